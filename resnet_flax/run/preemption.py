"""SIGTERM / SIGINT: finish the step in flight, save a checkpoint at it, exit 0.

Schedulers preempt with SIGTERM and people stop runs with Ctrl-C. The first signal only sets a
flag that the loop reads between steps, so the checkpoint is taken at a step boundary; a second
SIGINT exits at once (the last complete checkpoint stays intact: Orbax writes to a temporary
directory and renames it only when complete). `CheckpointManager.reached_preemption` is no help
in a single process, hence this.
"""

import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[str] = []  # The stop signals of the latest training loop, in order.


def received_signal() -> str | None:
  """The signal that stopped the latest training loop of this process, if any (a sweep then queues the
  trial again and takes no new one)."""
  return _received[0] if _received else None


class StopRequest:
  """Context manager: records the first stop signal; a second SIGINT ends the process now."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self):
    _received.clear()
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None and signum == signal.SIGINT:
      logging.warning('Second SIGINT: exiting now, without saving. The last complete checkpoint is intact.')
      os._exit(128 + signum)
    self.signal_name = name
    _received.append(name)
    logging.warning('%s received: finishing the current step, then saving a checkpoint and exiting.', name)

  def requested(self) -> bool:
    """True once any process got a signal. With several processes, all agree (one small all-gather)."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))
