"""LatentSync's SyncNet, and the LSE-C / LSE-D lip-sync scores computed with it.

SyncNet embeds 16 video frames (the lower half of an aligned face) and the 0.64 s of audio
under them into one space, where matching pairs lie close. Over a whole clip:

- for every window start ``t`` (one window per frame) the visual embedding ``v_t`` and the
  audio embedding ``a_t`` of the mel window starting at the same time;
- for every offset ``k`` in -15..15 frames, ``D(k)`` = mean over ``t`` of ``|v_t - a_{t+k}|``;
- **LSE-D** = ``min_k D(k)`` (lower is better), **LSE-C** = ``median_k D(k) - min_k D(k)``
  (higher is better: the true offset stands out), and the offset at the minimum.

These are the definitions of syncnet_python's evaluation (used by Wav2Lip, MuseTalk and
LatentSync), except that pairs whose shifted audio window falls outside the audio are left
out of the mean rather than compared with a zero vector.

What was checked against public code and what is assumed
--------------------------------------------------------
Verified (LatentSync's ``latentsync/models/syncnet.py``/``stable_syncnet.py``,
``configs/syncnet/syncnet_16_pixel.yaml``, ``latentsync/data/syncnet_dataset.py``,
``latentsync/utils/image_processor.py``, ``latentsync/utils/affine_transform.py``,
``configs/audio.yaml``; MuseTalk's ``configs/training/syncnet.yaml``, which names
``latentsync_syncnet.pt`` with that config):

- the architecture and parameter names: two encoders (``audio_encoder``, ``visual_encoder``),
  each ``conv_in``, ``down_blocks.N`` residual blocks (``norm1``, ``conv1``, ``norm2``,
  ``conv2``, ``conv_shortcut`` when the width changes, ``downsample_conv`` when the block
  downsamples, with the same asymmetric padding) and ``norm_out``; GroupNorm(32), SiLU, a
  final ReLU; embeddings L2-normalised. The config in ``model_configs/syncnet.json`` has no
  attention blocks; built from it the model has 371.8 M parameters, 1.385 GiB in fp32, the
  size reported for ``latentsync_syncnet.pt`` (1.4 GB);
- the checkpoint holds ``{"state_dict": ..., "global_step": ...}`` (LatentSync's trainer
  saves that; its evaluation loads it with ``weights_only=True``); a bare state dict is
  accepted too;
- inputs: 16 frames at 25 fps, RGB scaled to [-1, 1], stacked frame-major into 48 channels,
  lower half (rows 128..255) of a 256x256 face; audio = the Wav2Lip mel spectrogram
  (16 kHz, pre-emphasis 0.97, n_fft 800, hop 200, Hann window 800, 80 Slaney mel bands
  55..7600 Hz, dB - 20, normalised to [-4, 4]), window of 52 mel steps starting at step
  ``int(80 * frame / 25)``;
- face alignment: LatentSync aligns each face with a similarity transform of three points
  (the two eyebrow centres and the nose) onto a template in a 210x280 crop, then resizes it
  to 256x256.

Assumed (not verifiable without the weights and LatentSync's own face detector):

- the landmarks: LatentSync takes the three points from InsightFace's 106-point model; here
  they come from the MediaPipe mesh (means of the brow points, and of nose points 195 and 5,
  chosen because on a frontal face they sit in the template's proportions: nose 0.49 brow
  spans below the brows, template 0.488);
- the warp is done in one step (bilinear) instead of LatentSync's warp then Lanczos resize;
- the scale of the numbers: published LSE-C / LSE-D figures come from syncnet_python's own
  SyncNet (``syncnet_v2.model``, MFCC input, unnormalised embeddings), so values from this
  network are on their own scale (distances of unit vectors, 0..2): compare results with
  each other, not with paper tables.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from musetalk.errors import InputError, WeightsMismatchError, WeightsMissingError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "latentsync_syncnet.pt"
# A config file next to the weights overrides the shipped official one (tests load tiny models so).
CONFIG_NAME = "syncnet.json"
OFFICIAL_CONFIG = "syncnet.json"  # in musetalk.model_configs

FPS = 25  # the network was trained on 25 fps video
WINDOW_FRAMES = 16
SAMPLE_RATE = 16000
MEL_STEPS_PER_SECOND = 80  # hop of 200 samples at 16 kHz
MEL_WINDOW = math.ceil(WINDOW_FRAMES / 5 * 16)  # 52 mel steps for 16 frames, as LatentSync's dataset
MAX_OFFSET_FRAMES = 15  # offsets searched: +-0.6 s, as syncnet_python
FACE_SIZE = 256

# Wav2Lip's audio front end (LatentSync configs/audio.yaml).
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB, REF_LEVEL_DB, MAX_ABS_VALUE = -100.0, 20.0, 4.0

# LatentSync's alignment template (AlignRestore, 3 points, resolution 256): left brow centre,
# right brow centre, nose, in a 210x280 crop that is then resized to 256x256.
_TEMPLATE_SCALE = 2.8
TEMPLATE = np.array([[17.0, 20.0], [58.0, 20.0], [37.5, 40.0]]) * _TEMPLATE_SCALE
ALIGNED_SIZE = (int(75 * _TEMPLATE_SCALE), int(100 * _TEMPLATE_SCALE))  # (width 210, height 280)
FILL_VALUE = 127
# MediaPipe mesh points standing in for InsightFace's: brows in image left / right, and the nose.
BROW_IMAGE_LEFT = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)
BROW_IMAGE_RIGHT = (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)
NOSE = (195, 5)


# --------------------------------------------------------------------------- the network


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, a residual, then an optional strided conv (LatentSync's block)."""

    def __init__(self, in_channels: int, out_channels: int, downsample_factor, norm_num_groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        factor = tuple(downsample_factor) if isinstance(downsample_factor, (list, tuple)) else downsample_factor
        if factor == 1:
            self.downsample_conv = None
        else:
            self.downsample_conv = nn.Conv2d(out_channels, out_channels, 3, stride=factor, padding=0)
        # F.pad order (left, right, top, bottom): a stride-1 axis is padded on both sides so the
        # 3x3 kernel keeps its size; a strided axis gets one extra row/column at its far end.
        self.pad = (0, 1, 0, 1)
        if isinstance(factor, tuple) and factor[0] == 1:
            self.pad = (0, 1, 1, 1)
        elif isinstance(factor, tuple) and factor[1] == 1:
            self.pad = (1, 1, 0, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(inputs)))
        hidden = self.conv2(F.silu(self.norm2(hidden)))
        shortcut = inputs if self.conv_shortcut is None else self.conv_shortcut(inputs)
        hidden = hidden + shortcut
        if self.downsample_conv is not None:
            hidden = self.downsample_conv(F.pad(hidden, self.pad))
        return hidden


