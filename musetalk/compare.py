"""Side-by-side and grid compositions of several videos: one labelled picture, one audio track.

Each panel is decoded by its own ``FrameReader`` at the grid's frame rate and the grid is
encoded by one ``FrameWriter``, frame by frame, so memory holds about one frame per panel
however long the videos are. Panels that end early hold their last frame; a still photo
is one frame held throughout. The sound is the audio track of one file (by default the
first panel that has one), cut or padded with silence to the grid's length.

A panel can be given a schedule: the source frame to show at each grid frame. The
original video beside its dub uses the pipeline's own schedule (ping-pong, loop or
freeze), so the original and the dubbed face move together.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from musetalk import schedule as schedule_lib
from musetalk import video_io
from musetalk.errors import InputError

logger = logging.getLogger(__name__)

MAX_PANELS = 9
# Gap between cells and the background of empty space, a dark grey that reads as "not video".
GAP = 4
BACKGROUND = (24, 24, 27)
LABEL_BACKGROUND = (36, 36, 40)
LABEL_COLOUR = (240, 240, 240)
MIN_LABEL_SCALE = 0.35  # the smallest font a label is drawn in before it is shortened
# The label band above each cell, as a fraction of the cell's height (with a floor in pixels).
LABEL_FRACTION = 0.07
MIN_LABEL_HEIGHT = 18
PROGRESS_EVERY = 10  # frames between two progress reports of a grid


@dataclass(frozen=True)
class Panel:
    """One cell of a grid: a video or photo and the label drawn above it."""

    path: str
    label: str
    # Source frame (at the grid's rate) shown at each grid frame; None plays the file in order.
    schedule: np.ndarray | None = None


@dataclass(frozen=True)
class Composition:
    """What ``compose_grid`` wrote."""

    path: str
    width: int
    height: int
    fps: float
    num_frames: int
    rows: int
    cols: int
    audio_from: str | None


@dataclass(frozen=True)
class _Layout:
    rows: int
    cols: int
    cell_width: int
    cell_height: int
    label_height: int

    @property
    def width(self) -> int:
        return self.cols * self.cell_width + (self.cols - 1) * GAP

    @property
    def height(self) -> int:
        return self.rows * (self.label_height + self.cell_height) + (self.rows - 1) * GAP

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left corner (x, y) of cell ``index``'s label band."""
        row, col = divmod(index, self.cols)
        return col * (self.cell_width + GAP), row * (self.label_height + self.cell_height + GAP)


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, cols) for ``count`` panels: one row up to three, then the squarest grid."""
    if not 1 <= count <= MAX_PANELS:
        raise InputError(f"a grid holds 1 to {MAX_PANELS} videos, not {count}")
    cols = count if count <= 3 else math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def source_frame_count(info: video_io.MediaInfo, fps: float) -> int:
    """How many frames a reader at ``fps`` yields from ``info``'s file (a photo: one)."""
    if info.is_image:
        return 1
    if not info.is_vfr and abs(info.fps - fps) < 1e-6:
        return max(1, info.num_frames)
    return max(1, int(round(info.duration * fps)))


def dub_schedule(video, num_frames: int, fps: float, loop: str = "pingpong") -> np.ndarray:
    """The source frame of ``video`` under each of a dub's ``num_frames`` frames, as the pipeline
    plays it (``loop`` as in RunOptions; an output as long as the video is the identity)."""
    info = video_io.probe(video)
    return schedule_lib.frame_schedule(num_frames, source_frame_count(info, fps), loop)


def side_by_side(original, dubbed, out_path, labels: tuple[str, str] = ("Original", "Dubbed"),
                 original_schedule: np.ndarray | None = None, **grid_options) -> Composition:
    """The original and its dub next to each other, with the dub's sound."""
    panels = [Panel(os.fspath(original), labels[0], original_schedule), Panel(os.fspath(dubbed), labels[1])]
    return compose_grid(panels, out_path, audio_path=dubbed, **grid_options)


# The studio's side-by-side is a view beside the dub, made from the two files once the dub is done (so
# it adds nothing to the dub's own time), and its encoding is most of what it costs: x264's ultrafast
# encodes several times quicker than medium, for a bigger file (at the same crf the picture looks the
# same); at x264's default crf (23; the dub keeps its own) ultrafast's file is a third smaller than at
# 20 and its encoding 6% cheaper (docs/performance.md). compose_grid's own defaults (medium, crf 20)
# stay for a grid made to be kept.
VIEW_PRESET = "ultrafast"
VIEW_CRF = 23


