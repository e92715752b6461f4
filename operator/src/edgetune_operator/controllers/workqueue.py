"""A de-duplicating work queue with delayed retries, drained by a fixed set of threads.

Watch events arrive in bursts (a trainer Job and its pod change together; a resync finds hundreds
of jobs due). Queuing the *object* rather than the event means a burst costs one reconcile per
object: a key already waiting is not queued twice, and a key that changes while it is being worked
on is queued once more after. Work never waits behind a thread stuck on another object for long:
each key is processed by one thread at a time, and keys are served in arrival order — except that
keys put with ``first=True`` (objects seen for the first time: a job nobody has started yet) are
served before every other waiting key, in their own arrival order. A burst of new jobs then gets
its trainers started while finished ones wait to be verified and registered (seconds each against
S3 and MLflow), not behind them.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from edgetune_operator import metrics

log = logging.getLogger("edgetune.queue")


class WorkQueue:
    def __init__(self, work: Callable[[Hashable], None], threads: int, name: str = "reconcile") -> None:
        self._work = work
        self._cond = threading.Condition()
        self._ready: deque[Hashable] = deque()
        self._first: deque[Hashable] = deque()
        """Keys served before those in ``_ready``."""
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._again: set[Hashable] = set()
        self._later: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}
        """Earliest time each delayed key is due (older, later heap entries are stale)."""
        self._seq = 0
        self._stopped = False
        self._threads = [threading.Thread(target=self._drain, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def put(self, key: Hashable, *, first: bool = False) -> None:
        with self._cond:
            self._put(key, first=first)

    def put_after(self, key: Hashable, seconds: float) -> None:
        """Queue ``key`` once ``seconds`` have passed (a retry with backoff, or a batch of changes
        collected for a moment); a key already due sooner is left as it is."""
        due = time.monotonic() + seconds
        with self._cond:
            if self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._later, (due, self._seq, key))
            self._cond.notify()

    def _put(self, key: Hashable, *, first: bool = False) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            (self._first if first else self._ready).append(key)
            metrics.QUEUE_DEPTH.set(len(self._ready) + len(self._first))
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._first) + len(self._active)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _next(self) -> Hashable | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    due, _, key = heapq.heappop(self._later)
                    if self._due.get(key) == due:
                        del self._due[key]
                        self._put(key)
                if self._first or self._ready:
                    key = (self._first or self._ready).popleft()
                    self._queued.discard(key)
                    self._active.add(key)
                    metrics.QUEUE_DEPTH.set(len(self._ready) + len(self._first))
                    return key
                self._cond.wait(self._later[0][0] - now if self._later else None)
            return None

    def _drain(self) -> None:
        while (key := self._next()) is not None:
            try:
                self._work(key)
            except Exception:
                log.exception("work on %s failed", key)
            finally:
                with self._cond:
                    self._active.discard(key)
                    if key in self._again:
                        self._again.discard(key)
                        self._put(key)
