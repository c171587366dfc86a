"""Audio: 16 kHz mono waveforms, speech detection and silence gating, Whisper features, per-frame windows.

The path of one job's audio::

    load_audio -> fit_length -> detect_speech -> gate_silence
               -> WhisperAudioEncoder.encode -> chunk_indices -> frame_features (per batch)

Why gate silence: MuseTalk reads the Whisper-tiny encoder's hidden states, and those are never
"nothing" in a pause: breathing, room noise and reverb tails give features that open the lips.
An offline voice-activity detector (silero-vad, whose model ships inside its wheel) marks what
is not speech, and that stretch is set to digital zero before the encoder. A zeroed stretch
gives the same log-mel values as the zero padding Whisper puts after every clip shorter than
30 s, which the model saw throughout training, so it reads as silence and the mouth rests.

Time axes: the encoder gives 50 steps per second (``WHISPER_STEPS_PER_SECOND``);
``T = floor(seconds * 50)``. A video frame ``i`` at ``fps`` takes a window of
``2 * (pad_left + pad_right + 1)`` steps (10 for the defaults) around step ``floor(i * (50 / fps))``.
Every count and index is computed with the official code's floating-point expressions: the model
was trained on what they give, and at the rounding edges exact arithmetic gives another step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np

from musetalk.errors import InputError, WeightsMismatchError, WeightsMissingError

if TYPE_CHECKING:  # pragma: no cover - typing only; torch loads lazily
    import torch

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WHISPER_STEPS_PER_SECOND = 50
# Whisper reads fixed 30 s windows: 480000 samples -> 3000 mel frames -> 1500 encoder steps.
WHISPER_WINDOW_SECONDS = 30
# Peak below this (about -80 dBFS) is digital silence: the detector is not even asked.
DIGITAL_SILENCE_PEAK = 1e-4
# Shorter than this, the detector cannot judge (its context is a few 32 ms windows).
MIN_DETECTABLE_SECONDS = 0.1
VERSIONS = ("v15", "v1")


# --------------------------------------------------------------------------- waveforms


def load_audio(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode any audio file, or a video's audio track, to float32 mono at 16 kHz."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"audio file not found: {path!r}; give the path of an audio or video file")
    from musetalk.video_io import decode_audio  # lazy: video_io pulls in ffmpeg helpers

    wav = np.asarray(decode_audio(path, sample_rate=SAMPLE_RATE), dtype=np.float32)
    if wav.ndim != 1 or wav.size == 0:
        raise InputError(f"{path!r} has no audio samples; give a file with an audio track")
    return wav


def _as_waveform(wav: Any, name: str = "wav") -> np.ndarray:
    """A 1-D float32 array of finite samples, or InputError."""
    array = np.asarray(wav)
    if array.ndim != 1:
        raise InputError(
            f"{name} must be a mono waveform (1-D array), got shape {array.shape}; mix channels down first"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{name} must hold float samples in [-1, 1], got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite samples; the audio file is corrupt")
    return array


def _check_sample_rate(sr: int) -> None:
    if sr != SAMPLE_RATE:
        raise InputError(f"sample rate must be {SAMPLE_RATE} Hz, got {sr}; decode with load_audio() first")


def fit_length(wav: np.ndarray, num_samples: int) -> np.ndarray:
    """Pad with trailing zeros or cut at the end so the result has exactly ``num_samples`` samples."""
    wav = _as_waveform(wav)
    if num_samples < 0:
        raise InputError(f"num_samples must be >= 0, got {num_samples}")
    if wav.size >= num_samples:
        return wav[:num_samples].copy()
    return np.concatenate([wav, np.zeros(num_samples - wav.size, dtype=np.float32)])


def num_whisper_steps(num_samples: int, sr: int = SAMPLE_RATE) -> int:
    """Encoder steps kept for a waveform: ``floor(seconds * 50)``, in floating point as the official code
    computes it. Exact arithmetic keeps one step more for about 5% of the lengths that are multiples of
    320 samples: for 9280 samples ``9280 / 16000 * 50`` is 28.999999999999996, so 28 steps, not 29. The
    model only ever saw the official count, and the last frames' windows depend on it."""
    return math.floor((num_samples / sr) * WHISPER_STEPS_PER_SECOND)


