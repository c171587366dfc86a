"""Measurements of a result: lip-sync, silence, identity, stability and SyncNet scores.

Everything is computed offline from the output file (plus, optionally, the source video and
the audio) with what the project already has: MediaPipe landmarks, the voice-activity
detector and the waveform. ``score_video`` returns a ``Scores``; every field is a float or
None when it cannot be computed, and ``Scores.reasons`` says why for each None. ``FrameScorer``
takes the same measures during a job, from the frames it encodes and the faces it found (the
studio's way: no second pass over the files; from 5 s of output on its face mesh measures half the
frames, in runs of 5, within tested tolerances of score_video's).

The scores (``SCORE_INFO`` holds the same text the tables show):

- ``sync_correlation`` -1..1: Pearson correlation between the mouth opening and the speech
  loudness (dB) at the best lag within +-200 ms. Both signals are resampled to 100 Hz and the
  peak is refined by a parabola through its neighbours, so the lag is finer than a frame.
  A mouth that does not move (opening range under ``STILL_MOUTH_RANGE``) scores 0.
- ``sync_lag_ms``: that lag. Positive = the picture is late against the sound (the mouth opens
  after the sound starts); a well-synced result peaks near 0.
- ``silence_mouth_open`` / ``speech_mouth_open``: mean mouth opening in the frames the detector
  calls silence / speech. Mouth opening = gap between the inner lips (mesh points 13 and 14)
  divided by the distance between the outer eye corners (33, 263), which does not move when
  the jaw does.
- ``silent_closed_share`` 0..1: share of silent frames whose opening is below ``CLOSED_OPENING``.
- ``identity_psnr`` (dB, capped at ``PSNR_CAP``) / ``identity_ssim`` 0..1: the upper face
  (face-oval top to just above the nose line, where the pipeline never paints) of each output
  frame against its source frame. The source frame of output frame i follows the pipeline's
  frame schedule (``loop``, default pingpong) at the output's frame rate.
- ``passthrough_psnr`` (dB): whole frames without a face (passed through untouched) against the source.
- ``box_jitter`` / ``mouth_jitter``: root-mean-square second difference (frame-to-frame
  acceleration) of the face box (centre and size) and of the lip landmarks in face
  coordinates, in eye distances per frame squared. For the lips, the part that follows the
  acceleration of the sound's power (a least-squares fit, at the sync lag) is removed first:
  only shake the audio does not explain is counted.
- ``lse_c`` / ``lse_d`` / ``syncnet_offset_ms``: SyncNet confidence and distance (see
  ``musetalk.syncnet``), when ``musetalk download --scoring`` has fetched its weights.
- ``face_coverage`` 0..1: share of frames where a face was found (of the frames measured).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from musetalk import audio as audio_lib
from musetalk import face as face_lib
from musetalk import schedule, stages, video_io
from musetalk.config import LOOP_MODES
from musetalk.errors import InputError

logger = logging.getLogger(__name__)

# (stage, done, total); stages: "faces", "identity", "syncnet".
ProgressCallback = Callable[[str, int, int], None]

UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14
MOUTH_CORNERS = (61, 291)
EYE_OUTER_CORNERS = (33, 263)
LIP_POINTS = tuple(face_lib.LIPS_OUTER) + face_lib.LIPS_INNER
# The face oval from ear to ear over the forehead: the face box measured from these points does
# not grow when the jaw opens.
UPPER_OVAL = (234, 127, 162, 21, 54, 103, 67, 109, 10, 338, 297, 332, 284, 251, 389, 356, 454)

ENVELOPE_RATE = 100.0  # Hz: both sync signals are compared on this grid (10 ms steps)
ENVELOPE_WINDOW_S = 0.04  # loudness window, one frame at 25 fps
LOUDNESS_RANGE_DB = 45.0  # the envelope is floored this far below its loudest point
MAX_LAG_S = 0.2
MIN_SYNC_SECONDS = 1.0  # less overlap than this gives no sync score
# A mouth whose opening varies less than this (5th to 95th percentile, in eye distances) does not
# move: its correlation with anything is landmark noise, so it scores 0 and has no lag.
STILL_MOUTH_RANGE = 0.02
# Inner-lip gap (in eye distances) below which a mouth counts as closed: a closed mouth reads
# about 0.006 on the test face, its mouth drawn 14 px open 0.12 to 0.13.
CLOSED_OPENING = 0.05
MIN_SILENT_FRAMES = 3
PSNR_CAP = 100.0  # dB given to identical pixels
UPPER_FACE_MARGIN = 0.05  # of the face height, kept clear above the nose line where painting starts


@dataclass
class Scores:
    """One result's numbers; each a float, or None with the reason in ``reasons``."""

    sync_correlation: float | None = None
    sync_lag_ms: float | None = None
    silence_mouth_open: float | None = None
    speech_mouth_open: float | None = None
    silent_closed_share: float | None = None
    identity_psnr: float | None = None
    identity_ssim: float | None = None
    passthrough_psnr: float | None = None
    box_jitter: float | None = None
    mouth_jitter: float | None = None
    lse_c: float | None = None
    lse_d: float | None = None
    syncnet_offset_ms: float | None = None
    face_coverage: float | None = None
    reasons: dict[str, str] = field(default_factory=dict)  # field name -> why it is None

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "reasons"]

    def as_dict(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in self.names()}

    def table_rows(self) -> list[tuple[str, str, str]]:
        """(score, value, what is good) per score, in ``SCORE_INFO`` order; None shows its reason."""
        rows = []
        for name, (label, unit, good) in SCORE_INFO.items():
            value = getattr(self, name)
            text = _format(value, unit) if value is not None else f"n/a: {self.reasons.get(name, 'not computed')}"
            rows.append((label, text, good))
        return rows

    def _set(self, name: str, value: float | None, reason: str = "") -> None:
        if value is None or not math.isfinite(value):
            setattr(self, name, None)
            self.reasons[name] = reason or "could not be computed"
        else:
            setattr(self, name, float(value))
            self.reasons.pop(name, None)


