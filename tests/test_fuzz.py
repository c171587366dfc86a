"""Fuzzing: random and mutated media bytes fed to the probe, the frame reader and audio decoding.

Whatever the bytes, the answer is a result or a typed error (InputError / FFmpegError): never
another exception, never a hang. The time limits are the code's own (video_io.COMMAND_TIMEOUT_S
and STALL_TIMEOUT_S, shortened here so a hang would show within the test), and each example
must finish well inside them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musetalk import audio as audio_lib
from musetalk import video_io
from musetalk.errors import FFmpegError, InputError

from conftest import ffmpeg

TYPED = (InputError, FFmpegError)
TIME_LIMIT_S = 8.0  # the code's own limits during this test
SEEDS = {
    "mp4": ["-f", "lavfi", "-i", "testsrc2=s=32x24:d=0.2:r=25", "-f", "lavfi", "-i", "sine=d=0.2:sample_rate=8000",
            "-c:v", "libx264", "-g", "2", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"],
    "webm": ["-f", "lavfi", "-i", "testsrc2=s=32x24:d=0.2:r=25", "-f", "lavfi", "-i", "sine=d=0.2",
             "-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libopus", "-shortest"],
    "wav": ["-f", "lavfi", "-i", "sine=d=0.1:sample_rate=8000"],
    "mp3": ["-f", "lavfi", "-i", "sine=d=0.2:sample_rate=8000"],
    "png": ["-f", "lavfi", "-i", "testsrc2=s=16x16", "-frames:v", "1"],
    "jpg": ["-f", "lavfi", "-i", "testsrc2=s=16x16", "-frames:v", "1"],
}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    made = {}
    for extension, args in SEEDS.items():
        path = folder / f"seed.{extension}"
        ffmpeg(*args, str(path))
        made[extension] = path.read_bytes()
    return made


@pytest.fixture(scope="module")
def short_limits():
    """The code's time limits, shortened so that a hang fails this test instead of stalling it."""
    saved = video_io.COMMAND_TIMEOUT_S, video_io.STALL_TIMEOUT_S
    video_io.COMMAND_TIMEOUT_S = video_io.STALL_TIMEOUT_S = TIME_LIMIT_S
    yield
    video_io.COMMAND_TIMEOUT_S, video_io.STALL_TIMEOUT_S = saved


def exercise(path: Path) -> str:
    """Everything the studio does with an upload: probe, read frames, decode audio. Returns what
    happened; raises only when the answer is neither a result nor a typed error."""
    try:
        info = video_io.probe(path)
    except TYPED:
        return "refused by probe"
    outcome = "probed"
    if info.has_video:
        try:
            for frame in video_io.read_frames(path, info=info, max_frames=8):
                assert frame.shape == (info.height, info.width, 3) and frame.dtype == np.uint8
            for frame in video_io.read_frames(path, info=info, start_frame=2, max_frames=2, fps=10):
                assert frame.shape == (info.height, info.width, 3)
            outcome += ", frames read"
        except TYPED:
            outcome += ", frames refused"
    if info.has_audio:
        try:
            wav = audio_lib.load_audio(path)
            assert wav.dtype == np.float32 and wav.ndim == 1 and np.all(np.isfinite(wav))
            outcome += ", audio read"
        except TYPED:
            outcome += ", audio refused"
    return outcome


def mutate(data: bytes, edits: list[tuple[int, int, int]], cut: float | None) -> bytes:
    """Overwrite, insert or delete bytes at the given positions, then maybe cut the tail."""
    buffer = bytearray(data)
    for kind, position, value in edits:
        at = position % max(1, len(buffer))
        if kind == 0:
            buffer[at] = value
        elif kind == 1:
            buffer[at:at] = bytes([value]) * (1 + value % 7)
        else:
            del buffer[at: at + 1 + value % 16]
    if cut is not None:
        buffer = buffer[: max(1, int(len(buffer) * cut))]
    return bytes(buffer)


# Mostly overwrites: the container stays whole and the damage reaches the decoders.
edit = st.tuples(st.sampled_from([0, 0, 0, 1, 2]), st.integers(0, 1 << 20), st.integers(0, 255))


@settings(max_examples=45, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(SEEDS)), edits=st.lists(edit, min_size=1, max_size=12),
       cut=st.none() | st.floats(0.05, 1.0))
def test_mutated_media_get_a_result_or_a_typed_error(seeds, short_limits, tmp_path_factory, kind, edits, cut):
    path = tmp_path_factory.mktemp("mutant") / f"mutant.{kind}"
    path.write_bytes(mutate(seeds[kind], edits, cut))
    started = time.monotonic()
    exercise(path)
    assert time.monotonic() - started < 4 * TIME_LIMIT_S


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(min_size=1, max_size=4096), extension=st.sampled_from(["mp4", "wav", "png", "m3u8", "bin"]))
def test_random_bytes_get_a_typed_error(short_limits, tmp_path_factory, data, extension):
    path = tmp_path_factory.mktemp("random") / f"random.{extension}"
    path.write_bytes(data)
    started = time.monotonic()
    exercise(path)
    assert time.monotonic() - started < 4 * TIME_LIMIT_S


@pytest.mark.parametrize("header", [b"RIFF\xff\xff\xff\xffWAVEfmt ", b"\x00\x00\x00\x20ftypisom", b"\x89PNG\r\n\x1a\n",
                                    b"\x1aE\xdf\xa3", b"ID3\x04\x00\x00", b"OggS\x00\x02"])
def test_a_valid_header_on_garbage_is_a_typed_error(short_limits, tmp_path, header):
    """The start of a real file followed by noise: the demuxer accepts it, the rest must not crash anything."""
    path = tmp_path / "garbage.bin"
    path.write_bytes(header + np.random.default_rng(len(header)).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    assert exercise(path)


def test_the_seeds_themselves_read_whole(seeds, tmp_path):
    """The mutations start from files that work (so a refusal above is the mutation's doing)."""
    for kind, data in seeds.items():
        path = tmp_path / f"seed.{kind}"
        path.write_bytes(data)
        outcome = exercise(path)
        assert "refused" not in outcome, (kind, outcome)
