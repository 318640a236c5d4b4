"""A background thread that prepares the next batches while the device trains on this one.

:class:`BatchIterator` calls ``make_batch(step)`` for each step in order, ``prefetch`` ahead,
in a daemon thread; :func:`jaxdiff.data.batch_iterator` builds one over a dataset.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["BatchIterator"]


class BatchIterator(Iterator[tuple[int, dict[str, np.ndarray]]]):
    """Yields ``(step, batch)`` while a daemon thread prepares the next ``prefetch``.

    Use as a context manager (or call :meth:`close`) to stop the thread. An error raised
    while making a batch is re-raised by ``next``.
    """

    _END = object()

    def __init__(
        self,
        make_batch: Callable[[int], dict[str, np.ndarray]],
        steps: Iterator[int],
        prefetch: int = 2,
    ):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self._make_batch = make_batch
        self._steps = steps
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="jaxdiff-data", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Blocks until ``item`` is queued (True) or the iterator is closed (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        try:
            for step in self._steps:
                if not self._put((step, self._make_batch(step))):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the consumer, re-raised by next()
            self._put(error)

    def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END or isinstance(item, BaseException):
            self.close()
            if item is self._END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        """Stops and joins the background thread; further ``next`` calls stop."""
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