TABLE_HEADERS = ("score", "value", "good")
# name -> (label, unit, what is good). The README's "Scores" section says the same.
SCORE_INFO: dict[str, tuple[str, str, str]] = {
    "sync_correlation": ("Lip-sync correlation", "", "> 0.3 (1 = mouth follows loudness exactly; ~0 = ignores it)"),
    "sync_lag_ms": ("Lip-sync lag", "ms", "within +-40 ms (one frame at 25 fps); + = picture late"),
    "lse_c": ("SyncNet confidence (LSE-C)", "", "higher is better; compare results of the same clip"),
    "lse_d": ("SyncNet distance (LSE-D)", "", "lower is better; compare results of the same clip"),
    "syncnet_offset_ms": ("SyncNet offset", "ms", "0 (+-40 ms); + = picture late"),
    "silence_mouth_open": ("Mouth opening in silence", "eye", f"< {CLOSED_OPENING} (closed)"),
    "speech_mouth_open": ("Mouth opening in speech", "eye", "0.05 .. 0.2, well above the silence value"),
    "silent_closed_share": ("Silent frames with the mouth closed", "%", "> 80%"),
    "identity_psnr": ("Upper face vs source (PSNR)", "dB", f"> 35 dB ({PSNR_CAP:g} = identical)"),
    "identity_ssim": ("Upper face vs source (SSIM)", "", "> 0.95 (1 = identical)"),
    "passthrough_psnr": ("Frames without a face vs source (PSNR)", "dB", "> 40 dB"),
    "box_jitter": ("Face box jitter", "eye", "< 0.02 (a still face measures 0.005 to 0.01)"),
    "mouth_jitter": ("Lip jitter not explained by the audio", "eye", "< 0.02"),
    "face_coverage": ("Frames with a face", "%", "100%"),
}


def _format(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.0f}%"
    if unit == "ms":
        return f"{value:+.0f} ms"
    if unit == "dB":
        return f"{value:.1f} dB"
    return f"{value:.3f}"  # correlations, SSIM, SyncNet numbers and eye distances


def format_table(scores: Scores) -> str:
    """The scores as an aligned plain-text table (what ``musetalk score`` prints)."""
    rows = [TABLE_HEADERS, *scores.table_rows()]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}" for row in rows)


# --------------------------------------------------------------------------- 1. mouth track


@dataclass
class MouthTrack:
    """Per output frame, the mouth measured from the face mesh (NaN where there is no face)."""

    opening: np.ndarray  # [N] inner-lip gap / eye distance
    width: np.ndarray  # [N] mouth-corner distance / eye distance
    eye_distance: np.ndarray  # [N] pixels between the outer eye corners
    has_face: np.ndarray  # [N] bool
    fps: float

    def __len__(self) -> int:
        return int(self.has_face.shape[0])


def mouth_track(track: face_lib.FaceTrack, fps: float) -> MouthTrack:
    """Mouth opening and width per frame, normalised by the eye distance (face size)."""
    points = track.landmarks.astype(np.float64)
    eyes = _distance(points, *EYE_OUTER_CORNERS)
    has_face = track.has_face & (np.nan_to_num(eyes) > 1.0)
    eyes = np.where(has_face, eyes, np.nan)
    opening = _distance(points, UPPER_INNER_LIP, LOWER_INNER_LIP) / eyes
    width = _distance(points, *MOUTH_CORNERS) / eyes
    return MouthTrack(opening=opening, width=width, eye_distance=eyes, has_face=has_face, fps=float(fps))


