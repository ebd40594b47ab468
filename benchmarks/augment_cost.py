"""What each augmentation option costs the train step, and short real-data runs with each.

  python benchmarks/augment_cost.py [--model=resnet_tiny] [--batch_size=256] [--steps=10] [--repeats=3]
  python benchmarks/augment_cost.py --data_path=<unpacked cifar10-jpeg> --train_epochs=0.05

1. Seconds per train step (augmentation inside, as in training) for every option in `OPTIONS`,
   against crop + flip, on the same model, batch and device: median over `--repeats`.
2. With `--data_path`: a short `main.py` run on the real images with each option (the
   `configs/quick.py` recipe for `--train_epochs`), reporting the final train loss and test accuracy:
   proof that every option trains, not a measure of how well.
"""

import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

from absl import app, flags, logging  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import quick  # noqa: E402
from resnet_flax.run import writers  # noqa: E402
from resnet_flax.train import trainer

flags.DEFINE_string('model', 'resnet_tiny', 'Model preset.')
flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
flags.DEFINE_integer('steps', 10, 'Timed steps per measurement.')
flags.DEFINE_integer('repeats', 3, 'Measurements per option.')
flags.DEFINE_string('data_path', None, 'Unpacked CIFAR-10 image folder: also train briefly with each option.')
flags.DEFINE_float('train_epochs', 0.05, 'Epochs of each real-data run.')
FLAGS = flags.FLAGS

BASELINE = 'crop+flip'
OPTIONS = {  # name: (train_ops, mixup_alpha, cutmix_alpha)
  BASELINE: (('crop', 'flip'), 0.0, 0.0),
  'cutout': (('crop', 'flip', 'cutout'), 0.0, 0.0),
  'autoaugment': (('crop', 'flip', 'autoaugment'), 0.0, 0.0),
  'randaugment': (('crop', 'flip', 'randaugment'), 0.0, 0.0),
  'trivialaugment': (('crop', 'flip', 'trivialaugment'), 0.0, 0.0),
  'trivialaugment+cutout+mixup/cutmix': (('crop', 'flip', 'trivialaugment', 'cutout'), 0.2, 1.0),
}
HEAVIEST = 'trivialaugment+cutout+mixup/cutmix'


def config_for(option: str):
  config = quick.get_config()
  config.model.name = FLAGS.model
  config.batch_size = FLAGS.batch_size
  config.augment.train_ops, config.augment.mixup_alpha, config.augment.cutmix_alpha = OPTIONS[option]
  return config


def step_seconds(option: str, split) -> list[float]:
  jax_trainer = common.create_jax_trainer(config_for(option), split)
  batch = jax_trainer.device_batch(split)
  jax_trainer.run_on(batch, 1)  # Compiles.
  return [s / FLAGS.steps for s in common.time_calls(lambda: jax_trainer.run_on(batch, FLAGS.steps), FLAGS.repeats)]


def short_real_run(option: str) -> dict[str, float]:
  config = config_for(option)
  config.data.source, config.data.path = 'folder', FLAGS.data_path
  config.num_epochs, config.eval_every_epochs, config.log_every_steps = FLAGS.train_epochs, 100.0, 5
  with tempfile.TemporaryDirectory() as workdir:
    metrics = trainer.train_and_evaluate(config, workdir)
    losses = writers.read_scalars(workdir)['train_loss']
  return {'first_train_loss': losses[0][1], 'last_train_loss': losses[-1][1], 'test_accuracy': metrics['accuracy']}


def main(_):
  logging.set_verbosity(logging.WARNING)
  common.apply_tiny({'model': 'resnet_tiny', 'batch_size': 8, 'steps': 1, 'repeats': 1, 'data_path': None})
  split = common.random_split(4 * FLAGS.batch_size)
  options = (BASELINE, HEAVIEST) if FLAGS.tiny else tuple(OPTIONS)  # --tiny: only the extremes.
  seconds = {option: step_seconds(option, split) for option in options}
  baseline = common.summarize(seconds[BASELINE])['median']
  results = {}
  print(f'device: {common.jax_device()}; model {FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.repeats} repeats')
  for option, values in seconds.items():
    slowdown = common.summarize(values)['median'] / baseline - 1
    results[option] = {'step_seconds': common.summarize(values), 'slowdown_vs_crop_flip': slowdown}
    print(
      f'{option:36s} step {common.describe([1e3 * v for v in values], lambda v: f"{v:.1f} ms")}  '
      f'{slowdown:+.1%} vs {BASELINE}'
    )
  if FLAGS.data_path:
    for option in options:
      results[option]['real_data_run'] = run = short_real_run(option)
      print(
        f'{option:36s} {FLAGS.train_epochs} epochs on CIFAR-10 (JPEG q75): train loss '
        f'{run["first_train_loss"]:.3f} -> {run["last_train_loss"]:.3f}, test accuracy {run["test_accuracy"]:.3f}'
      )
  settings = {
    'model': FLAGS.model,
    'batch_size': FLAGS.batch_size,
    'steps': FLAGS.steps,
    'repeats': FLAGS.repeats,
    'data_path': FLAGS.data_path,
    'train_epochs': FLAGS.train_epochs,
  }
  common.write_results('augment_cost', common.jax_device(), settings, results)


if __name__ == '__main__':
  app.run(main)
