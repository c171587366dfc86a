"""Stopping a job on a signal (Ctrl-C, ``kill``, a closed terminal) without raising inside arbitrary code.

An exception raised by a signal handler lands wherever the main thread is at that moment: inside
tqdm while it holds its write lock (the process then hung for good in tqdm's ``__del__``), inside
another library's clean-up, or inside our own clean-up of the first signal. So the command's handler
(``stop_on_signals``) first records the request, and raises ``Stopped`` at once only where that is
known to be safe. Three kinds of code:

- by default (no region entered) the handler raises at once, as Python's own Ctrl-C does: commands
  that never enter a region behave as before;
- in a ``deferred()`` region (a dubbing job, speech synthesis) it only records the request; the job
  notices it at the points where unwinding is safe: ``check()`` between frames, batches, sentences,
  and in every wait on a thread, a queue or ffmpeg (they poll), and stops there;
- in an ``interruptible()`` region inside a deferred one (a model's forward pass, seconds per batch on
  a CPU) it raises at once again; a ``shielded()`` region (progress bars, the command's own output)
  defers it to the region's end.

Worker threads call ``check()`` too: a stopped job's threads end on their own and the main thread,
unwinding, joins them, so no native thread is still running when the interpreter exits. A second
signal while a job stops is only recorded: it cannot cut the clean-up of the first one short.
Nothing here does anything until ``stop_on_signals`` is entered (the command line does; the app and
library users are not affected).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_requested = threading.Event()
_signal_number: int | None = None
# What the handler does on the main thread: "raise" or "defer", innermost region last.
_modes: list[str] = []


class Stopped(KeyboardInterrupt):
    """A job stopped by a signal. A KeyboardInterrupt, so whatever unwinds on Ctrl-C unwinds on it."""

    def __init__(self, signal_number: int | None):
        self.signal_number = signal_number
        super().__init__(f"stopped by {signal_name(signal_number)}")


def signal_name(signal_number: int | None) -> str:
    if signal_number is None:
        return "a stop request"
    try:
        return signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"


def requested() -> bool:
    """Whether a stop was asked for (by a signal, or ``request``)."""
    return _requested.is_set()


def requested_signal() -> int | None:
    """The signal that asked for the stop (None: ``request()`` without one)."""
    return _signal_number


def check() -> None:
    """Raise ``Stopped`` when a stop was asked for; call it where unwinding is safe, on any thread."""
    if _requested.is_set():
        raise Stopped(_signal_number)


def request(signal_number: int | None = None) -> None:
    """Ask the running job to stop (what the signal handler does; tests call it too)."""
    global _signal_number
    if not _requested.is_set():
        _signal_number = signal_number
        _requested.set()


def clear() -> None:
    global _signal_number
    _signal_number = None
    _requested.clear()


def wait_for(event: threading.Event | None = None, thread: threading.Thread | None = None,
             poll: float = 0.1) -> None:
    """Wait until ``event`` is set or ``thread`` has ended, checking for a stop request meanwhile."""
    while True:
        if event is not None and event.wait(poll):
            return
        if thread is not None:
            thread.join(poll)
            if not thread.is_alive():
                return
        check()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A region whose code checks for stops itself: a signal here is only recorded (and stays recorded
    after it: work that ended before noticing the stop is not undone)."""
    with _mode("defer"):
        yield


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A region safe to interrupt anywhere (pure computation, no locks of its own): a signal raises at once."""
    check()
    with _mode("raise"):
        yield


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A region that must not be interrupted (it writes progress or output under a lock); a stop asked
    for meanwhile is raised at its end where the code around it would have raised it at once."""
    with _mode("defer", raise_after=True):
        yield


@contextlib.contextmanager
def _mode(mode: str, raise_after: bool = False) -> Iterator[None]:
    main = threading.current_thread() is threading.main_thread()
    if main:
        _modes.append(mode)
    try:
        yield
    except BaseException:
        if main:
            _modes.pop()
        raise
    else:
        if main:
            _modes.pop()
            if raise_after and _requested.is_set() and _current_mode() == "raise":
                raise Stopped(_signal_number)


def _current_mode() -> str:
    return _modes[-1] if _modes else "raise"


def _handle(signal_number: int, frame) -> None:
    if _requested.is_set():
        return  # stopping already: a second signal must not interrupt the clean-up
    request(signal_number)
    if _current_mode() == "raise":
        raise Stopped(signal_number)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Handle SIGINT, SIGTERM and SIGHUP as described above while inside; the previous handlers come
    back afterwards. Only the main thread can install handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear()
    previous = {number: signal.signal(number, _handle) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _modes.clear()
        clear()  # the request was for this command's job, which has ended