def _distance(points: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.hypot(points[:, a, 0] - points[:, b, 0], points[:, a, 1] - points[:, b, 1])


# --------------------------------------------------------------------------- 2. sync


def loudness_envelope(wav: np.ndarray, rate: float = ENVELOPE_RATE, window_s: float = ENVELOPE_WINDOW_S,
                      sr: int = audio_lib.SAMPLE_RATE) -> np.ndarray:
    """Loudness in dB at times ``k / rate`` (RMS over ``window_s`` centred there), floored
    ``LOUDNESS_RANGE_DB`` below the loudest point so room noise does not count as variation."""
    wav = np.asarray(wav, dtype=np.float64)
    hop = sr / rate
    count = int(math.ceil(wav.size / hop)) if wav.size else 0
    if count == 0:
        return np.zeros(0)
    half = int(round(window_s * sr / 2))
    energy = np.concatenate([[0.0], np.cumsum(np.pad(wav, half) ** 2)])
    centres = np.rint(np.arange(count) * hop).astype(np.int64) + half
    rms = np.sqrt((energy[centres + half] - energy[centres - half]) / (2 * half))
    level = 20 * np.log10(rms + 1e-10)
    return np.maximum(level, level.max() - LOUDNESS_RANGE_DB)


def frame_loudness(envelope: np.ndarray, num_frames: int, fps: float, rate: float = ENVELOPE_RATE) -> np.ndarray:
    """The envelope at each frame's centre time ``(i + 0.5) / fps`` (held at the ends)."""
    times = (np.arange(num_frames) + 0.5) / fps
    if envelope.size == 0:
        return np.zeros(num_frames)
    return np.interp(times * rate, np.arange(envelope.size), envelope)


def sync_scores(mouth: MouthTrack, envelope: np.ndarray, max_lag_s: float = MAX_LAG_S,
                rate: float = ENVELOPE_RATE) -> tuple[float | None, float | None, str]:
    """(correlation at the best lag, lag in ms, reason when None) between mouth opening and loudness.

    The lag L pairs the mouth at time t with the loudness at t - L: a positive lag means the
    picture is late against the sound.
    """
    mouth_grid = _mouth_on_grid(mouth, envelope.size, rate)
    if np.isfinite(mouth_grid).sum() < MIN_SYNC_SECONDS * rate:
        return None, None, f"less than {MIN_SYNC_SECONDS:g} s of frames with a face under the audio"
    low, high = np.nanpercentile(mouth_grid, [5, 95])
    if high - low < STILL_MOUTH_RANGE:
        return 0.0, None, "the mouth does not move"
    if envelope.size == 0 or np.std(envelope) < 1e-6:
        return None, None, "the audio is silent"
    max_lag = int(round(max_lag_s * rate))
    lags = np.arange(-max_lag, max_lag + 1)
    correlations = np.array([_lagged_correlation(mouth_grid, envelope, int(lag), rate) for lag in lags])
    if not np.isfinite(correlations).any():
        return None, None, "too little overlap between the picture and the sound"
    best = int(np.nanargmax(correlations))
    peak, shift = float(correlations[best]), 0.0
    if 0 < best < len(lags) - 1 and np.isfinite(correlations[best - 1 : best + 2]).all():
        left, right = correlations[best - 1], correlations[best + 1]
        curvature = left - 2 * peak + right
        if curvature < 0:
            shift = 0.5 * (left - right) / curvature
            peak = peak - 0.25 * (left - right) * shift
    return float(np.clip(peak, -1.0, 1.0)), float((lags[best] + shift) / rate * 1000.0), ""


def _mouth_on_grid(mouth: MouthTrack, size: int, rate: float) -> np.ndarray:
    """Mouth opening linearly interpolated between frame centres onto ``k / rate``; NaN where
    either neighbouring frame has no face or the time is outside the frames."""
    position = np.arange(size) / rate * mouth.fps - 0.5  # in frames, 0 = first frame's centre
    lower = np.floor(position).astype(np.int64)
    inside = (lower >= 0) & (lower + 1 < len(mouth))
    grid = np.full(size, np.nan)
    low, high, frac = lower[inside], lower[inside] + 1, position[inside] - lower[inside]
    values = mouth.opening[low] * (1 - frac) + mouth.opening[high] * frac
    grid[inside] = np.where(mouth.has_face[low] & mouth.has_face[high], values, np.nan)
    return grid


def _lagged_correlation(mouth: np.ndarray, loudness: np.ndarray, lag: int, rate: float) -> float:
    """Pearson correlation of mouth[t] with loudness[t - lag] over the samples where both exist."""
    if lag >= 0:
        a, b = mouth[lag:], loudness[: loudness.size - lag]
    else:
        a, b = mouth[: mouth.size + lag], loudness[-lag:]
    valid = np.isfinite(a)
    if valid.sum() < MIN_SYNC_SECONDS * rate:
        return float("nan")
    a, b = a[valid], b[valid]
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


# --------------------------------------------------------------------------- 3. silence


def silence_scores(mouth: MouthTrack, speech: np.ndarray) -> dict[str, tuple[float | None, str]]:
    """Mean opening in silence and in speech, and the share of silent frames with the mouth closed."""
    silent = ~speech & mouth.has_face
    spoken = speech & mouth.has_face
    result: dict[str, tuple[float | None, str]] = {}
    if silent.sum() >= MIN_SILENT_FRAMES:
        result["silence_mouth_open"] = (float(np.mean(mouth.opening[silent])), "")
        result["silent_closed_share"] = (float(np.mean(mouth.opening[silent] < CLOSED_OPENING)), "")
    else:
        reason = "no silence in the audio (under a face)"
        result["silence_mouth_open"] = result["silent_closed_share"] = (None, reason)
    if spoken.any():
        result["speech_mouth_open"] = (float(np.mean(mouth.opening[spoken])), "")
    else:
        result["speech_mouth_open"] = (None, "no speech detected in the audio (under a face)")
    return result


# --------------------------------------------------------------------------- 4. identity


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB, ``PSNR_CAP`` when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of the luma of two RGB uint8 images (Gaussian window, sigma 1.5)."""
    import cv2

    # float32: half the time of float64 (the blurs are most of it), the same index to 1e-5.
    x, y = (cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) for image in (a, b))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def upper_face_box(landmarks: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) of the face above the nose line, where the pipeline never paints."""
    oval = landmarks[list(face_lib.FACE_OVAL)]
    top, bottom = float(oval[:, 1].min()), float(oval[:, 1].max())
    nose_line = float(landmarks[list(face_lib.NOSE_29), 1].mean())
    x1, x2 = int(max(0, math.floor(oval[:, 0].min()))), int(min(width, math.ceil(oval[:, 0].max())))
    y1 = int(max(0, math.floor(top)))
    y2 = int(min(height, nose_line - UPPER_FACE_MARGIN * (bottom - top)))
    if x2 - x1 < 8 or y2 - y1 < 8:
        return None
    return x1, y1, x2, y2


def _source_info(source: str, result: video_io.MediaInfo) -> video_io.MediaInfo:
    """Probe the source and check it can be the one the result was made from."""
    info = video_io.probe(source)
    if not info.has_video:
        raise InputError(f"the source {source} has no picture; give the video or photo the result was made from")
    if (info.width, info.height) != (result.width, result.height):
        raise InputError(
            f"the source {source} is {info.width}x{info.height} but the result is "
            f"{result.width}x{result.height}; give the original video the result was made from"
        )
    return info


def identity_scores(video: str, source_info: video_io.MediaInfo, track: face_lib.FaceTrack, fps: float,
                    loop: str = "pingpong", progress: Callable[[int, int], None] | None = None
                    ) -> dict[str, tuple[float | None, str]]:
    """Upper-face PSNR/SSIM of frames with a face and whole-frame PSNR of frames without one,
    each output frame against the source frame the pipeline's schedule gave it."""
    source = source_info.path
    num_source = _source_frame_count(source_info, fps)
    order = schedule.frame_schedule(len(track), num_source, loop)
    rate = None if source_info.is_image else fps

    def open_reader(start: int, count: int) -> Iterator[np.ndarray]:
        return video_io.read_frames(source, info=source_info, fps=rate, start_frame=start, max_frames=count)

    def compared() -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int, int, int] | None]]:
        outputs = video_io.read_frames(video, max_frames=len(track))
        originals = schedule.scheduled_frames(order, open_reader, source_info.frame_bytes)
        for index, (output, original) in enumerate(zip(outputs, originals)):
            if track.has_face[index]:
                box = upper_face_box(track.landmarks[index], track.width, track.height)
                if box is not None:
                    x1, y1, x2, y2 = box
                    yield output[y1:y2, x1:x2], original[y1:y2, x1:x2], box
            else:
                yield output, original, None
            if progress is not None:
                progress(index + 1, len(track))

    return _identity_of(compared())


