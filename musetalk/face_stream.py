"""Face analysis that generation can follow a few frames behind.

The first dub of a video used to analyse every frame before the model saw the first one.
Here the analysis runs in a thread and hands on each source frame, with its smoothed
landmarks and crop box, as soon as they are final (``LandmarkSmoother.latency`` frames after
the frame was decoded). So the model, blending and encoding run while the rest of the video
is still being analysed, and each source frame is decoded once for both. When every frame
has been analysed, ``result()`` gives the whole ``Avatar`` (for the rest of the schedule and
for the cache); it is the same avatar a whole-video analysis gives.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from musetalk import face, stopping
from musetalk.avatar import Avatar, FaceFrame
from musetalk.config import RunOptions
from musetalk.stages import DONE, cpu_workers, drain, get_checking_stops, put_unless_stopped
from musetalk.timing import StageTimer

# Finished frames waiting for the generation (the decoder ahead of the analysis holds more).
FRAMES_HANDED_ON = 4


def analyse(frames: Iterable[np.ndarray], key: str, width: int, height: int, fps: float, options: RunOptions,
            timer: StageTimer, hand_on: Callable[[FaceFrame], None] | None = None,
            progress: Callable[[int], None] | None = None, source: str = "the video",
            workers: int | None = None) -> Avatar:
    """Landmarks, crop box and whether to redraw, for every frame; ``hand_on`` gets each frame as
    soon as its face is final. ``workers``: face analysis threads (None: ``stages.cpu_workers()``).
    Raises NoFaceError when no frame has a face."""
    workers = cpu_workers() if workers is None else workers
    smoother = face.LandmarkSmoother(options.smoothing, fps)
    rows: list[np.ndarray | None] = []
    boxes: list[np.ndarray] = []
    usable: list[bool] = []  # the engine redraws the frame: a face, and a box with an area
    held: dict[int, np.ndarray] = {}  # frames whose smoothing is not final yet

    def finished(done: list[tuple[int, np.ndarray | None]]) -> None:
        for index, landmarks in done:
            box = _crop_box(landmarks, width, height, options)
            rows.append(landmarks)
            boxes.append(box)
            usable.append(landmarks is not None and box[0] >= 0)
            frame = held.pop(index, None)
            if hand_on is not None:
                hand_on(FaceFrame(index, frame, landmarks, box) if usable[-1] else FaceFrame(index, frame, None, None))

    found = face.stream_landmarks(frames, options.face_index, workers)
    try:
        for index in itertools.count():
            with timer.stage("face"):
                pair = next(found, None)
            if pair is None:
                break
            frame, landmarks = pair
            if hand_on is not None:
                held[index] = frame
            finished(smoother.push(landmarks))
            if progress is not None:
                progress(index + 1)
    finally:
        found.close()  # stops the analysis threads when this ends early
    finished(smoother.finish())
    track = face.FaceTrack.from_rows(rows, width, height).require_face(source)
    return Avatar(key, track, np.stack(boxes).astype(np.int32), np.array(usable, bool))


def _crop_box(landmarks: np.ndarray | None, width: int, height: int, options: RunOptions) -> np.ndarray:
    if landmarks is None:
        return np.full(4, -1, np.int32)
    track = face.FaceTrack(landmarks[None], np.ones(1, bool), width, height)
    return face.crop_boxes(track, options.version, options.extra_margin, options.bbox_shift)[0]


class FaceStream:
    """``analyse`` in a thread. ``frames(count)`` yields the first ``count`` source frames as their
    faces become final; ``result()`` waits for the whole avatar; ``close()`` stops early."""

    def __init__(self, frames: Iterable[np.ndarray], key: str, width: int, height: int, fps: float,
                 options: RunOptions, timer: StageTimer, progress: Callable[[int], None] | None = None,
                 source: str = "the video", workers: int | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=FRAMES_HANDED_ON)
        self._wanted = float("inf")  # frames the generation will take (unknown until it asks)
        self._stop_handing_on = threading.Event()
        self._cancelled = threading.Event()
        self._avatar: Avatar | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faces", daemon=True,
                                        args=(frames, key, width, height, fps, options, timer, progress, source,
                                              workers))
        self._thread.start()

    def _run(self, frames, key, width, height, fps, options, timer, progress, source, workers) -> None:
        try:
            self._avatar = analyse(self._until_cancelled(frames), key, width, height, fps, options, timer,
                                   self._hand_on, progress, source, workers)
        except BaseException as error:  # raised in the caller's thread by frames() and result()
            self._error = error
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()  # stops the decoder
            put_unless_stopped(self._queue, DONE, self._stop_handing_on)

    def _until_cancelled(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for frame in frames:
            if self._cancelled.is_set():
                raise _Cancelled()
            stopping.check()  # a stopped job's analysis ends at the next frame
            yield frame

    def _hand_on(self, item: FaceFrame) -> None:
        if item.index < self._wanted:
            put_unless_stopped(self._queue, item, self._stop_handing_on)

    def frames(self, count: int) -> Iterator[FaceFrame]:
        """Source frames 0 .. count-1 (fewer when the video is shorter), each once its face is final."""
        self._wanted = count
        taken = 0
        while taken < count:
            item = get_checking_stops(self._queue)
            if item is DONE:
                if self._error is not None:
                    raise self._error
                return
            yield item
            taken += 1

    def result(self) -> Avatar:
        """The whole avatar, once every frame is analysed; raises what the analysis raised."""
        self._stop_handing_on.set()  # whatever the generation did not take is dropped
        drain(self._queue)
        stopping.wait_for(thread=self._thread)
        if self._error is not None:
            raise self._error
        return self._avatar

    def close(self) -> None:
        """Stop the analysis (a job that failed elsewhere)."""
        self._cancelled.set()
        self._stop_handing_on.set()
        drain(self._queue)
        self._thread.join()


class _Cancelled(Exception):
    pass
