"""Stopping always stops: SIGINT, SIGTERM and SIGHUP end a job within seconds, at any moment, with the
documented exit code (128 + the signal's number), nothing partial and no ffmpeg child left.

The signal handler no longer raises inside whatever code runs (tqdm holding its lock, a clean-up):
it records the stop and the job notices it where unwinding is safe. The random stops run in this
process (cheap: no start-up per stop, the real handler, stderr a pipe); two stops go to a real
`musetalk` process, whose exit (no native thread left running: once signal 6) only a process shows.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from musetalk import cli, stopping

from conftest import EXAMPLES
from test_robustness import face_video, ffmpeg_children, leftovers, speech

# A stop must end the job within this many seconds; generous for a loaded 2-core machine, far below
# what a hang would take (the hang this replaces lasted for good).
STOP_WITHIN_S = 30
RANDOM_STOPS = 12


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stop-media")
    return face_video(folder / "face.mp4", 1.2), speech(folder / "voice.wav", 1.6)


@pytest.fixture
def stray_signals_recorded():
    """A signal that arrives after the command returned (the job beat it) is recorded, not fatal to pytest."""
    caught = []
    previous = {number: signal.signal(number, lambda n, frame: caught.append(n)) for number in stopping.SIGNALS}
    yield caught
    for number, handler in previous.items():
        signal.signal(number, handler)


class PipeStderr:
    """sys.stderr as a pipe with a reader at the other end, as a supervisor's or a parent's."""

    def __init__(self):
        read_end, write_end = os.pipe()
        self.stream = io.TextIOWrapper(os.fdopen(write_end, "wb", buffering=0), encoding="utf-8",
                                       line_buffering=True)
        self._reader = os.fdopen(read_end, "rb")
        self.text = bytearray()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self):
        for chunk in iter(lambda: self._reader.read1(65536), b""):
            self.text += chunk

    def close(self) -> str:
        self.stream.close()
        self._thread.join(10)
        self._reader.close()
        return self.text.decode("utf-8", "replace")


def run_stopped(argv, delay: float | None, signal_number: int, monkeypatch) -> tuple[int, float, str]:
    """cli.main with stderr a pipe and, after ``delay`` seconds, a signal from another thread; (exit code,
    seconds from the signal to the return, stderr)."""
    pipe = PipeStderr()
    monkeypatch.setattr(sys, "stderr", pipe.stream)
    sent = []
    finished = threading.Event()

    def send():
        if delay is not None and not finished.wait(delay):
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal_number)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        code = cli.main(argv)
    finally:
        finished.set()
        sender.join()
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    took = time.monotonic() - sent[0] if sent else 0.0
    return code, took, pipe.close()


def wait_for_no_ffmpeg(seconds: float = 10) -> list:
    """ffmpeg children still alive after a stop (a reader's ffmpeg is reaped as its thread ends)."""
    deadline = time.monotonic() + seconds
    while ffmpeg_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return ffmpeg_children()


def test_stops_at_random_moments_leave_nothing(media, tmp_path, monkeypatch, stray_signals_recorded):
    """Jobs stopped at seeded random moments across their whole run (loading, speaking, face analysis,
    generation, encoding, the progress bars): each ends with 128 + the signal, within seconds, leaving no
    output, no temporary file and no ffmpeg; a signal that comes too late finds a complete result."""
    video, voice = media
    rng = random.Random(17)
    jobs = [
        ["run", "--engine", "preview", "--no-cache", "--video", str(video), "--audio", str(voice)],
        ["run", "--engine", "preview", "--no-cache", "--video", str(video), "--text",
         "Stop me while I speak. Or while I am dubbed. Any moment will do."],
    ]
    durations = []
    for argv in jobs:  # how long each takes unstopped: the stops are spread over that
        started = time.monotonic()
        code, _, _ = run_stopped([*argv, "--out", str(tmp_path / "whole.mp4")], None, signal.SIGTERM, monkeypatch)
        assert code == 0
        durations.append(time.monotonic() - started)
        (tmp_path / "whole.mp4").unlink()
    stopped = 0
    for attempt in range(RANDOM_STOPS):
        which = attempt % len(jobs)
        number = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)[attempt % 3]
        out_dir = tmp_path / f"stop{attempt}"
        out_dir.mkdir()
        out = out_dir / "new" / "out.mp4"  # into a new folder: a stopped job removes it again
        delay = rng.uniform(0.0, durations[which])
        code, took, err = run_stopped([*jobs[which], "--out", str(out)], delay, number, monkeypatch)
        case = f"attempt {attempt}: {stopping.signal_name(number)} after {delay:.2f} s"
        assert "Traceback" not in err and "Exception ignored" not in err, (case, err[-3000:])
        if code == 0:  # the job finished before the stop could reach it
            assert out.is_file(), case
        else:
            stopped += 1
            assert code == 128 + number, (case, code, err[-2000:])
            assert f"interrupted by {stopping.signal_name(number)}" in err, case
            assert took < STOP_WITHIN_S, (case, took)
            assert not (out_dir / "new").exists(), (case, list(out_dir.rglob("*")))
        assert not leftovers(out_dir), (case, leftovers(out_dir))
        assert not wait_for_no_ffmpeg(), case
    assert stopped >= RANDOM_STOPS // 2, "most stops should land while the job runs"


