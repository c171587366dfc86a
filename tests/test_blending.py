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
    # box 100x80 centred at (150, 140): half side int(100 / 2 * 1.5) = 75
    assert face_square((100, 100, 200, 180), 640, 480) == (75, 65, 225, 215)
    assert face_square((0, 10, 100, 90), 640, 480) == (0, 0, 125, 125)  # clipped, not moved
    with pytest.raises(InputError):
        face_square((10, 10, 10, 50), 640, 480)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_every_mask_is_feathered_zero_above_the_boundary_and_at_the_border(scene, mode):
    _, landmarks, box, square = scene
    mask = blend_mask(landmarks, box, square, mode=mode)
    sx1, sy1, sx2, sy2 = square
    assert mask.dtype == np.float32 and mask.shape == (sy2 - sy1, sx2 - sx1)
    assert mask.min() >= 0.0 and mask.max() == pytest.approx(1.0, abs=1e-3)
    side = sy2 - sy1
    assert not mask[: int(side * 0.5) + 1].any()
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    # Feathered: values strictly between 0 and 1 exist (a soft edge, not a cut-out).
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 0.1 * (mask > 0.5).sum()


def test_masks_sit_on_the_lower_face(scene):
    _, landmarks, box, square = scene
    sx1, sy1 = square[:2]
    mouth_centre = landmarks[[13, 14]].mean(axis=0) - np.array([sx1, sy1])
    for mode in MASK_MODES:
        mask = blend_mask(landmarks, box, square, mode=mode)
        assert mask[int(mouth_centre[1]), int(mouth_centre[0])] > 0.99, mode
        eye = landmarks[33] - np.array([sx1, sy1])
        assert mask[int(eye[1]), int(eye[0])] == 0.0, mode


def test_mouth_mask_is_smaller_than_jaw_and_cheek_width_narrows_jaw(scene):
    _, landmarks, box, square = scene
    jaw = blend_mask(landmarks, box, square, mode="jaw")
    raw = blend_mask(landmarks, box, square, mode="raw")
    mouth = blend_mask(landmarks, box, square, mode="mouth")
    assert mouth.sum() < 0.6 * jaw.sum() and mouth.sum() < 0.6 * raw.sum()
    narrow = blend_mask(landmarks, box, square, mode="jaw", left_cheek_width=40, right_cheek_width=40)
    assert narrow.sum() < 0.75 * jaw.sum()
    columns = np.flatnonzero(narrow.max(axis=0) > 0.5)
    wide_columns = np.flatnonzero(jaw.max(axis=0) > 0.5)
    assert np.ptp(columns) < np.ptp(wide_columns)
    # Only the left cheek trimmed: the right edge stays where it was.
    left_only = blend_mask(landmarks, box, square, mode="jaw", left_cheek_width=40)
    assert np.flatnonzero(left_only.max(axis=0) > 0.5).max() == wide_columns.max()
    assert np.flatnonzero(left_only.max(axis=0) > 0.5).min() > wide_columns.min()


def test_jaw_mode_reaches_below_the_chin_raw_does_not(scene):
    _, landmarks, box, square = scene
    chin_row = int(landmarks[152, 1]) - square[1]
    chin_col = int(landmarks[152, 0]) - square[0]
    below = chin_row + 6
    jaw = blend_mask(landmarks, box, square, mode="jaw")
    raw = blend_mask(landmarks, box, square, mode="raw")
    assert jaw[below, chin_col] > raw[below, chin_col] + 0.2


def test_upper_boundary_ratio_moves_the_boundary(scene):
    _, landmarks, box, square = scene
    side = square[3] - square[1]
    lower = blend_mask(landmarks, box, square, mode="raw", upper_boundary_ratio=0.65)
    assert not lower[: int(side * 0.65) + 1].any()
    assert lower.sum() < blend_mask(landmarks, box, square, mode="raw").sum()


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
    boundary = sy1 + int((sy2 - sy1) * 0.5)
    assert np.array_equal(pasted[: boundary + 1], frame[: boundary + 1])
    full = mask > 0.999
    assert (pasted[sy1:sy2, sx1:sx2][full] == (255, 0, 255)).all()
    assert np.array_equal(pasted[sy1:sy2, sx1:sx2][mask == 0], frame[sy1:sy2, sx1:sx2][mask == 0])


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
    assert mask[-1].max() > 0.5
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
