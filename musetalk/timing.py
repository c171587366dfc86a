"""Wall-clock time per pipeline stage, summed over a job."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StageTimer:
    """Adds up seconds per named stage, from any thread (stages that overlap each add their own
    time, so the sum can exceed the wall time). ``sync`` (a CUDA synchronize on a GPU) runs at both
    ends of the stages that queue work on the model's device, so that asynchronous work is charged
    to the stage that queued it. Other stages never call it: a synchronize waits for all the
    device's work, and a CPU thread (face analysis, crops, blending) would stall on the model's."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync or _no_sync
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str, device: bool = False) -> Iterator[None]:
        """Time the block as ``name``; ``device``: it queues work on the model's device."""
        sync = self._sync if device else _no_sync
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[name] += elapsed

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}


def _no_sync() -> None:
    pass
