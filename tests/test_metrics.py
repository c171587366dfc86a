"""Scores with known answers: a real face whose mouth is drawn open exactly when a tone sounds.

The test clips are tests/data/face.jpg at 256x256 with the lower lip and jaw pushed down and the
mouth's inside painted dark in the frames marked open; MediaPipe reads that as an open mouth.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio as audio_lib
from musetalk import cli, face, metrics, video_io
from musetalk.errors import InputError

from conftest import EXAMPLES, ffmpeg

FACE = Path(__file__).resolve().parent / "data" / "face.jpg"
SIZE = 256
SCALE = SIZE / 320  # the mouth geometry below was measured on the 320 px photo
FPS = 25
SR = 16000
OPEN_PX = 14


def base_face() -> np.ndarray:
    import cv2

    image = cv2.cvtColor(cv2.imread(str(FACE)), cv2.COLOR_BGR2RGB)
    return cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def open_mouth(image: np.ndarray, open_px: float) -> np.ndarray:
    """The face with its lower lip and chin pushed down by ``open_px`` and a dark mouth between the lips."""
    import cv2

    centre_x, lip_line, half_width = 170 * SCALE, 214 * SCALE, 36 * SCALE
    chin, fade = 262 * SCALE, 30 * SCALE
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float32)
    across = np.clip(1 - ((xs - centre_x) / (half_width * 1.6)) ** 2, 0, 1)
    below_chin_fade = np.clip(1 - (ys - chin) / fade, 0, 1)
    shift = open_px * across * below_chin_fade * (ys >= lip_line)
    out = cv2.remap(image, xs, ys - shift, cv2.INTER_LINEAR)
    lens = np.clip(1 - ((xs - centre_x) / half_width) ** 2, 0, 1) * open_px
    out[(ys >= lip_line) & (ys < lip_line + lens)] = (60, 25, 25)
    return out


def open_pattern(num_frames: int, seed: int = 3) -> np.ndarray:
    """Open/closed per frame in runs of 3..8 frames (120..320 ms), irregular so no lag looks alike."""
    rng = np.random.default_rng(seed)
    flags: list[bool] = []
    state = False
    while len(flags) < num_frames:
        flags += [state] * int(rng.integers(3, 9))
        state = not state
    return np.array(flags[:num_frames])


def tone(flags: np.ndarray, delay_s: float = 0.0) -> np.ndarray:
    """A buzz (150 Hz and harmonics) sounding exactly during the open frames, delayed by ``delay_s``."""
    n = int(len(flags) / FPS * SR)
    gain = np.zeros(n)
    for index in np.flatnonzero(flags):
        start, end = (int(round((t / FPS + delay_s) * SR)) for t in (index, index + 1))
        gain[max(0, start) : max(0, min(n, end))] = 1.0
    gain = np.convolve(gain, np.ones(80) / 80, mode="same")  # 5 ms ramps, no clicks
    t = np.arange(n) / SR
    buzz = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    return (0.25 * gain * buzz).astype(np.float32)


def write_wav(path: Path, wav: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SR)
        out.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def write_clip(path: Path, frames, audio: Path | None = None, crf: int = 12) -> Path:
    frames = list(frames)
    with video_io.FrameWriter(path, frames[0].shape[1], frames[0].shape[0], FPS, audio_path=audio, crf=crf) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def mouth_frames(flags: np.ndarray) -> list[np.ndarray]:
    closed = base_face()
    shapes = {False: closed, True: open_mouth(closed, OPEN_PX)}
    return [shapes[bool(flag)] for flag in flags]


def score(video, **kwargs) -> metrics.Scores:
    return metrics.score_video(video, models_dir=kwargs.pop("models_dir", None) or "/nonexistent-models", **kwargs)


@pytest.fixture(autouse=True)
def no_syncnet_in_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache: whatever this machine holds, SyncNet weights are absent here."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.fixture(scope="module")
def flags() -> np.ndarray:
    return open_pattern(50)  # 2 s


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metrics")


@pytest.fixture(scope="module")
def tone_wav(flags, media) -> Path:
    return write_wav(media / "tone.wav", tone(flags))


@pytest.fixture(scope="module")
def synced_clip(flags, media, tone_wav) -> Path:
    """The mouth open exactly while the tone sounds, sound inside the file."""
    return write_clip(media / "synced.mp4", mouth_frames(flags), tone_wav)


@pytest.fixture(scope="module")
def synced_scores(synced_clip) -> metrics.Scores:
    return score(synced_clip)


def test_mouth_track_follows_the_drawn_opening(synced_clip, flags):
    with face.FaceAnalyzer() as analyzer:
        track = analyzer.analyze(video_io.read_frames(synced_clip, max_frames=20))
    mouth = metrics.mouth_track(track, FPS)
    flags = flags[:20]
    assert flags.any() and not flags.all()
    assert mouth.has_face.all()
    assert np.all(mouth.opening[flags] > 0.08)
    assert np.all(mouth.opening[~flags] < 0.03)
    # Normalised by the eye distance (about 80 px at this size), not in pixels.
    assert 60 < np.median(mouth.eye_distance) < 100
    assert np.all(mouth.width[flags] > mouth.width[~flags].mean())  # the stretched mouth is wider too


def test_a_synced_clip_peaks_high_at_zero_lag(synced_scores):
    assert synced_scores.sync_correlation > 0.85
    assert abs(synced_scores.sync_lag_ms) < 15


@pytest.mark.parametrize("delay_ms", [120, -60])
def test_the_lag_is_measured_finer_than_a_frame(flags, media, delay_ms):
    # Sound 120 ms late = picture 120 ms early: -120 ms. 60 ms (a frame and a half) early: +60.
    wav = write_wav(media / f"tone{delay_ms}.wav", tone(flags, delay_ms / 1000))
    clip = write_clip(media / f"shifted{delay_ms}.mp4", mouth_frames(flags), wav)
    scores = score(clip)
    assert scores.sync_correlation > 0.85
    assert scores.sync_lag_ms == pytest.approx(-delay_ms, abs=15)


def test_a_mouth_that_ignores_the_sound_scores_low(flags, media, tone_wav, synced_scores):
    unrelated = open_pattern(len(flags), seed=11)
    clip = write_clip(media / "unrelated.mp4", mouth_frames(unrelated), tone_wav)
    scores = score(clip)
    assert scores.sync_correlation < 0.5
    # The same amount of opening and closing, but none of it follows the sound.
    assert scores.mouth_jitter > 2 * synced_scores.mouth_jitter


def test_a_still_mouth_scores_zero_sync(flags, media, tone_wav):
    clip = write_clip(media / "still.mp4", [base_face()] * len(flags), tone_wav)
    scores = score(clip)
    assert scores.sync_correlation == 0.0
    assert scores.sync_lag_ms is None
    assert "does not move" in scores.reasons["sync_lag_ms"]
    assert scores.box_jitter < 0.01  # a still face: only landmark noise


def test_a_shaking_face_has_box_jitter(flags, media, tone_wav):
    import cv2

    rng = np.random.default_rng(0)
    still = base_face()
    shaken = [cv2.warpAffine(still, np.float32([[1, 0, dx], [0, 1, dy]]), (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE)
              for dx, dy in rng.uniform(-3, 3, size=(len(flags), 2))]
    clip = write_clip(media / "shaken.mp4", shaken, tone_wav)
    assert score(clip).box_jitter > 0.04


@pytest.fixture(scope="module")
def speech_wav(media) -> tuple[Path, np.ndarray]:
    """1.7 s of the example speech from 1.9 s: about 0.8 s of speech, then a 0.8 s pause."""
    path = media / "speech.wav"
    ffmpeg("-ss", "1.9", "-t", "1.7", "-i", str(EXAMPLES / "speech.wav"), str(path))
    wav = audio_lib.load_audio(path)
    speaking = audio_lib.detect_speech(wav).frame_mask(42, FPS)
    assert 15 <= (~speaking).sum() <= 27  # the test needs both
    return path, speaking


def talking(frames_speaking: np.ndarray) -> np.ndarray:
    """Open for 2 frames, closed for 2, wherever ``frames_speaking`` is True."""
    rhythm = (np.arange(len(frames_speaking)) // 2) % 2 == 0
    return rhythm & frames_speaking


def test_a_mouth_moving_in_silence_scores_badly_on_silence(speech_wav, media):
    path, speaking = speech_wav
    resting = score(write_clip(media / "resting.mp4", mouth_frames(talking(speaking)), path))
    babbling = score(write_clip(media / "babbling.mp4", mouth_frames(talking(np.ones_like(speaking))), path))

    assert resting.silent_closed_share > 0.9
    assert resting.silence_mouth_open < 0.03
    assert resting.speech_mouth_open > 0.04
    assert babbling.silent_closed_share < 0.7
    assert babbling.silence_mouth_open > 2 * resting.silence_mouth_open + 0.02
    assert babbling.speech_mouth_open == pytest.approx(resting.speech_mouth_open, abs=0.01)


def test_an_unchanged_video_scores_identity_at_the_maximum(synced_clip, media, tone_wav):
    same = score(synced_clip, source=synced_clip)
    assert same.identity_psnr == metrics.PSNR_CAP
    assert same.identity_ssim == pytest.approx(1.0)
    assert same.passthrough_psnr is None and "every frame has a face" in same.reasons["passthrough_psnr"]

    # Re-encoded at ordinary quality: near the top; the upper face painted over: far below.
    reencoded = media / "reencoded.mp4"
    ffmpeg("-i", str(synced_clip), "-c:v", "libx264", "-crf", "20", "-c:a", "copy", str(reencoded))
    good = score(reencoded, source=synced_clip)
    assert good.identity_psnr > 35 and good.identity_ssim > 0.95
    frames = [frame.copy() for frame in video_io.read_frames(synced_clip)]
    for frame in frames:
        frame[90:140, 60:200] = np.clip(frame[90:140, 60:200].astype(int) + 40, 0, 255)  # the eyes, brightened
    changed = score(write_clip(media / "changed.mp4", frames, tone_wav), source=synced_clip)
    assert changed.identity_psnr < 30 and changed.identity_ssim < good.identity_ssim - 0.05


def test_identity_pairs_frames_by_the_pipelines_schedule(face_clip, media):
    """A result longer than its source shows the source frames forward then backward (pingpong)."""
    source = list(video_io.read_frames(face_clip))  # 30 frames of a slow zoom and pan
    order = list(range(30)) + list(range(29, 9, -1))
    result = write_clip(media / "pingpong.mp4", [source[i] for i in order], crf=8)
    right = score(result, source=face_clip, loop="pingpong")
    wrong = score(result, source=face_clip, loop="loop")
    assert right.identity_psnr > 38
    assert wrong.identity_psnr < right.identity_psnr - 3


def test_frames_without_a_face_are_compared_whole(synced_clip, media, tone_wav):
    frames = [frame.copy() for frame in video_io.read_frames(synced_clip)]
    for frame in frames[30:40]:
        frame[:] = 128
    gap = write_clip(media / "gap.mp4", frames, tone_wav)
    scores = score(gap, source=gap)
    assert scores.passthrough_psnr == metrics.PSNR_CAP
    assert scores.face_coverage == pytest.approx(40 / 50)


def test_scores_as_dict_and_table(synced_scores):
    values = synced_scores.as_dict()
    assert list(values) == metrics.Scores.names()
    assert all(value is None or isinstance(value, float) for value in values.values())
    assert values["identity_psnr"] is None  # no source given
    rows = synced_scores.table_rows()
    assert [row[0] for row in rows] == [label for label, _, _ in metrics.SCORE_INFO.values()]
    by_label = {label: (value, good) for label, value, good in rows}
    assert by_label["Upper face vs source (PSNR)"][0] == "n/a: no source video given (--source)"
    assert by_label["SyncNet distance (LSE-D)"][0] == "n/a: " + metrics.SYNCNET_MISSING
    assert by_label["Lip-sync lag"][0].endswith(" ms")
    table = metrics.format_table(synced_scores)
    assert "Lip-sync correlation" in table and "musetalk download --scoring" in table


def test_audio_comes_from_the_video_or_the_audio_option(synced_clip, media, tone_wav):
    silent_video = write_clip(media / "mute.mp4", video_io.read_frames(synced_clip))
    without = score(silent_video)
    assert without.sync_correlation is None
    assert "--audio" in without.reasons["sync_correlation"]
    with_audio = score(silent_video, audio=tone_wav)
    assert with_audio.sync_correlation > 0.85


def test_bad_inputs_are_typed_errors(synced_clip, media, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        score(tmp_path / "nothing.mp4")
    with pytest.raises(InputError, match="not a video"):
        score(FACE)
    small = media / "small.mp4"
    ffmpeg("-i", str(synced_clip), "-vf", "scale=128:128", str(small))
    with pytest.raises(InputError, match="the original video the result was made from"):
        score(synced_clip, source=small)
    with pytest.raises(InputError, match="syncnet_stride"):
        score(synced_clip, syncnet_stride=0)


# --------------------------------------------------------------------------- real pipeline output


def test_scores_of_a_real_pipeline_result_through_the_command_line(models_dir, face_clip, speech_clip, tmp_path,
                                                                 capsys):
    out = tmp_path / "dubbed.mp4"
    assert cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--video", str(face_clip),
                     "--audio", str(speech_clip), "--out", str(out), "--score"]) == 0
    printed = capsys.readouterr().out
    rows = {label: printed.split(label, 1)[1].split("\n", 1)[0].split()[0]
            for label, _, _ in metrics.SCORE_INFO.values() if label in printed}
    assert len(rows) == len(metrics.SCORE_INFO)  # one table row per score

    # The tiny models paint noise over the lower face; the rest of the frame is the source's.
    assert float(rows["Frames with a face"].rstrip("%")) > 50
    assert float(rows["Upper face vs source (PSNR)"]) > 28 and float(rows["Upper face vs source (SSIM)"]) > 0.85
    assert -1.0 <= float(rows["Lip-sync correlation"]) <= 1.0
    assert 0 <= float(rows["Silent frames with the mouth closed"].rstrip("%")) <= 100  # a 0.3 s pause
    assert float(rows["Face box jitter"]) >= 0 and float(rows["Lip jitter not explained by the audio"]) >= 0
    assert rows["SyncNet distance (LSE-D)"] == "n/a:"


def test_score_command_reports_a_missing_file_in_one_line(tmp_path, capsys):
    assert cli.main(["score", "--video", str(tmp_path / "missing.mp4")]) == cli.EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err