def num_video_frames(num_samples: int, fps: float, sr: int = SAMPLE_RATE) -> int:
    """Video frames the audio covers: ``floor(seconds * fps)``, in floating point as the official code."""
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    return math.floor((num_samples / sr) * fps)


# --------------------------------------------------------------------------- speech detection


@dataclass(frozen=True)
class SpeechSegments:
    """What the voice-activity detector calls speech: sorted, non-overlapping ``(start_s, end_s)`` spans."""

    spans: list[tuple[float, float]]
    duration: float

    def speech_mask(self, times: np.ndarray) -> np.ndarray:
        """True where a time (seconds) lies inside a speech span (start inclusive, end exclusive)."""
        times = np.asarray(times, dtype=np.float64)
        mask = np.zeros(times.shape, dtype=bool)
        for start, end in self.spans:
            mask |= (times >= start) & (times < end)
        return mask

    def frame_mask(self, num_frames: int, fps: float) -> np.ndarray:
        """True for each video frame whose centre time ``(i + 0.5) / fps`` is speech."""
        if fps <= 0:
            raise InputError(f"fps must be positive, got {fps}")
        return self.speech_mask((np.arange(num_frames) + 0.5) / fps)

    @property
    def speech_seconds(self) -> float:
        """Total length of speech."""
        return float(sum(end - start for start, end in self.spans))


# Importing silero_vad calls torch.set_num_threads(1) for the whole process; that would slow
# every later torch model (Whisper, UNet, VAE) to one core. Restore the count it overwrote.
@lru_cache(maxsize=1)
def load_vad_model() -> Any:
    """The silero-vad model (TorchScript, from inside the wheel; no download), loaded once per process."""
    import torch

    threads = torch.get_num_threads()
    try:
        import silero_vad
    finally:
        torch.set_num_threads(threads)
    model = silero_vad.load_silero_vad(onnx=False)
    torch.set_num_threads(threads)
    logger.debug("silero-vad loaded from %s", os.path.dirname(silero_vad.__file__))
    return model


# Speech spans start and end this much beyond what silero-vad calls speech, so consonants are not cut.
SPEECH_PAD_S = 0.08

# The model keeps recurrent state between windows; one caller at a time.
_VAD_LOCK = threading.Lock()


def detect_speech(
    wav: np.ndarray,
    sr: int = SAMPLE_RATE,
    threshold: float = 0.5,
    min_silence_s: float = 0.25,
    speech_pad_s: float = SPEECH_PAD_S,
    min_speech_s: float = 0.15,
) -> SpeechSegments:
    """Find speech with silero-vad (offline).

    Pauses shorter than ``min_silence_s`` stay speech (lips do not close for a 100 ms gap);
    each span is widened by ``speech_pad_s`` so consonant onsets are not cut; bursts shorter
    than ``min_speech_s`` are dropped. Digital silence gives no spans without running the
    model; audio shorter than 0.1 s is too short to judge and is returned as all speech,
    so gating leaves it as it is.
    """
    wav = _as_waveform(wav)
    _check_sample_rate(sr)
    if not 0.0 < threshold < 1.0:
        raise InputError(f"speech threshold must be between 0 and 1, got {threshold}")
    if min_silence_s < 0 or speech_pad_s < 0 or min_speech_s < 0:
        raise InputError("min_silence_s, speech_pad_s and min_speech_s must be >= 0")
    duration = wav.size / sr
    if wav.size == 0 or float(np.max(np.abs(wav))) < DIGITAL_SILENCE_PEAK:
        return SpeechSegments(spans=[], duration=duration)
    if duration < MIN_DETECTABLE_SECONDS:
        logger.debug("audio of %.3f s is too short for speech detection; keeping it all", duration)
        return SpeechSegments(spans=[(0.0, duration)], duration=duration)
    raw = _silero_timestamps(wav, sr, threshold, min_silence_s, speech_pad_s, min_speech_s)
    spans = _merge_spans([(start / sr, end / sr) for start, end in raw], duration)
    return SpeechSegments(spans=spans, duration=duration)


