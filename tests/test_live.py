"""Live sessions (musetalk.live): a prepared face streamed from audio chunks, against the batch dub of
the same audio, at rest in silence, with bounded buffers, and skipping (said) when it falls behind."""

from __future__ import annotations

import json
import logging
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio as audio_lib
from musetalk import cli, face, metrics, schedule, video_io
from musetalk.config import RunOptions
from musetalk.errors import InputError, LiveError
from musetalk.live import LiveSession
from musetalk.pipeline import LipSyncPipeline
from musetalk.video_io import probe

from conftest import EXAMPLES, ffmpeg

SR = audio_lib.SAMPLE_RATE


@pytest.fixture(scope="module")
def preview_pipeline(tmp_path_factory) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(engine="preview", cache_dir=tmp_path_factory.mktemp("live-cache"))


@pytest.fixture(scope="module")
def musetalk_pipeline(models_dir, tmp_path_factory) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(models_dir, "v15", device="cpu",
                                           cache_dir=tmp_path_factory.mktemp("live-cache-musetalk"))


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory) -> Path:
    """The first 3 s of the example speech (75 frames at 25 fps): long enough for its loud level to be heard."""
    path = tmp_path_factory.mktemp("live-media") / "speech3.wav"
    ffmpeg("-i", str(EXAMPLES / "speech.wav"), "-t", "3", str(path))
    return path


def batch_frames(pipeline: LipSyncPipeline, video, audio, tmp_path: Path, monkeypatch) -> list[np.ndarray]:
    """The batch dub's frames as they go to the encoder (RGB, before any video compression)."""
    written = []
    write = video_io.FrameWriter.write

    def record(writer, frame):
        written.append(frame.copy())
        return write(writer, frame)

    monkeypatch.setattr(video_io.FrameWriter, "write", record)
    pipeline(video, audio, tmp_path / "batch.mp4", RunOptions())
    monkeypatch.setattr(video_io.FrameWriter, "write", write)
    return written


def stream(session: LiveSession, wav: np.ndarray, seed: int = 0, max_chunk: int = 4000) -> list:
    """Push ``wav`` in chunks of random sizes from another thread, close, and collect every frame."""
    rng = np.random.default_rng(seed)

    def feed():
        position = 0
        while position < wav.size:
            size = int(rng.integers(1, max_chunk))
            session.push_audio(wav[position:position + size])
            position += size
        session.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    frames = list(session.frames())
    feeder.join()
    return frames


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def openings(frames: list[np.ndarray], fps: float) -> np.ndarray:
    """The scores' mouth measure (inner-lip gap over eye distance) of each frame."""
    with face.FaceAnalyzer() as analyzer:
        track = analyzer.analyze(frames)
    return metrics.mouth_track(track, fps).opening


# --------------------------------------------------------------------------- against the batch dub


def test_preview_stream_gives_the_batch_dubs_frames_once_the_loudness_is_known(
        preview_pipeline, face_clip, long_speech, tmp_path, monkeypatch):
    wav = audio_lib.load_audio(long_speech)
    batch = batch_frames(preview_pipeline, face_clip, long_speech, tmp_path, monkeypatch)
    session = LiveSession(preview_pipeline, face_clip, paced=False)
    frames = stream(session, wav)

    assert [frame.index for frame in frames] == list(range(len(batch))), "every frame, in order, as long as the dub"
    played = np.concatenate([frame.audio for frame in frames])
    np.testing.assert_array_equal(played[:wav.size], wav)  # each frame carries its own audio
    # The stream learns the voice's loud level as it hears it; after 1.6 s of this speech it has
    # heard its loudest, and each frame is the dub's: closer to it than to any of its neighbours (a
    # frame off differs by 2 to 4 levels, or by a quarter where ping-pong shows a source frame twice).
    for k in range(40, len(batch)):
        assert mean_difference(frames[k].image, batch[k]) < 0.1, k
        nearby = range(k - 2, min(k + 3, len(batch)))
        assert min(nearby, key=lambda j: mean_difference(frames[k].image, batch[j])) == k
    silent = [k for k, frame in enumerate(frames) if not frame.speaking]
    assert silent, "the clip has pauses"
    for k in silent:
        np.testing.assert_array_equal(frames[k].image, batch[k])  # the resting face is exactly the dub's
    assert session.stats.frames_skipped == 0


