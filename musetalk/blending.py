"""Lower-face masks, and pasting a generated face back into its frame, with the official geometry.

MuseTalk v1.5 cuts an expanded square around the face box, segments it with a face-parsing
network (BiSeNet, CelebAMask-HQ classes) on a 512x512 canvas, turns the classes into a mask
(MUSETALK_FACTS section 5), and alpha-composites the generated face through it. We need no
parsing network: ``parsing_from_landmarks`` draws the classes the mask reads (skin, nose, lips,
mouth) from the face-mesh landmarks, and ``mask_from_parsing`` applies the official geometry to
any such map, step for step:

1. the classes to a 0/255 region on the 512 canvas, by mode:
   - ``jaw`` (v1.5's default): the skin dilated with a cone-shaped kernel (which, anchored as
     OpenCV anchors it, grows the skin about 16/512 upward and at most 6/512 downward), the cheeks
     outside a central band eroded sideways, the nose left out, lips and mouth added;
   - ``raw`` (v1.0's): skin, lips and mouth as segmented (the nose is its own class, so it is out);
   - ``mouth`` (ours, not the official code's): only the lips and the mouth opening grown by a
     margin, to keep a moustache, a beard or the cheeks untouched;
2. resized back to the square's size (Pillow's bicubic, as the official code's ``Image.resize``);
3. kept only inside the face box;
4. cut at ``upper_boundary_ratio`` of the square's height (rows above it are 0), *then*
5. feathered with a Gaussian blur whose kernel is 0.05 of the square's side (odd): alpha is about
   one half on the boundary row, and the feather reaches a few pixels above it.

The mask is uint8 (0..255) and the composite uses Pillow's integer arithmetic for ``paste`` with a
mask, so that given the same inputs the frame is the official one bit for bit.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np

from musetalk.errors import InputError
from musetalk.face import FACE_OVAL, LIPS_INNER, LIPS_OUTER, NOSE_REGION, NUM_LANDMARKS

logger = logging.getLogger(__name__)

MASK_MODES = ("jaw", "raw", "mouth")
# The official square's half side is (max(w, h) // 2) * 1.5 of the face box.
_SQUARE_EXPAND = 1.5
# The face-parsing canvas: the square is resized to this before segmentation, cheek widths and the
# jaw kernel are in its pixels.
CANVAS = 512
# Feathering: the Gaussian kernel's side as a fraction of the square's side (the offline script's).
_BLUR_FRACTION = 0.05
# Mouth mode keeps the lips plus this margin, in canvas pixels (about 0.04 of the square).
_MOUTH_MARGIN = 20

# The face-parsing classes (BiSeNet trained on CelebAMask-HQ) that the masks read.
BACKGROUND, SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP = 0, 1, 10, 11, 12, 13
_LIPS_AND_MOUTH = (MOUTH, UPPER_LIP, LOWER_LIP)


def _class_table(*classes: int) -> np.ndarray:
    """A lookup table for cv2.LUT: 255 for these classes, 0 for the rest (tens of times faster than np.isin)."""
    table = np.zeros(256, dtype=np.uint8)
    table[list(classes)] = 255
    return table


_LIPS_TABLE = _class_table(*_LIPS_AND_MOUTH)
_RAW_TABLE = _class_table(SKIN, *_LIPS_AND_MOUTH)

Box = tuple[int, int, int, int]


def _full_square(box: Box) -> tuple[int, int, int]:
    """(left, top, side) of the official square around a box, before clipping to the frame."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"The face box {tuple(box)} has no area; pass the box of a frame that has a face.")
    half = int(max(x2 - x1, y2 - y1) // 2 * _SQUARE_EXPAND)
    centre_x, centre_y = (x1 + x2) // 2, (y1 + y2) // 2
    return centre_x - half, centre_y - half, 2 * half


def face_square(box: Box, width: int, height: int) -> Box:
    """The expanded square around a crop box (official geometry), clipped to the frame: (x1, y1, x2, y2).

    Centre = the box's centre, half side = (max(w, h) // 2) * 1.5. Near the frame's edges the
    square is clipped, not moved: the official code crops it with black beyond the frame and
    pastes only what lies inside, which is the same. ``blend_mask`` derives the full square from
    the box again, so the boundary and cheek band stay where the official code puts them.
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
    """Alpha over ``square`` (uint8 [sh, sw], 0..255): 255 where the generated face replaces the frame.

    ``landmarks`` are the frame's 468 mesh points in frame pixels; ``box`` the crop box and
    ``square`` what ``face_square`` returned for it. Cheek widths are in pixels of the 512 canvas
    (as the official options) and only apply to ``jaw`` mode.
    """
    left, top, side = _full_square(box)
    sx1, sy1, sx2, sy2 = (int(v) for v in square)
    if not (left <= sx1 < sx2 <= left + side and top <= sy1 < sy2 <= top + side):
        raise InputError(
            f"square {tuple(square)} is not the face_square of box {tuple(box)}; use face_square(box, ...)"
        )
    parsing = parsing_from_landmarks(landmarks, box)
    mask = mask_from_parsing(parsing, box, mode, left_cheek_width, right_cheek_width, upper_boundary_ratio)
    return mask[sy1 - top : sy2 - top, sx1 - left : sx2 - left]


def parsing_from_landmarks(landmarks: np.ndarray, box: Box) -> np.ndarray:
    """The classes a face-parsing network would give the box's square, drawn from the landmarks:
    uint8 [512, 512] with skin (the face oval), nose, lips and the mouth opening.

    Only the classes the masks read are drawn; eyes, brows, hair and the rest lie above the
    boundary, where every mask is 0.
    """
    landmarks = _check_landmarks(landmarks)
    left, top, side = _full_square(box)
    # Continuous frame coordinates -> canvas pixel indices (pixel i covers [i, i + 1)).
    points = (landmarks - np.array([left, top], dtype=np.float32)) * (CANVAS / side) - 0.5
    parsing = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    _fill(parsing, points[list(FACE_OVAL)], SKIN)
    _fill(parsing, _convex_hull(points[list(NOSE_REGION)]), NOSE)
    _fill(parsing, points[list(LIPS_OUTER)], UPPER_LIP)
    _fill(parsing, points[list(LIPS_INNER)], MOUTH)
    return parsing


def mask_from_parsing(
    parsing: np.ndarray,
    box: Box,
    mode: str = "jaw",
    left_cheek_width: int = 90,
    right_cheek_width: int = 90,
    upper_boundary_ratio: float = 0.5,
) -> np.ndarray:
    """The official blend mask (uint8 [side, side], 0..255) over the box's whole square, from a
    face-parsing map of that square on the 512 canvas (BiSeNet's classes)."""
    import cv2
    from PIL import Image

    parsing = np.asarray(parsing, dtype=np.uint8)
    if parsing.shape != (CANVAS, CANVAS):
        raise InputError(f"the parsing map must be {CANVAS}x{CANVAS} (the square on the parsing canvas), "
                         f"got {parsing.shape}")
    if mode not in MASK_MODES:
        raise InputError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")
    if not 0.0 < upper_boundary_ratio < 1.0:
        raise InputError(f"upper_boundary_ratio must be between 0 and 1, got {upper_boundary_ratio}")
    if mode == "jaw":
        region = _jaw_region(parsing, left_cheek_width, right_cheek_width)
    elif mode == "raw":
        region = cv2.LUT(parsing, _RAW_TABLE)
    else:
        region = _mouth_region(parsing)

    left, top, side = _full_square(box)
    x1, y1, x2, y2 = (int(v) for v in box)
    # Back to the square's size, kept inside the face box and cut at the boundary (cut first, then feather).
    resized = np.asarray(Image.fromarray(region).resize((side, side), Image.Resampling.BICUBIC))
    rows = slice(max(y1 - top, int(side * upper_boundary_ratio)), y2 - top)
    cols = slice(x1 - left, x2 - left)
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[rows, cols] = resized[rows, cols]
    return _feather(mask, int(_BLUR_FRACTION * side // 2 * 2) + 1)


def _feather(mask: np.ndarray, kernel: int) -> np.ndarray:
    """The official Gaussian blur of the mask, computed only around its set pixels: a kernel's reach
    away from them it is exactly 0 (and the square's own edges, where the official blur reflects, are
    that far from any face)."""
    import cv2

    window = _around(mask > 0, kernel)
    if window is None:
        return mask
    feathered = np.zeros_like(mask)
    feathered[window] = cv2.GaussianBlur(mask[window], (kernel, kernel), 0, borderType=cv2.BORDER_CONSTANT)
    return feathered


def _jaw_region(parsing: np.ndarray, left_cheek_width: int, right_cheek_width: int) -> np.ndarray:
    """v1.5's jaw mode on the canvas: the dilated skin (eroded outside the cheek band) minus the nose,
    plus lips and mouth; 0/255."""
    import cv2

    if not (0 <= left_cheek_width <= CANVAS // 2 and 0 <= right_cheek_width <= CANVAS // 2):
        raise InputError(f"cheek widths must be 0 to {CANVAS // 2}, got left={left_cheek_width} "
                         f"right={right_cheek_width}")
    region = cv2.LUT(parsing, _LIPS_TABLE)
    window = _around(parsing == SKIN, _MORPHOLOGY_REACH)
    if window is None:
        return region
    part = parsing[window]
    skin = (part == SKIN).view(np.uint8) * np.uint8(255)
    dilated = _jaw_dilate(skin)
    eroded = _cheek_erode(_cheek_erode(dilated))
    cheeks = _cheek_columns(left_cheek_width, right_cheek_width)[window[1]]
    face = np.where(cheeks[None, :], eroded, dilated)
    face[part == NOSE] = 0
    region[window] |= face
    return region


# How far the jaw mode's morphology reaches from the skin, in canvas pixels: the dilation 16 rows and 10
# columns, then two erosions 2 rows and 34 columns (which must see real zeros, not the window's border),
# and a little more. Outside this reach every result is 0, so the work is done in a window around the skin.
_MORPHOLOGY_REACH = 64


def _around(where: np.ndarray, reach: int) -> tuple[slice, slice] | None:
    """The canvas window around the set pixels of ``where``, ``reach`` pixels wider on every side."""
    rows, cols = np.flatnonzero(where.any(axis=1)), np.flatnonzero(where.any(axis=0))
    if rows.size == 0:
        return None
    height, width = where.shape
    return (slice(max(0, rows[0] - reach), min(height, rows[-1] + 1 + reach)),
            slice(max(0, cols[0] - reach), min(width, cols[-1] + 1 + reach)))


def _jaw_dilate(skin: np.ndarray) -> np.ndarray:
    """``cv2.dilate(skin, _jaw_kernel())``, in two cheap parts (the same pixels, a fifth of the time):
    the kernel's lower 12 x 21 rectangle, a rectangular dilation of the skin 5 rows below, and its cone,
    ten steps of a 4-point kernel from the skin 6 rows above (each step one row further, one column
    wider either side), on the skin padded with the kernel's reach so no step loses what it shifts."""
    import cv2

    padded = cv2.copyMakeBorder(skin, 16, 16, 10, 10, cv2.BORDER_CONSTANT, value=0)
    below, above = np.zeros_like(padded), np.zeros_like(padded)
    below[:-5], above[6:] = padded[5:], padded[:-6]  # skin(y + 5) and skin(y - 6)
    tail = cv2.dilate(below, np.ones((12, 21), np.uint8), anchor=(10, 0))
    cone = cv2.dilate(above, np.array([[0, 1, 0], [1, 1, 1]], np.uint8), anchor=(1, 0), iterations=10)
    return np.maximum(tail, cone)[16:-16, 10:-10]


@lru_cache(maxsize=1)
def _jaw_kernel() -> np.ndarray:
    """33x33: a cone widening downward over rows 10..20 (1, 3, .., 21 wide), then 12 rows 21 wide.

    With the anchor at the centre, the wide lower rows copy skin from up to 16 px below (the mask
    grows upward) and the cone's narrow tip copies it from at most 6 px above (a narrow point down).
    """
    cone, tail = 21, 12
    size = cone + tail
    centre = size // 2
    kernel = np.zeros((size, size), dtype=np.uint8)
    for row in range(cone // 2, cone):
        half = row - cone // 2
        kernel[row, centre - half : centre + half + 1] = 1
    base_half = (cone - 1) - cone // 2  # the half width of the cone's last row
    kernel[cone:, centre - base_half : centre + base_half + 1] = 1
    return kernel


@lru_cache(maxsize=1)
def _cheek_kernel() -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))  # a flat ellipse: erodes sideways


def _cheek_erode(region: np.ndarray) -> np.ndarray:
    """``cv2.erode(region, _cheek_kernel())``: that flat ellipse is a 35-pixel row and one pixel above and
    below its centre, so the erosion is the smaller of two line erosions (which OpenCV does fast)."""
    import cv2

    across = cv2.erode(region, np.ones((1, 35), np.uint8))
    return np.minimum(across, cv2.erode(region, np.ones((3, 1), np.uint8)))


def _cheek_columns(left_width: int, right_width: int) -> np.ndarray:
    """Canvas columns outside the central band [centre - left, centre + right] (both ends outside,
    as the official filled rectangles include their corner columns)."""
    columns = np.arange(CANVAS)
    centre = CANVAS // 2
    return (columns <= centre - left_width) | (columns >= centre + right_width)


def _mouth_region(parsing: np.ndarray) -> np.ndarray:
    """Lips and mouth grown by a margin (a disc); 0/255."""
    import cv2

    lips = cv2.LUT(parsing, _LIPS_TABLE)
    region = np.zeros(parsing.shape, dtype=np.uint8)
    window = _around(lips, _MOUTH_MARGIN + 1)
    if window is not None:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * _MOUTH_MARGIN + 1, 2 * _MOUTH_MARGIN + 1))
        region[window] = cv2.dilate(lips[window], disc)
    return region


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape != (NUM_LANDMARKS, 2) or not np.isfinite(landmarks).all():
        raise InputError(
            f"Expected the 468 face-mesh landmarks of a frame with a face ([468, 2], finite), got shape "
            f"{landmarks.shape}; frames without a face have no mask and are passed through."
        )
    return landmarks


_SUBPIXEL_BITS = 4  # polygon vertices with 1/16 px precision


def _fill(image: np.ndarray, polygon: np.ndarray, value: int) -> None:
    import cv2

    vertices = np.rint(polygon * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(image, [vertices], int(value), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.convexHull(points.astype(np.float32))[:, 0, :]


def crop_face(frame: np.ndarray, box: Box, size: int = 256) -> np.ndarray:
    """``frame[y1:y2, x1:x2]`` resized to size x size (Lanczos): the model's input crop, RGB uint8."""
    import cv2

    frame = _check_image(frame, "frame")
    x1, y1, x2, y2 = _check_box(box, frame)
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LANCZOS4)


def paste_face(frame: np.ndarray, face_256: np.ndarray, box: Box, square: Box, mask: np.ndarray) -> np.ndarray:
    """A new frame: the generated face resized to the box (bilinear, as the official code), composited
    through ``mask`` (uint8, from ``blend_mask``) over ``square`` with Pillow's integer arithmetic.

    The input frame is not modified; pixels outside the square, and wherever the mask is 0, keep
    their exact values.
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
    if mask.shape != (sy2 - sy1, sx2 - sx1) or mask.dtype != np.uint8:
        raise InputError(
            f"The mask is {mask.dtype} {mask.shape} but the square needs uint8 {(sy2 - sy1, sx2 - sx1)}; "
            "build it with blend_mask."
        )

    result = frame.copy()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return result
    composed = frame[sy1:sy2, sx1:sx2].copy()
    composed[y1 - sy1 : y2 - sy1, x1 - sx1 : x2 - sx1] = cv2.resize(face_256, (x2 - x1, y2 - y1))
    # Blend only where the mask is set: the rest stays bit-identical.
    r1, r2, c1, c2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    target = result[sy1 + r1 : sy1 + r2, sx1 + c1 : sx1 + c2]
    target[:] = _mask_blend(target, composed[r1:r2, c1:c2], mask[r1:r2, c1:c2])
    return result


def _mask_blend(under: np.ndarray, over: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Pillow's ``paste`` through an 8-bit mask: (under * (255 - a) + over * a) / 255, rounded its way."""
    a = alpha.astype(np.uint32)[..., None]
    total = under.astype(np.uint32) * (255 - a) + over.astype(np.uint32) * a + 128
    return ((total + (total >> 8)) >> 8).astype(np.uint8)


def draw_overlay(frame: np.ndarray, box: Box, square: Box, mask: np.ndarray) -> np.ndarray:
    """Preview for the app: the mask tinted green over the frame, the crop box in yellow, the square in blue."""
    import cv2

    frame = _check_image(frame, "frame")
    sx1, sy1, sx2, sy2 = _check_box(square, frame)
    x1, y1, x2, y2 = _check_box(box, frame)
    out = frame.copy()
    region = out[sy1:sy2, sx1:sx2].astype(np.float32)
    tint = np.array([0, 255, 0], dtype=np.float32)
    alpha = 0.45 / 255.0 * mask.astype(np.float32)[..., None]
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