def _identity_of(compared) -> dict[str, tuple[float | None, str]]:
    """The identity scores from (output, source, upper-face box) pairs: upper faces where the box is
    given, whole frames without a face where it is None."""
    face_psnr, face_ssim, empty_psnr = [], [], []
    for output, original, box in compared:
        if box is not None:
            face_psnr.append(psnr(output, original))
            face_ssim.append(ssim(output, original))
        else:
            empty_psnr.append(psnr(output, original))
    no_face = "no frame with a face" if not face_psnr else ""
    return {
        "identity_psnr": (float(np.mean(face_psnr)) if face_psnr else None, no_face),
        "identity_ssim": (float(np.mean(face_ssim)) if face_ssim else None, no_face),
        "passthrough_psnr": (float(np.mean(empty_psnr)) if empty_psnr else None,
                             "" if empty_psnr else "every frame has a face"),
    }


def _source_frame_count(info: video_io.MediaInfo, fps: float) -> int:
    """Frames the pipeline saw in the source at ``fps``: 1 for a photo, the packet count at the
    source's own rate, else what the resampling reader yields (counted by decoding)."""
    if info.is_image:
        return 1
    if abs(info.fps - fps) < 1e-6 and not info.is_vfr and info.num_frames > 0:
        return info.num_frames
    return sum(1 for _ in video_io.read_frames(info.path, info=info, fps=fps))


