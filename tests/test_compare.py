"""Grids and side-by-side videos: layout, labels, which frame each cell shows, one audio track, flat memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from musetalk import compare, schedule
from musetalk.errors import InputError
from musetalk.video_io import FrameWriter, probe, read_frames

PHOTO = Path(__file__).parent / "data" / "face.jpg"
MARK = 24  # side of the top-left square whose grey level encodes a frame index


def mark_value(index: int) -> int:
    return 12 + 20 * index


def read_mark(patch: np.ndarray) -> int:
    return int(round((patch.mean() - 12) / 20))


def marked_video(path: Path, count: int, audio: Path | None = None, size=(96, 80)) -> Path:
    """``count`` flat frames at 25 fps, frame i carrying the grey level mark_value(i) in its top-left square."""
    width, height = size
    with FrameWriter(path, width, height, 25, audio_path=audio, crf=4, total_frames=count) as writer:
        for index in range(count):
            frame = np.full((height, width, 3), 200, dtype=np.uint8)
            frame[:MARK, :MARK] = mark_value(index % 12)
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return marked_video(tmp_path_factory.mktemp("compare") / "source.mp4", 12)


@pytest.fixture(scope="module")
def dub(tmp_path_factory, speech_clip) -> Path:
    """40 frames (1.6 s) with the speech clip's sound, like a dub of the 12-frame source."""
    return marked_video(tmp_path_factory.mktemp("compare") / "dub.mp4", 40, audio=speech_clip)


def cell_mark(frame: np.ndarray, composition: compare.Composition, index: int, cell_width: int) -> int:
    """The mark of the panel in cell ``index`` (cells here are not scaled: the mark stays MARK px)."""
    row, col = divmod(index, composition.cols)
    label_height = (composition.height - (composition.rows - 1) * compare.GAP) // composition.rows - 80
    x = col * (cell_width + compare.GAP)
    y = row * (label_height + 80 + compare.GAP) + label_height
    return read_mark(frame[y + 4 : y + MARK - 4, x + 4 : x + MARK - 4])


@pytest.mark.parametrize("count, shape", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)), (9, (3, 3))])
def test_grid_shape(count, shape):
    assert compare.grid_shape(count) == shape


def test_side_by_side_plays_the_original_on_the_dub_schedule(source, dub, tmp_path):
    order = compare.dub_schedule(source, 40, 25.0, "pingpong")
    assert order.tolist() == schedule.frame_schedule(40, 12, "pingpong").tolist()
    out = tmp_path / "side.mp4"
    made = compare.side_by_side(source, dub, out, original_schedule=order)

    info = probe(out)
    assert (made.rows, made.cols) == (1, 2)
    assert (info.width, info.height) == (made.width, made.height)
    assert made.width == 2 * 96 + compare.GAP and made.height - 80 >= compare.MIN_LABEL_HEIGHT
    assert info.num_frames == made.num_frames == 40
    assert info.duration == pytest.approx(1.6, abs=0.05)
    assert info.has_audio and made.audio_from == str(dub)
    for k, frame in enumerate(read_frames(out)):
        assert cell_mark(frame, made, 0, 96) == order[k], f"frame {k}: the original shows the wrong frame"
        assert cell_mark(frame, made, 1, 96) == k % 12, f"frame {k}: the dub shows the wrong frame"
    assert not list(tmp_path.glob(".*partial*"))


def test_grid_holds_short_panels_and_photos_and_draws_labels(source, dub, speech_clip, tmp_path):
    out = tmp_path / "grid.mp4"
    panels = [compare.Panel(str(dub), "Variant 1: espeak en-us"), compare.Panel(str(source), "Variant 2"),
              compare.Panel(str(PHOTO), "Photo (Français)")]
    made = compare.compose_grid(panels, out, audio_path=speech_clip)
    info = probe(out)
    assert (made.rows, made.cols) == (1, 3)
    assert info.num_frames == 40 and info.has_audio
    assert info.duration == pytest.approx(1.6, abs=0.05)
    frames = list(read_frames(out, max_frames=40))
    label_height = made.height - 80
    assert label_height >= compare.MIN_LABEL_HEIGHT
    # The 12-frame panel holds its last frame after it ends.
    assert [cell_mark(f, made, 1, 96) for f in frames[11:]] == [11] * 29
    # Each label band has text in it (light pixels on the dark band).
    for index in range(3):
        x = index * (96 + compare.GAP)
        band = frames[0][:label_height, x : x + 96]
        assert (band.max(axis=2) > 150).sum() > 20, f"no label drawn in cell {index}"
    # The photo (320x320) is fitted into its 96x80 cell without distortion: an 80x80 square, centred.
    photo_cell = frames[0][label_height:, 2 * (96 + compare.GAP):]
    columns_with_picture = np.flatnonzero(np.abs(photo_cell.astype(int) - compare.BACKGROUND).max(axis=(0, 2)) > 30)
    assert 76 <= len(columns_with_picture) <= 82


def test_a_grid_without_sound_is_silent_and_big_grids_are_scaled_down(source, tmp_path):
    out = tmp_path / "silent.mp4"
    made = compare.compose_grid([compare.Panel(str(source), str(i)) for i in range(4)], out, max_width=100)
    info = probe(out)
    assert not info.has_audio and made.audio_from is None
    assert (made.rows, made.cols) == (2, 2)
    assert info.width <= 100 and made.width % 2 == 0 and made.height % 2 == 0
    assert info.num_frames == 12


def test_bad_grids_are_refused_and_leave_nothing(source, tmp_path):
    out = tmp_path / "never.mp4"
    with pytest.raises(InputError, match="1 to 9"):
        compare.compose_grid([], out)
    with pytest.raises(InputError, match="1 to 9"):
        compare.compose_grid([compare.Panel(str(source), "x")] * 10, out)
    with pytest.raises(InputError, match="no sound"):
        compare.compose_grid([compare.Panel(str(source), "x")], out, audio_path=source)
    with pytest.raises(InputError, match="one of the inputs"):
        compare.compose_grid([compare.Panel(str(source), "x")], source)
    assert list(tmp_path.iterdir()) == []


def test_memory_stays_flat_in_the_length(source, tmp_path):
    """300 grid frames of two 96x80 panels: the frames alone would be 14 MB; far less is held at once."""
    order = schedule.frame_schedule(300, 12, "pingpong")
    panels = [compare.Panel(str(source), "a", order), compare.Panel(str(source), "b")]
    tracemalloc.start()
    try:
        made = compare.compose_grid(panels, tmp_path / "long.mp4")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert made.num_frames == 300
    all_frames = 300 * made.width * made.height * 3
    assert peak < all_frames / 5, f"peak {peak} bytes for {all_frames} bytes of frames"


def test_a_long_label_is_drawn_smaller_and_only_then_cut_after_a_whole_word():
    from musetalk.compare import MIN_LABEL_SCALE, _fit_text

    short, scale, _ = _fit_text("MuseTalk", 400, 40)
    assert short == "MuseTalk" and scale > 1
    smaller, small_scale, _ = _fit_text("preview, en-us, v1, mouth mask", 300, 40)
    assert smaller == "preview, en-us, v1, mouth mask" and small_scale < scale
    cut, cut_scale, _ = _fit_text("preview with a very long voice name that cannot fit", 120, 40)
    assert cut_scale == MIN_LABEL_SCALE and cut.endswith("...")
    assert "preview with a very long voice name that cannot fit".startswith(cut[:-3])
    assert cut[:-3].split()[-1] in "preview with a very long voice name that cannot fit".split()  # whole words
