"""Face analysis on a real photo (MediaPipe, offline), the crop-box rules and the temporal smoothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk.errors import InputError, NoFaceError
from musetalk.face import (
    CHIN,
    NOSE_29,
    NUM_LANDMARKS,
    OUTLINE_68,
    FaceAnalyzer,
    FaceTrack,
    LandmarkSmoother,
    _OneEuro,
    crop_boxes,
    smooth_track,
)

FACE_JPG = Path(__file__).parent / "data" / "face.jpg"
NOSE_TIP, UPPER_LIP, LOWER_LIP = 1, 13, 14
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263


def load_face() -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(str(FACE_JPG)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return load_face()


@pytest.fixture(scope="module")
def analyzer():
    with FaceAnalyzer() as shared:
        yield shared


@pytest.fixture(scope="module")
def face_landmarks(face, analyzer) -> np.ndarray:
    points = analyzer.landmarks(face)
    assert points is not None
    return points


def blank(height: int = 320, width: int = 320) -> np.ndarray:
    return np.full((height, width, 3), 128, dtype=np.uint8)


# --------------------------------------------------------------------------- detection


def test_landmarks_on_a_real_face_are_plausible(face_landmarks, face):
    points = face_landmarks
    assert points.shape == (NUM_LANDMARKS, 2) and points.dtype == np.float32
    height, width = face.shape[:2]
    assert (points >= 0).all() and (points[:, 0] < width).all() and (points[:, 1] < height).all()
    eyes_y = points[[RIGHT_EYE_OUTER, LEFT_EYE_OUTER], 1].mean()
    # Top to bottom: eyes, nose tip, lips, chin; the image-left eye is the subject's right.
    assert eyes_y < points[NOSE_TIP, 1] < points[UPPER_LIP, 1] <= points[LOWER_LIP, 1] < points[CHIN, 1]
    assert points[RIGHT_EYE_OUTER, 0] < points[NOSE_TIP, 0] < points[LEFT_EYE_OUTER, 0]
    # The face is about half the photo wide (see tests/data/face.jpg).
    assert 0.35 * width < np.ptp(points[:, 0]) < 0.7 * width


def test_small_face_in_a_wide_frame_is_found(face, face_landmarks, analyzer):
    import cv2

    side = 150
    small = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
    # Several places: in some of them the detector, seeing the whole frame at 192 px, misses
    # the face and only the tiles find it.
    for left, top in [(900, 300), (118, 285), (743, 540), (1002, 285), (40, 20)]:
        frame = blank(720, 1280)
        frame[top : top + side, left : left + side] = small
        points = analyzer.landmarks(frame)
        assert points is not None, (left, top)
        # The same points as on the full-size photo, scaled into the small copy.
        expected = face_landmarks * (side / face.shape[1]) + np.array([left, top], dtype=np.float32)
        error = np.hypot(*(points - expected).T)
        assert np.median(error) < 0.03 * side, (left, top)


def test_tiles_cover_the_frame():
    from musetalk.face import _tiles

    for height, width in [(720, 1280), (1080, 1920), (1280, 720), (480, 480), (200, 1200)]:
        covered = np.zeros((height, width), dtype=bool)
        for left, top, side in _tiles(height, width):
            assert left + side <= width and top + side <= height
            covered[top : top + side, left : left + side] = True
        assert covered.all()


def test_analyze_follows_the_face_when_the_detector_misses_it(face, monkeypatch):
    import cv2

    moved = cv2.warpAffine(face, np.float32([[1, 0, 6], [0, 1, 0]]), (320, 320), borderMode=cv2.BORDER_REPLICATE)
    with FaceAnalyzer() as analyzer:
        first = analyzer.landmarks(face)
        calls = {"n": 0}
        real_detect = analyzer._detect_in

        def blind_after_first(image):
            calls["n"] += 1
            boxes, scores = real_detect(image)
            return (boxes, scores) if calls["n"] == 1 else (boxes[:0], scores[:0])

        monkeypatch.setattr(analyzer, "_detect_in", blind_after_first)
        track = analyzer.analyze([face, moved, blank()])
    assert track.has_face.tolist() == [True, True, False]  # followed, but no face invented
    shift = np.median(track.landmarks[1, :, 0] - first[:, 0])
    assert 4 < shift < 8


def test_an_empty_image_has_no_face(analyzer):
    assert analyzer.landmarks(blank()) is None
    assert analyzer.landmarks(np.zeros((720, 1280, 3), dtype=np.uint8)) is None


def test_face_index_picks_left_or_right_and_none_picks_the_largest(face):
    import cv2

    pair = np.concatenate([face, face], axis=1)
    centres = {}
    for index in (0, 1):
        with FaceAnalyzer(face_index=index) as picker:
            points = picker.landmarks(pair)
        assert points is not None
        centres[index] = points[:, 0].mean()
    assert centres[0] < face.shape[1] <= centres[1]
    with FaceAnalyzer(face_index=2) as picker:
        assert picker.landmarks(pair) is None  # fewer faces than asked for = no face

    unequal = blank(320, 640)
    unequal[:, 320:] = face
    unequal[100:260, 40:200] = cv2.resize(face, (160, 160), interpolation=cv2.INTER_AREA)
    with FaceAnalyzer() as largest:
        points = largest.landmarks(unequal)
    assert points is not None and points[:, 0].mean() > 320


def test_analyze_marks_frames_without_a_face(face, analyzer):
    frames = [face, face, blank(), blank(), face]
    done: list[int] = []
    track = analyzer.analyze(iter(frames), progress=done.append)
    assert len(track) == 5 and (track.width, track.height) == (320, 320)
    assert track.has_face.tolist() == [True, True, False, False, True]
    assert np.isnan(track.landmarks[2:4]).all() and np.isfinite(track.landmarks[[0, 1, 4]]).all()
    assert done == [1, 2, 3, 4, 5]
    assert track.require_face() is track
    with pytest.raises(NoFaceError, match="No face"):
        analyzer.analyze([blank()]).require_face()


def test_bad_input_raises_input_error(analyzer, face):
    with pytest.raises(InputError):
        analyzer.landmarks(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(InputError, match="same size"):
        analyzer.analyze([face, blank(100, 100)])
    with pytest.raises(InputError, match="No frames"):
        analyzer.analyze([])
    with pytest.raises(InputError):
        FaceAnalyzer(face_index=-1)


# --------------------------------------------------------------------------- crop box


def known_landmarks() -> np.ndarray:
    """A face drawn by hand: every point at (150, 150) except the ones the box reads."""
    points = np.full((NUM_LANDMARKS, 2), 150.0, dtype=np.float32)
    points[234] = (100, 150)  # face side, 68-point #1
    points[454] = (200, 150)  # other side, #15
    points[CHIN] = (150, 220)  # #8
    points[NOSE_29[0]] = (150, 158)  # the two bridge points whose mean is #29: mid = 160
    points[NOSE_29[1]] = (150, 162)
    points[10] = (150, 90)  # top of the forehead: not one of the 68-point stand-ins
    return points


def one_frame_track(points: np.ndarray, width: int = 400, height: int = 400) -> FaceTrack:
    return FaceTrack.from_rows([points], width, height)


def test_box_v15_follows_the_facts():
    # x from the outline, y2 = chin + margin, y1 as far above mid as the chin is below.
    assert crop_boxes(one_frame_track(known_landmarks())).tolist() == [[100, 100, 200, 230]]
    assert crop_boxes(one_frame_track(known_landmarks()), extra_margin=0).tolist() == [[100, 100, 200, 220]]
    # The margin stops at the bottom of the frame.
    assert crop_boxes(one_frame_track(known_landmarks(), height=225)).tolist() == [[100, 100, 200, 225]]


def test_box_v1_shifts_the_middle_line():
    boxes = crop_boxes(one_frame_track(known_landmarks()), version="v1", bbox_shift=5)
    assert boxes.tolist() == [[100, 110, 200, 220]]  # mid 165: y1 = 165 - 55, no margin in v1
    boxes = crop_boxes(one_frame_track(known_landmarks()), version="v1", bbox_shift=-5)
    assert boxes.tolist() == [[100, 90, 200, 220]]


def test_box_is_clipped_and_falls_back_when_empty():
    high = known_landmarks() - np.array([0, 80], dtype=np.float32)  # mid 80, chin 140: y1 = 20
    assert crop_boxes(one_frame_track(high)).tolist() == [[100, 20, 200, 150]]
    higher = known_landmarks() - np.array([0, 120], dtype=np.float32)  # y1 would be -20
    assert crop_boxes(one_frame_track(higher)).tolist()[0][1] == 0
    # A shift that puts y1 below the chin leaves no area: the landmarks' own bounding box is used.
    fallback = crop_boxes(one_frame_track(known_landmarks()), version="v1", bbox_shift=70)
    assert fallback.tolist() == [[100, 90, 200, 220]]
    outside = known_landmarks() + np.array([1000, 0], dtype=np.float32)
    assert crop_boxes(one_frame_track(outside)).tolist() == [[-1, -1, -1, -1]]


def test_rows_without_a_face_are_minus_one():
    track = FaceTrack.from_rows([known_landmarks(), None, known_landmarks()], 400, 400)
    boxes = crop_boxes(track)
    assert boxes.dtype == np.int32 and boxes.shape == (3, 4)
    assert boxes[1].tolist() == [-1, -1, -1, -1] and boxes[0].tolist() == boxes[2].tolist() == [100, 100, 200, 230]
    with pytest.raises(InputError):
        crop_boxes(track, version="v2")


def test_box_on_the_real_face_holds_the_lower_face(face_landmarks):
    (x1, y1, x2, y2), = crop_boxes(one_frame_track(face_landmarks, 320, 320)).tolist()
    outline = face_landmarks[OUTLINE_68]
    assert x1 <= outline[:, 0].min() + 1 and outline[:, 0].max() - 1 <= x2
    assert y2 == pytest.approx(face_landmarks[CHIN, 1] + 10, abs=1)
    # The middle line sits between the eyes and the nose tip, so the box's upper half holds
    # the eyes and its lower half the whole mouth.
    mid = (y1 + y2 - 10) / 2
    eyes_y = face_landmarks[[RIGHT_EYE_OUTER, LEFT_EYE_OUTER], 1].mean()
    assert eyes_y < mid < face_landmarks[NOSE_TIP, 1]
    assert y1 < eyes_y


# --------------------------------------------------------------------------- smoothing


def moving_track(frames: int = 100, noise: float = 1.5, seed: int = 0) -> tuple[np.ndarray, FaceTrack]:
    """A real face held still, then moved 80 px right in 8 frames (a quick head move), plus jitter."""
    rng = np.random.default_rng(seed)
    base = known_landmarks_spread()
    progress = np.clip((np.arange(frames) - 40) / 8, 0, 1)
    shift = 80 * (3 * progress**2 - 2 * progress**3)
    truth = base[None] + np.stack([shift, np.zeros(frames)], axis=1)[:, None, :].astype(np.float32)
    noisy = truth + rng.normal(0, noise, truth.shape).astype(np.float32)
    return truth, FaceTrack(noisy, np.ones(frames, dtype=bool), 1280, 720)


def known_landmarks_spread() -> np.ndarray:
    """468 distinct points spread over a 150 px face (for the smoothing tests, no MediaPipe needed)."""
    angles = np.linspace(0, 2 * np.pi, NUM_LANDMARKS, endpoint=False)
    radius = 40 + 35 * np.sin(7 * angles) ** 2
    return np.stack([400 + radius * np.cos(angles), 300 + radius * np.sin(angles)], axis=1).astype(np.float32)


def test_smoothing_removes_jitter_on_a_still_face():
    truth, track = moving_track()
    still = np.r_[0:35, 55:100]
    before = (track.landmarks - truth)[still].std()
    after = (smooth_track(track, 0.5).landmarks - truth)[still].std()
    assert after < 0.5 * before
    stronger = (smooth_track(track, 1.0).landmarks - truth)[still].std()
    assert stronger < after


def test_smoothing_follows_a_real_move_without_lag():
    truth, track = moving_track()
    smoothed = smooth_track(track, 1.0).landmarks
    move = slice(38, 52)
    mean_x_error = (smoothed - truth)[move, :, 0].mean(axis=1)
    # Less than 3 px behind or ahead in any frame of a move of 10 px per frame, and no lag:
    # the error is as often ahead as behind.
    assert np.abs(mean_x_error).max() < 3.0
    assert abs(mean_x_error.mean()) < 0.5
    # A plain moving average of the same noise reduction would be far behind.
    window = 9
    kernel = np.ones(window) / window
    averaged = np.convolve(track.landmarks[:, 0, 0], kernel, mode="same")
    assert np.abs(averaged[move] - truth[move, 0, 0]).max() > 2 * np.abs(smoothed[move, 0, 0] - truth[move, 0, 0]).max()


def test_smoothing_never_crosses_a_gap_and_zero_strength_is_identity():
    _, first = moving_track(30, seed=1)
    _, second = moving_track(30, seed=2)
    second.landmarks += 200  # a different place after the gap
    rows = list(first.landmarks) + [None, None] + list(second.landmarks)
    track = FaceTrack.from_rows(rows, 1280, 720)
    smoothed = smooth_track(track, 0.8)
    assert smoothed.has_face.tolist() == track.has_face.tolist()
    assert np.isnan(smoothed.landmarks[30:32]).all()
    np.testing.assert_allclose(smoothed.landmarks[:30], smooth_track(first, 0.8).landmarks, atol=1e-4)
    np.testing.assert_allclose(smoothed.landmarks[32:], smooth_track(second, 0.8).landmarks, atol=1e-4)
    assert np.array_equal(smooth_track(track, 0.0).landmarks, track.landmarks, equal_nan=True)
    assert smoothed.landmarks is not track.landmarks and np.isfinite(track.landmarks[0]).all()
    with pytest.raises(InputError):
        smooth_track(track, 1.5)


def test_streamed_smoothing_is_final_within_its_latency_and_equals_the_whole_track():
    _, track = moving_track(100)
    rows = list(track.landmarks[:60]) + [None] + list(track.landmarks[61:])
    smoother = LandmarkSmoother(0.5, 25.0)
    assert 0 < smoother.latency < 25
    streamed, arrived_at = {}, {}
    for pushed, row in enumerate(rows):
        for index, smoothed in smoother.push(row):
            assert index not in streamed and pushed - index <= smoother.latency
            streamed[index], arrived_at[index] = smoothed, pushed
    for index, smoothed in smoother.finish():
        streamed[index] = smoothed
    assert list(streamed) == list(range(100))  # every frame once, in order
    assert streamed[60] is None
    whole = smooth_track(FaceTrack.from_rows(rows, 1280, 720), 0.5).landmarks
    for index, smoothed in streamed.items():
        if smoothed is not None:
            assert np.array_equal(smoothed, whole[index])


def test_the_fixed_lag_barely_differs_from_a_backward_pass_over_the_whole_run():
    """The backward pass restarts behind each block; after the lag its start is forgotten."""
    for strength in (0.5, 0.8):
        _, track = moving_track(100)
        smoother = LandmarkSmoother(strength, 25.0)
        size = np.hypot(*(track.landmarks[0].max(0) - track.landmarks[0].min(0)))
        flat = track.landmarks.reshape(100, -1).astype(np.float64) / size
        forward_filter, backward_filter = _OneEuro(25.0, smoother.min_cutoff), _OneEuro(25.0, smoother.min_cutoff)
        forward = np.stack([forward_filter.step(row) for row in flat])
        backward = np.stack([backward_filter.step(row) for row in flat[::-1]])[::-1]
        reference = ((forward + backward) / 2 * size).reshape(track.landmarks.shape)
        error = np.abs(smooth_track(track, strength).landmarks - reference)
        assert error.max() < 0.2, strength  # pixels, on a 150 px face whose jitter is 1.5 px


def test_the_detector_runs_on_one_frame_in_five_and_following_finds_the_same_points(face, monkeypatch):
    from musetalk import face as face_module

    canvas = np.full((face.shape[0], face.shape[1] + 30, 3), 90, np.uint8)
    frames = []
    for shift in range(0, 30, 2):  # the face moves 2 px a frame
        frame = canvas.copy()
        frame[:, shift : shift + face.shape[1]] = face
        frames.append(frame)

    def analyze(every: int) -> tuple[FaceTrack, int]:
        monkeypatch.setattr(face_module, "DETECT_EVERY", every)
        with FaceAnalyzer() as analyzer:
            calls = []
            real_detect = analyzer._detect_in
            monkeypatch.setattr(analyzer, "_detect_in", lambda image: calls.append(1) or real_detect(image))
            return analyzer.analyze(frames), len(calls)

    followed, detector_calls = analyze(face_module.DETECT_EVERY)
    detected, every_frame_calls = analyze(1)
    assert (detector_calls, every_frame_calls) == (3, 15) and followed.has_face.all()
    assert np.median(np.abs(followed.landmarks - detected.landmarks)) < 1.0
    moved = followed.landmarks[:, :, 0].mean(axis=1) - followed.landmarks[0, :, 0].mean()
    np.testing.assert_allclose(moved, np.arange(0, 30, 2), atol=1.0)