def _silero_timestamps(
    wav: np.ndarray, sr: int, threshold: float, min_silence_s: float, speech_pad_s: float, min_speech_s: float
) -> list[tuple[int, int]]:
    """Speech spans in samples as silero-vad reports them."""
    import torch
    from silero_vad import get_speech_timestamps

    model = load_vad_model()
    with _VAD_LOCK, torch.inference_mode(), _torch_threads(1):
        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(wav)),
            model,
            threshold=threshold,
            sampling_rate=sr,
            min_speech_duration_ms=int(round(min_speech_s * 1000)),
            min_silence_duration_ms=int(round(min_silence_s * 1000)),
            speech_pad_ms=int(round(speech_pad_s * 1000)),
        )
    return [(int(stamp["start"]), int(stamp["end"])) for stamp in stamps]


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch ops of this thread on ``count`` threads. The VAD steps through 32 ms windows one
    by one: ops far too small to share, where OpenMP's hand-offs between two threads made 7.5 s of
    audio take 4 s instead of 0.3 s on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)  # per thread under OpenMP, and the default for new threads


def _merge_spans(spans: list[tuple[float, float]], duration: float) -> list[tuple[float, float]]:
    """Clip spans to [0, duration], sort them and merge any that touch or overlap."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted((max(0.0, s), min(duration, e)) for s, e in spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def gate_silence(
    wav: np.ndarray, segments: SpeechSegments, sr: int = SAMPLE_RATE, fade_s: float = 0.03
) -> np.ndarray:
    """A copy of ``wav`` with everything outside speech set to zero.

    Inside each span the first and last ``fade_s`` ramp linearly from and to zero (no clicks);
    the spans already carry the detector's padding, so the ramps fall before and after the
    speech itself. Samples outside every span are exactly zero.
    """
    wav = _as_waveform(wav)
    _check_sample_rate(sr)
    if fade_s < 0:
        raise InputError(f"fade_s must be >= 0, got {fade_s}")
    gain = np.zeros(wav.size, dtype=np.float32)
    for start_s, end_s in segments.spans:
        start = max(0, int(round(start_s * sr)))
        end = min(wav.size, int(round(end_s * sr)))
        if end > start:
            gain[start:end] = np.maximum(gain[start:end], _span_gain(end - start, int(round(fade_s * sr))))
    return wav * gain


def _span_gain(length: int, fade: int) -> np.ndarray:
    """1 over a span of ``length`` samples, with linear ramps of ``fade`` samples at both ends."""
    gain = np.ones(length, dtype=np.float32)
    fade = min(fade, length // 2)
    if fade > 0:
        ramp = (np.arange(1, fade + 1, dtype=np.float32) / (fade + 1)).astype(np.float32)
        gain[:fade] = ramp
        gain[length - fade :] = ramp[::-1]
    return gain


# --------------------------------------------------------------------------- Whisper features


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No transformers progress bar while loading: a 150 MB checkpoint loads in a blink, and the
    command line's own bars are the ones a user should see."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


class WhisperAudioEncoder:
    """Whisper-tiny encoder + feature extractor, loaded once.

    Turns a 16 kHz waveform into features ``[T, L, D]``: ``T = floor(seconds * 50)`` steps,
    ``L = encoder_layers + 1`` hidden states (embedding output and every layer), ``D = d_model``.
    """

    def __init__(
        self,
        encoder: Any,
        feature_extractor: Any,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        windows_per_batch: int = 4,
    ) -> None:
        import torch

        if hasattr(encoder, "get_encoder"):
            # WhisperModel or WhisperForConditionalGeneration -> its encoder; an encoder -> itself
            encoder = encoder.get_encoder()
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else torch.float32
        self.encoder = encoder.to(device=self.device, dtype=self.dtype).eval()
        self.feature_extractor = feature_extractor
        self.windows_per_batch = max(1, int(windows_per_batch))
        config = self.encoder.config
        self.num_hidden_states = int(config.encoder_layers) + 1
        self.d_model = int(config.d_model)
        # Steps one 30 s window gives; the 50-per-second time axis depends on it being 1500.
        self.window_steps = int(config.max_source_positions)
        if self.window_steps != WHISPER_WINDOW_SECONDS * WHISPER_STEPS_PER_SECOND:
            raise WeightsMismatchError(
                f"Whisper encoder has max_source_positions={self.window_steps}; MuseTalk needs 1500 "
                "(50 steps per second over 30 s windows): use the openai/whisper-tiny checkpoint"
            )

    @classmethod
    def from_pretrained(
        cls, whisper_dir: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> WhisperAudioEncoder:
        """Load from a local folder holding ``config.json``, the weights and ``preprocessor_config.json``.

        The official whisper-tiny file is the whole sequence-to-sequence model (keys prefixed
        ``model.``); ``WhisperModel.from_pretrained`` strips the prefix. The decoder is dropped.
        Never touches the network.
        """
        from transformers import WhisperFeatureExtractor, WhisperModel

        whisper_dir = os.fspath(whisper_dir)
        for name in ("config.json", "preprocessor_config.json"):
            if not os.path.isfile(os.path.join(whisper_dir, name)):
                raise WeightsMissingError(
                    f"Whisper files missing: {os.path.join(whisper_dir, name)}; "
                    "run `musetalk download` to fetch openai/whisper-tiny into the models folder"
                )
        try:
            with _quiet_loading():
                model, info = WhisperModel.from_pretrained(
                    whisper_dir, local_files_only=True, output_loading_info=True
                )
        except OSError as error:
            raise WeightsMissingError(
                f"Whisper weights could not be read from {whisper_dir}: {error}; "
                "run `musetalk download` to fetch openai/whisper-tiny again"
            ) from error
        missing = [key for key in info.get("missing_keys", []) if key.startswith("encoder.")]
        if missing:
            raise WeightsMismatchError(
                f"the Whisper checkpoint in {whisper_dir} lacks {len(missing)} encoder weights "
                f"(first: {missing[0]}); it is not a whisper-tiny checkpoint, download it again"
            )
        feature_extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir, local_files_only=True)
        encoder = model.encoder
        del model  # the decoder is never used; let it go
        return cls(encoder, feature_extractor, device=device, dtype=dtype)

    def encode(self, wav: np.ndarray, turn: Callable[[], ContextManager] = nullcontext) -> np.ndarray:
        """Float32 features ``[floor(seconds * 50), L, D]`` of a 16 kHz mono waveform; each batch of windows
        runs inside a ``turn()`` (the pipeline's ``EngineTurns``: the encoder may be shared)."""
        wav = _as_waveform(wav)
        total_steps = num_whisper_steps(wav.size)
        features = np.zeros((total_steps, self.num_hidden_states, self.d_model), dtype=np.float32)
        window = WHISPER_WINDOW_SECONDS * SAMPLE_RATE
        starts = list(range(0, wav.size, window))
        for first in range(0, len(starts), self.windows_per_batch):
            batch_starts = starts[first : first + self.windows_per_batch]
            with turn():
                hidden = self._encode_windows([wav[start : start + window] for start in batch_starts])
            for row, start in enumerate(batch_starts):
                step0 = start // window * self.window_steps
                keep = min(self.window_steps, total_steps - step0)
                if keep > 0:
                    features[step0 : step0 + keep] = hidden[row, :keep]
        return features

    def mel(self, windows: list[np.ndarray]) -> np.ndarray:
        """Log-mel features ``[B, 80, 3000]`` of up to 30 s windows, each zero-padded to 30 s."""
        mel = self.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        return np.ascontiguousarray(mel, dtype=np.float32)

    def _encode_windows(self, windows: list[np.ndarray]) -> np.ndarray:
        """Hidden states ``[B, steps, L, D]`` for up to 30 s windows (each zero-padded to 30 s)."""
        import torch

        inputs = torch.from_numpy(self.mel(windows)).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            output = self.encoder(inputs, output_hidden_states=True)
            stacked = torch.stack(output.hidden_states, dim=2)
        return stacked.float().cpu().numpy()


# --------------------------------------------------------------------------- per-frame windows


def window_length(pad_left: int = 2, pad_right: int = 2) -> int:
    """Steps in one frame's window: ``2 * (pad_left + pad_right + 1)`` (10 for the defaults)."""
    return 2 * (pad_left + pad_right + 1)


def chunk_indices(
    num_frames: int,
    fps: float,
    version: str = "v15",
    pad_left: int = 2,
    pad_right: int = 2,
    num_steps: int | None = None,
) -> np.ndarray:
    """Indices ``[num_frames, W]`` into the unpadded features ``[T, L, D]``; -1 means a zero vector.

    ``W = 2 * (pad_left + pad_right + 1)`` and ``m = 50 / fps``, computed first, in floating point, as
    the official code does. With ``p = ceil(m)`` the official code
    puts ``p * pad_left`` zero steps before the features (and some after), and frame ``i`` takes the
    ``W`` steps that start at ``floor(i * m)`` of that padded array. In unpadded indices that window
    starts at ``floor(i * m) - p * pad_left``; steps before 0 or at/after ``T`` are zero (-1 here).
    At 25 fps frame ``i`` covers steps ``2i - 4 .. 2i + 5``: four before, its own two, four after.

    ``num_steps`` is ``T``; pass ``features.shape[0]``. Left out, it is taken as the steps of audio
    exactly ``num_frames / fps`` seconds long. ``fps`` is used as given: the official code truncates it
    to an integer (29.97 fps video drifts against its audio by 3%) and stops at 50 fps and above, where
    its zero padding after the features runs out; here every step past the end is zero, as the padding is.

    ``version`` ("v15" or "v1") changes nothing: the official code takes MuseTalk 1.0's audio through
    1.5's processor, the same windows. (The original 1.0 release clamped at the edges instead.)
    """
    if version not in VERSIONS:
        raise InputError(f"unknown MuseTalk version {version!r}; use one of {', '.join(VERSIONS)}")
    if fps <= 0 or not math.isfinite(fps):
        raise InputError(f"fps must be a positive number, got {fps}")
    if num_frames < 0 or pad_left < 0 or pad_right < 0:
        raise InputError("num_frames, pad_left and pad_right must be >= 0")
    if num_steps is None:
        num_steps = int(math.floor(num_frames * WHISPER_STEPS_PER_SECOND / fps + 1e-9))
    if num_steps < 0:
        raise InputError(f"num_steps must be >= 0, got {num_steps}")
    steps_per_frame = WHISPER_STEPS_PER_SECOND / fps
    starts = np.floor(np.arange(num_frames, dtype=np.float64) * steps_per_frame).astype(np.int64)
    starts -= math.ceil(steps_per_frame) * pad_left
    indices = starts[:, None] + np.arange(window_length(pad_left, pad_right), dtype=np.int64)[None, :]
    indices[(indices < 0) | (indices >= num_steps)] = -1
    return indices


def frame_features(features: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Gather frames' windows: ``[T, L, D]`` and ``[n, W]`` -> ``[n, W * L, D]``, zeros where index is -1.

    Tokens are time-major (all L hidden states of step 0, then of step 1, ...), the order the
    official code flattens ``[W, L, D]`` in. Call it per batch of frames to keep memory flat.
    """
    features = np.asarray(features)
    indices = np.asarray(indices)
    if features.ndim != 3:
        raise InputError(f"features must be [T, L, D], got shape {features.shape}")
    if indices.ndim != 2:
        raise InputError(f"indices must be [frames, window], got shape {indices.shape}")
    steps, layers, width = features.shape
    if indices.size and (indices.min() < -1 or indices.max() >= steps):
        raise InputError(
            f"window indices run from {indices.min()} to {indices.max()} but the features have {steps} steps; "
            "build them with chunk_indices(..., num_steps=features.shape[0])"
        )
    if steps == 0:  # nothing to gather: every index is -1
        gathered = np.zeros(indices.shape + (layers, width), dtype=features.dtype)
    else:
        gathered = features[np.clip(indices, 0, None)]  # fancy indexing copies, so zeroing is safe
    gathered[indices < 0] = 0
    return gathered.reshape(indices.shape[0], indices.shape[1] * layers, width)


# --------------------------------------------------------------------------- streaming silence gate

VAD_WINDOW = 512  # samples silero-vad judges at a time at 16 kHz (32 ms)
# A window stays speech while its probability is above the threshold less this (silero's own hysteresis).
VAD_HYSTERESIS = 0.15
# After the last speech window a stream stays ungated this long: short gaps inside a word do not
# shut the lips. The whole-file gate holds gaps up to 0.25 s, but it sees the future; a stream would
# have to wait a quarter of a second to know, and that is latency.
STREAM_HOLD_S = 0.15


class StreamingSpeechGate:
    """The silence gate for audio that arrives in pieces: ``feed`` samples in order, then ``gated(a, b)``
    gives samples ``a .. b`` (absolute indices) with non-speech set to zero, once they are final
    (``b <= final_end``).

    The rules are the whole-file gate's (``detect_speech`` + ``gate_silence``), made causal: silero-vad
    judges 32 ms windows with its own state; a speech span starts ``speech_pad_s`` before the first
    speech window, ends ``STREAM_HOLD_S`` after the last one, and ramps in and out over ``fade_s``
    inside the span. A sample is final once the windows up to ``speech_pad_s + fade_s`` after it are
    judged; with the window being filled, that is the gate's lookahead (``lookahead_samples``, 142 ms),
    part of a stream's latency.
    Memory is bounded: what lies before ``release(before)`` is dropped.
    """

    def __init__(self, threshold: float = 0.5, speech_pad_s: float = SPEECH_PAD_S, fade_s: float = 0.03,
                 hold_s: float = STREAM_HOLD_S, model: Any = None):
        if not 0.0 < threshold < 1.0:
            raise InputError(f"speech threshold must be between 0 and 1, got {threshold}")
        self.threshold = threshold
        self.pad = int(round(speech_pad_s * SAMPLE_RATE))
        self.fade = int(round(fade_s * SAMPLE_RATE))
        self.hold = int(round(hold_s * SAMPLE_RATE))
        self._reach = self.pad + self.fade + 1  # judged samples a gated sample depends on, after it
        # The latency the gate adds at worst: that reach, and a window still being filled.
        self.lookahead_samples = self._reach + VAD_WINDOW
        self._model = model if model is not None else _new_vad_model()
        _warm_up(self._model)
        self._raw = np.zeros(0, np.float32)  # samples from self._offset on
        self._offset = 0
        self._flags = np.zeros(0, bool)  # speech per VAD window, windows from self._window_offset on
        self._window_offset = 0
        self._triggered = False
        self._closed_at: int | None = None  # the stream's end, once closed

    @property
    def end(self) -> int:
        """Samples fed so far."""
        return self._offset + self._raw.size

    @property
    def final_end(self) -> int:
        """Samples before this are gated for good."""
        if self._closed_at is not None:
            return self._closed_at
        judged = (self._window_offset + self._flags.size) * VAD_WINDOW
        return max(0, judged - self._reach)

    def samples_needed(self, final: int) -> int:
        """The samples to feed before the first ``final`` are final: the pre-roll and fade after them, to the
        end of the VAD window that holds them."""
        return -(-(final + self._reach) // VAD_WINDOW) * VAD_WINDOW

    def feed(self, samples: np.ndarray) -> None:
        """The next samples of the stream (16 kHz mono float)."""
        self._raw = np.concatenate([self._raw, _as_waveform(samples, "samples")])
        self._judge_whole_windows()

    def close(self) -> None:
        """The stream ended: every sample fed is final (the last partial window is judged as it is)."""
        if self._closed_at is None:
            self._judge_whole_windows(final=True)
            self._closed_at = self.end

    def _judge_whole_windows(self, final: bool = False) -> None:
        import torch

        first = (self._window_offset + self._flags.size) * VAD_WINDOW  # the next window's first sample
        new_flags = []
        while first + VAD_WINDOW <= self.end or (final and first < self.end):
            window = self._raw[first - self._offset: first - self._offset + VAD_WINDOW]
            window = np.pad(window, (0, VAD_WINDOW - window.size))
            new_flags.append(self._is_speech(window, torch))
            first += VAD_WINDOW
        if new_flags:
            self._flags = np.concatenate([self._flags, np.array(new_flags, bool)])

    def _is_speech(self, window: np.ndarray, torch) -> bool:
        if float(np.max(np.abs(window))) < DIGITAL_SILENCE_PEAK:
            probability = 0.0  # the model is not asked about digital silence (as detect_speech)
        else:
            with torch.inference_mode(), _torch_threads(1):
                probability = float(self._model(torch.from_numpy(np.ascontiguousarray(window)), SAMPLE_RATE))
        limit = self.threshold - VAD_HYSTERESIS if self._triggered else self.threshold
        self._triggered = probability >= limit
        return self._triggered

    @property
    def closed_at(self) -> int | None:
        """The stream's length once it is closed, else None."""
        return self._closed_at

    @property
    def kept_from(self) -> int:
        """The first sample still held (what ``release`` dropped lies before it)."""
        return self._offset

    def raw(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start .. stop`` as fed (zeros before 0 and past the end)."""
        if max(start, 0) < self._offset and stop > self._offset:
            raise InputError(f"samples from {start} were released (kept from {self._offset})")
        out = np.zeros(max(0, stop - start), np.float32)
        low, high = max(start, self._offset), min(stop, self.end)
        if high > low:
            out[low - start: high - start] = self._raw[low - self._offset: high - self._offset]
        return out

    def gated(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start .. stop`` with non-speech zeroed; zeros before 0 and past a closed stream's end.
        ``stop`` may not pass ``final_end`` while the stream is open."""
        if self._closed_at is None and stop > self.final_end:
            raise InputError(f"samples up to {stop} are not final yet (final up to {self.final_end})")
        return self.raw(start, stop) * self._gain(start, stop)

    def speech_at(self, samples: np.ndarray) -> np.ndarray:
        """True where a (final) sample index lies in a speech span."""
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size == 0:
            return np.zeros(0, bool)
        low, high = int(samples.min()), int(samples.max()) + 1
        return self._speech_mask(low, high)[samples - low]

    def is_silent(self, start: int, stop: int) -> bool:
        """No speech passes the gate in samples ``start .. stop`` (final ones)."""
        return not np.any(self.gated(start, stop))

    def _gain(self, start: int, stop: int) -> np.ndarray:
        """Per sample 0 .. 1: inside a speech span, ramped over ``fade`` samples at its ends."""
        reach = self.fade + 1
        low, high = start - reach, stop + reach
        speech = self._speech_mask(low, high)
        # Distance of each sample to the nearest non-speech sample, capped at ``reach``.
        gain = np.zeros(high - low, np.float32)
        for run_start, run_stop in _runs_of_true(speech):
            positions = np.arange(run_start, run_stop)
            from_start = positions - run_start + 1 if run_start > 0 else np.full(positions.size, reach)
            to_stop = run_stop - positions if run_stop < speech.size else np.full(positions.size, reach)
            gain[run_start:run_stop] = np.minimum(np.minimum(from_start, to_stop), reach) / reach
        return gain[reach: reach + stop - start]

    def _speech_mask(self, low: int, high: int) -> np.ndarray:
        """True for samples ``low .. high`` within ``pad`` before or ``hold`` after a speech window."""
        mask = np.zeros(high - low, bool)
        first_window = max(self._window_offset, (low - self.hold) // VAD_WINDOW - 1)
        last_window = min(self._window_offset + self._flags.size, (high + self.pad) // VAD_WINDOW + 2)
        for window in range(first_window, last_window):
            if self._flags[window - self._window_offset]:
                begin = window * VAD_WINDOW - self.pad
                finish = (window + 1) * VAD_WINDOW + self.hold
                mask[max(begin - low, 0): max(finish - low, 0)] = True
        if self._closed_at is not None:
            mask[max(self._closed_at - low, 0):] = False
        return mask

    def release(self, before: int) -> None:
        """Samples (and window judgements) before ``before`` will not be asked for again."""
        drop = min(max(0, before - self.hold - self.pad - 2 * VAD_WINDOW) - self._offset, self._raw.size)
        if drop > 0:
            self._raw = self._raw[drop:]
            self._offset += drop
        windows = min(self._offset // VAD_WINDOW - 1 - self._window_offset, self._flags.size)
        if windows > 0:
            self._flags = self._flags[windows:]
            self._window_offset += windows


def _runs_of_true(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _warm_up(model: Any) -> None:
    """Run the model twice on noise, then reset its state. TorchScript optimises a model on its first two
    calls (50 and 15 ms here, against 0.2 ms after): in a stream those calls would fall on the first
    speech and make its frames late."""
    import torch

    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(VAD_WINDOW).astype(np.float32) * 0.1)
    with torch.inference_mode(), _torch_threads(1):
        for _ in range(2):
            model(noise, SAMPLE_RATE)
    model.reset_states()


def _new_vad_model() -> Any:
    """A silero-vad model of its own: the model keeps state between windows, so a stream cannot share
    the whole-file gate's (``load_vad_model``)."""
    import torch

    load_vad_model()  # imports silero_vad once, keeping torch's thread count
    import silero_vad

    threads = torch.get_num_threads()
    model = silero_vad.load_silero_vad(onnx=False)
    torch.set_num_threads(threads)
    return model
