"""Which source frame each output frame shows, and reading them in that order with flat memory.

The output length follows the audio. When it is longer than the video the source frames
are played again: forward then backward ("pingpong", as the official code), from the
start ("loop"), or the last frame held ("freeze").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from musetalk.config import LOOP_MODES

# Frames read at a time when playing backward: each chunk is decoded forward then reversed, and each
# decode starts at the keyframe before the chunk (often the video's first frame), so fewer, longer
# chunks decode less. A chunk holds BACKWARD_CHUNK frames, or as many as BACKWARD_CHUNK_BYTES hold when
# the frame size is known: 200 frames of a 432x504 video, 46 of 720p, 32 of 1080p.
BACKWARD_CHUNK = 32
BACKWARD_CHUNK_BYTES = 128 * 2**20

OpenReader = Callable[[int, int], Iterable[np.ndarray]]  # (start_frame, count) -> frames


def frames_to_carry(seconds: float, fps: float) -> int:
    """Frames that carry ``seconds`` of audio, rounded up (the official code rounds down and drops up
    to a frame of speech); the tolerance absorbs float seconds of an exact frame count."""
    return max(0, math.ceil(seconds * fps - 1e-6))


def frame_schedule(num_frames: int, num_source: int, loop: str = "pingpong") -> np.ndarray:
    """Source frame index of each of ``num_frames`` output frames, int64."""
    return source_frames(np.arange(num_frames, dtype=np.int64), num_source, loop)


def source_frames(positions: np.ndarray, num_source: int, loop: str = "pingpong") -> np.ndarray:
    """Source frame index of output frames ``positions`` (any, in any order: a live stream asks
    batch by batch), int64."""
    if loop not in LOOP_MODES:
        raise ValueError(f"loop must be one of {', '.join(LOOP_MODES)}, not {loop!r}")
    if num_source < 1:
        raise ValueError("a video needs at least one frame")
    positions = np.asarray(positions, dtype=np.int64)
    if loop == "loop":
        return positions % num_source
    if loop == "freeze":
        return np.minimum(positions, num_source - 1)
    # pingpong: 0..N-1, N-1..0, 0..N-1, ... (each end frame shown twice, as the official code does)
    cycle = positions % (2 * num_source)
    return np.where(cycle < num_source, cycle, 2 * num_source - 1 - cycle)


def runs(schedule: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a schedule into runs (first index, length, step) with step +1, -1 or 0."""
    result: list[tuple[int, int, int]] = []
    position = 0
    while position < len(schedule):
        length, step = 1, 0
        if position + 1 < len(schedule):
            step = int(schedule[position + 1] - schedule[position])
            if step not in (-1, 0, 1):
                step = 0  # a jump: this run is one frame long
            else:
                length = 2
                while (
                    position + length < len(schedule)
                    and schedule[position + length] - schedule[position + length - 1] == step
                ):
                    length += 1
        result.append((int(schedule[position]), length, step))
        position += length
    return result


def scheduled_frames(schedule: np.ndarray, open_reader: OpenReader,
                     frame_bytes: int | None = None) -> Iterator[np.ndarray]:
    """Source frames in schedule order. Forward runs stream; backward runs decode chunks (see
    BACKWARD_CHUNK; ``frame_bytes``: the size of one frame, when known) forward and reverse them;
    repeats decode once."""
    chunk_frames = max(BACKWARD_CHUNK, BACKWARD_CHUNK_BYTES // frame_bytes) if frame_bytes else BACKWARD_CHUNK
    for first, length, step in runs(schedule):
        if step == 1:
            yield from _stream_exactly(open_reader, first, length)
        elif step == 0:
            frame = next(_stream_exactly(open_reader, first, 1))
            for _ in range(length):
                yield frame
        else:
            last = first - length + 1
            chunk_end = first
            while chunk_end >= last:
                chunk_start = max(last, chunk_end - chunk_frames + 1)
                chunk = list(_stream_exactly(open_reader, chunk_start, chunk_end - chunk_start + 1))
                yield from reversed(chunk)
                chunk_end = chunk_start - 1


def _stream_exactly(open_reader: OpenReader, start: int, count: int) -> Iterator[np.ndarray]:
    """``count`` frames from ``start``; a decoder that stops a frame short repeats its last frame
    (seeking near the end of some files yields one frame fewer than counting did)."""
    frame = None
    produced = 0
    frames = open_reader(start, count)
    try:
        for frame in frames:
            yield frame
            produced += 1
            if produced == count:
                return
    finally:
        if hasattr(frames, "close"):
            frames.close()  # stops the decoder now, not whenever the garbage collector runs
    if frame is None:
        raise RuntimeError(f"could not read source frame {start}")
    for _ in range(count - produced):
        yield frame
