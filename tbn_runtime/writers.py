"""Background writes with a bounded number in flight: the stream driver's mask files (a pool of
threads) and overlay frames (one thread, in order)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional


class Writers:
    """`pool` writes mask files in parallel; `ordered` (one thread) appends overlay frames in
    order. `submit` blocks while `max_pending` writes are queued, so a slow disk slows the stream
    instead of filling memory. The first error of any write is raised by `check()`."""

    def __init__(self, workers: int = 2, max_pending: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tbn-write")
        self.ordered = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tbn-overlay")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._idle = threading.Condition()
        self.pending = 0
        self.max_pending_seen = 0
        self.seconds = 0.0
        self.error: Optional[BaseException] = None

    def submit(self, fn: Callable[..., Any], *args: Any, ordered: bool = False) -> None:
        self.check()
        self._slots.acquire()
        with self._idle:
            self.pending += 1
            self.max_pending_seen = max(self.max_pending_seen, self.pending)

        def task() -> None:
            t0 = time.perf_counter()
            try:
                fn(*args)
            except BaseException as e:  # reported on the main thread by check()
                with self._idle:
                    if self.error is None:
                        self.error = e
            finally:
                with self._idle:
                    self.pending -= 1
                    self.seconds += time.perf_counter() - t0
                    self._idle.notify_all()
                self._slots.release()
        (self.ordered if ordered else self.pool).submit(task)

    def drain(self) -> None:
        """Wait until every submitted write has finished, then raise the first error."""
        with self._idle:
            self._idle.wait_for(lambda: self.pending == 0)
        self.check()

    def check(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def close(self) -> None:
        """Wait for every write, then raise the first error (if any)."""
        self.pool.shutdown(wait=True)
        self.ordered.shutdown(wait=True)
        self.check()
