"""The preview engine: mouth shapes from the audio and from phoneme timings, the rendered mouth
measured with the face mesh, and whole jobs through ``musetalk run --engine preview``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio as audio_lib
from musetalk import blending, cli, face, metrics, visemes
from musetalk.config import RunOptions
from musetalk.engines import preview
from musetalk.pipeline import LipSyncPipeline, _landmarks_in_crop
from musetalk.plugins import SpeechEvent
from musetalk.video_io import probe, read_frames

from conftest import EXAMPLES, ffmpeg

SR = audio_lib.SAMPLE_RATE
PHOTO = Path(__file__).parent / "data" / "face.jpg"


def vowel(seconds: float, formants: tuple[float, ...], pitch: float = 120.0) -> np.ndarray:
    """A vowel-like sound: harmonics of ``pitch`` weighted by resonances at ``formants`` (Hz)."""
    t = np.arange(int(seconds * SR)) / SR
    wave = np.zeros_like(t)
    for harmonic in np.arange(pitch, 4000, pitch):
        gain = sum(1.0 / (1.0 + ((harmonic - f) / 80.0) ** 2) for f in formants)
        wave += gain * np.sin(2 * np.pi * harmonic * t)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def spans(*pairs: tuple[float, float], duration: float) -> audio_lib.SpeechSegments:
    return audio_lib.SpeechSegments(spans=list(pairs), duration=duration)


# --------------------------------------------------------------------------- shapes from the audio


def test_loud_speech_opens_and_silence_closes_without_lag():
    # 0.5 s silence, 0.8 s of a vowel whose loudness rises and falls 4 times a second, 0.5 s silence
    sound = vowel(0.8, (700, 1200))
    envelope = 0.5 - 0.5 * np.cos(2 * np.pi * 4 * np.arange(sound.size) / SR)
    wav = np.concatenate([silence(0.5), sound * envelope.astype(np.float32), silence(0.5)])
    targets = visemes.targets_from_audio(wav, spans((0.5, 1.3), duration=1.8))
    assert targets.source == "audio"
    times = np.arange(len(targets)) / targets.rate
    assert np.all(targets.open[(times < 0.45) | (times > 1.35)] == 0), "closed in silence"
    assert targets.open.max() > 0.6
    # The loudness peaks at 0.5 + (k + 0.5) / 4 s; so must the opening (10 ms grid).
    for k in range(3):
        peak = 0.5 + (k + 0.5) / 4
        window = (times > peak - 0.12) & (times < peak + 0.12)
        assert times[window][np.argmax(targets.open[window])] == pytest.approx(peak, abs=0.021)


def test_the_spectrum_rounds_spreads_and_opens(tmp_path):
    from musetalk import speech

    shapes = {}
    for word in ("who", "see", "far"):
        wav = audio_lib.load_audio(speech.synthesize_text(word, "espeak", cache_dir=tmp_path).path)
        targets = visemes.targets_from_audio(wav)
        vowel_part = visemes.loudness_curve(wav) > 0.8
        curves = np.stack([targets.open, targets.spread, targets.round], axis=1)[vowel_part]
        shapes[word] = dict(zip(("open", "spread", "round"), np.median(curves, axis=0)))
    assert shapes["who"]["round"] > 0.4 and shapes["who"]["spread"] < -0.3, shapes
    assert shapes["see"]["spread"] > 0.5 and shapes["see"]["round"] < 0.1, shapes
    assert shapes["far"]["open"] > max(shapes["who"]["open"], shapes["see"]["open"]) + 0.2, shapes


# --------------------------------------------------------------------------- shapes from phoneme timings


def test_phoneme_timings_give_visemes():
    # A steady loud vowel throughout: the audio alone would keep the mouth open, the phonemes close it.
    wav = vowel(0.9, (700, 1200))
    names = [(0.05, "m"), (0.15, "'A:"), (0.35, "p"), (0.45, "u:"), (0.65, "aI"), (0.85, "_")]
    events = [SpeechEvent("word", 0.05, "map", 0)] + [SpeechEvent("phoneme", t, n) for t, n in names]
    targets = visemes.targets_from_phonemes(events, wav, spans((0.0, 0.9), duration=0.9))
    assert targets.source == "phonemes"
    shape = {name: targets.at(np.array([t])) for t, name in
             [(0.1, "m"), (0.25, "A"), (0.4, "p"), (0.55, "u"), (0.69, "a"), (0.81, "I")]}
    assert shape["m"][0, 0] < 0.1 and shape["p"][0, 0] < 0.1, "bilabials close the lips"
    assert shape["A"][0, 0] > 0.7
    assert shape["u"][0, 2] > 0.7 and shape["u"][0, 1] < -0.3, "oo is rounded and narrow"
    assert shape["a"][0, 0] > shape["I"][0, 0] + 0.3, "a diphthong glides from open to closed"
    assert shape["I"][0, 1] > 0.3
    audio_only = visemes.targets_from_audio(wav).at(np.array([0.1, 0.4]))
    assert (audio_only[:, 0] > 0.4).all()


def test_viseme_names_with_stress_length_and_unknown_symbols():
    assert visemes.viseme("'a") == visemes.viseme("a") == visemes.viseme(",a")
    assert visemes.viseme("oU") == (visemes.VISEMES["O"], visemes.VISEMES["U"])
    assert visemes.viseme("b")[0][0] == 0.0
    assert visemes.viseme("Y:")[0] == visemes.VISEMES["Y"]
    assert visemes.viseme("e~")[0][0] > 0.3  # an unknown vowel opens
    assert visemes.viseme("c'")[0][0] < 0.3  # an unknown consonant barely opens


def test_the_engine_uses_phonemes_when_the_source_gave_them():
    engine = preview.PreviewEngine()
    wav = vowel(0.5, (700, 1200))
    assert engine.audio_features(wav, None, ()).source == "audio"
    words_only = [SpeechEvent("word", 0.0, "ah", 0)]
    assert engine.audio_features(wav, None, words_only).source == "audio"
    with_phonemes = words_only + [SpeechEvent("phoneme", 0.0, "A:")]
    features = engine.audio_features(wav, None, with_phonemes)
    assert features.source == "phonemes"
    batch = engine.frame_audio(features, np.array([0, 5, 11]), 25.0, RunOptions())
    assert batch.shape == (3, 3) and batch.dtype == np.float32
    assert np.array_equal(batch, features.at((np.array([0, 5, 11]) + 0.5) / 25.0))


# --------------------------------------------------------------------------- the rendered mouth


@pytest.fixture(scope="module")
def photo_face():
    """The test photo, its landmarks, its crop box, and the 256 px crop with landmarks in it."""
    import cv2

    image = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    with face.FaceAnalyzer() as analyzer:
        landmarks = analyzer.landmarks(image)
    track = face.FaceTrack(landmarks[None], np.array([True]), image.shape[1], image.shape[0])
    box = face.crop_boxes(track)[0]
    return image, landmarks, box, blending.crop_face(image, box), _landmarks_in_crop(landmarks, box)


def paste(image, box, landmarks, crop):
    square = blending.face_square(box, image.shape[1], image.shape[0])
    return blending.paste_face(image, crop, box, square, blending.blend_mask(landmarks, box, square))


def measured(analyzer, image) -> tuple[float, float]:
    """(inner-lip gap, mouth width), both in eye distances, read by the face mesh."""
    points = analyzer.landmarks(image)
    eyes = np.hypot(*(points[263] - points[33]))
    return np.hypot(*(points[14] - points[13])) / eyes, np.hypot(*(points[291] - points[61])) / eyes


def test_the_rendered_mouth_opens_as_intended(photo_face):
    image, landmarks, box, crop, in_crop = photo_face
    with face.FaceAnalyzer() as analyzer:
        gaps = []
        for opening in (0.0, 0.5, 1.0):
            rendered = preview.render(crop, in_crop, np.array([opening, 0.0, 0.0]))
            gaps.append(measured(analyzer, paste(image, box, landmarks, rendered))[0])
        assert gaps[0] < metrics.CLOSED_OPENING
        assert gaps[0] + 0.04 < gaps[1] < gaps[2] - 0.04, gaps
        expected = [o * preview.MAX_OPENING * np.hypot(*(landmarks[291] - landmarks[61]))
                    / np.hypot(*(landmarks[263] - landmarks[33])) for o in (0.5, 1.0)]
        assert gaps[1:] == pytest.approx(expected, rel=0.35), "the mesh reads about the gap that was drawn"
        wide = measured(analyzer, paste(image, box, landmarks, preview.render(crop, in_crop, np.array([0.3, 1, 0]))))
        narrow = measured(analyzer, paste(image, box, landmarks, preview.render(crop, in_crop, np.array([0.3, -1, 1]))))
        assert wide[1] > narrow[1] + 0.05, "spread lips are wider than rounded ones"


def test_only_the_lower_face_changes_in_the_crop(photo_face):
    _, _, _, crop, in_crop = photo_face
    rendered = preview.render(crop, in_crop, np.array([1.0, 1.0, 0.0]))
    nose_base = int(in_crop[preview.NOSE_BASE, 1])
    changed_rows = np.flatnonzero(np.any(rendered != crop, axis=(1, 2)))
    assert changed_rows.min() > nose_base - 0.3 * np.hypot(*(in_crop[291] - in_crop[61]))
    for edge in (rendered[:, 0] - crop[:, 0], rendered[:, -1] - crop[:, -1], rendered[-1] - crop[-1]):
        assert not edge.any(), "the crop's edges, where it meets the frame, stay as they were"
    assert np.array_equal(preview.render(crop, in_crop, np.array([1.0, 1.0, 0.0])), rendered), "deterministic"


def test_an_open_source_mouth_is_closed_for_silence(photo_face):
    image, landmarks, box, crop, in_crop = photo_face
    opened = paste(image, box, landmarks, preview.render(crop, in_crop, np.array([1.0, 0.0, 0.0])))
    with face.FaceAnalyzer() as analyzer:
        open_points = analyzer.landmarks(opened)
        assert measured(analyzer, opened)[0] > 0.12
        closed = preview.render(blending.crop_face(opened, box), _landmarks_in_crop(open_points, box),
                                np.zeros(3))
        assert measured(analyzer, paste(opened, box, open_points, closed))[0] < metrics.CLOSED_OPENING


# --------------------------------------------------------------------------- whole jobs


@pytest.fixture(scope="module")
def speech_with_a_pause(speech_clip, tmp_path_factory) -> Path:
    """The speech clip, 1.2 s of silence, the speech clip again: 4.4 s."""
    path = tmp_path_factory.mktemp("pause") / "pause.wav"
    ffmpeg("-i", str(speech_clip), "-f", "lavfi", "-t", "1.2", "-i", "anullsrc=r=16000:cl=mono",
           "-i", str(speech_clip), "-filter_complex", "[0:a][1:a][2:a]concat=n=3:v=0:a=1", str(path))
    return path


def test_run_with_the_preview_needs_no_weights(face_clip, speech_with_a_pause, tmp_path, capsys):
    out = tmp_path / "preview.mp4"
    no_models = tmp_path / "no-models"
    assert cli.main(["run", "--engine", "preview", "--models-dir", str(no_models), "--video", str(face_clip),
                     "--audio", str(speech_with_a_pause), "--out", str(out), "--crf", "0"]) == 0
    assert "(preview engine)" in capsys.readouterr().out
    assert not no_models.exists()
    source, result, speech = probe(face_clip), probe(out), probe(speech_with_a_pause)
    assert (result.width, result.height, result.fps) == (source.width, source.height, source.fps)
    assert result.num_frames == int(speech.duration * source.fps)
    assert result.has_audio and result.duration == pytest.approx(speech.duration, abs=0.05)

    scores = metrics.score_video(out, source=face_clip, audio=speech_with_a_pause)
    assert scores.silent_closed_share >= 0.9, "the mouth rests in the pause"
    assert scores.speech_mouth_open > scores.silence_mouth_open + 0.03
    assert scores.sync_correlation > 0.5 and abs(scores.sync_lag_ms) <= 40
    assert scores.identity_psnr > 40, "the upper face is untouched"


def test_a_photo_and_the_cache(speech_clip, tmp_path):
    pipeline = LipSyncPipeline.from_pretrained(cache_dir=tmp_path / "cache", engine="preview")
    first = pipeline(PHOTO, speech_clip, tmp_path / "a.mp4", RunOptions(crf=0))
    assert (first.engine, first.num_frames, first.frames_with_face) == ("preview", 40, 40)
    assert "face" in first.timings and "render" in first.timings
    again = pipeline(PHOTO, speech_clip, tmp_path / "b.mp4", RunOptions(crf=0))
    assert "face" not in again.timings, "the second run finds the face analysis in the cache"
    frames = [np.asarray(f) for f in read_frames(tmp_path / "a.mp4")]
    for a, b in zip(frames, read_frames(tmp_path / "b.mp4"), strict=True):
        assert np.array_equal(a, b)
    moving = np.abs(np.diff(np.stack(frames).astype(np.int16), axis=0)).reshape(len(frames) - 1, -1).max(axis=1)
    assert (moving > 40).sum() > 5, "the mouth of the photo moves"


def test_an_audio_clip_brings_its_phoneme_timings(tmp_path, monkeypatch):
    from musetalk import speech

    clip = speech.speech_for_video("Mama made a map.", "espeak", None, {}, cache_dir=tmp_path / "speech")
    assert any(event.kind == "phoneme" for event in clip.events)
    pipeline = LipSyncPipeline.from_pretrained(cache_dir=False, engine="preview")
    made = []
    real = pipeline.engine.audio_features
    monkeypatch.setattr(pipeline.engine, "audio_features", lambda *args, **kwargs: made.append(real(*args, **kwargs)) or made[-1])
    result = pipeline(PHOTO, clip, tmp_path / "mama.mp4", RunOptions())
    assert made[0].source == "phonemes"
    assert result.num_frames == math.ceil(probe(clip.path).duration * 25 - 1e-6)  # the whole speech


def test_bench_times_the_preview(tmp_path):
    from musetalk import bench

    video = tmp_path / "clip.mp4"
    ffmpeg("-loop", "1", "-i", str(PHOTO), "-i", str(EXAMPLES / "speech.wav"), "-t", "1", "-r", "25",
           "-vf", "scale=320:-2", "-pix_fmt", "yuv420p", "-c:a", "aac", str(video))
    report = bench.run_bench(video=str(video), runs=2, engine="preview")
    assert report.model == "preview" and len(report.runs) == 2
    assert "face" in report.runs[0].stages and "face" not in report.runs[1].stages
    assert report.runs[1].stages["render"] > 0 and report.runs[1].fps > 0
    assert any("first run" in line for line in bench.format_report(report))


def test_the_mouth_opens_as_wide_as_the_scores_call_good_from_espeak_and_from_audio(face_clip, tmp_path):
    """The preview's mouth in speech measures 0.05 .. 0.2 eye distances (the scores' good range) whether
    it follows eSpeak's phonemes or the sound alone, and rests in the pause between the sentences."""
    from musetalk import speech

    clip = speech.speech_for_video("Good morning. Today we look at three ways to dub a video.", "espeak", None, {},
                                   cache_dir=tmp_path / "speech")
    pipeline = LipSyncPipeline.from_pretrained(cache_dir=False, engine="preview")
    for name, audio in (("phonemes", clip), ("audio", clip.path)):
        out = tmp_path / f"{name}.mp4"
        pipeline(face_clip, audio, out, RunOptions())
        scores = metrics.score_video(out, source=face_clip, audio=clip.path)
        assert 0.05 <= scores.speech_mouth_open <= 0.2, (name, scores.speech_mouth_open)
        assert scores.silence_mouth_open < 0.02 and scores.silent_closed_share >= 0.8, name
