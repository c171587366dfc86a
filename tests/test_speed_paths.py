"""The overlapped pipeline and the prepared-avatar cache change no output."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk.avatar import AvatarCache
from musetalk.config import RunOptions
from musetalk.pipeline import LipSyncPipeline
from musetalk.video_io import read_frames

from conftest import ffmpeg


def frames_of(path) -> list[np.ndarray]:
    return list(read_frames(path))


@pytest.fixture(scope="module")
def lossless() -> RunOptions:
    return RunOptions(crf=0, batch_size=4)


@pytest.fixture(scope="module")
def clip(face_clip, tmp_path_factory):
    """The first 12 frames of the face clip: these tests compare runs, so short is enough."""
    path = tmp_path_factory.mktemp("speed") / "clip.mp4"
    ffmpeg("-i", str(face_clip), "-frames:v", "12", "-c:v", "libx264", "-crf", "12", str(path))
    return path


@pytest.fixture(scope="module")
def speech(speech_clip, tmp_path_factory):
    """0.8 s of speech: 20 frames, so the 12 source frames play forward and back."""
    path = tmp_path_factory.mktemp("speed") / "speech.wav"
    ffmpeg("-i", str(speech_clip), "-t", "0.8", str(path))
    return path


def test_overlapped_run_equals_one_at_a_time(models_dir, clip, speech, tmp_path, lossless):
    threaded = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=False)
    serial = LipSyncPipeline(threaded.engine, overlap=False)
    threaded(clip, speech, tmp_path / "threaded.mp4", lossless)
    serial(clip, speech, tmp_path / "serial.mp4", lossless)
    for a, b in zip(frames_of(tmp_path / "threaded.mp4"), frames_of(tmp_path / "serial.mp4"), strict=True):
        assert np.array_equal(a, b)


def test_cache_hit_equals_miss_and_skips_the_work(models_dir, clip, speech, tmp_path, lossless):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    miss = pipeline(clip, speech, tmp_path / "miss.mp4", lossless)
    assert "face" in miss.timings and miss.timings["vae_encode"] > 0
    assert len(cache.entries()) == 1
    hit = pipeline(clip, speech, tmp_path / "hit.mp4", lossless)
    assert "face" not in hit.timings and "vae_encode" not in hit.timings
    for a, b in zip(frames_of(tmp_path / "miss.mp4"), frames_of(tmp_path / "hit.mp4"), strict=True):
        assert np.array_equal(a, b)


def test_a_face_option_change_misses_and_a_mask_change_hits(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    pipeline(clip, speech, tmp_path / "a.mp4", RunOptions())
    changed = pipeline(clip, speech, tmp_path / "b.mp4", RunOptions(extra_margin=20))
    assert "face" in changed.timings
    assert len(cache.entries()) == 2
    mask_only = pipeline(clip, speech, tmp_path / "c.mp4", RunOptions(parsing_mode="mouth"))
    assert "face" not in mask_only.timings


def test_an_edited_video_never_uses_the_old_entry(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    copy = tmp_path / "clip.mp4"
    copy.write_bytes(clip.read_bytes())
    pipeline(copy, speech, tmp_path / "a.mp4", RunOptions())
    copy.write_bytes(clip.read_bytes() + b"\0")  # same name, other bytes
    assert "face" in pipeline(copy, speech, tmp_path / "b.mp4", RunOptions()).timings


def test_the_cache_keeps_to_its_limit_and_clears(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    pipeline(clip, speech, tmp_path / "a.mp4", RunOptions())
    pipeline(clip, speech, tmp_path / "b.mp4", RunOptions(smoothing=0.2))
    entries = cache.entries()
    assert len(entries) == 2
    small = AvatarCache(cache.root, limit_bytes=entries[0].size)
    assert small.prune() == [entries[1].key]  # the least recently used goes
    assert [e.key for e in small.entries()] == [entries[0].key]
    assert small.clear() == entries[0].size and small.entries() == []


def test_a_damaged_entry_is_a_miss(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    pipeline(clip, speech, tmp_path / "a.mp4", RunOptions())
    for path in (cache.root / cache.entries()[0].key).iterdir():
        path.write_bytes(b"garbage")
    again = pipeline(clip, speech, tmp_path / "b.mp4", RunOptions())
    assert "face" in again.timings
    third = pipeline(clip, speech, tmp_path / "c.mp4", RunOptions())
    assert "face" not in third.timings, "the damaged entry was replaced by a good one"