def test_the_preview_streams_shorter_pre_roll_opens_the_mouth_with_the_dubs(preview_pipeline, face_clip, tmp_path,
                                                                             monkeypatch):
    """Live, the preview's silence gate starts a speech span one VAD window (32 ms) before silero-vad hears
    speech, the dub's 80 ms (less latency; live only, by design): at a word's start the stream zeroes a
    little more of the quiet consonant, and its mouth still opens as the dub's does."""
    speech = audio_lib.load_audio(EXAMPLES / "speech.wav")
    # 2.5 s for the stream to learn the voice's loud level, then a pause and the onsets to compare.
    wav = np.concatenate([speech[: int(2.5 * SR)], np.zeros(SR, np.float32), speech[: int(2 * SR)],
                          np.zeros(SR, np.float32), speech[int(4 * SR): int(6 * SR)]])
    path = tmp_path / "onsets.wav"
    _write_wav(path, wav)
    batch = batch_frames(preview_pipeline, face_clip, path, tmp_path, monkeypatch)
    session = LiveSession(preview_pipeline, face_clip, paced=False)
    frames = [frame.image for frame in stream(session, wav)]
    assert session._gate.pad < audio_lib.SPEECH_PAD_S * SR, "the stream's pre-roll is the shorter one"

    dub_gaps, stream_gaps = openings(batch, session.fps), openings(frames, session.fps)
    for onset_s in (3.5, 6.5):  # where each stretch after a pause starts
        first = int(onset_s * session.fps)
        onset = slice(first, first + 6)
        assert np.nanmax(dub_gaps[onset]) > 0.05, "the mouth opens there (the scores' speaking range: 0.05 to 0.2)"
        # Within a hundredth of an eye distance, frame by frame (a span starting 100 ms late is 0.05 off).
        np.testing.assert_allclose(stream_gaps[onset], dub_gaps[onset], atol=0.01, err_msg=f"onset at {onset_s} s")


def _write_wav(path: Path, wav: np.ndarray) -> None:
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SR)
        handle.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())


def test_musetalk_stream_gives_the_batch_dubs_frames(musetalk_pipeline, face_clip, speech_clip, tmp_path,
                                                     monkeypatch):
    wav = audio_lib.load_audio(speech_clip)
    batch = batch_frames(musetalk_pipeline, face_clip, speech_clip, tmp_path, monkeypatch)
    silent_audio = tmp_path / "silence.wav"
    ffmpeg("-f", "lavfi", "-i", f"anullsrc=r={SR}:cl=mono", "-t", "1.6", str(silent_audio))
    other = batch_frames(musetalk_pipeline, face_clip, silent_audio, tmp_path, monkeypatch)
    session = LiveSession(musetalk_pipeline, face_clip, paced=False, batch_size=4)
    frames = stream(session, wav, seed=1)

    assert [frame.index for frame in frames] == list(range(len(batch)))
    spoken = [k for k, frame in enumerate(frames) if frame.speaking]
    assert len(spoken) > len(frames) // 2
    for k in spoken:
        # Whisper's attention spans its 30 s block, whose future a stream cannot know: within a level or two.
        difference = np.abs(frames[k].image.astype(np.int16) - batch[k].astype(np.int16))
        assert difference.max() <= 2, k
    # ... while the same frames dubbed from silence differ more: the audio is what matches.
    assert np.mean([mean_difference(batch[k], other[k]) for k in spoken]) > 10 * np.mean(
        [mean_difference(frames[k].image, batch[k]) for k in spoken])


# --------------------------------------------------------------------------- rest, idling, bounds


def test_in_silence_the_face_rests_and_idles_on_its_own_frames(preview_pipeline, face_clip):
    speech = audio_lib.load_audio(EXAMPLES / "speech.wav")[: int(0.8 * SR)]
    wav = np.concatenate([np.zeros(int(1.6 * SR), np.float32), speech, np.zeros(int(1.6 * SR), np.float32)])
    session = LiveSession(preview_pipeline, face_clip, paced=False)
    frames = stream(session, wav)

    sources = schedule.frame_schedule(len(frames), 30, "pingpong")
    assert [session.source_index(frame.index) for frame in frames] == sources.tolist()
    in_silence = list(range(0, 36)) + list(range(70, len(frames)))  # clear of the speech and its context
    assert not any(frames[k].speaking for k in in_silence)
    assert any(frame.speaking for frame in frames[40:60])
    # The same source frame at rest twice (on the way forward and back) is the same picture.
    for k in range(0, 30):
        twin = 59 - k  # ping-pong: output 59 - k shows source k again
        if twin in in_silence:
            np.testing.assert_array_equal(frames[k].image, frames[twin].image)
    gaps = openings([frame.image for frame in frames], session.fps)
    assert np.nanmax(gaps[in_silence]) < metrics.CLOSED_OPENING
    assert np.nanmax(gaps[40:60]) > 2 * metrics.CLOSED_OPENING, "and it opens to speak"
    assert session.stats.frames_rest >= len(in_silence)


