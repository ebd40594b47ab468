"""Dynamic batching: the images of concurrent requests share one forward pass, computed off the event loop.

One asyncio task gathers the queued images: it takes the first, then more as they come, until it holds
`max_batch`, for up to `max_wait_ms` but only while other requests are still being read and decoded
(`expecting`): a lone request never waits, and under load the batches fill. The batch is padded with black images to the next power of
two, so a backend sees at most log2(max_batch) + 1 shapes, all compiled and warmed at start-up
(`backends.warm`). The forward pass runs in one worker thread: the event loop keeps accepting and
parsing requests meanwhile, and the images that arrive during a pass form the next batch. One thread,
because LiteRT's interpreter takes one caller at a time and ONNX Runtime and XLA spread one call over
the cores themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float32 probabilities [N, classes].


def padded_size(count: int) -> int:
  """The smallest power of two that holds `count` images."""
  return 1 << max(count - 1, 0).bit_length()


def batch_sizes(max_batch: int) -> list[int]:
  """Every padded batch size the batcher can send: 1, 2, 4, ... max_batch (a power of two)."""
  return [1 << i for i in range(max_batch.bit_length())]


class Batcher:
  """Runs `predict` on batches of the images given to `predict` by concurrent callers (see the module
  docstring). `observe(n)` is told the number of real images of each forward pass."""

  def __init__(self, predict: Predict, max_batch: int, max_wait_ms: float, observe: Callable[[int], None]):
    if max_batch < 1 or padded_size(max_batch) != max_batch:
      raise ValueError(f'max_batch must be a power of two, got {max_batch}')
    self._predict, self._max_batch, self._max_wait_s, self._observe = predict, max_batch, max_wait_ms / 1000, observe
    self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='forward')
    self._arriving = 0  # Requests being read and decoded, whose images a batch may wait for.
    self._task = asyncio.get_running_loop().create_task(self._run())

  @contextlib.contextmanager
  def expecting(self) -> Iterator[None]:
    """Around the reading and decoding of a request whose images `predict` will get: a batch waits for them."""
    self._arriving += 1
    try:
      yield
    finally:
      self._arriving -= 1

  async def predict(self, pixels: np.ndarray) -> np.ndarray:
    """Probabilities [N, classes] of uint8 `pixels` [N, H, W, 3], computed with whatever else is queued."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in pixels]
    for image, future in zip(pixels, futures, strict=True):
      self._queue.put_nowait((image, future))
    return np.stack(await asyncio.gather(*futures))

  async def close(self) -> None:
    """Stops gathering; the pass under way finishes first."""
    self._task.cancel()
    await asyncio.gather(self._task, return_exceptions=True)
    self._executor.shutdown(wait=True)

  async def _run(self) -> None:
    while True:
      batch = await self._gather()
      await self._forward(batch)

  async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future]]:
    """The first queued image, then those queued or coming within the wait, up to max_batch."""
    batch = [await self._queue.get()]
    deadline = asyncio.get_running_loop().time() + self._max_wait_s
    while len(batch) < self._max_batch:
      if not self._queue.empty():
        batch.append(self._queue.get_nowait())
        continue
      left = deadline - asyncio.get_running_loop().time()
      if left <= 0 or not self._arriving:
        break
      try:
        batch.append(await asyncio.wait_for(self._queue.get(), left))
      except asyncio.TimeoutError:  # Not the builtin TimeoutError before Python 3.11.
        break
    return batch

  async def _forward(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
    pixels = np.stack([image for image, _ in batch])
    padding = np.zeros((padded_size(len(batch)) - len(batch), *pixels.shape[1:]), pixels.dtype)
    self._observe(len(batch))
    try:
      probabilities = await asyncio.get_running_loop().run_in_executor(
        self._executor, self._predict, np.concatenate([pixels, padding])
      )
    except Exception as e:  # The callers of this batch get the error; the next batch is tried afresh.
      for _, future in batch:
        if not future.done():
          future.set_exception(e)
      return
    for (_, future), row in zip(batch, probabilities, strict=False):
      if not future.done():  # A caller that went away (the client disconnected) is skipped.
        future.set_result(row)
