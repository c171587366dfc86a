"""Lower-face masks from the landmarks of a real photo, and pasting a face back without seams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk.blending import MASK_MODES, blend_mask, crop_face, draw_overlay, face_square, paste_face
from musetalk.errors import InputError
from musetalk.face import FaceAnalyzer, FaceTrack, crop_boxes

FACE_JPG = Path(__file__).parent / "data" / "face.jpg"
WIDTH, HEIGHT = 640, 480


@pytest.fixture(scope="module")
def scene():
    """The test photo placed inside a bigger frame, its landmarks, crop box and square."""
    import cv2

    photo = cv2.cvtColor(cv2.imread(str(FACE_JPG)), cv2.COLOR_BGR2RGB)
    frame = np.full((HEIGHT, WIDTH, 3), 90, dtype=np.uint8)
    frame[80:400, 200:520] = photo
    with FaceAnalyzer() as analyzer:
        landmarks = analyzer.landmarks(frame)
    assert landmarks is not None
    box = tuple(crop_boxes(FaceTrack.from_rows([landmarks], WIDTH, HEIGHT))[0].tolist())
    square = face_square(box, WIDTH, HEIGHT)
    return frame, landmarks, box, square


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_face_square_is_the_official_square_clipped_to_the_frame():
    # box 100x80 centred at (150, 140): half side (100 // 2) * 1.5 = 75
    assert face_square((100, 100, 200, 180), 640, 480) == (75, 65, 225, 215)
    # an odd longer side: (101 // 2) * 1.5 = 75, not int(101 / 2 * 1.5) = 75.75 -> 75 ... and 103: 76, not 77
    assert face_square((100, 100, 203, 180), 640, 480) == (75, 64, 227, 216)
    assert face_square((0, 10, 100, 90), 640, 480) == (0, 0, 125, 125)  # clipped, not moved
    with pytest.raises(InputError):
        face_square((10, 10, 10, 50), 640, 480)


def _feather_radius(square) -> int:
    side = square[3] - square[1]
    return (int(0.05 * side // 2 * 2) + 1) // 2


@pytest.mark.parametrize("mode", MASK_MODES)
def test_every_mask_is_cut_at_the_boundary_then_feathered(scene, mode):
    _, landmarks, box, square = scene
    mask = blend_mask(landmarks, box, square, mode=mode)
    sx1, sy1, sx2, sy2 = square
    assert mask.dtype == np.uint8 and mask.shape == (sy2 - sy1, sx2 - sx1)
    assert mask.max() == 255
    side = sy2 - sy1
    boundary, radius = int(side * 0.5), _feather_radius(square)
    # Cut first, blurred after: nothing more than a blur radius above the boundary ...
    assert not mask[: boundary - radius].any()
    if mode != "mouth":  # ... and the feather does reach above it where the face crosses the cut
        assert mask[boundary - 2].max() > 0 and 64 < mask[boundary].max() < 192
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    # Nothing outside the face box but the feather.
    x1, y1, x2, y2 = box
    assert not mask[y2 - sy1 + radius + 1 :].any()
    assert not mask[:, : x1 - sx1 - radius].any() and not mask[:, x2 - sx1 + radius + 1 :].any()
    # Feathered: values strictly between 0 and 255 exist (a soft edge, not a cut-out).
    assert ((mask > 12) & (mask < 243)).sum() > 0.1 * (mask > 127).sum()


def test_masks_sit_on_the_lower_face_and_leave_the_nose_out(scene):
    _, landmarks, box, square = scene
    sx1, sy1 = square[:2]
    mouth_centre = landmarks[[13, 14]].mean(axis=0) - np.array([sx1, sy1])
    nose_wing = landmarks[[98, 327]].mean(axis=0) - np.array([sx1, sy1])  # below the boundary
    for mode in MASK_MODES:
        mask = blend_mask(landmarks, box, square, mode=mode)
        assert mask[int(mouth_centre[1]), int(mouth_centre[0])] == 255, mode
        eye = landmarks[33] - np.array([sx1, sy1])
        assert mask[int(eye[1]), int(eye[0])] == 0, mode
        assert mask[int(nose_wing[1]), int(nose_wing[0])] < 64, mode


def test_mouth_mask_is_smaller_than_jaw_and_cheek_width_narrows_jaw(scene):
    _, landmarks, box, square = scene
    jaw = blend_mask(landmarks, box, square, mode="jaw").astype(np.int64)
    raw = blend_mask(landmarks, box, square, mode="raw").astype(np.int64)
    mouth = blend_mask(landmarks, box, square, mode="mouth").astype(np.int64)
    assert mouth.sum() < 0.6 * jaw.sum() and mouth.sum() < 0.6 * raw.sum()
    # Narrower cheek bands: more of the cheeks eroded sideways (not removed).
    narrow = blend_mask(landmarks, box, square, mode="jaw", left_cheek_width=40, right_cheek_width=40)
    assert narrow.astype(np.int64).sum() < 0.97 * jaw.sum()
    assert (narrow.astype(np.int64) <= jaw + 1).all()
    # Only the left band narrowed: only the left half changes.
    left_only = blend_mask(landmarks, box, square, mode="jaw", left_cheek_width=40)
    changed = np.flatnonzero((left_only != jaw).any(axis=0))
    assert changed.size and changed.max() < (square[2] - square[0]) // 2


def test_jaw_mode_grows_the_skin_upward_and_stops_near_the_chin(scene):
    from musetalk.blending import mask_from_parsing, parsing_from_landmarks

    _, landmarks, box, square = scene
    parsing = parsing_from_landmarks(landmarks, box)
    # A skin band alone on the canvas: jaw mode grows it 16 px up and at most 6 px down (as a point).
    band = np.zeros_like(parsing)
    band[300:310, 200:312] = 1
    jaw = mask_from_parsing(band, box, "jaw", upper_boundary_ratio=0.01)
    raw = mask_from_parsing(band, box, "raw", upper_boundary_ratio=0.01)
    rows_jaw, rows_raw = np.flatnonzero(jaw.max(axis=1) > 127), np.flatnonzero(raw.max(axis=1) > 127)
    scale = (square[3] - square[1]) / 512
    assert rows_jaw.min() < rows_raw.min() - 12 * scale  # grown upward
    assert rows_jaw.max() <= rows_raw.max() + 8 * scale + 1  # hardly downward


def test_upper_boundary_ratio_moves_the_boundary(scene):
    _, landmarks, box, square = scene
    side = square[3] - square[1]
    lower = blend_mask(landmarks, box, square, mode="raw", upper_boundary_ratio=0.65)
    assert not lower[: int(side * 0.65) - _feather_radius(square)].any()
    assert lower.astype(np.int64).sum() < blend_mask(landmarks, box, square, mode="raw").astype(np.int64).sum()


def test_paste_changes_only_the_masked_part_of_the_square(scene):
    frame, landmarks, box, square = scene
    before = frame.copy()
    mask = blend_mask(landmarks, box, square)
    generated = np.full((256, 256, 3), (255, 0, 255), dtype=np.uint8)  # impossible to miss
    pasted = paste_face(frame, generated, box, square, mask)
    assert np.array_equal(frame, before)  # input untouched
    assert pasted.dtype == np.uint8 and pasted.shape == frame.shape
    sx1, sy1, sx2, sy2 = square
    outside = np.ones(frame.shape[:2], dtype=bool)
    outside[sy1:sy2, sx1:sx2] = False
    assert np.array_equal(pasted[outside], frame[outside])
    top = sy1 + int((sy2 - sy1) * 0.5) - _feather_radius(square)
    assert np.array_equal(pasted[:top], frame[:top])
    full = mask == 255
    assert (pasted[sy1:sy2, sx1:sx2][full] == (255, 0, 255)).all()
    assert np.array_equal(pasted[sy1:sy2, sx1:sx2][mask == 0], frame[sy1:sy2, sx1:sx2][mask == 0])


def test_paste_uses_pillows_mask_arithmetic(scene):
    from PIL import Image

    frame, landmarks, box, square = scene
    mask = blend_mask(landmarks, box, square)
    generated = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pasted = paste_face(frame, generated, box, square, mask)
    # The official composite: the face resized into the box of the square, pasted through the mask.
    import cv2

    sx1, sy1, sx2, sy2 = square
    x1, y1, x2, y2 = box
    large = Image.fromarray(frame[sy1:sy2, sx1:sx2].copy())
    large.paste(Image.fromarray(cv2.resize(generated, (x2 - x1, y2 - y1))), (x1 - sx1, y1 - sy1))
    body = Image.fromarray(frame.copy())
    body.paste(large, (sx1, sy1), Image.fromarray(mask))
    assert np.array_equal(pasted, np.asarray(body))


def test_pasting_the_frames_own_crop_back_changes_little(scene):
    frame, landmarks, box, square = scene
    mask = blend_mask(landmarks, box, square)
    pasted = paste_face(frame, crop_face(frame, box), box, square, mask)
    sx1, sy1, sx2, sy2 = square
    replaced = mask > 0  # measured only where the frame was replaced, not diluted by untouched pixels
    assert psnr(pasted[sy1:sy2, sx1:sx2][replaced], frame[sy1:sy2, sx1:sx2][replaced]) > 35
    # A face shifted by a few pixels (a wrong box mapping) must fail the same check.
    shifted = crop_face(frame, (box[0] + 4, box[1] + 4, box[2] + 4, box[3] + 4))
    misplaced = paste_face(frame, shifted, box, square, mask)
    assert psnr(misplaced[sy1:sy2, sx1:sx2][replaced], frame[sy1:sy2, sx1:sx2][replaced]) < 30


def test_mask_at_the_frame_edge_may_reach_it():
    # A face whose square is clipped by the bottom of the frame: the mask is not forced to 0
    # along the frame's edge (nothing lies beyond it), but still is along the inner edges.
    from musetalk.face import NUM_LANDMARKS

    angles = np.linspace(0, 2 * np.pi, NUM_LANDMARKS, endpoint=False)
    landmarks = np.stack([300 + 80 * np.cos(angles), 400 + 100 * np.sin(angles)], axis=1).astype(np.float32)
    box = (220, 300, 380, 480)
    square = face_square(box, 640, 480)
    assert square[3] == 480
    mask = blend_mask(landmarks, box, square, mode="raw")
    assert mask[-1].max() > 64
    assert not mask[:, 0].any() and not mask[:, -1].any()


def test_crop_face_and_overlay(scene):
    frame, landmarks, box, square = scene
    crop = crop_face(frame, box)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    overlay = draw_overlay(frame, box, square, blend_mask(landmarks, box, square))
    assert overlay.shape == frame.shape and not np.array_equal(overlay, frame)
    mouth = landmarks[[13, 14]].mean(axis=0).astype(int)
    assert overlay[mouth[1], mouth[0], 1] > frame[mouth[1], mouth[0], 1]  # tinted green
    assert np.array_equal(overlay[:5, :5], frame[:5, :5])


def test_bad_arguments_raise_input_error(scene):
    frame, landmarks, box, square = scene
    mask = blend_mask(landmarks, box, square)
    with pytest.raises(InputError):
        blend_mask(landmarks, box, square, mode="lips")
    with pytest.raises(InputError):
        blend_mask(np.full((468, 2), np.nan, dtype=np.float32), box, square)
    with pytest.raises(InputError):
        paste_face(frame, np.zeros((256, 256, 3), np.uint8), box, square, mask[1:])
    with pytest.raises(InputError):
        crop_face(frame, (10, 10, 5, 50))


def test_a_jobs_masks_are_built_once_per_source_frame(scene, monkeypatch):
    from musetalk import pipeline
    from musetalk.avatar import FaceFrame
    from musetalk.config import RunOptions

    frame, landmarks, box, _ = scene
    built = []
    real = pipeline.blending.blend_mask
    monkeypatch.setattr(pipeline.blending, "blend_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    memo = pipeline._MaskMemo(RunOptions())
    first = memo.get(FaceFrame(0, frame, landmarks, np.array(box)))
    assert memo.get(FaceFrame(0, frame, landmarks, np.array(box)))[1] is first[1] and len(built) == 1
    for index in range(1, pipeline.MASKS_KEPT + 1):  # the least recently used is let go
        memo.get(FaceFrame(index, frame, landmarks, np.array(box)))
    memo.get(FaceFrame(0, frame, landmarks, np.array(box)))
    assert len(built) == pipeline.MASKS_KEPT + 2


def _official_steps(parsing, box, mode, left, right, ratio):
    """The mask as the official code computes it, step for step on the whole canvas and square (slow
    and plain): what the fast paths of mask_from_parsing must give exactly."""
    import cv2
    from PIL import Image

    from musetalk import blending

    lips = np.isin(parsing, (11, 12, 13))
    if mode == "raw":
        region = np.where(lips | (parsing == 1), 255, 0).astype(np.uint8)
    elif mode == "mouth":
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (41, 41))
        region = cv2.dilate(np.where(lips, 255, 0).astype(np.uint8), disc)
    else:
        skin = np.where(parsing == 1, 255, 0).astype(np.uint8)
        dilated = cv2.dilate(skin, blending._jaw_kernel())
        eroded = cv2.erode(dilated, blending._cheek_kernel(), iterations=2)
        face = np.where(blending._cheek_columns(left, right)[None, :], eroded, dilated)
        region = np.where((face == 255) & (parsing != 10) | lips, 255, 0).astype(np.uint8)
    x, y, side = blending._full_square(box)
    resized = np.asarray(Image.fromarray(region).resize((side, side), Image.Resampling.BICUBIC))
    mask = np.zeros((side, side), np.uint8)
    mask[box[1] - y : box[3] - y, box[0] - x : box[2] - x] = resized[box[1] - y : box[3] - y, box[0] - x : box[2] - x]
    mask[: int(side * ratio)] = 0
    kernel = int(0.05 * side // 2 * 2) + 1
    return cv2.GaussianBlur(mask, (kernel, kernel), 0)


def test_the_fast_mask_is_the_plain_official_computation_exactly():
    import cv2

    from musetalk.blending import mask_from_parsing

    rng = np.random.default_rng(7)
    cases = 0
    for _ in range(12):  # random class maps, some reaching the canvas edges
        parsing = np.zeros((512, 512), np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            centre = tuple(int(v) for v in rng.integers(-50, 560, 2))
            axes = tuple(int(v) for v in rng.integers(5, 200, 2))
            cv2.ellipse(parsing, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                        int(rng.choice([1, 1, 10, 11, 12, 13])), -1)
        x, y, w, h = (int(v) for v in (*rng.integers(0, 300, 2), *rng.integers(40, 700, 2)))
        for mode, left, right in (("jaw", 90, 90), ("jaw", 30, 200), ("raw", 90, 90), ("mouth", 90, 90)):
            ratio = float(rng.choice([0.5, 0.35]))
            box = (x, y, x + w, y + h)
            ours = mask_from_parsing(parsing, box, mode, left, right, ratio)
            np.testing.assert_array_equal(ours, _official_steps(parsing, box, mode, left, right, ratio))
            cases += 1
    assert cases == 48
