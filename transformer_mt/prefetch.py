"""Training batches assembled on a background thread, ahead of the step that needs them.

Building a batch (reading a few hundred pairs from the token store, planning the next
epoch) runs while the device computes the current step, so the step waits on the host only when
the queue runs dry. Each batch travels with the stream position after it, so a checkpoint
records the position of the batches actually trained on, not of those merely prefetched.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

_DONE = object()


class Prefetcher:
    """Iterates (batch, position after it) from `stream` with up to `depth` batches ready."""

    def __init__(self, stream, depth: int = 4, prepare: Callable = lambda batch: batch):
        self.stream, self.prepare = stream, prepare
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.position = dict(stream.position)  # of the next batch handed out
        self.wait_seconds = 0.0  # time the consumer spent blocked on an empty queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.prepare(next(self.stream))
                item = (batch, dict(self.stream.position))
                while not self._stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            self.queue.put((_DONE, e))

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch, position = self.queue.get()
        self.wait_seconds += time.perf_counter() - start
        if batch is _DONE:
            raise position
        self.position = position
        return batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
