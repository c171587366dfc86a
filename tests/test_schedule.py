import numpy as np
import pytest

from musetalk import schedule


def test_pingpong_plays_forward_then_backward():
    assert schedule.frame_schedule(10, 4, "pingpong").tolist() == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1]


def test_loop_and_freeze():
    assert schedule.frame_schedule(7, 3, "loop").tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert schedule.frame_schedule(5, 3, "freeze").tolist() == [0, 1, 2, 2, 2]


def test_shorter_output_is_the_first_frames_in_every_mode():
    for mode in ("pingpong", "loop", "freeze"):
        assert schedule.frame_schedule(3, 10, mode).tolist() == [0, 1, 2]


def test_a_photo_is_one_frame_repeated():
    assert schedule.frame_schedule(4, 1, "pingpong").tolist() == [0, 0, 0, 0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        schedule.frame_schedule(3, 0)
    with pytest.raises(ValueError):
        schedule.frame_schedule(3, 3, "bounce")


def test_runs_cover_the_schedule():
    plan = schedule.frame_schedule(23, 5, "pingpong")
    rebuilt = []
    for first, length, step in schedule.runs(plan):
        rebuilt += [first + step * k for k in range(length)]
    assert rebuilt == plan.tolist()
    assert schedule.runs(np.array([0, 1, 2, 0, 1])) == [(0, 3, 1), (0, 2, 1)]


class CountingSource:
    """Frames that carry their own index; records each read so memory and seeks can be checked."""

    def __init__(self, num_frames: int):
        self.num_frames = num_frames
        self.reads: list[tuple[int, int]] = []

    def __call__(self, start: int, count: int):
        self.reads.append((start, count))
        for index in range(start, min(start + count, self.num_frames)):
            yield np.full((2, 2, 3), index, np.uint8)


@pytest.mark.parametrize("mode", ["pingpong", "loop", "freeze"])
def test_scheduled_frames_follow_the_schedule(mode):
    source = CountingSource(70)
    plan = schedule.frame_schedule(200, 70, mode)
    frames = [int(frame[0, 0, 0]) for frame in schedule.scheduled_frames(plan, source)]
    assert frames == plan.tolist()
    # backward runs are read in bounded chunks, never the whole video at once
    assert all(count <= max(schedule.BACKWARD_CHUNK, 70) for _, count in source.reads)


def test_backward_chunks_hold_as_many_frames_as_their_byte_budget_allows():
    source = CountingSource(200)  # frames carry their index in a uint8: at most 256 of them
    plan = schedule.frame_schedule(400, 200, "pingpong")  # forward 200 frames, then back 200
    small = 2 * 2 * 3  # CountingSource's frames
    frames = [int(frame[0, 0, 0]) for frame in schedule.scheduled_frames(plan, source, frame_bytes=small)]
    assert frames == plan.tolist()
    assert len(source.reads) == 2, "a small frame's whole backward run in one chunk"
    big = schedule.BACKWARD_CHUNK_BYTES // 40  # 40 frames to a chunk
    source.reads.clear()
    assert [int(f[0, 0, 0]) for f in schedule.scheduled_frames(plan, source, frame_bytes=big)] == plan.tolist()
    assert [count for _, count in source.reads[1:]] == [40] * 5
    huge = schedule.BACKWARD_CHUNK_BYTES  # never fewer than BACKWARD_CHUNK frames a chunk
    source.reads.clear()
    list(schedule.scheduled_frames(plan, source, frame_bytes=huge))
    assert max(count for _, count in source.reads[1:]) == schedule.BACKWARD_CHUNK


def test_a_decoder_that_stops_short_repeats_its_last_frame():
    source = CountingSource(5)
    frames = list(schedule.scheduled_frames(np.arange(7), source))
    assert [int(f[0, 0, 0]) for f in frames] == [0, 1, 2, 3, 4, 4, 4]
