"""Lower-face masks built from landmarks, and pasting a generated face back into its frame.

MuseTalk v1.5 segments an expanded square around the face with a face-parsing network and
keeps the lower face (MUSETALK_FACTS section 5). The mask here is built from the mesh
landmarks instead (no extra weights): the face oval below the nose line, lips included.

Modes:
- ``jaw`` (default, like the official one): the lower face grown downward below the chin
  (so an opened jaw in the generated face is not cut off), cheeks trimmed to a central band;
- ``raw``: the lower-face polygon as it is;
- ``mouth``: only the lips and a margin, to keep a moustache, a beard or the lip shape.

Every mask is 0 above ``upper_boundary_ratio`` of the square's height and feathered with a
Gaussian blur; it reaches exactly 0 at the square's edges inside the frame, so pasting can
leave no seam and pixels outside the square are never touched.
"""

from __future__ import annotations

import logging

import numpy as np

from musetalk.errors import InputError
from musetalk.face import FACE_OVAL, LIPS_OUTER, NUM_LANDMARKS

logger = logging.getLogger(__name__)

MASK_MODES = ("jaw", "raw", "mouth")
# The official square is 1.5 times the box's longer side.
_SQUARE_EXPAND = 1.5
# The official cheek widths are measured on the square resized to 512 px.
_CANVAS = 512
# Feathering: Gaussian kernel side as a fraction of the square's side (official: about 0.08).
_BLUR_FRACTION = 0.08
# Jaw mode grows the lower face this far below the chin, as a fraction of the square's side.
_JAW_GROWTH = 0.06
# Mouth mode keeps the lips plus this margin, as a fraction of the square's side.
_MOUTH_MARGIN = 0.04

Box = tuple[int, int, int, int]


