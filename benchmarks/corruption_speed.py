"""How long generating CIFAR-10-C takes: `--examples` images x 15 corruptions x 5 severities.

  python benchmarks/corruption_speed.py [--data_path=<unpacked cifar10-jpeg>] [--examples=1000] [--repeats=3]

With `--data_path`, the `--examples` test images an evaluation scores (`corruptions.select_examples`,
seed 0); without, CIFAR-sized uint8 noise (only JPEG's cost depends on the content). The first pass
over the 75 settings includes compiling, one program per corruption (its time, read from JAX's compile
events, is reported apart); then `--repeats` passes, with the median and spread per corruption and of
the total. No cache: this is the generation itself. Results go to
`<--output_dir>/corruption_speed_<device>.json`.
"""

import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from resnet_flax import data  # noqa: E402
from resnet_flax.robust import corruption_ops, corruptions  # noqa: E402
from resnet_flax.run import compile_log  # noqa: E402

flags.DEFINE_string('data_path', None, 'Unpacked CIFAR-10 image folder: corrupt its test images, not noise.')
flags.DEFINE_integer('examples', 1000, 'Images corrupted by each of the 75 settings.')
flags.DEFINE_integer('repeats', 3, 'Timed passes over the 75 settings after the first.')
FLAGS = flags.FLAGS


def test_images() -> np.ndarray:
  if not FLAGS.data_path:
    return common.random_split(FLAGS.examples).images
  data_config = default.get_config().data
  data_config.source, data_config.path = 'folder', FLAGS.data_path
  split = data.load_test_split(data_config)
  return split.images[corruptions.select_examples(split.labels, FLAGS.examples, seed=0)]


def corruption_seconds(images: np.ndarray) -> dict[str, float]:
  """Seconds per corruption for its 5 severities, on the host's copy of the result (as evaluation reads it)."""
  seconds = {}
  for name in corruption_ops.CORRUPTIONS:
    start = time.perf_counter()
    for severity in corruption_ops.SEVERITIES:
      corruption_ops.corrupt(images, name, severity)
    seconds[name] = time.perf_counter() - start
  return seconds


def main(_):
  logging.set_verbosity(logging.WARNING)
  common.apply_tiny({'examples': 8, 'repeats': 1, 'data_path': None})
  images = test_images()
  with compile_log.CompileLog() as compiling:
    first = corruption_seconds(images)
  passes = [corruption_seconds(images) for _ in range(FLAGS.repeats)]
  totals = [sum(p.values()) for p in passes]
  source = f'CIFAR-10 test images from {FLAGS.data_path}' if FLAGS.data_path else 'uint8 noise'
  print(f'device: {common.jax_device()}; {len(images)} images ({source}) x 75 settings, {FLAGS.repeats} repeats')
  results = {'corruptions': {}}
  for name in corruption_ops.CORRUPTIONS:
    values = [p[name] for p in passes]
    results['corruptions'][name] = {'first_pass_seconds': first[name], 'seconds': common.summarize(values)}
    print(f'{name:18s} 5 severities {common.describe(values, lambda v: f"{v:.2f} s")}; first {first[name]:.2f} s')
  results.update(
    total_seconds=common.summarize(totals),
    first_pass_seconds=sum(first.values()),
    compile_seconds=compiling.seconds,
    images_per_sec=common.summarize([75 * len(images) / t for t in totals]),
  )
  print(
    f'total: {common.describe(totals, lambda v: f"{v:.1f} s")} for {75 * len(images):,} images; first pass '
    f'{results["first_pass_seconds"]:.1f} s, of which compiling {compiling.seconds:.1f} s'
  )
  settings = {'examples': len(images), 'repeats': FLAGS.repeats, 'data_path': FLAGS.data_path, 'images': source}
  common.write_results('corruption_speed', common.jax_device(), settings, results)


if __name__ == '__main__':
  app.run(main)
