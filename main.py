"""Trains, evaluates or predicts with a compact image classifier.

  python main.py --config=configs/resnet34.py --workdir=runs/r34 [--config.field=value ...]
  python main.py --config=configs/resnet34.py --workdir=runs/r34 --mode=evaluate [--config.eval.tta=flip]
  python main.py --config=configs/resnet34.py --workdir=runs/r34 --mode=predict --predict_paths=a.png,dir/
  python main.py --config=configs/resnet34.py --workdir=runs/r34 --mode=export [--export_formats=tflite,onnx]
  python main.py --config=configs/resnet34.py --workdir=runs/r34 --mode=explain [--predict_paths=a.png,dir/]
  python main.py --config=configs/resnet34.py --workdir=runs/r34 --mode=lr_find [--lr_find_steps=300]

Running the same command again resumes from the checkpoints in the workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from resnet_flax import cli, evaluate
from resnet_flax.deploy import export, formats, predict
from resnet_flax.explain import command as explain_command
from resnet_flax.train import lr_find, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and reports.')
flags.DEFINE_enum(
  'mode', 'train', ['train', 'evaluate', 'predict', 'export', 'explain', 'lr_find'], 'What to do with the workdir.'
)
flags.DEFINE_list('predict_paths', [], '--mode=predict|explain: image files and folders, comma-separated.')
flags.DEFINE_integer('top_k', 5, '--mode=predict: how many classes to show per image.', lower_bound=1)
flags.DEFINE_string('predict_output', None, '--mode=predict: JSON output (default <workdir>/predictions.json).')
flags.DEFINE_list('export_formats', [], f'--mode=export: of {",".join(formats.FORMATS)} (default: all installed).')
flags.DEFINE_integer('export_test_images', None, '--mode=export: test images to score (default all).', lower_bound=0)
flags.DEFINE_integer(
  'explain_per_class', 2, '--mode=explain without --predict_paths: test images per class to explain.', lower_bound=1
)
flags.DEFINE_integer(
  'explain_steps', None, '--mode=explain: integrated gradients steps (default: adaptive).', lower_bound=1
)
flags.DEFINE_integer(
  'lr_find_steps', lr_find.DEFAULT_STEPS, '--mode=lr_find: steps of the learning-rate range test.', lower_bound=2
)
flags.DEFINE_float('lr_find_min', None, '--mode=lr_find: first learning rate (default: the config rate / 1000).')
flags.DEFINE_float('lr_find_max', None, '--mode=lr_find: last learning rate (default: the config rate x 100).')
cli.define_job_flags()
flags.adopt_module_key_flags(cli)  # `--help` lists them with the modes' flags.
flags.mark_flags_as_required(['config', 'workdir'])

MODES = {
  'train': lambda: trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir),
  'evaluate': lambda: evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.workdir),
  'predict': lambda: predict.run_predict(
    FLAGS.config, FLAGS.workdir, FLAGS.predict_paths, FLAGS.top_k, FLAGS.predict_output
  ),
  'export': lambda: export.run_export(FLAGS.config, FLAGS.workdir, FLAGS.export_formats, FLAGS.export_test_images),
  'explain': lambda: explain_command.run_explain(
    FLAGS.config, FLAGS.workdir, FLAGS.predict_paths, FLAGS.explain_per_class, FLAGS.explain_steps
  ),
  'lr_find': lambda: lr_find.run_lr_find(
    FLAGS.config, FLAGS.workdir, FLAGS.lr_find_steps, FLAGS.lr_find_min, FLAGS.lr_find_max
  ),
}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.run(MODES[FLAGS.mode], **cli.job_settings())


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