def test_buffers_stay_bounded_over_a_long_stream(preview_pipeline, face_clip):
    speech = audio_lib.load_audio(EXAMPLES / "speech.wav")
    wav = np.tile(np.concatenate([speech, np.zeros(SR, np.float32)]), 7)  # about a minute
    session = LiveSession(preview_pipeline, face_clip, paced=False, max_buffered_s=2.0)
    frames_seen = 0
    history_before = None

    def feed():
        rng = np.random.default_rng(3)
        position = 0
        while position < wav.size:
            size = int(rng.integers(1, 8000))
            session.push_audio(wav[position:position + size])  # blocks while 2 s wait ahead of the picture
            position += size
        session.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    for frame in session.frames():
        frames_seen += 1
        if frames_seen == 200:
            history_before = session.stats.history_samples_max
    feeder.join()

    assert frames_seen == int(np.ceil(wav.size / SR * session.fps - 1e-6))
    stats = session.stats
    assert stats.buffered_samples_max <= 2 * SR
    assert stats.buffered_samples_max > SR, "the feeder ran ahead and was held back"
    assert stats.queued_frames_max <= 2 * session.batch_size
    assert stats.history_samples_max < SR // 2  # the features' window, not the stream
    assert stats.history_samples_max == history_before, "the history does not grow with the stream"
    assert len(session._rest_faces) <= 30 and len(session._states) <= 64


def test_a_paced_session_idles_at_the_videos_rate_without_audio(preview_pipeline, face_clip):
    session = LiveSession(preview_pipeline, face_clip)  # paced: the clock fills in silence
    frames = []
    for frame in session.frames():
        frames.append((time.monotonic(), frame))
        if len(frames) == 20:
            session.stop()
            break
    assert [frame.index for _, frame in frames] == list(range(20))
    assert not any(frame.speaking or frame.skipped for _, frame in frames)
    # Shown when due: frame k at the start plus the stated latency plus k / fps (never early).
    for moment, frame in frames:
        assert moment >= session.due(frame.index) - 0.005
    assert all(np.all(frame.audio == 0) for _, frame in frames)


