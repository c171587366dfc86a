"""Wall-clock time per pipeline stage, summed over a job."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StageTimer:
    """Adds up seconds per named stage, from any thread (stages that overlap each add their own
    time, so the sum can exceed the wall time). ``sync`` runs before each reading (a CUDA
    synchronize on a GPU) so asynchronous device work is charged to the stage that queued it."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync or (lambda: None)
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[name] += elapsed

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}
