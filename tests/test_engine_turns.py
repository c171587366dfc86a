"""One pipeline, a dub and a live session at once (the studio and ``musetalk live`` share it): the
engine's calls take turns (``pipeline.EngineTurns``), a live session's first, and neither result
changes for the other's being there."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio as audio_lib
from musetalk import video_io
from musetalk.config import RunOptions
from musetalk.live import LiveSession
from musetalk.pipeline import SHARED_BATCH, EngineTurns, LipSyncPipeline

from conftest import EXAMPLES, example_speech

SR = audio_lib.SAMPLE_RATE


# --------------------------------------------------------------------------- the turns themselves


def _wait_until_waiting(turns: EngineTurns, count: int) -> None:
    """Until ``count`` threads wait for a turn (the condition's own waiters: no sleeping on a guess)."""
    with turns._changed:
        while len(turns._changed._waiters) < count:
            turns._changed.wait(0.001)


def test_a_clocked_call_goes_before_a_dub_that_waited_longer():
    turns = EngineTurns()
    for _ in range(10):  # a fair, first-come lock would let the dub's call go first
        order = []
        running = turns.take()
        running.__enter__()  # a call runs now
        dub = threading.Thread(target=lambda: _take_and_note(turns, order, "dub", clocked=False))
        dub.start()
        _wait_until_waiting(turns, 1)
        live = threading.Thread(target=lambda: _take_and_note(turns, order, "live", clocked=True))
        live.start()
        _wait_until_waiting(turns, 2)
        running.__exit__(None, None, None)
        dub.join()
        live.join()
        assert order == ["live", "dub"]


def _take_and_note(turns: EngineTurns, order: list, name: str, clocked: bool) -> None:
    with turns.take(clocked=clocked):
        order.append(name)


def test_a_turn_taken_inside_itself_is_said_not_waited_for():
    turns = EngineTurns()
    with turns.take():
        with pytest.raises(RuntimeError, match="not taken inside itself"):
            with turns.take(clocked=True):
                pass
    with turns.take(clocked=True):  # and the turn was given back
        pass


def test_a_dub_draws_small_batches_while_a_live_session_generates():
    turns = EngineTurns()
    assert turns.batch_limit(8) == 8
    with pytest.raises(ValueError):
        with turns.clocked_session():
            with turns.clocked_session():  # two sessions
                assert turns.batch_limit(8) == SHARED_BATCH
            assert turns.batch_limit(8) == SHARED_BATCH
            assert turns.batch_limit(1) == 1
            raise ValueError("a session that failed")
    assert turns.batch_limit(8) == 8  # the session's end, failed or not, gives the dub its batches back


# --------------------------------------------------------------------------- a dub and a live session at once


class EngineCalls:
    """Wraps an object's methods (the real ones run): notes which thread called, and whether any call began
    while another was still running."""

    def __init__(self, monkeypatch):
        self._monkeypatch = monkeypatch
        self._lock = threading.Lock()
        self._running = 0
        self.overlaps = 0
        self.callers: list[str] = []
        self.sizes: list[tuple[str, int]] = []  # (caller, frames) of each ``generate`` call
        self.dub_called = threading.Event()  # the dub has reached the engine

    def watch(self, target, *names: str) -> None:
        for name in names:
            self._monkeypatch.setattr(target, name, self._recorded(getattr(target, name), name))

    def _recorded(self, method, name: str):
        def recorded(*args, **kwargs):
            with self._lock:
                self._running += 1
                self.overlaps += self._running > 1
                self.callers.append(threading.current_thread().name)
                if name == "generate":
                    self.sizes.append((self.callers[-1], len(args[0])))
                if self.callers[-1] == "dub":
                    self.dub_called.set()
            try:
                return method(*args, **kwargs)
            finally:
                with self._lock:
                    self._running -= 1

        return recorded

    def dub_sizes_between_live_calls(self) -> list[int]:
        """The frames of the dub's calls made between the live session's first call and its last."""
        live = [n for n, (caller, _) in enumerate(self.sizes) if caller == "live"]
        return [size for caller, size in self.sizes[live[0]:live[-1]] if caller == "dub"] if live else []

    def interleaved(self) -> bool:
        """The live session called the engine between the dub's first call and its last."""
        dub_calls = [n for n, caller in enumerate(self.callers) if caller == "dub"]
        return bool(dub_calls) and "live" in self.callers[dub_calls[0]:dub_calls[-1]]


def dub_frames(pipeline: LipSyncPipeline, video, audio, output: Path, options: RunOptions,
               monkeypatch) -> list[np.ndarray]:
    """The dub's frames as they go to its encoder."""
    written = []
    write = video_io.FrameWriter.write

    def record(writer, frame):
        if writer.out_path == str(output.resolve()):
            written.append(frame.copy())
        return write(writer, frame)

    monkeypatch.setattr(video_io.FrameWriter, "write", record)
    pipeline(video, audio, output, options)
    monkeypatch.setattr(video_io.FrameWriter, "write", write)
    return written


def run_at_once(pipeline: LipSyncPipeline, video, dub_audio, dub_options: RunOptions, live_wav: np.ndarray,
                tmp_path: Path, monkeypatch, calls: EngineCalls, paced: bool, batch_size: int | None = None):
    """The dub on its own thread ("dub"), and once it reaches the engine a live session that streams
    ``live_wav`` (pushed at once, then closed); returns the dub's frames, the live frames and the session."""
    dubbed: list = []
    failure: list = []

    def dub():
        try:
            dubbed.extend(dub_frames(pipeline, video, dub_audio, tmp_path / "together.mp4", dub_options, monkeypatch))
        except BaseException as error:  # raised again in the test's thread
            failure.append(error)

    dubbing = threading.Thread(target=dub, name="dub")
    dubbing.start()
    while not calls.dub_called.wait(0.05) and dubbing.is_alive():
        pass  # the dub's start (probe, cache, silence gate) takes longer than a short live stream
    session = LiveSession(pipeline, video, paced=paced, batch_size=batch_size)
    session.push_audio(live_wav)
    session.close()
    frames = list(session.frames())
    dubbing.join()
    if failure:
        raise failure[0]
    return dubbed, frames, session


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def preview_pipeline(tmp_path_factory) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(engine="preview", cache_dir=tmp_path_factory.mktemp("turns-cache"))


def test_a_dub_and_a_paced_preview_session_share_the_engine_in_turns(preview_pipeline, face_clip, tmp_path,
                                                                      monkeypatch):
    live_audio = example_speech(tmp_path / "live.wav", 3.0)  # 75 frames
    live_wav = audio_lib.load_audio(live_audio)
    # The dub's own batch size (8 frames on a CPU), cut to SHARED_BATCH while the live session generates: a
    # live frame waits for at most one such batch, about 20 ms of the preview's drawing here.
    options = RunOptions()
    alone = dub_frames(preview_pipeline, face_clip, EXAMPLES / "speech.wav", tmp_path / "alone.mp4", options,
                       monkeypatch)
    live_alone = dub_frames(preview_pipeline, face_clip, live_audio, tmp_path / "live-dub.mp4", RunOptions(),
                            monkeypatch)
    calls = EngineCalls(monkeypatch)
    calls.watch(preview_pipeline.engine, "prepare", "generate")

    together, frames, session = run_at_once(preview_pipeline, face_clip, EXAMPLES / "speech.wav", options,
                                            live_wav, tmp_path, monkeypatch, calls, paced=True)

    assert calls.overlaps == 0, "no call into the engine began while another ran"
    assert calls.interleaved(), "the two ran at the same time, taking turns"
    assert calls.dub_sizes_between_live_calls() and max(calls.dub_sizes_between_live_calls()) <= SHARED_BATCH
    assert max(size for caller, size in calls.sizes if caller == "dub") == 8  # before and after the session
    assert len(together) == len(alone) == 190
    for mine, theirs in zip(together, alone):
        np.testing.assert_array_equal(mine, theirs)  # the dub is the dub made alone
    assert [frame.index for frame in frames] == list(range(len(live_alone)))
    # Paced: a live frame that waited past its time is skipped (it repeats the last picture). Waiting for one
    # dub batch leaves it on time; a loaded machine's stalls can still cost one now and then: at most 1 in 10.
    assert session.stats.frames_skipped <= len(frames) // 10, session.stats
    for k in range(40, len(frames)):  # the loudness is known by then (test_live's stream-vs-dub test)
        if not frames[k].skipped:
            assert mean_difference(frames[k].image, live_alone[k]) < 0.1, k


def test_a_dub_and_a_musetalk_session_share_the_models_in_turns(models_dir, face_clip, speech_clip, tmp_path,
                                                                 monkeypatch):
    pipeline = LipSyncPipeline.from_pretrained(models_dir, "v15", device="cpu", cache_dir=tmp_path / "cache")
    live_wav = audio_lib.load_audio(speech_clip)
    # The dub's batches are SHARED_BATCH frames throughout: a larger size would be cut to it only while
    # the live session generates (which batches, the timing decides), and the model's CPU kernels are
    # not bit-identical across batch sizes (a level in one or two pixels), so the frames could not be
    # compared exactly. The cutting itself is tested with the preview engine above.
    options = RunOptions(batch_size=SHARED_BATCH)
    alone = dub_frames(pipeline, face_clip, speech_clip, tmp_path / "alone.mp4", options, monkeypatch)
    calls = EngineCalls(monkeypatch)
    calls.watch(pipeline.engine, "prepare", "generate")
    calls.watch(pipeline.engine.audio_encoder, "_encode_windows")  # Whisper: the dub's features, the stream's

    # Unpaced: MuseTalk on a CPU cannot keep a clock, and every frame is then drawn by the model.
    together, frames, session = run_at_once(pipeline, face_clip, speech_clip, options, live_wav, tmp_path,
                                            monkeypatch, calls, paced=False, batch_size=4)

    assert calls.overlaps == 0, "no call into the models began while another ran"
    assert calls.interleaved(), "the two ran at the same time, taking turns"
    assert len(together) == len(alone) == 40
    for mine, theirs in zip(together, alone):
        np.testing.assert_array_equal(mine, theirs)
    # The stream's frames are the dub's within a level or two (test_live: Whisper's 30 s block).
    spoken = [k for k, frame in enumerate(frames) if frame.speaking]
    assert len(spoken) > len(frames) // 2 and not session.stats.frames_skipped
    for k in spoken:
        assert np.abs(frames[k].image.astype(np.int16) - alone[k].astype(np.int16)).max() <= 2, k
