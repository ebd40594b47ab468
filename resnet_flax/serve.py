"""Serves a trained run over HTTP: an API, a web page, health probes and metrics (`resnet_flax.deploy.serving`).

  python -m resnet_flax.serve --workdir=runs/quick [--host=127.0.0.1] [--port=8000] [--backend=auto]
      [--max_batch=32] [--max_wait_ms=2] [--api_key=...] [--export_missing]

This module only parses the flags; docs/serving.md describes the server.
"""

from __future__ import annotations

import os

from absl import app, flags

from resnet_flax import cli
from resnet_flax.deploy.serving import backends, launch, server
from resnet_flax.deploy.serving.request_images import Limits

FLAGS = flags.FLAGS
API_KEY_VARIABLE = 'RESNET_FLAX_API_KEY'


def define_flags() -> None:
  """The command's flags: defined only when run as `python -m resnet_flax.serve`, not on importing this module."""
  defaults, limits = server.Settings(workdir=''), Limits()
  flags.DEFINE_string('workdir', None, 'The trained run to serve (its checkpoints, and export/ for the artifacts).')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind; another than loopback wants an --api_key.')
  flags.DEFINE_integer('port', 8000, 'Port to bind.', lower_bound=0)
  flags.DEFINE_enum(
    'backend', defaults.backend, ['auto', *backends.BACKENDS], 'Runtime; auto: the fastest float one here.'
  )
  flags.DEFINE_integer('max_batch', defaults.max_batch, 'Most images in one forward pass (a power of two).')
  flags.DEFINE_float('max_wait_ms', defaults.max_wait_ms, 'How long a batch waits for more images.')
  flags.DEFINE_string('api_key', None, f'Bearer key every /v1/* request must send (default: ${API_KEY_VARIABLE}).')
  flags.DEFINE_bool('export_missing', False, "Export the backend's missing artifacts first (--mode=export's work).")
  flags.DEFINE_integer('max_images', limits.max_images, 'Most images in one request.')
  flags.DEFINE_float('max_body_mb', limits.max_body_bytes / 2**20, 'Largest request body, in MiB.')
  flags.DEFINE_integer('max_pixels', limits.max_pixels, 'Most pixels of one image (read from its header).')
  flags.DEFINE_bool('access_log', True, "uvicorn's line per request.")
  flags.DEFINE_string(
    'compilation_cache_dir', os.path.expanduser('~/.cache/resnet_flax/jax'), 'Persistent XLA compilation cache.'
  )
  flags.mark_flag_as_required('workdir')


def settings() -> server.Settings:
  return server.Settings(
    workdir=FLAGS.workdir,
    backend=FLAGS.backend,
    max_batch=FLAGS.max_batch,
    max_wait_ms=FLAGS.max_wait_ms,
    api_key=(FLAGS.api_key or os.environ.get(API_KEY_VARIABLE) or '').strip() or None,  # A secret file's newline.
    limits=Limits(int(FLAGS.max_body_mb * 2**20), FLAGS.max_images, FLAGS.max_pixels),
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  serve = lambda: launch.serve(settings(), FLAGS.host, FLAGS.port, FLAGS.export_missing, FLAGS.access_log)
  cli.run(serve, FLAGS.compilation_cache_dir, coordinator_address=None, num_processes=None, process_id=None)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