def _full_square(box: Box) -> tuple[int, int, int]:
    """(left, top, side) of the official square around a box, before clipping to the frame."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"The face box {tuple(box)} has no area; pass the box of a frame that has a face.")
    half = int(max(x2 - x1, y2 - y1) / 2 * _SQUARE_EXPAND)
    centre_x, centre_y = (x1 + x2) // 2, (y1 + y2) // 2
    return centre_x - half, centre_y - half, 2 * half


def face_square(box: Box, width: int, height: int) -> Box:
    """The expanded square around a crop box (official geometry), clipped to the frame: (x1, y1, x2, y2).

    Centre = the box's centre, half side = int(max(w, h) / 2 * 1.5). Near the frame's edges
    the square is clipped, not moved: it stays centred on the face, so what is left is the
    visible part of the official square (a rectangle). ``blend_mask`` derives the full square
    from the box again, so the upper boundary and cheek band stay where the official code puts
    them even when the square is clipped.
    """
    left, top, side = _full_square(box)
    return max(0, left), max(0, top), min(int(width), left + side), min(int(height), top + side)


def blend_mask(
    landmarks: np.ndarray,
    box: Box,
    square: Box,
    mode: str = "jaw",
    left_cheek_width: int = 90,
    right_cheek_width: int = 90,
    upper_boundary_ratio: float = 0.5,
) -> np.ndarray:
    """Alpha over ``square`` (float32 [sh, sw] in [0, 1]): 1 where the generated face replaces the frame.

    ``landmarks`` are the frame's 468 mesh points in frame pixels; ``box`` the crop box and
    ``square`` what ``face_square`` returned for it. Cheek widths are in pixels on a 512 px
    canvas of the square (as in the official options) and only apply to ``jaw`` mode.
    """
    landmarks = _check_landmarks(landmarks)
    if mode not in MASK_MODES:
        raise InputError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")
    if not 0.0 < upper_boundary_ratio < 1.0:
        raise InputError(f"upper_boundary_ratio must be between 0 and 1, got {upper_boundary_ratio}")
    left, top, side = _full_square(box)
    sx1, sy1, sx2, sy2 = (int(v) for v in square)
    if not (left <= sx1 < sx2 <= left + side and top <= sy1 < sy2 <= top + side):
        raise InputError(
            f"square {tuple(square)} is not the face_square of box {tuple(box)}; use face_square(box, ...)"
        )

    points = landmarks - np.array([left, top], dtype=np.float32)
    if mode == "mouth":
        region = _mouth_region(points, side)
    else:
        region = _lower_face_region(points, side, jaw=mode == "jaw")
        if mode == "jaw":
            _trim_cheeks(region, side, left_cheek_width, right_cheek_width)

    kernel = max(3, int(side * _BLUR_FRACTION) // 2 * 2 + 1)
    radius = kernel // 2
    # Cut the region a blur radius inside the boundary and inside the square's edges, so the
    # blurred mask is exactly 0 above the boundary and at the edges (no seam when pasted).
    region[: int(side * upper_boundary_ratio) + radius + 1] = 0
    visible = (slice(sy1 - top, sy2 - top), slice(sx1 - left, sx2 - left))
    _clear_edges(region, visible, radius + 1)
    mask = _blur_where_set(region, kernel)
    return np.clip(mask[visible], 0.0, 1.0)


def _blur_where_set(region: np.ndarray, kernel: int) -> np.ndarray:
    """Gaussian blur of a 0/1 region, computed only around its set pixels (the rest stays exactly 0)."""
    import cv2

    mask = np.zeros(region.shape, dtype=np.float32)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return mask
    pad = kernel // 2 + 1
    r1, r2 = max(0, rows[0] - pad), min(region.shape[0], rows[-1] + 1 + pad)
    c1, c2 = max(0, cols[0] - pad), min(region.shape[1], cols[-1] + 1 + pad)
    part = region[r1:r2, c1:c2].astype(np.float32)
    mask[r1:r2, c1:c2] = cv2.GaussianBlur(part, (kernel, kernel), 0, borderType=cv2.BORDER_CONSTANT)
    return mask


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape != (NUM_LANDMARKS, 2) or not np.isfinite(landmarks).all():
        raise InputError(
            f"Expected the 468 face-mesh landmarks of a frame with a face ([468, 2], finite), got shape "
            f"{landmarks.shape}; frames without a face have no mask and are passed through."
        )
    return landmarks


def _fill(side: int, polygon: np.ndarray) -> np.ndarray:
    import cv2

    region = np.zeros((side, side), dtype=np.uint8)
    cv2.fillPoly(region, [np.rint(polygon).astype(np.int32)], 1)
    return region


def _lower_face_region(points: np.ndarray, side: int, jaw: bool) -> np.ndarray:
    """The face oval (lips inside it), optionally grown downward below the chin (jaw mode)."""
    import cv2

    region = _fill(side, points[list(FACE_OVAL)])
    if jaw:
        # A rectangular kernel anchored on its bottom row grows the region downward, never up
        # (and a little sideways); rectangular kernels take OpenCV's fast separable path.
        grow = max(3, int(side * _JAW_GROWTH) // 2 * 2 + 1)
        kernel = np.ones((grow + 1, grow), dtype=np.uint8)
        region = cv2.dilate(region, kernel, anchor=(grow // 2, grow))
    return region


def _mouth_region(points: np.ndarray, side: int) -> np.ndarray:
    """The outer lips polygon dilated by a margin."""
    import cv2

    region = _fill(side, points[list(LIPS_OUTER)])
    margin = max(1, int(side * _MOUTH_MARGIN))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    return cv2.dilate(region, disc)


def _trim_cheeks(region: np.ndarray, side: int, left_width: int, right_width: int) -> None:
    """Zero the columns outside the central band [centre - left, centre + right] (widths on a 512 canvas)."""
    if left_width < 0 or right_width < 0:
        raise InputError(f"cheek widths must be 0 or more, got left={left_width} right={right_width}")
    scale = side / _CANVAS
    centre = side // 2
    region[:, : max(0, centre - int(round(left_width * scale)))] = 0
    region[:, centre + int(round(right_width * scale)) :] = 0


def _clear_edges(region: np.ndarray, visible: tuple[slice, slice], band: int) -> None:
    """Zero a band along each edge of the visible part that lies inside the frame.

    An edge where the square was clipped is the frame's own edge: nothing lies beyond it, so
    the mask may reach it (a chin at the bottom of the frame is still replaced).
    """
    side = region.shape[0]
    rows, cols = visible
    if rows.start == 0:
        region[:band] = 0
    if rows.stop == side:
        region[side - band :] = 0
    if cols.start == 0:
        region[:, :band] = 0
    if cols.stop == side:
        region[:, side - band :] = 0


def crop_face(frame: np.ndarray, box: Box, size: int = 256) -> np.ndarray:
    """``frame[y1:y2, x1:x2]`` resized to size x size (Lanczos): the model's input crop, RGB uint8."""
    import cv2

    frame = _check_image(frame, "frame")
    x1, y1, x2, y2 = _check_box(box, frame)
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LANCZOS4)