def compose_grid(panels: Sequence[Panel], out_path, audio_path=None, fps: float | None = None,
                 num_frames: int | None = None, max_width: int = 1920, max_height: int = 1080,
                 crf: int = 20, preset: str = "medium",
                 progress: Callable[[int, int], None] | None = None) -> Composition:
    """Write the panels as one labelled grid video; returns what was written.

    ``fps`` defaults to the first panel's rate, ``num_frames`` to the longest panel,
    ``audio_path`` to the first panel with sound (None and no panel with sound: a silent
    video). The grid is scaled down to fit ``max_width`` x ``max_height``; every panel is
    fitted into its cell without distortion.
    """
    panels = list(panels)
    infos = [video_io.probe(panel.path) for panel in panels]
    for panel, info in zip(panels, infos):
        if not info.has_video:
            raise InputError(f"{panel.path} has no picture; every panel of a grid must be a video or a photo")
    rows, cols = grid_shape(len(panels))
    fps = float(fps or infos[0].fps)
    audio_path = _choose_audio(audio_path, panels, infos)
    lengths = [len(p.schedule) if p.schedule is not None else source_frame_count(i, fps) for p, i in zip(panels, infos)]
    num_frames = int(num_frames or max(lengths))
    layout = _layout(rows, cols, infos[0].width, infos[0].height, max_width, max_height)
    # Each panel decoded at the size it is shown (ffmpeg scales it, in the decoder's own process).
    infos = [info.resized(*_fitted_size(info.width, info.height, layout)) for info in infos]
    background = _background(layout, [panel.label for panel in panels])
    logger.info("composing %d panels into a %dx%d grid (%dx%d px, %d frames at %g fps)",
                len(panels), rows, cols, layout.width, layout.height, num_frames, fps)

    writer = video_io.FrameWriter(
        out_path, layout.width, layout.height, fps, audio_path=audio_path, crf=crf, preset=preset,
        protect=[panel.path for panel in panels], total_frames=num_frames,
    )
    report = progress or (lambda done, total: None)
    try:
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(contextlib.closing(_held_frames(panel, info, fps)))
                       for panel, info in zip(panels, infos)]
            for done in range(1, num_frames + 1):
                canvas = background.copy()
                for index, stream in enumerate(streams):
                    _paste_cell(canvas, next(stream), layout, index)
                writer.write(canvas)
                if done % PROGRESS_EVERY == 0 or done == num_frames:
                    report(done, num_frames)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return Composition(os.fspath(out_path), layout.width, layout.height, fps, num_frames, rows, cols,
                       os.fspath(audio_path) if audio_path is not None else None)


# --------------------------------------------------------------------------- reading


def _choose_audio(audio_path, panels: list[Panel], infos: list[video_io.MediaInfo]):
    if audio_path is not None:
        if not video_io.probe(audio_path).has_audio:
            raise InputError(f"{audio_path} has no sound; choose a file with an audio track for the grid")
        return os.fspath(audio_path)
    return next((panel.path for panel, info in zip(panels, infos) if info.has_audio), None)


def _held_frames(panel: Panel, info: video_io.MediaInfo, fps: float) -> Iterator[np.ndarray]:
    """The panel's frames at ``fps`` (in its schedule's order if it has one), then its last frame forever."""
    rate = None if info.is_image else fps
    if panel.schedule is not None:
        frames = schedule_lib.scheduled_frames(panel.schedule, lambda start, count: _read(info, rate, start, count),
                                               info.frame_bytes)
    else:
        frames = _read(info, rate, 0, None)
    last = None
    try:
        for last in frames:
            yield last
    finally:
        frames.close()
    if last is None:
        raise InputError(f"no frame could be decoded from {panel.path}; the file may be damaged")
    while True:
        yield last


def _read(info: video_io.MediaInfo, rate: float | None, start: int, count: int | None) -> Iterator[np.ndarray]:
    """Frames from ``start``; a start past the end (a frame count estimated one too high) gives
    the last frame instead, so a schedule never runs dry one frame before the end."""
    produced = False
    with video_io.FrameReader(info.path, info=info, fps=rate, start_frame=start, max_frames=count) as reader:
        for frame in reader:
            produced = True
            yield frame
    if not produced and start > 0:
        with video_io.FrameReader(info.path, info=info, fps=rate, start_frame=start - 1, max_frames=1) as reader:
            yield from reader


