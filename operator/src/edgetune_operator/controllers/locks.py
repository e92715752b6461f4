"""One lock per object: reconciles of the same object never overlap, different objects run in
parallel (both controllers are called from kopf's handlers and from their resync loops)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class PerObjectLocks:
    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(uid, threading.Lock())
        with lock:
            yield

    def forget(self, uid: str) -> None:
        with self._guard:
            self._locks.pop(uid, None)