# --------------------------------------------------------------------------- 5. stability


def box_jitter(track: face_lib.FaceTrack, mouth: MouthTrack) -> float | None:
    """RMS second difference of the face box (centre x, centre y, width, height of the face oval
    above the ears, which an opening jaw does not move) in eye distances."""
    oval = track.landmarks[:, list(UPPER_OVAL)].astype(np.float64)
    low, high = oval.min(axis=1), oval.max(axis=1)
    features = np.concatenate([(low + high) / 2, high - low], axis=1) / _eye_scale(mouth)
    return _rms_acceleration(features, mouth.has_face)


def mouth_jitter(track: face_lib.FaceTrack, mouth: MouthTrack, loudness: np.ndarray | None,
                 lag_ms: float = 0.0) -> float | None:
    """RMS second difference of the lip points in face coordinates, after removing the part that a
    least-squares fit on the loudness's own second difference explains.

    ``loudness`` is the mean power per frame (None = no audio, nothing removed); it is taken at
    the sync lag rounded to a frame and at one frame either side, so a lag between two frames is
    covered too. Power rather than dB: a little sound leaking into a quiet frame is a large step
    in dB but not in the mouth, and power adds up linearly when a sound straddles two frames.
    """
    lips = _face_coordinates(track, mouth)  # [N, P, 2]
    second = _second_difference(lips.reshape(len(lips), -1), mouth.has_face)
    rows = np.isfinite(second).all(axis=1)
    if rows.sum() < 3:
        return None
    second = second[rows]
    if loudness is not None:
        lag = int(round(lag_ms / 1000.0 * mouth.fps))
        everywhere = np.ones(len(loudness), dtype=bool)
        regressors = [_second_difference(_delayed(loudness, lag + d)[:, None], everywhere)[rows, 0] for d in (-1, 0, 1)]
        design = np.column_stack([np.ones(len(second)), *regressors])
        coefficients, *_ = np.linalg.lstsq(np.nan_to_num(design), second, rcond=None)
        second = second - np.nan_to_num(design) @ coefficients
    return float(np.sqrt(np.mean(second**2)))


def _delayed(values: np.ndarray, frames: int) -> np.ndarray:
    """``values[t - frames]``, the ends held."""
    return values[np.clip(np.arange(len(values)) - frames, 0, len(values) - 1)]


def _face_coordinates(track: face_lib.FaceTrack, mouth: MouthTrack) -> np.ndarray:
    """Lip points with the eye midpoint at the origin, the eye line along x, eye distance 1."""
    points = track.landmarks.astype(np.float64)
    left, right = points[:, EYE_OUTER_CORNERS[0]], points[:, EYE_OUTER_CORNERS[1]]
    origin = (left + right) / 2
    angle = np.arctan2(right[:, 1] - left[:, 1], right[:, 0] - left[:, 0])
    cos, sin = np.cos(-angle)[:, None], np.sin(-angle)[:, None]
    lips = points[:, list(LIP_POINTS)] - origin[:, None]
    rotated = np.stack([lips[..., 0] * cos - lips[..., 1] * sin, lips[..., 0] * sin + lips[..., 1] * cos], axis=-1)
    return rotated / mouth.eye_distance[:, None, None]


def _eye_scale(mouth: MouthTrack) -> float:
    """One face size for the whole clip (per-frame eye distances would add their own jitter)."""
    return float(np.nanmedian(mouth.eye_distance)) if mouth.has_face.any() else 1.0