def paste_face(frame: np.ndarray, face_256: np.ndarray, box: Box, square: Box, mask: np.ndarray) -> np.ndarray:
    """A new frame: the generated face resized to the box, alpha-composited through ``mask`` over ``square``.

    The input frame is not modified; pixels outside the square, and wherever the mask is 0,
    keep their exact values.
    """
    import cv2

    frame = _check_image(frame, "frame")
    face_256 = _check_image(face_256, "generated face")
    x1, y1, x2, y2 = _check_box(box, frame)
    sx1, sy1, sx2, sy2 = _check_box(square, frame)
    if not (sx1 <= x1 and sy1 <= y1 and x2 <= sx2 and y2 <= sy2):
        raise InputError(
            f"The face box {tuple(box)} is not inside the square {tuple(square)}; use face_square(box, ...)."
        )
    if mask.shape != (sy2 - sy1, sx2 - sx1):
        raise InputError(
            f"The mask is {mask.shape} but the square is {(sy2 - sy1, sx2 - sx1)}; build it with blend_mask."
        )

    composed = frame[sy1:sy2, sx1:sx2].copy()
    # Bicubic back to the box: as sharp as Lanczos to the eye at these scales, at a seventh of its cost.
    composed[y1 - sy1 : y2 - sy1, x1 - sx1 : x2 - sx1] = cv2.resize(
        face_256, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC
    )
    result = frame.copy()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return result
    # Blend only the part of the square where the mask is set: the rest stays bit-identical
    # (a weight of 0 gives the original value exactly).
    r1, r2, c1, c2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    original = np.ascontiguousarray(frame[sy1 + r1 : sy1 + r2, sx1 + c1 : sx1 + c2])
    alpha = np.ascontiguousarray(mask[r1:r2, c1:c2], dtype=np.float32)
    result[sy1 + r1 : sy1 + r2, sx1 + c1 : sx1 + c2] = cv2.blendLinear(
        np.ascontiguousarray(composed[r1:r2, c1:c2]), original, alpha, 1.0 - alpha
    )
    return result


def draw_overlay(frame: np.ndarray, box: Box, square: Box, mask: np.ndarray) -> np.ndarray:
    """Preview for the app: the mask tinted green over the frame, the crop box in yellow, the square in blue."""
    import cv2

    frame = _check_image(frame, "frame")
    sx1, sy1, sx2, sy2 = _check_box(square, frame)
    x1, y1, x2, y2 = _check_box(box, frame)
    out = frame.copy()
    region = out[sy1:sy2, sx1:sx2].astype(np.float32)
    tint = np.array([0, 255, 0], dtype=np.float32)
    alpha = 0.45 * mask.astype(np.float32)[..., None]
    out[sy1:sy2, sx1:sx2] = np.rint(region + alpha * (tint - region)).astype(np.uint8)
    thickness = max(1, round(max(frame.shape[:2]) / 400))
    cv2.rectangle(out, (sx1, sy1), (sx2 - 1, sy2 - 1), (60, 120, 255), thickness)
    cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), (255, 220, 0), thickness)
    return out


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"The {what} must be an RGB uint8 array [H, W, 3], got {getattr(image, 'shape', image)}.")
    return image


def _check_box(box: Box, frame: np.ndarray) -> Box:
    x1, y1, x2, y2 = (int(v) for v in box)
    height, width = frame.shape[:2]
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise InputError(f"The box {tuple(box)} is empty or outside the {width}x{height} frame.")
    return x1, y1, x2, y2
