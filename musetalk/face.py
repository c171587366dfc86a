"""Face detection, 468-point landmarks, temporal smoothing and the MuseTalk crop box.

MediaPipe's face mesh on its own misses faces that are small in the frame (its built-in
detector is short-range), so every frame goes through two stages:

1. ``FaceDetection(model_selection=1)`` (full range) finds the faces in the whole frame;
2. the face mesh runs on an enlarged, resized crop around the chosen face, where the face
   fills a good part of the image, and its points are mapped back to frame pixels.

The detector runs on one frame in ``DETECT_EVERY`` (and on any frame where following fails):
there the face chosen (largest, or the N-th from the left) is decided afresh from the
detector's boxes, so it cannot drift to another person for more than a few frames the way a
tracker that only follows the previous frame's points can when two faces cross. In between,
the mesh runs in the detector's last box carried along with the face, which costs half as much
(the detector and the mesh take about 7 and 10 ms a call on one CPU core). When the detector
finds no face at all, ``analyze`` looks where the previous frame's face was (the mesh must find
a face whose centre stays in that area), and then in overlapping tiles of the frame, where a
small face is shrunk less than in the whole frame.

The crop box follows MuseTalk's rules (MUSETALK_FACTS section 4), which were written for
the 68-point landmark layout; ``OUTLINE_68`` and ``NOSE_29`` are the mesh points that stand
in for it (see their comments for how they were chosen).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from musetalk.errors import InputError, NoFaceError
from musetalk.stages import ordered_map, thread_pool

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 468

# The face oval of the mesh, in order around the face (clockwise in the image, starting at
# the top of the forehead). Used for the box outline and for the blending masks.
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
# The outer lip contour, in order (mouth corner 61, upper lip, corner 291, lower lip).
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
# The inner lip contour (the mouth opening), in order.
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
# The nose as a face-parsing network segments it (bridge, sides, wings and base): MediaPipe's own
# nose contour points (FACEMESH_NOSE); their convex hull is the nose class of the blending masks.
NOSE_REGION = (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327,
               344, 440)
CHIN = 152

# Which mesh points stand in for the 68-point layout. Checked on tests/data/face.jpg: the
# 68-point mean face shape (dlib/iBUG 300-W) was fitted onto the mesh with a similarity
# transform through seven unambiguous pairs (eye corners 36/39/42/45 = 33/133/362/263, mouth
# corners 48/54 = 61/291, chin 8 = 152), then each 68-point position was matched to its
# nearest mesh points:
# - jaw line 0..16 lies along the face oval from 127 (temple, beside #0) through 234 (#1),
#   the chin 152 (#8) and 454 (#15) to 356 (#16); the face oval's forehead arc (above
#   127/356) is not part of the 68 points and is left out. The 68 points' x range on that
#   image was 93..243 px, the mesh outline below gives 91..238 px.
# - brows 17..26, eye contours 36..47, nose 27..35 and the outer lips 48..59 are the mesh's
#   own brow, eye, nose and lip points; they never set the box's sides on a frontal face
#   but they do on a turned head, as in the 68-point layout.
_JAW_LINE = (127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152,
             377, 400, 378, 379, 365, 397, 288, 361, 323, 454, 356)
_BROWS = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107, 276, 283, 282, 295, 285, 300, 293, 334, 296, 336)
_EYES = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7,
         362, 398, 384, 385, 386, 387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382)
_NOSE = (168, 6, 197, 195, 5, 4, 1, 2, 98, 97, 326, 327)
OUTLINE_68 = np.array(sorted(set(_JAW_LINE + _BROWS + _EYES + _NOSE + LIPS_OUTER)), dtype=np.int64)
# 68-point #29 (the bridge point just above the nose tip, the box's middle line): the fit
# put it at y = 167.3 px; along the mesh's bridge 168 (#27, 140.4), 6, 197, 195 (164.0),
# 5 (172.3), 4 (#30, 182.0), 1 (tip, 188.8). #29 is two thirds of the way from #27 to #30
# (168.1 px): the mean of 195 and 5 (168.2 px) matches it better than either point alone.
NOSE_29 = (195, 5)

# The detector's box is enlarged this much around its centre before the mesh runs: the
# detector's box spans brows to mouth, the mesh needs the whole head and some background.
_CROP_EXPAND = 1.8
# The crop is resized so its longer side is this many pixels: small faces are upscaled so
# the mesh's own (short-range) detector finds them, big ones downscaled for speed (the mesh
# model itself sees a 192 px image, so nothing is lost).
_CROP_SIDE = 320
# The full-range detector runs on one frame in this many; in between, the mesh follows the face in
# the detector's box carried along with it. The detector costs about as much as the mesh, so this
# takes about 40% off face analysis, and a face cannot be followed to a neighbour for longer than
# this many frames before the detector chooses again.
DETECT_EVERY = 5
# A mesh with fewer of its points inside the frame than this is treated as no face.
_MIN_INSIDE_FRACTION = 0.5


def load_models() -> None:
    """Import MediaPipe (about a second) with the other models, so the first job does not pay it;
    its graphs are built per analyzer in milliseconds."""
    import mediapipe  # noqa: F401


@dataclass
class FaceTrack:
    """Landmarks of one face through a video: what face analysis hands to the rest of the job."""

    landmarks: np.ndarray  # [N, 468, 2] float32 pixel coordinates (x, y) in the frame; NaN rows where no face
    has_face: np.ndarray  # [N] bool
    width: int  # frame width in pixels
    height: int  # frame height in pixels

    def __len__(self) -> int:
        return int(self.has_face.shape[0])

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray | None], width: int, height: int) -> FaceTrack:
        """Build a track from per-frame results of ``FaceAnalyzer.landmarks`` (None = no face)."""
        landmarks = np.full((len(rows), NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
        has_face = np.zeros(len(rows), dtype=bool)
        for index, row in enumerate(rows):
            if row is not None:
                landmarks[index] = row
                has_face[index] = True
        return cls(landmarks=landmarks, has_face=has_face, width=int(width), height=int(height))

    def require_face(self, source: str = "the video") -> FaceTrack:
        """Return self, or raise NoFaceError when no frame has a face."""
        if not self.has_face.any():
            raise NoFaceError(
                f"No face was found in any of the {len(self)} frames of {source}. Use a video where one face "
                "is visible and reasonably lit (frontal or slightly turned), or check --face-index."
            )
        return self


class FaceAnalyzer:
    """Finds one face per frame and its 468 mesh landmarks, with MediaPipe (models created once, lazily).

    ``face_index`` None picks the largest face in each frame; N picks the N-th face counted
    from the left (0-based); a frame with fewer faces counts as a frame with no face.
    ``follow``: for ``landmarks_near`` on the frames of one video in order, where each crop holds the
    same face in about the same place: the mesh runs in MediaPipe's video mode, which follows the face
    from the previous frame's points instead of finding it again (a third off the mesh's cost), one face.
    Use as a context manager, or call ``close()`` to release the models.
    """

    def __init__(self, face_index: int | None = None, min_confidence: float = 0.5, follow: bool = False):
        if face_index is not None and face_index < 0:
            raise InputError(f"face_index must be 0 or more (0 = the leftmost face), got {face_index}")
        if not 0.0 < min_confidence < 1.0:
            raise InputError(f"min_confidence must be between 0 and 1, got {min_confidence}")
        self.face_index = face_index
        self.min_confidence = min_confidence
        self.follow = follow
        self._detector: Any = None
        self._mesh: Any = None

    def __enter__(self) -> FaceAnalyzer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the MediaPipe graphs; the analyzer builds them again if used afterwards."""
        for model in (self._detector, self._mesh):
            if model is not None:
                model.close()
        self._detector = self._mesh = None

    def _models(self) -> tuple[Any, Any]:
        if self._detector is None:
            import mediapipe as mp

            self._detector = mp.solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=self.min_confidence
            )
            # static_image_mode: every crop is a new image (crops move from frame to frame, so
            # the mesh's own frame-to-frame tracking would follow the wrong coordinates).
            # Up to 3 faces so that a neighbour inside the crop cannot hide the one we want.
            # Following (crops that hold the face in place): one face, or the video mode would look
            # for more with its detector on every frame.
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=not self.follow, max_num_faces=1 if self.follow else 3, refine_landmarks=False,
                min_detection_confidence=self.min_confidence,
            )
        return self._detector, self._mesh

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        """Face boxes found in a frame: [K, 4] float32 (x, y, w, h) in pixels.

        The detector sees the whole frame shrunk to 192 px, where a small face in a wide frame
        can fall under its limit; when it finds nothing, it looks again in overlapping tiles
        (each shrunk less) and merges what the tiles found.
        """
        frame_rgb = _check_frame(frame_rgb)
        boxes, _ = self._detect_in(frame_rgb)
        if len(boxes) == 0:
            boxes = self._detect_in_tiles(frame_rgb)
        return boxes

    def _detect_in(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One detector call: boxes [K, 4] (x, y, w, h) in the image's pixels and their scores [K]."""
        detector, _ = self._models()
        height, width = image.shape[:2]
        result = detector.process(np.ascontiguousarray(image))
        boxes, scores = [], []
        for detection in result.detections or ():
            rel = detection.location_data.relative_bounding_box
            boxes.append((rel.xmin * width, rel.ymin * height, rel.width * width, rel.height * height))
            scores.append(detection.score[0] if detection.score else 0.0)
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(scores, dtype=np.float32)

    def _detect_in_tiles(self, frame_rgb: np.ndarray) -> np.ndarray:
        """Detections from overlapping tiles of the frame, merged (duplicates on overlaps removed)."""
        all_boxes, all_scores = [], []
        for left, top, side in _tiles(*frame_rgb.shape[:2]):
            boxes, scores = self._detect_in(frame_rgb[top : top + side, left : left + side])
            all_boxes.append(boxes + np.array([left, top, 0, 0], dtype=np.float32))
            all_scores.append(scores)
        return _suppress_duplicates(np.concatenate(all_boxes), np.concatenate(all_scores))

    def choose(self, boxes: np.ndarray) -> np.ndarray | None:
        """The box of the face to dub among the detector's boxes, or None (see the class docstring)."""
        if len(boxes) == 0:
            return None
        if self.face_index is None:
            return boxes[int(np.argmax(boxes[:, 2] * boxes[:, 3]))]
        if self.face_index >= len(boxes):
            return None
        left_to_right = np.argsort(boxes[:, 0] + boxes[:, 2] / 2, kind="stable")
        return boxes[left_to_right[self.face_index]]

    def landmarks(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        """The chosen face's 468 landmarks ([468, 2] float32 frame pixels), or None when there is none."""
        frame_rgb = _check_frame(frame_rgb)
        box = self.choose(self.detect(frame_rgb))
        if box is None:
            return None
        return self._mesh_in_box(frame_rgb, box)

    def landmarks_near(self, frame_rgb: np.ndarray, near: np.ndarray) -> np.ndarray | None:
        """The landmarks of the face that was at ``near`` ([468, 2] frame pixels), or None: the mesh alone,
        in the box of those points, as analysis follows a face the detector missed. For a frame where
        the face is known to be (a dub's output frame: the face its source frame had), at the mesh's
        cost only (on one core, 4.9 ms a frame of the example face against 12 with a detection; 3.4 ms
        with ``follow``)."""
        return self._mesh_in_box(_check_frame(frame_rgb), _landmark_box(near))

    def _detect_and_mesh(self, frame_rgb: np.ndarray, previous: np.ndarray | None
                         ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(landmarks, the box the mesh ran in) of the chosen face, or (None, None). Like ``landmarks``,
        but when the detector misses the face that the previous frame had, the mesh looks where that
        face was (the same face: its centre must stay inside that area)."""
        boxes, _ = self._detect_in(frame_rgb)
        if len(boxes) == 0 and previous is not None:
            box = _landmark_box(previous)
            followed = self._mesh_in_box(frame_rgb, box)
            if followed is not None:
                return followed, box
        if len(boxes) == 0:
            boxes = self._detect_in_tiles(frame_rgb)
        box = self.choose(boxes)
        found = None if box is None else self._mesh_in_box(frame_rgb, box)
        return (found, box) if found is not None else (None, None)

    def _mesh_in_box(self, frame_rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """Run the mesh on an enlarged crop around a detector box; landmarks in frame pixels or None."""
        _, mesh = self._models()
        height, width = frame_rgb.shape[:2]
        x, y, w, h = (float(v) for v in box)
        centre_x, centre_y = x + w / 2, y + h / 2
        half = max(w, h) * _CROP_EXPAND / 2
        left, top = max(0, int(centre_x - half)), max(0, int(centre_y - half))
        right, bottom = min(width, int(centre_x + half) + 1), min(height, int(centre_y + half) + 1)
        if right - left < 8 or bottom - top < 8:
            return None
        scale = _CROP_SIDE / max(right - left, bottom - top)
        if self.follow and scale < 1:
            # Following, the mesh cuts the face's region out and resizes it to its input itself: shrinking
            # the crop first only costs time (0.8 ms a frame of the example face, a fifth of the mesh).
            scale = 1.0
        region = frame_rgb[top:bottom, left:right]
        crop = np.ascontiguousarray(region) if scale == 1.0 else _resize(region, scale)
        result = mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        crop_h, crop_w = crop.shape[:2]
        candidates = [
            np.array([(p.x * crop_w, p.y * crop_h) for p in face.landmark], dtype=np.float32) / scale
            + np.array([left, top], dtype=np.float32)
            for face in result.multi_face_landmarks
        ]
        # The mesh may see a neighbour in the crop: keep the face whose centre is nearest the
        # detector's, and only if that centre lies inside the detector's box.
        centres = np.array([points.mean(axis=0) for points in candidates])
        best = int(np.argmin(np.hypot(centres[:, 0] - centre_x, centres[:, 1] - centre_y)))
        points = candidates[best]
        cx, cy = centres[best]
        if not (x <= cx <= x + w and y <= cy <= y + h):
            return None
        inside = (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
        if inside.mean() < _MIN_INSIDE_FRACTION:
            return None
        return points

    def analyze(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> FaceTrack:
        """Landmarks of the chosen face in every frame; ``progress(n)`` is called with the frames done so far."""
        rows: list[np.ndarray | None] = []
        size = None
        for frame, row in self.stream(frames):
            rows.append(row)
            size = frame.shape[:2]
            if progress is not None:
                progress(len(rows))
        track = FaceTrack.from_rows(rows, width=size[1], height=size[0])
        logger.info("face found in %d of %d frames", int(track.has_face.sum()), len(track))
        return track

    def stream(self, frames: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(frame, its landmarks or None) for each frame, as they are found.

        The detector runs on every ``DETECT_EVERY``-th frame, and on any frame where following
        fails; in between, the mesh runs in the detector's last box carried along with the face
        (moved and scaled as its landmarks moved), the same crop the detector would have given."""
        previous: np.ndarray | None = None
        anchor: tuple[np.ndarray, np.ndarray] | None = None  # (box, the landmarks found in it)
        for index, frame in enumerate(_checked_frames(frames)):
            found = None
            if anchor is not None and previous is not None and index % DETECT_EVERY:
                found = self._mesh_in_box(frame, _carried_box(*anchor, previous))
            if found is None:
                found, box = self._detect_and_mesh(frame, previous)
                anchor = None if found is None else (box, found)
            previous = found
            yield frame, found


def stream_landmarks(frames: Iterable[np.ndarray], face_index: int | None = None, workers: int = 1
                     ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``FaceAnalyzer.stream`` spread over ``workers`` threads, results in frame order.

    The frames are cut into segments of ``DETECT_EVERY`` frames, each analysed by the next free
    worker with its own analyzer. Each segment starts on a frame where the detector runs anyway, so
    the landmarks are the ones one analyzer finds, except where the detector misses the face on a
    segment's first frame: one analyzer would then look where the previous frame's face was, a
    worker has no previous frame and looks in tiles. At most ``workers + 1`` segments are in flight.
    """
    if workers <= 1:
        with FaceAnalyzer(face_index=face_index) as analyzer:
            yield from analyzer.stream(frames)
        return
    local = threading.local()
    analyzers: list[FaceAnalyzer] = []

    def analyse_segment(segment: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if not hasattr(local, "analyzer"):
            local.analyzer = FaceAnalyzer(face_index=face_index)
            analyzers.append(local.analyzer)  # list.append is atomic
        return list(local.analyzer.stream(segment))

    try:
        with thread_pool(workers, "faces") as pool:
            for results in ordered_map(analyse_segment, _segments(frames, DETECT_EVERY), pool, workers):
                yield from results
    finally:
        for analyzer in analyzers:
            analyzer.close()


def _segments(frames: Iterable[np.ndarray], length: int) -> Iterator[list[np.ndarray]]:
    """Consecutive lists of ``length`` frames (the last may be shorter), all of the first frame's size."""
    segment: list[np.ndarray] = []
    for frame in _checked_frames(frames):
        segment.append(frame)
        if len(segment) == length:
            yield segment
            segment = []
    if segment:
        yield segment


def _checked_frames(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The frames as contiguous RGB arrays; InputError for one of another size than the first, or for none."""
    size: tuple[int, int] | None = None
    for index, frame in enumerate(frames):
        frame = _check_frame(frame)
        size = size or frame.shape[:2]
        if frame.shape[:2] != size:
            raise InputError(
                f"Frame {index} is {frame.shape[1]}x{frame.shape[0]} but the first frame was "
                f"{size[1]}x{size[0]}; all frames of one video must have the same size."
            )
        yield frame
    if size is None:
        raise InputError("No frames to analyze: the video has no decodable frames.")


def _carried_box(box: np.ndarray, anchor: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """``box`` (x, y, w, h), where the face had ``anchor`` landmarks, moved and scaled with the face to
    where it has ``landmarks``."""
    scale = _extent(landmarks) / max(_extent(anchor), 1e-6)
    x, y, w, h = (float(v) for v in box)
    centre = landmarks.mean(axis=0) + (np.array([x + w / 2, y + h / 2]) - anchor.mean(axis=0)) * scale
    return np.array([centre[0] - w * scale / 2, centre[1] - h * scale / 2, w * scale, h * scale], np.float32)


def _extent(points: np.ndarray) -> float:
    low, high = points.min(axis=0), points.max(axis=0)
    return float(np.hypot(*(high - low)))


def _landmark_box(points: np.ndarray) -> np.ndarray:
    """(x, y, w, h) bounding box of landmarks."""
    low, high = points.min(axis=0), points.max(axis=0)
    return np.array([low[0], low[1], high[0] - low[0], high[1] - low[1]], dtype=np.float32)


def _tiles(height: int, width: int) -> list[tuple[int, int, int]]:
    """(left, top, side) of square tiles that cover the frame with at least a quarter overlap.

    A wide or tall frame gets tiles as big as its short side; a squarish one a 2x2 grid.
    """
    short, long = min(height, width), max(height, width)
    side = short if long >= 1.3 * short else int(0.6 * short)

    def starts(length: int) -> list[int]:
        count = int(np.ceil(max(0, length - side) / (0.75 * side))) + 1
        return sorted({int(round(v)) for v in np.linspace(0, length - side, count)})

    return [(left, top, side) for top in starts(height) for left in starts(width)]


def _suppress_duplicates(boxes: np.ndarray, scores: np.ndarray, overlap: float = 0.4) -> np.ndarray:
    """Keep the best-scored of boxes that overlap (intersection over union above ``overlap``)."""
    kept: list[int] = []
    for index in np.argsort(-scores, kind="stable"):
        if all(_iou(boxes[index], boxes[other]) <= overlap for other in kept):
            kept.append(int(index))
    return boxes[sorted(kept)].reshape(-1, 4)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0.0, float(width)) * max(0.0, float(height))
    union = float(a[2] * a[3] + b[2] * b[3]) - inter
    return inter / union if union > 0 else 0.0


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        described = getattr(frame, "shape", type(frame).__name__)
        raise InputError(f"Expected an RGB frame as a uint8 array of shape [H, W, 3], got {described}.")
    return np.ascontiguousarray(frame)


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


# --------------------------------------------------------------------------- smoothing


def smooth_track(track: FaceTrack, strength: float = 0.5, fps: float = 25.0) -> FaceTrack:
    """Remove landmark jitter without lagging real motion; returns a new track (the input is untouched).

    The whole-track form of ``LandmarkSmoother`` (see there): the same numbers, frame for frame.
    ``strength`` 0 returns the landmarks unchanged, 1 smooths hardest.
    """
    smoother = LandmarkSmoother(strength, fps)
    done = [pair for row in track.landmarks for pair in smoother.push(row if np.isfinite(row).all() else None)]
    landmarks = track.landmarks.copy()
    for index, smoothed in done + smoother.finish():
        if smoothed is not None:
            landmarks[index] = smoothed
    return FaceTrack(landmarks=landmarks, has_face=track.has_face.copy(), width=track.width, height=track.height)


# Speed coefficient of the one-euro filter, per face size per second: a head moving one
# face size per second raises the cutoff by 4 Hz, so it is followed within a frame or two.
_BETA = 4.0
# Cutoff of the low-pass on the speed estimate itself.
_SPEED_CUTOFF = 1.0
# Frames finalised together: the backward pass runs once per block, from the block's end plus the lag.
_BLOCK = 8
# What the backward pass may still owe to its starting point after the lag (5%).
_FORGOTTEN = 0.05


class LandmarkSmoother:
    """Zero-lag jitter removal that works as frames arrive, so generation can follow face analysis.

    Each coordinate goes through a one-euro filter (a low-pass whose cutoff rises with the
    speed, so still faces are smoothed hard and moving ones followed) run forward and
    backward in time; the two passes lag in opposite directions and their mean does not lag.
    The forward pass runs as frames arrive. The backward pass runs over blocks of ``_BLOCK``
    frames, each time starting ``lag`` frames after the block, far enough that its starting
    point is forgotten (a filter that fast settles in ``lag`` frames), so a frame's result is
    final ``latency`` frames after it arrived, whatever comes later.
    Coordinates are measured in face sizes (the run's first frame), so the same strength suits
    small and big faces. Runs of frames with a face are smoothed independently: nothing leaks
    across a frame without a face.

    ``push(landmarks or None)`` and ``finish()`` return ``(frame index, smoothed or None)``
    for the frames that became final, in order.
    """

    def __init__(self, strength: float = 0.5, fps: float = 25.0):
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"smoothing strength must be between 0 and 1, got {strength}")
        if fps <= 0:
            raise InputError(f"fps must be positive, got {fps}")
        self.strength = strength
        self.fps = float(fps)
        # strength 0.5 -> 1.3 Hz, 1 -> 0.3 Hz: the cutoff used while the face is still.
        self.min_cutoff = 6.0 * 0.05**strength
        settle = int(np.ceil(np.log(_FORGOTTEN) / np.log(1.0 - _alpha(self.min_cutoff, self.fps))))
        self.lag = int(min(max(settle, _BLOCK), round(self.fps)))  # at most a second of frames held back
        self.latency = 0 if strength == 0 else _BLOCK + self.lag - 1  # frames a result can trail its input
        self._count = 0  # frames pushed
        self._run: list[tuple[int, np.ndarray, np.ndarray]] = []  # (index, input, forward) not yet final
        self._forward: _OneEuro | None = None
        self._face_size = 1.0

    def push(self, landmarks: np.ndarray | None) -> list[tuple[int, np.ndarray | None]]:
        index = self._count
        self._count += 1
        if landmarks is None:
            return self._end_run() + [(index, None)]
        if self.strength == 0:
            return [(index, np.asarray(landmarks, dtype=np.float32))]
        if self._forward is None:
            self._face_size = max(_extent(landmarks), 1.0)
            self._forward = _OneEuro(self.fps, self.min_cutoff)
        flat = np.asarray(landmarks, dtype=np.float64).reshape(-1) / self._face_size
        self._run.append((index, flat, self._forward.step(flat)))
        if len(self._run) < _BLOCK + self.lag:
            return []
        return self._finalise(_BLOCK)

    def finish(self) -> list[tuple[int, np.ndarray | None]]:
        """The frames still held back (call once, after the last push)."""
        return self._end_run()

    def _end_run(self) -> list[tuple[int, np.ndarray | None]]:
        done = self._finalise(len(self._run))
        self._forward = None
        return done

    def _finalise(self, count: int) -> list[tuple[int, np.ndarray | None]]:
        """The first ``count`` held frames, smoothed; the backward pass starts at the last held frame."""
        if count == 0:
            return []
        backward = _OneEuro(self.fps, self.min_cutoff)
        backward_values = [backward.step(flat) for _, flat, _ in reversed(self._run)][::-1]
        done = []
        for (index, _, forward), behind in zip(self._run[:count], backward_values):
            smoothed = (forward + behind) / 2 * self._face_size
            done.append((index, smoothed.reshape(-1, 2).astype(np.float32)))
        del self._run[:count]
        return done


def _alpha(cutoff, fps: float):
    return 1.0 / (1.0 + fps / (2 * np.pi * cutoff))


class _OneEuro:
    """One-euro filter over a vector, one step per frame."""

    def __init__(self, fps: float, min_cutoff: float):
        self.fps = fps
        self.min_cutoff = min_cutoff
        self.estimate: np.ndarray | None = None
        self.speed: np.ndarray | float = 0.0

    def step(self, value: np.ndarray) -> np.ndarray:
        if self.estimate is None:
            self.estimate = value.copy()
            return self.estimate
        self.speed = self.speed + _alpha(_SPEED_CUTOFF, self.fps) * ((value - self.estimate) * self.fps - self.speed)
        weight = _alpha(self.min_cutoff + _BETA * np.abs(self.speed), self.fps)
        self.estimate = self.estimate + weight * (value - self.estimate)
        return self.estimate


# --------------------------------------------------------------------------- crop box


def crop_boxes(track: FaceTrack, version: str = "v15", extra_margin: int = 10, bbox_shift: int = 0) -> np.ndarray:
    """MuseTalk's crop box per frame: [N, 4] int32 (x1, y1, x2, y2); -1 rows where there is nothing to crop.

    x1/x2 = the outline's min/max x, y2 = its max y (the chin), mid = y of the #29 stand-in,
    y1 = mid - (y2 - mid). v15 adds ``extra_margin`` below the chin; v1 moves mid by
    ``bbox_shift`` (positive opens the mouth more). Clipped to the frame; a box with no area
    falls back to the bounding box of all 468 landmarks. Rows are -1 for frames without a face
    and for the rare face whose landmarks all lie outside the frame: treat both as no face.
    """
    if version not in ("v15", "v1"):
        raise InputError(f"version must be 'v15' or 'v1', got {version!r}")
    boxes = np.full((len(track), 4), -1, dtype=np.int32)
    if not track.has_face.any():
        return boxes
    # The official code truncates its landmarks to whole pixels before it measures the box.
    points = np.trunc(track.landmarks[track.has_face].astype(np.float64))
    outline = points[:, OUTLINE_68]
    x1 = outline[:, :, 0].min(axis=1)
    x2 = outline[:, :, 0].max(axis=1)
    y2 = outline[:, :, 1].max(axis=1)
    mid = np.trunc(track.landmarks[track.has_face][:, list(NOSE_29), 1].astype(np.float64).mean(axis=1))
    if version == "v1":
        mid = mid + bbox_shift
    y1 = mid - (y2 - mid)
    if version == "v15":
        y2 = y2 + extra_margin
    chosen = _clip_boxes(np.stack([x1, y1, x2, y2], axis=1), track.width, track.height)
    fallback = _clip_boxes(
        np.stack([points[..., 0].min(1), points[..., 1].min(1), points[..., 0].max(1), points[..., 1].max(1)], 1),
        track.width, track.height,
    )
    chosen[_no_area(chosen)] = fallback[_no_area(chosen)]
    # Landmarks wholly outside the frame leave nothing to crop: such rows are -1 as well.
    chosen[_no_area(chosen)] = -1
    boxes[track.has_face] = chosen
    return boxes


def _no_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def _clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Round float boxes to whole pixels and clip them to the frame."""
    rounded = np.rint(boxes)
    rounded[:, [0, 2]] = np.clip(rounded[:, [0, 2]], 0, width)
    rounded[:, [1, 3]] = np.clip(rounded[:, [1, 3]], 0, height)
    return rounded.astype(np.int32)