def _second_difference(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """x[t+1] - 2 x[t] + x[t-1] for each t with three valid frames (NaN rows elsewhere): [N, C]."""
    result = np.full(values.shape, np.nan)
    middle = valid[1:-1] & valid[:-2] & valid[2:]
    result[1:-1][middle] = (values[2:] - 2 * values[1:-1] + values[:-2])[middle]
    return result


def _rms_acceleration(features: np.ndarray, valid: np.ndarray) -> float | None:
    second = _second_difference(features, valid)
    rows = np.isfinite(second).all(axis=1)
    return float(np.sqrt(np.mean(second[rows] ** 2))) if rows.sum() >= 3 else None


# --------------------------------------------------------------------------- 6. SyncNet


SYNCNET_MISSING = "SyncNet weights not installed: musetalk download --scoring"


def syncnet_scores(video: str, track: face_lib.FaceTrack, fps: float, wav: np.ndarray, weights: Path,
                   device: str = "cpu", window_stride: int = 1,
                   progress: Callable[[int, int], None] | None = None):
    """LSE-C / LSE-D of a clip (``musetalk.syncnet``); frames are read again at 25 fps and each takes
    the landmarks of the analysed frame nearest in time."""
    from musetalk import syncnet

    model = syncnet.load_syncnet(weights, device)
    scorer = syncnet.SyncNetScorer(model, device=device)
    info = video_io.probe(video)
    count = max(1, int(round(len(track) / fps * syncnet.FPS)))
    nearest = np.minimum(np.rint((np.arange(count) + 0.5) / syncnet.FPS * fps - 0.5).astype(np.int64), len(track) - 1)
    nearest = np.maximum(nearest, 0)
    rows = (track.landmarks[i] if track.has_face[i] else None for i in nearest)
    frames = video_io.read_frames(video, info=info, fps=syncnet.FPS, max_frames=count)
    visual, valid = scorer.visual_embeddings(
        frames, rows, progress=None if progress is None else (lambda done: progress(done, count)), stride=window_stride)
    return syncnet.lse_scores(visual, valid, scorer.audio_embeddings(wav))


# --------------------------------------------------------------------------- all together


def score_video(video: str | os.PathLike, source: str | os.PathLike | None = None,
                audio: str | os.PathLike | None = None, progress: ProgressCallback | None = None,
                models_dir: str | os.PathLike | None = None, loop: str = "pingpong", device: str = "auto",
                syncnet_stride: int = 1) -> Scores:
    """Every score of a result video.

    ``audio`` None uses the video's own sound; ``source`` None leaves the identity scores None.
    ``loop`` is the frame schedule the result was made with (to pair output and source frames);
    ``syncnet_stride`` > 1 scores every N-th SyncNet window only (N times faster on a CPU).
    """
    progress = progress or (lambda stage, done, total: None)
    video = _existing(video, "result video")
    info = video_io.probe(video)
    if not info.has_video or info.is_image:
        raise InputError(f"{video} is not a video; scores need the result video (.mp4, .mov, .mkv)")
    if syncnet_stride < 1:
        raise InputError(f"syncnet_stride must be 1 or more, got {syncnet_stride}")
    if loop not in LOOP_MODES:
        raise InputError(f"loop must be one of {', '.join(LOOP_MODES)}, not {loop!r}")
    fps = info.fps
    scores = Scores()
    # Inputs are checked before the long work starts.
    source_info = None if source is None else _source_info(_existing(source, "source video"), info)
    wav, no_audio = _load_audio(video, info, audio)

    track = _analyze(video, info, progress)
    mouth = mouth_track(track, fps)
    scores._set("face_coverage", float(mouth.has_face.mean()) if len(mouth) else None, "no frames")
    _audio_scores(scores, track, mouth, wav, no_audio)

    if source_info is None:
        for name in ("identity_psnr", "identity_ssim", "passthrough_psnr"):
            scores._set(name, None, "no source video given (--source)")
    else:
        found = identity_scores(video, source_info, track, fps, loop, lambda d, t: progress("identity", d, t))
        for name, (value, reason) in found.items():
            scores._set(name, value, reason)

    _syncnet(scores, video, track, fps, wav, no_audio, models_dir, device, syncnet_stride, progress)
    return scores


# --------------------------------------------------------------------------- in the job's own pass

# Output frames compared with their source for the identity scores, at most, evenly spaced: the output
# file is read back for these frames only, and their source crops are what memory holds, however long
# the dub (a mean over 50 frames is within a few tenths of a dB of one over all).
IDENTITY_SAMPLES = 50
# Of those, whole frames without a face kept for passthrough_psnr, at most (a 1080p frame is 6 MB).
PASSTHROUGH_SAMPLES = 12
# The face mesh is most of the scores' cost (3 ms a frame on one core of a small machine, as much as the
# preview engine's whole frame). From MESH_SAMPLED_FROM_S of output on, it runs on runs of MESH_RUN frames
# in a row with as many skipped between: half the cost, and every score stays within the tolerances it has
# against score_video's analysis of every frame (tests/test_frame_sinks.py): the jitters' second
# differences need three frames in a row, a run of 5 gives three; the sync's 0.2 s gaps are left out of the
# correlation, as frames without a face are. A shorter clip is measured whole: half of it could fall under
# the sync score's MIN_SYNC_SECONDS.
MESH_RUN = 5
MESH_SAMPLED_FROM_S = 5.0
FRAMES_QUEUED = 8  # output frames waiting for the scorer's thread


class FrameScorer:
    """``score_video``'s scores of a dub, measured from the job's own frames as they are encoded (a
    ``pipeline.FrameSink``): no second face analysis of the output and no second decode of the source.

    On its own thread, the face mesh runs on the output frames where the job found the face, in that
    face's box (``FaceAnalyzer.landmarks_near``: no detector), every frame of a short clip and runs of
    ``MESH_RUN`` frames with as many between of a longer one, and the mouth, sync, silence, coverage and
    stability scores come from the frames measured through the same functions as score_video's (SyncNet,
    which reads 16 frames in a row, places the face where the job found it in the frames between). The identity scores
    compare the output as encoded (read back for ``IDENTITY_SAMPLES`` frames) with the source frame the
    job showed there. How close it comes to score_video is stated and tested in tests/test_frame_sinks.py
    (TOLERANCES). ``close(output)`` after the job gives the Scores; ``abort()`` after a failure."""

    def __init__(self, models_dir: str | os.PathLike | None = None, device: str = "auto", syncnet_stride: int = 1):
        self.models_dir, self.device, self.syncnet_stride = models_dir, device, syncnet_stride
        self.seconds = 0.0  # spent measuring, on the scorer's thread and in close()
        self._plan = None

    def start(self, plan) -> None:
        """Called by the pipeline before the first frame (``plan``: its OutputPlan)."""
        self._plan = plan
        self._rows: list[np.ndarray | None] = [None] * plan.num_frames  # the mesh's landmarks, None: no face
        self._located: list[np.ndarray | None] = [None] * plan.num_frames  # for SyncNet: the job's where unmeasured
        self._mesh_period = 2 * MESH_RUN if plan.num_frames >= MESH_SAMPLED_FROM_S * plan.fps else 1
        self._every = max(1, math.ceil(plan.num_frames / IDENTITY_SAMPLES))
        self._samples: dict[int, tuple[tuple[int, int, int, int] | None, np.ndarray]] = {}
        self._whole_frames = 0
        self._analyzer = face_lib.FaceAnalyzer(follow=True)  # its mesh only: the job chose the face
        self._worker = stages.Worker(self._measure, FRAMES_QUEUED, "scores")

    def add(self, position: int, source, frame: np.ndarray) -> None:
        self._worker.put((position, source, frame))

    def _meshed(self, position):
        """Whether the mesh measures the output frame at ``position`` (an int, or an array of them)."""
        return position % self._mesh_period < MESH_RUN

    def _measure(self, item) -> None:
        started = time.perf_counter()
        position, source, frame = item
        if not self._meshed(position):
            self._located[position] = source.landmarks
        else:
            found = None if source.landmarks is None else self._analyzer.landmarks_near(frame, source.landmarks)
            self._rows[position] = self._located[position] = found
            if position % self._every == 0:
                self._keep_sample(position, source.frame, found)
        self.seconds += time.perf_counter() - started

    def _keep_sample(self, position: int, original: np.ndarray, found: np.ndarray | None) -> None:
        """What identity compares this output frame with once it is encoded: the source's upper face, or
        the whole source frame where the output has no face (as score_video pairs them)."""
        if found is None:
            if self._whole_frames < PASSTHROUGH_SAMPLES:
                self._samples[position] = (None, original)
                self._whole_frames += 1
            return
        box = upper_face_box(found, self._plan.width, self._plan.height)
        if box is not None:
            x1, y1, x2, y2 = box
            self._samples[position] = (box, original[y1:y2, x1:x2].copy())

    def close(self, output: str | os.PathLike, progress: ProgressCallback | None = None,
              speech: audio_lib.SpeechSegments | None = None) -> Scores:
        """The scores, once the job wrote ``output`` (its identity frames are read back from it).
        ``speech``: what the job's silence gate found in its audio (None: detected here again)."""
        if self._plan is None:
            raise InputError("the scorer saw no frames: it scores a job it was given to as a sink")
        self._worker.finish()
        started = time.perf_counter()
        try:
            scores = self._scores(os.fspath(output), progress or (lambda stage, done, total: None), speech)
        finally:
            self._analyzer.close()
        self.seconds += time.perf_counter() - started
        return scores

    def abort(self) -> None:
        if self._plan is not None:
            self._worker.abort()
            self._analyzer.close()

    def _scores(self, output: str, progress: ProgressCallback, speech) -> Scores:
        plan = self._plan
        # The output is read back (ffmpeg decodes it) while the audio scores are computed here.
        identity = stages.BackgroundCall(self._identity, output)
        track = face_lib.FaceTrack.from_rows(self._rows, plan.width, plan.height)
        mouth = mouth_track(track, plan.fps)
        scores = Scores()
        measured = self._meshed(np.arange(plan.num_frames))
        scores._set("face_coverage", float(mouth.has_face[measured].mean()) if measured.any() else None,
                    "no frames")
        wav = audio_lib.load_audio(plan.audio_path)
        _audio_scores(scores, track, mouth, wav, "", speech)
        for name, (value, reason) in identity.result().items():
            scores._set(name, value, reason)
        located = face_lib.FaceTrack.from_rows(self._located, plan.width, plan.height)
        _syncnet(scores, output, located, plan.fps, wav, "", self.models_dir, self.device, self.syncnet_stride,
                 progress)
        return scores

    def _identity(self, output: str) -> dict[str, tuple[float | None, str]]:
        return _identity_of(self._compared(output))

    def _compared(self, output: str) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int, int, int] | None]]:
        """(encoded output, source, box) for the kept frames, the output read back at those frames only."""
        for index, encoded in enumerate(video_io.read_frames(output, every=self._every)):
            sample = self._samples.get(index * self._every)
            if sample is None:
                continue  # not kept: a face without an upper face to compare, or whole frames enough
            box, original = sample
            if box is None:
                yield encoded, original, None
            else:
                x1, y1, x2, y2 = box
                yield encoded[y1:y2, x1:x2], original, box