def test_a_signal_during_progress_output_is_not_raised_inside_it(media, tmp_path, monkeypatch,
                                                                stray_signals_recorded):
    """The hang: SIGTERM raised an exception while tqdm held its write lock. Here the signal arrives
    in the middle of a progress bar's write on the main thread (the speech bar): nothing may be
    raised there; the job stops right after, cleanly."""
    video, _ = media
    raised_inside = []
    pipe = PipeStderr()

    class SignalledStderr(io.TextIOBase):
        def __init__(self):
            self.sent = False

        def write(self, text):
            if (not self.sent and threading.current_thread() is threading.main_thread()
                    and "speaking" in text):
                self.sent = True
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    deadline = time.monotonic() + 0.2
                    while time.monotonic() < deadline:  # bytecodes run: the handler runs here
                        pass
                except BaseException as error:
                    raised_inside.append(error)
                    raise
            return pipe.stream.write(text)

        def flush(self):
            pipe.stream.flush()

    stderr = SignalledStderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    out = tmp_path / "out.mp4"
    code = cli.main(["run", "--engine", "preview", "--no-cache", "--video", str(video), "--text",
                     "One sentence. And another one.", "--out", str(out)])
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    err = pipe.close()
    assert stderr.sent, "the speech progress bar never wrote on the main thread"
    assert not raised_inside, f"the signal raised {raised_inside[0]!r} inside the progress output"
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err, err[-2000:]
    assert not out.exists() and not leftovers(tmp_path) and not wait_for_no_ffmpeg()


def test_a_second_signal_does_not_cut_the_clean_up_short(media, tmp_path, monkeypatch, stray_signals_recorded):
    """A supervisor (or an impatient Ctrl-C) signals again while the job stops: the second one is only
    recorded, so the clean-up of the first runs to its end."""
    from musetalk import video_io

    video, voice = media
    real_write, real_abort = video_io.FrameWriter.write, video_io.FrameWriter.abort

    def write_then_get_stopped(self, frame):
        if self.frames_written == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the first signal, while the encoder is at work
        real_write(self, frame)

    def abort_signalled_again(self):
        os.kill(os.getpid(), signal.SIGINT)  # the second, in the middle of the clean-up
        time.sleep(0.1)
        real_abort(self)

    monkeypatch.setattr(video_io.FrameWriter, "write", write_then_get_stopped)
    monkeypatch.setattr(video_io.FrameWriter, "abort", abort_signalled_again)
    out = tmp_path / "out.mp4"
    code, _, err = run_stopped(["run", "--engine", "preview", "--no-cache", "--video", str(video), "--audio",
                                str(voice), "--out", str(out)], None, signal.SIGTERM, monkeypatch)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert not out.exists() and not leftovers(tmp_path) and not wait_for_no_ffmpeg()


def start_command(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "musetalk.cli", *argv], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_output(proc: subprocess.Popen, marker: bytes, limit: float = 120) -> tuple[bytes, list[int]]:
    """Read the command's stderr until ``marker`` shows; also note its ffmpeg children meanwhile."""
    seen, children = b"", set()
    os.set_blocking(proc.stderr.fileno(), False)
    deadline = time.monotonic() + limit
    while marker not in seen:
        assert proc.poll() is None, seen.decode("utf-8", "replace")[-3000:]
        assert time.monotonic() < deadline, f"{marker!r} never showed"
        seen += proc.stderr.read() or b""
        try:
            children |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True) if "ffmpeg" in c.name()}
        except psutil.Error:
            pass
        time.sleep(0.02)
    return seen, sorted(children)


@pytest.mark.parametrize("number, marker, text", [
    # SIGHUP mid-job (the terminal closed): it left a .out.*.partial.mp4 in the output folder
    (signal.SIGHUP, b"generating", None),
    # Ctrl-C while a long text was spoken and analysed: once the process aborted (signal 6)
    (signal.SIGINT, b"speaking", " ".join(f"This is sentence {n} of a long script." for n in range(150))),
])
def test_a_real_command_stopped_by_a_signal_exits_cleanly(tmp_path, number, marker, text):
    video = face_video(tmp_path / "face.mp4", 4)
    argv = ["run", "--engine", "preview", "--no-cache", "--video", str(video), "--out", str(tmp_path / "out.mp4")]
    argv += ["--text", text] if text else ["--audio", str(EXAMPLES / "speech.wav")]
    proc = start_command(argv, tmp_path)
    try:
        seen, children = wait_for_output(proc, marker)
        proc.send_signal(number)
        sent = time.monotonic()
        _, rest = proc.communicate(timeout=STOP_WITHIN_S)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = (seen + rest).decode("utf-8", "replace")
    assert proc.returncode == 128 + number, (proc.returncode, err[-3000:])
    assert took < STOP_WITHIN_S
    assert "terminate called" not in err and "Traceback" not in err, err[-3000:]
    assert f"interrupted by {stopping.signal_name(number)}" in err
    assert not (tmp_path / "out.mp4").exists() and not leftovers(tmp_path), leftovers(tmp_path)
    assert not [pid for pid in children if psutil.pid_exists(pid) and
                psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "an ffmpeg child outlived the command"
