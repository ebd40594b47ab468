"""Serving on an address: checks, the model's preparation, uvicorn, and a graceful exit on SIGTERM.

Before anything listens: the settings, a loud warning when the address is reachable from other machines
and no key protects it, and the backend's artifacts (missing ones named, or exported with
`export_missing`) — so that a mistake is one line at once, not a server that never gets ready. uvicorn
then owns SIGINT and SIGTERM: it stops accepting connections, lets the requests under way finish (for
up to `GRACE_SECONDS`), stops the batcher, and re-raises the signal, which `_exited_gracefully`
receives, so the process exits 0.
"""

from __future__ import annotations

import functools
import ipaddress
import signal

import uvicorn
from absl import logging

from resnet_flax.deploy import api
from resnet_flax.deploy.serving import backends, batching, server
from resnet_flax.errors import ConfigError, UserError

GRACE_SECONDS = 25  # Within the 30 s Kubernetes waits between SIGTERM and SIGKILL.


def check_settings(settings: server.Settings) -> None:
  if not 1 <= settings.max_batch <= api.MAX_BATCH or batching.padded_size(settings.max_batch) != settings.max_batch:
    raise ConfigError(f'--max_batch={settings.max_batch}: choose a power of two from 1 to {api.MAX_BATCH}')
  if settings.max_wait_ms < 0:
    raise ConfigError(f'--max_wait_ms={settings.max_wait_ms}: choose 0 (no waiting) or more')
  key = settings.api_key
  if key is not None and not (key.isascii() and key.isprintable() and ' ' not in key):
    raise ConfigError('the API key must be printable ASCII without spaces: an HTTP header could not carry it')
  limits = settings.limits
  if min(limits.max_body_bytes, limits.max_images, limits.max_pixels) < 1:
    raise ConfigError('--max_body_mb, --max_images and --max_pixels must be positive')


def is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # A host name: it may resolve to anything.
    return False


def warn_if_exposed(host: str, api_key: str | None) -> None:
  if api_key is None and not is_loopback(host):
    logging.warning(
      '!!! SERVING ON %s WITHOUT AN API KEY: anyone who can reach this port can use the model. '
      'Set --api_key or RESNET_FLAX_API_KEY, or bind to 127.0.0.1. !!!',
      host,
    )


def _exited_gracefully(signum: int, frame) -> None:
  logging.info('Stopped by signal %d after the requests under way were answered', signum)


def serve(settings: server.Settings, host: str, port: int, export_missing: bool, access_log: bool = True) -> None:
  """Serves `settings.workdir` on host:port until SIGTERM or SIGINT; a UserError where it cannot."""
  check_settings(settings)
  warn_if_exposed(host, settings.api_key)
  candidates = backends.prepare(settings.workdir, settings.backend, export_missing)
  load = functools.partial(backends.load, settings.workdir, settings.backend, candidates, settings.max_batch)

  def stop() -> None:
    uvicorn_server.should_exit = True

  app = server.create_app(settings, load, on_failure=stop)
  config = uvicorn.Config(
    app, host=host, port=port, timeout_graceful_shutdown=GRACE_SECONDS, access_log=access_log, log_level='info'
  )
  uvicorn_server = uvicorn.Server(config)
  signal.signal(signal.SIGTERM, _exited_gracefully)  # uvicorn re-raises SIGTERM once it has drained.
  uvicorn_server.run()
  failure = app.state.serving.failure
  if failure is not None:
    raise UserError(f'the model failed to load: {failure}')