class Encoder(nn.Module):
    """conv_in, one ResnetBlock per width, GroupNorm + ReLU: an image in, a [B, C, 1, 1] code out."""

    def __init__(self, in_channels: int, block_out_channels, downsample_factors, norm_num_groups: int = 32):
        super().__init__()
        if len(block_out_channels) != len(downsample_factors):
            raise WeightsMismatchError("a SyncNet encoder needs one downsample factor per block")
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        widths = [block_out_channels[0], *block_out_channels]
        self.down_blocks = nn.ModuleList(
            ResnetBlock(widths[i], widths[i + 1], downsample_factors[i], norm_num_groups)
            for i in range(len(block_out_channels))
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(inputs)
        for block in self.down_blocks:
            hidden = block(hidden)
        return F.relu(self.norm_out(hidden))


class SyncNet(nn.Module):
    """Audio and visual encoders whose unit-length outputs are close for matching pairs."""

    def __init__(self, config: dict):
        super().__init__()
        groups = int(config.get("norm_num_groups", 32))
        self.config = config
        self.audio_encoder = _encoder(config, "audio_encoder", groups)
        self.visual_encoder = _encoder(config, "visual_encoder", groups)

    @property
    def visual_channels(self) -> int:
        return int(self.config["visual_encoder"]["in_channels"])

    def embed_visual(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 48, 128, 256] stacked lower-half faces -> [B, D] unit vectors."""
        return F.normalize(self.visual_encoder(frames).flatten(1), p=2, dim=1)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, 1, 80, 52] mel windows -> [B, D] unit vectors."""
        return F.normalize(self.audio_encoder(mel).flatten(1), p=2, dim=1)

    def forward(self, frames: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_visual(frames), self.embed_audio(mel)


def _encoder(config: dict, name: str, groups: int) -> Encoder:
    try:
        part = config[name]
        return Encoder(int(part["in_channels"]), list(part["block_out_channels"]),
                       list(part["downsample_factors"]), groups)
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsMismatchError(f"the SyncNet config lacks a usable {name!r} section ({error})") from error


def official_config() -> dict:
    """LatentSync's 16-frame pixel SyncNet config, the one ``latentsync_syncnet.pt`` was trained with."""
    text = resources.files("musetalk.model_configs").joinpath(OFFICIAL_CONFIG).read_text()
    return {key: value for key, value in json.loads(text).items() if not key.startswith("_")}


# --------------------------------------------------------------------------- loading


_CACHE: dict[tuple, SyncNet] = {}
_CACHE_LOCK = threading.Lock()


def load_syncnet(weights_path: str | os.PathLike, device: str | torch.device = "cpu") -> SyncNet:
    """SyncNet from its checkpoint, loaded strictly with ``weights_only=True``; once per process
    per file and device (a changed file is loaded again)."""
    path = Path(weights_path)
    if not path.is_file():
        raise WeightsMissingError(f"SyncNet weights not found at {path}; fetch them with: musetalk download --scoring")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = _load(path, torch.device(device))
            _CACHE.clear()  # one SyncNet at a time: the real one is 1.4 GB
            _CACHE[key] = model
    return model


def _load(path: Path, device: torch.device) -> SyncNet:
    config = _config_for(path)
    with torch.device("meta"):
        model = SyncNet(config)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, garbled, or a pickle that would run code
        raise WeightsMissingError(
            f"{path} could not be read as a SyncNet checkpoint ({type(error).__name__}: {error}). "
            "Delete it and fetch it again with: musetalk download --scoring"
        ) from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"{path} does not hold a SyncNet state dict")
    _check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("SyncNet loaded from %s (%d parameters)", path, sum(p.numel() for p in model.parameters()))
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def _config_for(path: Path) -> dict:
    local = path.with_name(CONFIG_NAME)
    if not local.is_file():
        return official_config()
    try:
        return {k: v for k, v in json.loads(local.read_text()).items() if not k.startswith("_")}
    except (OSError, ValueError) as error:
        raise WeightsMismatchError(f"cannot read the SyncNet config {local}: {error}") from error


def _check_keys(model: SyncNet, state: dict, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshaped:
        details = "; ".join(
            f"{len(keys)} {label} (first: {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
            if keys
        )
        raise WeightsMismatchError(
            f"{path} does not fit LatentSync's 16-frame SyncNet: {details}. "
            f"Use {WEIGHTS_NAME} from ByteDance/LatentSync (musetalk download --scoring)."
        )


def save_syncnet(model: SyncNet, folder: str | os.PathLike, with_config: bool = True) -> Path:
    """Save as LatentSync's trainer does (``{"state_dict", "global_step"}``) under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if with_config:
        (folder / CONFIG_NAME).write_text(json.dumps(model.config, indent=2))
    target = folder / WEIGHTS_NAME
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, target)
    return target


# --------------------------------------------------------------------------- audio input


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised log-mel spectrogram of 16 kHz audio: float32 [80, 1 + len // 200]."""
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise InputError(f"the waveform must be mono (1-D), got shape {wav.shape}")
    emphasized = np.concatenate([wav[:1], wav[1:] - PREEMPHASIS * wav[:-1]])
    padded = np.pad(emphasized, N_FFT // 2)  # centred frames, zero padding (librosa >= 0.10)
    count = 1 + (padded.size - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:count]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    magnitude = np.abs(np.fft.rfft(frames * window, axis=1))
    mel = magnitude @ mel_filters().T
    level = 20 * np.log10(np.maximum(10 ** (MIN_LEVEL_DB / 20), mel)) - REF_LEVEL_DB
    scaled = 2 * MAX_ABS_VALUE * (level - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS_VALUE
    return np.clip(scaled, -MAX_ABS_VALUE, MAX_ABS_VALUE).T.astype(np.float32)


def mel_filters() -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters [80, 401] (librosa.filters.mel's defaults)."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2)
    edges = _mel_to_hz(mel_points)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    filters = np.maximum(0, np.minimum(lower, upper))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[:, None]


_F_SP = 200.0 / 3  # Slaney's mel scale: linear below 1 kHz, logarithmic above
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) / _LOG_STEP,
                    hz / _F_SP)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOG_STEP * (mel - _MIN_LOG_MEL)), mel * _F_SP)


def mel_windows(mel: np.ndarray) -> np.ndarray:
    """The 52-step window starting under each video frame that fits in the audio: [A, 1, 80, 52]."""
    starts = []
    frame = 0
    while int(MEL_STEPS_PER_SECOND * frame / FPS) + MEL_WINDOW <= mel.shape[1]:
        starts.append(int(MEL_STEPS_PER_SECOND * frame / FPS))
        frame += 1
    if not starts:
        return np.zeros((0, 1, mel.shape[0], MEL_WINDOW), dtype=np.float32)
    return np.stack([mel[:, s : s + MEL_WINDOW] for s in starts])[:, None].astype(np.float32)


# --------------------------------------------------------------------------- visual input


def face_alignment(landmarks: np.ndarray) -> np.ndarray:
    """Affine matrix [2, 3] from frame pixels to the aligned 256x256 face: a similarity taking the
    brow centres and the nose onto LatentSync's template, then its 210x280 crop stretched to 256x256."""
    points = np.stack([landmarks[list(BROW_IMAGE_LEFT)].mean(0), landmarks[list(BROW_IMAGE_RIGHT)].mean(0),
                       landmarks[list(NOSE)].mean(0)]).astype(np.float64)
    stretch = np.diag([FACE_SIZE / ALIGNED_SIZE[0], FACE_SIZE / ALIGNED_SIZE[1]])
    return stretch @ _similarity(points, TEMPLATE)


def lower_face(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The lower half (rows 128..255) of the aligned 256x256 face: uint8 RGB [128, 256, 3]."""
    import cv2

    matrix = face_alignment(landmarks) - np.array([[0, 0, 0], [0, 0, FACE_SIZE / 2]])
    return cv2.warpAffine(frame, matrix, (FACE_SIZE, FACE_SIZE // 2), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL_VALUE,) * 3)


def _similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + shift taking source points onto target points: [2, 3]."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    src, dst = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(dst.T @ src / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(singular) @ sign) / max((src**2).sum(1).mean(), 1e-12))
    shift = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, shift[:, None]])


def _to_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    """16 uint8 crops [128, 256, 3] -> float [48, 128, 256] in [-1, 1], frame-major channels."""
    stacked = np.stack(crops).astype(np.float32) / 127.5 - 1.0  # [16, 128, 256, 3]
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).reshape(-1, *stacked.shape[1:3])


# --------------------------------------------------------------------------- scoring


@dataclass
class SyncNetScores:
    lse_c: float  # confidence: median minus minimum of the mean distance over offsets (higher is better)
    lse_d: float  # mean distance at the best offset (lower is better)
    offset_ms: float  # best offset; positive = the picture is late against the sound
    windows: int  # 16-frame windows scored


class SyncNetScorer:
    """Scores a clip with a loaded SyncNet. Frames stream through a 16-frame buffer, so memory
    stays flat however long the clip is."""

    def __init__(self, model: SyncNet, device: str | torch.device = "cpu", batch_size: int = 8):
        self.model = model
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))

    def visual_embeddings(self, frames: Iterable[np.ndarray], landmarks: Iterable[np.ndarray | None],
                          progress: Callable[[int], None] | None = None,
                          stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of every ``stride``-th 16-frame window (25 fps frames, one landmark row or None
        per frame).

        Returns ``(embeddings [W, D], valid [W])`` for every window start; a window that was skipped
        or has a frame without a face is invalid.
        """
        buffer: deque[np.ndarray | None] = deque(maxlen=WINDOW_FRAMES)
        pending: list[tuple[int, torch.Tensor]] = []
        results: dict[int, np.ndarray] = {}
        count = 0
        for index, (frame, points) in enumerate(zip(frames, landmarks)):
            buffer.append(None if points is None else lower_face(frame, points))
            if len(buffer) == WINDOW_FRAMES:
                start = index - WINDOW_FRAMES + 1
                count = start + 1
                if start % stride == 0 and all(crop is not None for crop in buffer):
                    pending.append((start, _to_tensor(list(buffer))))
                if len(pending) >= self.batch_size:
                    results.update(self._embed_visual(pending))
                    pending = []
            if progress is not None:
                progress(index + 1)
        results.update(self._embed_visual(pending))
        width = self._embedding_width()
        embeddings = np.zeros((count, width), dtype=np.float32)
        valid = np.zeros(count, dtype=bool)
        for start, vector in results.items():
            embeddings[start] = vector
            valid[start] = True
        return embeddings, valid

    def audio_embeddings(self, wav: np.ndarray) -> np.ndarray:
        """Embeddings of the mel window under every 25 fps frame that fits in the audio: [A, D]."""
        windows = mel_windows(melspectrogram(wav))
        if len(windows) == 0:
            return np.zeros((0, self._embedding_width()), dtype=np.float32)
        chunks = []
        with torch.inference_mode():
            for first in range(0, len(windows), 64):
                batch = torch.from_numpy(windows[first : first + 64]).to(self.device)
                chunks.append(self.model.embed_audio(batch).float().cpu().numpy())
        return np.concatenate(chunks)

    def _embed_visual(self, pending: list[tuple[int, torch.Tensor]]) -> dict[int, np.ndarray]:
        if not pending:
            return {}
        batch = torch.stack([tensor for _, tensor in pending]).to(self.device)
        with torch.inference_mode():
            vectors = self.model.embed_visual(batch).float().cpu().numpy()
        return {start: vector for (start, _), vector in zip(pending, vectors)}

    def _embedding_width(self) -> int:
        return int(self.model.config["visual_encoder"]["block_out_channels"][-1])


def lse_scores(visual: np.ndarray, valid: np.ndarray, audio: np.ndarray,
               max_offset: int = MAX_OFFSET_FRAMES) -> SyncNetScores | None:
    """LSE-C / LSE-D from window embeddings (see the module docstring); None when no valid window
    has audio under it."""
    starts = np.flatnonzero(valid)
    offsets = np.arange(-max_offset, max_offset + 1)
    mean_distance = np.full(len(offsets), np.nan)
    for column, offset in enumerate(offsets):
        paired = starts[(starts + offset >= 0) & (starts + offset < len(audio))]
        if len(paired):
            mean_distance[column] = float(np.linalg.norm(visual[paired] - audio[paired + offset], axis=1).mean())
    if not np.isfinite(mean_distance).any():
        return None
    best = int(np.nanargmin(mean_distance))
    minimum = float(mean_distance[best])
    confidence = float(np.nanmedian(mean_distance)) - minimum
    # Visual window t best matches audio window t + k: k < 0 means the picture shows what the
    # sound said k frames earlier, i.e. the picture is late.
    offset_ms = float(-offsets[best] * 1000.0 / FPS)
    return SyncNetScores(lse_c=confidence, lse_d=minimum, offset_ms=offset_ms, windows=int(len(starts)))