def _existing(path: str | os.PathLike, role: str) -> str:
    if not Path(path).is_file():
        raise InputError(f"the {role} {path} does not exist; check the path")
    return os.fspath(path)


def _analyze(video: str, info: video_io.MediaInfo, progress: ProgressCallback) -> face_lib.FaceTrack:
    expected = max(1, info.num_frames)
    with face_lib.FaceAnalyzer() as analyzer:
        return analyzer.analyze(video_io.read_frames(video, info=info),
                                progress=lambda done: progress("faces", done, max(expected, done)))


def _load_audio(video: str, info: video_io.MediaInfo, audio) -> tuple[np.ndarray | None, str]:
    """The waveform the result is judged against, or (None, why not)."""
    if audio is not None:
        return audio_lib.load_audio(_existing(audio, "audio file")), ""
    if not info.has_audio:
        return None, "the video has no sound; pass the speech with --audio"
    return audio_lib.load_audio(video), ""


def _audio_scores(scores: Scores, track, mouth: MouthTrack, wav, no_audio: str,
                  speech: audio_lib.SpeechSegments | None = None) -> None:
    """``speech``: what the voice-activity detector found in ``wav``, when that is known (None: detect it)."""
    scores._set("box_jitter", box_jitter(track, mouth), "fewer than 5 consecutive frames with a face")
    if wav is None:
        for name in ("sync_correlation", "sync_lag_ms", "silence_mouth_open", "speech_mouth_open",
                     "silent_closed_share"):
            scores._set(name, None, no_audio)
        scores._set("mouth_jitter", mouth_jitter(track, mouth, None), "fewer than 5 consecutive frames with a face")
        return
    envelope = loudness_envelope(wav)
    correlation, lag_ms, reason = sync_scores(mouth, envelope)
    scores._set("sync_correlation", correlation, reason)
    scores._set("sync_lag_ms", lag_ms, reason)
    speech = (speech or audio_lib.detect_speech(wav)).frame_mask(len(mouth), mouth.fps)
    for name, (value, why) in silence_scores(mouth, speech).items():
        scores._set(name, value, why)
    # The loudness the mouth should follow, as power, at the measured lag (0 when unknown).
    power = 10 ** (frame_loudness(envelope - envelope.max(), len(mouth), mouth.fps) / 10)
    scores._set("mouth_jitter", mouth_jitter(track, mouth, power, lag_ms or 0.0),
                "fewer than 5 consecutive frames with a face")


def _syncnet(scores: Scores, video: str, track, fps: float, wav, no_audio: str, models_dir, device: str,
             stride: int, progress: ProgressCallback) -> None:
    from musetalk import weights

    names = ("lse_c", "lse_d", "syncnet_offset_ms")
    path = weights.syncnet_weights(models_dir)
    if path is None or wav is None:
        for name in names:
            scores._set(name, None, SYNCNET_MISSING if path is None else no_audio)
        return
    from musetalk.models import resolve_device

    result = syncnet_scores(video, track, fps, wav, path, str(resolve_device(device)), stride,
                            lambda d, t: progress("syncnet", d, t))
    reason = "fewer than 16 frames (0.64 s) in a row with a face under the audio"
    scores._set("lse_c", result.lse_c if result else None, reason)
    scores._set("lse_d", result.lse_d if result else None, reason)
    scores._set("syncnet_offset_ms", result.offset_ms if result else None, reason)