def test_audio_a_little_late_lands_in_its_place_and_later_audio_after_silence(preview_pipeline, face_clip):
    """A paced session's clock fills in silence only for audio more than ``LATE_AUDIO_S`` (20 ms) overdue:
    a piece a thread or the network held up 10 ms still plays where it belongs."""
    now = [0.0]
    piece = np.full(320, 0.1, np.float32)  # 20 ms
    with LiveSession(preview_pipeline, face_clip, clock=lambda: now[0]) as session:
        session.start()
        landed = [session.push_audio(piece)]
        now[0] = 0.02 + 0.01  # the second piece, 10 ms late
        landed.append(session.push_audio(piece))
        now[0] = 0.04 + 0.05  # the third, 50 ms late: 30 ms of it became silence first
        landed.append(session.push_audio(piece))
    assert landed == [0, 320, 640 + 30 * SR // 1000]


def test_a_session_that_falls_behind_skips_frames_and_says_so(preview_pipeline, face_clip, caplog, monkeypatch):
    session = LiveSession(preview_pipeline, face_clip)
    generate = session.engine.generate

    def slow_generate(states, frame_audio, timer):
        time.sleep(0.2)  # five times a frame's time at 25 fps
        return generate(states, frame_audio, timer)

    monkeypatch.setattr(session.engine, "generate", slow_generate)
    speech = audio_lib.load_audio(EXAMPLES / "speech.wav")[: 2 * SR]
    with caplog.at_level(logging.WARNING, logger="musetalk.live"):
        session.push_audio(speech)  # all at once, as a synthesized sentence arrives: it plays on the clock
        session.close()
        frames = list(session.frames())
    assert [frame.index for frame in frames] == list(range(len(frames))), "skipped frames still come, in order"
    skipped = [frame for frame in frames if frame.skipped]
    assert skipped and session.stats.frames_skipped == len(skipped)
    for frame in skipped:  # a skipped frame repeats the picture before it (the first: its source frame)
        before = frames[frame.index - 1].image if frame.index else session._sources[0]
        np.testing.assert_array_equal(frame.image, before)
    # ... and keeps its own audio: the sound plays on, whole (from the moment it was pushed).
    played = np.concatenate([frame.audio for frame in frames])
    assert any(np.array_equal(played[offset:offset + speech.size], speech) for offset in range(SR // 20))
    assert "skipped" in caplog.text


# --------------------------------------------------------------------------- errors


def test_wrong_audio_and_use_after_close_are_said(preview_pipeline, face_clip):
    session = LiveSession(preview_pipeline, face_clip, paced=False, max_buffered_s=0.5)
    with pytest.raises(InputError, match="mono"):
        session.push_audio(np.zeros((2, 100), np.float32))
    with pytest.raises(InputError, match="float"):
        session.push_audio(np.zeros(100, np.int64))
    session.push_audio(np.zeros(int(0.5 * SR), np.int16))
    with pytest.raises(LiveError, match="stayed full"):  # nobody takes the frames: the buffer stays full
        session.push_audio(np.zeros(SR // 10, np.float32), timeout=0.3)
    session.stop()
    with pytest.raises(LiveError, match="closed"):
        session.push_audio(np.zeros(10, np.float32))


# --------------------------------------------------------------------------- recording, command line, bench


def test_a_recording_holds_the_frames_and_their_sound(preview_pipeline, face_clip, speech_clip, tmp_path):
    from musetalk.live import LiveRecorder

    session = LiveSession(preview_pipeline, face_clip, paced=False)
    height, width = session.frame_size
    recorder = LiveRecorder(tmp_path / "live.mp4", width, height, session.fps)
    for frame in stream(session, audio_lib.load_audio(speech_clip)):
        recorder.add(frame)
    made = probe(recorder.finish())
    assert made.num_frames == recorder.frames == 40
    assert made.has_audio and made.duration == pytest.approx(1.6, abs=0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.mp4"], "no leftovers beside it"


def test_live_command_says_when_the_face_is_missing(tmp_path, capsys):
    assert cli.main(["live", "--video", str(tmp_path / "nobody.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_live_reports_frames_skips_and_latency(face_clip, capsys):
    assert cli.main(["bench", "--live", "--engine", "preview", "--seconds", "3", "--video", str(face_clip),
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"] == "preview" and report["frame_size"] == [252, 216]
    # Every frame of the stream came (a frame or two more: the clock runs from before the first push).
    assert 0 <= report["frames"] - report["seconds"] * 25 <= 2, report
    assert report["frames_skipped"] >= 0 and report["stated_latency_ms"] > 0
    assert len(report["latency_ms"]) >= 1, ("the spoken stretch opened the mouth, and was measured", report)


def test_a_late_musetalk_session_lets_the_preview_engine_draw_and_says_so(musetalk_pipeline, face_clip, caplog,
                                                                         monkeypatch):
    session = LiveSession(musetalk_pipeline, face_clip)  # on_late="auto": the preview engine stands in
    generate = session.engine.generate

    def slow_generate(states, frame_audio, timer):
        time.sleep(0.3)  # a GPU far too busy
        return generate(states, frame_audio, timer)

    monkeypatch.setattr(session.engine, "generate", slow_generate)
    speech = audio_lib.load_audio(EXAMPLES / "speech.wav")[: 2 * SR]
    with caplog.at_level(logging.WARNING, logger="musetalk.live"):
        session.push_audio(speech)
        session.close()
        frames = list(session.frames())
    assert [frame.index for frame in frames] == list(range(len(frames)))
    by_preview = [frame for frame in frames if frame.drawn_by == "preview"]
    assert by_preview and session.stats.frames_stood_in >= len(by_preview)
    assert session.stats.frames_skipped == 0 and not any(frame.skipped for frame in frames)
    assert all(frame.drawn_by in ("musetalk", "preview") for frame in frames if frame.speaking)
    assert "drawn by the preview engine" in caplog.text
