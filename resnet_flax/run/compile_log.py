"""What a block of code spent compiling, per jitted function, from `jax.monitoring`'s events.

JAX reports each XLA compilation (or persistent-cache load) as a '/jax/core/compile/backend_compile_duration'
duration with the function's name, and a persistent-cache hit as a '/jax/compilation_cache/cache_hits' event
just before it; tracing and lowering are time spans of the same '/jax/core/compile/' family. `CompileLog`
listens while it is entered: the training driver logs what a run compiled (so a user sees the cost, and
whether `--compilation_cache_dir` served it), the benchmarks and tests count compilations with it.
Hand-written: JAX has the events but nothing that collects them per function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

COMPILE_EVENTS = '/jax/core/compile/'  # Tracing, lowering and XLA compilation spans.
BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'  # One per program compiled or loaded from cache.
CACHE_HIT = '/jax/compilation_cache/cache_hits'  # The persistent cache served the next backend compile.


@dataclasses.dataclass(frozen=True)
class Compilation:
  """One program XLA compiled, or the persistent cache served (`cache_hit`)."""

  fun_name: str  # The jitted function's name, e.g. 'train_stack'.
  seconds: float
  cache_hit: bool


class CompileLog:
  """Records, while entered, every compilation (`compilations`) and the wall time spent compiling
  (`seconds`: tracing, lowering and XLA, overlapping spans counted once)."""

  def __init__(self):
    self.compilations: list[Compilation] = []
    self._spans: list[tuple[float, float]] = []
    self._hit_pending = False

  def _on_event(self, event: str, **_: Any) -> None:
    if event == CACHE_HIT:
      self._hit_pending = True

  def _on_duration(self, event: str, seconds: float, fun_name: str = '?', **_: Any) -> None:
    if event == BACKEND_COMPILE:
      self.compilations.append(Compilation(fun_name, seconds, self._hit_pending))
      self._hit_pending = False

  def _on_span(self, event: str, start: float, end: float, **_: Any) -> None:
    if event.startswith(COMPILE_EVENTS):
      self._spans.append((start, end))

  def __enter__(self) -> CompileLog:
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_time_span_listener(self._on_span)
    return self

  def __exit__(self, *_: Any) -> None:
    jax.monitoring.unregister_event_listener(self._on_event)
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_time_span_listener(self._on_span)

  @property
  def seconds(self) -> float:
    total, covered_until = 0.0, float('-inf')
    for start, end in sorted(self._spans):
      total += max(0.0, end - max(start, covered_until))
      covered_until = max(covered_until, end)
    return total

  def of(self, fun_name: str) -> list[Compilation]:
    """The compilations of the function `fun_name` ('train_stack'; JAX names its program 'jit(train_stack)')."""
    return [c for c in self.compilations if c.fun_name in (fun_name, f'jit({fun_name})')]

  def summary(self) -> str:
    """One line: the programs compiled, the slowest first, and which the persistent cache served."""
    ranked = sorted(self.compilations, key=lambda c: -c.seconds)
    parts = [f'{c.fun_name} {c.seconds:.1f} s{" (persistent cache)" if c.cache_hit else ""}' for c in ranked[:4]]
    more = f' and {len(ranked) - 4} more' if len(ranked) > 4 else ''
    return f'{len(ranked)} programs, {self.seconds:.1f} s compiling: {", ".join(parts)}{more}'