# --------------------------------------------------------------------------- drawing


def _layout(rows: int, cols: int, width: int, height: int, max_width: int, max_height: int) -> _Layout:
    """Cells as big as the first panel, scaled down (never up) until the grid fits; even sizes."""
    label_height = max(MIN_LABEL_HEIGHT, round(height * LABEL_FRACTION))
    scale = min(1.0, (max_width - (cols - 1) * GAP) / (cols * width),
                (max_height - (rows - 1) * GAP) / (rows * (height + label_height)))
    cell_width = max(2, int(width * scale) // 2 * 2)
    cell_height = max(2, int(height * scale) // 2 * 2)
    label_height = max(MIN_LABEL_HEIGHT, int(label_height * scale) // 2 * 2)
    return _Layout(rows, cols, cell_width, cell_height, label_height)


def _background(layout: _Layout, labels: list[str]) -> np.ndarray:
    """The grid's fixed part: background, label bands and their text, drawn once."""
    import cv2

    canvas = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for index, label in enumerate(labels):
        x, y = layout.origin(index)
        canvas[y : y + layout.label_height, x : x + layout.cell_width] = LABEL_BACKGROUND
        text, scale, thickness = _fit_text(_ascii(label), layout.cell_width - 8, layout.label_height)
        (_, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        baseline_y = y + (layout.label_height + text_height) // 2
        cv2.putText(canvas, text, (x + 4, baseline_y), cv2.FONT_HERSHEY_SIMPLEX, scale, LABEL_COLOUR,
                    thickness, cv2.LINE_AA)
    return canvas


def _fit_text(text: str, max_width: int, band_height: int) -> tuple[str, float, int]:
    """Text, font scale and thickness so the label fills about 60 % of its band and fits its width: a
    long label is drawn smaller first, and only past the smallest size cut after a whole word ("...")."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, unit_height), _ = cv2.getTextSize("Hg", font, 1.0, 1)
    scale = max(MIN_LABEL_SCALE, 0.6 * band_height / unit_height)

    def width(candidate: str) -> int:
        return cv2.getTextSize(candidate, font, scale, 1 if scale < 0.9 else 2)[0][0]

    while scale > MIN_LABEL_SCALE and width(text) > max_width:
        scale = max(MIN_LABEL_SCALE, scale * 0.9)
    thickness = 1 if scale < 0.9 else 2
    if width(text) <= max_width:
        return text, scale, thickness
    words = text.split()
    while len(words) > 1 and width(" ".join(words) + "...") > max_width:
        words.pop()
    shortened = " ".join(words)
    while len(shortened) > 1 and width(shortened + "...") > max_width:  # one word longer than the cell
        shortened = shortened[:-1]
    return shortened.rstrip(" ,;:") + "...", scale, thickness


def _ascii(label: str) -> str:
    """The Hershey fonts draw ASCII only: accents are dropped ("Français" -> "Francais"), other letters become '?'."""
    decomposed = unicodedata.normalize("NFKD", label)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return kept.encode("ascii", "replace").decode("ascii")


def _fitted_size(width: int, height: int, layout: _Layout) -> tuple[int, int]:
    """The size a width x height picture is shown at in a cell: as big as fits, its aspect ratio kept."""
    scale = min(layout.cell_width / width, layout.cell_height / height)
    return max(1, min(layout.cell_width, round(width * scale))), max(1, min(layout.cell_height, round(height * scale)))


def _paste_cell(canvas: np.ndarray, frame: np.ndarray, layout: _Layout, index: int) -> None:
    """Fit ``frame`` into cell ``index`` keeping its aspect ratio, centred."""
    import cv2

    x, y = layout.origin(index)
    y += layout.label_height
    height, width = frame.shape[:2]
    fitted_width, fitted_height = _fitted_size(width, height, layout)
    scale = fitted_width / width
    if (fitted_width, fitted_height) != (width, height):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        frame = cv2.resize(frame, (fitted_width, fitted_height), interpolation=interpolation)
    left = x + (layout.cell_width - fitted_width) // 2
    top = y + (layout.cell_height - fitted_height) // 2
    canvas[top : top + fitted_height, left : left + fitted_width] = frame
