"""Running pipeline stages side by side: a producer thread ahead of the consumer, and a worker
thread behind it, each joined by a bounded queue so memory stays flat and a slow stage only
makes the others wait. Errors cross to the caller's thread; closing stops the thread.

A stop request (``musetalk.stopping``: a signal to the command) is checked by every thread here
between items and while the caller waits, so a stopped job unwinds within a fraction of a second;
closing and aborting never check: they are the clean-up and must run to the end."""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from musetalk import stopping

DONE = object()
_POLL_S = 0.1  # how often a blocked thread looks whether it was told to stop
# Threads for each per-frame CPU step (face analysis; crops and blending) at most: at 4, a 720p job's
# face analysis runs at about 300 frames/s, beyond the model on a GPU.
MAX_CPU_WORKERS = 4


class Prefetch(Iterator):
    """Iterate ``iterable`` in a background thread, up to ``maxsize`` items ahead."""

    def __init__(self, iterable: Iterable, maxsize: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(iterable,), name=name, daemon=True)
        self._thread.start()

    def _produce(self, iterable: Iterable) -> None:
        iterator = iter(iterable)
        try:
            for item in iterator:
                stopping.check()
                if not put_unless_stopped(self._queue, item, self._stop):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._error = error
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator must be closed by the thread that ran it
            put_unless_stopped(self._queue, DONE, self._stop)

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item = get_checking_stops(self._queue)
        if item is DONE:
            self._finished = True
            self._thread.join()
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (it closes its iterable) and wait for it."""
        self._stop.set()
        drain(self._queue)
        self._thread.join()
        self._finished = True

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Worker:
    """Run ``handle(item)`` for each item put, in a background thread, in order."""

    def __init__(self, handle: Callable[[Any], None], maxsize: int, name: str):
        self._handle = handle
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._consume, name=name, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while True:
            item = self._queue.get()
            if item is DONE:
                return
            try:
                stopping.check()
                self._handle(item)
            except BaseException as error:
                self._error = error
                self._stop.set()
                drain(self._queue)
                return

    def put(self, item: Any) -> None:
        """Queue an item; raises the worker's error as soon as one happened."""
        self._raise_if_failed()
        if not put_unless_stopped(self._queue, item, self._stop, poll_stops=True):
            self._raise_if_failed()

    def finish(self) -> None:
        """Wait until every queued item is handled; raise the worker's error if it failed."""
        put_unless_stopped(self._queue, DONE, self._stop, poll_stops=True)  # False: it failed, raised below
        stopping.wait_for(thread=self._thread)
        self._raise_if_failed()

    def abort(self) -> None:
        """Drop what is queued and stop."""
        self._stop.set()
        drain(self._queue)
        put_unless_stopped(self._queue, DONE, threading.Event())
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def put_unless_stopped(target: queue.Queue, item: Any, stop: threading.Event, poll_stops: bool = False) -> bool:
    """Put unless told to stop; True when the item went in. ``poll_stops``: raise ``Stopped`` when a
    stop of the job is requested meanwhile (never in clean-up code, which must finish)."""
    while not stop.is_set():
        try:
            target.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            if poll_stops:
                stopping.check()
            continue
    return False


def get_checking_stops(source: queue.Queue) -> Any:
    """``source.get()``, raising ``Stopped`` when a stop of the job is requested while it waits."""
    while True:
        try:
            return source.get(timeout=_POLL_S)
        except queue.Empty:
            stopping.check()


def drain(source: queue.Queue) -> None:
    while True:
        try:
            source.get_nowait()
        except queue.Empty:
            return


class BackgroundCall:
    """``function(*args)`` started in a thread now (or run at once when not ``threaded``);
    ``result()`` waits and returns or raises."""

    def __init__(self, function: Callable, *args: Any, threaded: bool = True):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function, args), name=function.__name__,
                                        daemon=True)
        if threaded:
            self._thread.start()
        else:
            self._run(function, args)

    def _run(self, function: Callable, args: tuple) -> None:
        try:
            self._value = function(*args)
        except BaseException as error:
            self._error = error

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the call to end (at most ``timeout`` seconds); its result or error stays for ``result()``."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def result(self) -> Any:
        if self._thread.is_alive():
            stopping.wait_for(thread=self._thread)
        if self._error is not None:
            raise self._error
        return self._value


class Inline:
    """The same interfaces with no thread: items are produced and handled on the caller's
    thread, one at a time (for debugging, and to check that overlap changes no output)."""

    def __init__(self, iterable: Iterable | None = None, handle: Callable[[Any], None] | None = None):
        self._iterator = iter(iterable) if iterable is not None else None
        self._handle = handle

    def __iter__(self) -> Inline:
        return self

    def __next__(self) -> Any:
        return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def put(self, item: Any) -> None:
        self._handle(item)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


def prefetch(iterable: Iterable, maxsize: int, name: str, threaded: bool = True) -> Prefetch | Inline:
    return Prefetch(iterable, maxsize, name) if threaded else Inline(iterable=iterable)


def worker(handle: Callable[[Any], None], maxsize: int, name: str, threaded: bool = True) -> Worker | Inline:
    return Worker(handle, maxsize, name) if threaded else Inline(handle=handle)


def cpu_workers() -> int:
    """Threads for a per-frame CPU step: one per two CPU cores this process may use, up to
    ``MAX_CPU_WORKERS`` (MediaPipe and OpenCV release the GIL while they run; the other cores decode,
    run the model's host side and encode)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_CPU_WORKERS, cores // 2))


@contextmanager
def thread_pool(workers: int, name: str) -> Iterator[Executor | None]:
    """A pool of ``workers`` threads, shut down on leaving (queued calls dropped, running ones waited
    for); None for one worker: the caller's thread does the work."""
    if workers <= 1:
        yield None
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(function: Callable, iterable: Iterable, pool: Executor | None, ahead: int) -> Iterator:
    """``map(function, iterable)`` with the calls run on ``pool`` (None: here, one at a time), the
    results in order; at most ``ahead + 1`` calls are submitted before the oldest is waited for."""
    if pool is None:
        yield from map(function, iterable)
        return
    in_flight: collections.deque = collections.deque()
    try:
        for item in iterable:
            if len(in_flight) > ahead:
                yield in_flight.popleft().result()
            in_flight.append(pool.submit(function, item))
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        for future in in_flight:
            future.cancel()
