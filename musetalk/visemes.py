"""Mouth-shape targets from speech: how open, how wide and how rounded the lips are over time.

Two sources, one result (``MouthTargets``: three curves on a 100 Hz grid):

- ``targets_from_audio``: any speech. Per 10 ms the loudness of the voiced band (200 Hz to
  3 kHz, where vowels are loud and most consonants are weak) sets the opening, and the
  spectral shape refines it: a high first formant (open vowels: ``a``, ``aw``) opens wider,
  energy at 1.8 to 3.2 kHz (front vowels: ``ee``) spreads the lips, and a close vowel with
  nothing up there (``oo``) rounds them.
- ``targets_from_phonemes``: speech whose source reported phoneme timings (eSpeak NG does;
  see ``musetalk.plugins.SpeechEvent``). Each phoneme names a mouth shape (a viseme): lips
  closed for p/b/m, teeth on the lip for f/v, wide open for ``a``, rounded for ``u``; the
  loudness still scales the opening, so stressed syllables open wider.

Both are smoothed with a zero-phase Gaussian (no lag: the mouth peaks where the sound peaks)
and forced closed wherever the silence detector found no speech, the same gate MuseTalk uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from musetalk.audio import SAMPLE_RATE, SpeechSegments
from musetalk.errors import InputError

logger = logging.getLogger(__name__)

RATE = 100.0  # Hz: the targets' time grid (10 ms steps)
_WINDOW = 400  # samples: 25 ms analysis window at 16 kHz
_FFT = 512
# Loudness below the speech's own loud level by more than this is a closed mouth.
_LOUDNESS_SPAN_DB = 28.0
# The loud level: this percentile of the voiced-band level over the frames with sound.
_LOUD_PERCENTILE = 95
# Smoothing of every curve, as a Gaussian's sigma: short enough that a 60 ms /m/ still closes
# the lips between two vowels, long enough that 10 ms noise in the analysis does not flicker.
_SMOOTH_S = 0.02
# What a stream must know to read exactly what the whole-file analysis reads (musetalk.live): each
# step's analysis window in samples, and the smoothing's sigma.
ANALYSIS_WINDOW = _WINDOW
SMOOTHING_S = _SMOOTH_S
# How far a loud vowel scales a phoneme's opening, and the least a quiet one keeps.
_PHONEME_LOUDNESS_FLOOR = 0.65
_LAST_PHONEME_S = 0.12  # the last phoneme of a clip has no successor to end it
# Phonemes keep the mouth open for less of each syllable than the loudness does (consonants close it
# between vowels): the same sentence opened about half as wide as from its audio (0.033 against 0.064
# eye distances, the scores' measure). This gain evens the two.
_PHONEME_GAIN = 1.5


@dataclass(frozen=True)
class MouthTargets:
    """Mouth shape over time: ``open`` 0 (closed) .. 1 (wide open), ``spread`` -1 (narrow, pursed)
    .. 1 (wide smile), ``round`` 0 .. 1 (lips rounded), sampled at ``k / rate`` seconds."""

    open: np.ndarray
    spread: np.ndarray
    round: np.ndarray
    rate: float = RATE
    source: str = "audio"  # "audio" (loudness and spectrum) or "phonemes" (visemes from timings)

    def __len__(self) -> int:
        return int(self.open.shape[0])

    def at(self, times: np.ndarray) -> np.ndarray:
        """The shape at these times (seconds): float32 [n, 3] (open, spread, round); closed outside."""
        times = np.asarray(times, dtype=np.float64)
        grid = np.arange(len(self)) / self.rate
        if len(self) == 0:
            return np.zeros((times.size, 3), np.float32)
        columns = [np.interp(times, grid, curve, left=0.0, right=0.0) for curve in (self.open, self.spread, self.round)]
        return np.stack(columns, axis=1).astype(np.float32)


# --------------------------------------------------------------------------- from the audio


def _power_spectrogram(wav: np.ndarray) -> np.ndarray:
    """|STFT|^2 [frames, bins] with 10 ms hops, each frame centred on ``k / RATE`` seconds."""
    hop = int(SAMPLE_RATE / RATE)
    count = int(math.ceil(wav.size / hop))
    padded = np.pad(wav.astype(np.float32), (_WINDOW // 2, _WINDOW))
    starts = np.arange(count) * hop
    frames = padded[starts[:, None] + np.arange(_WINDOW)[None, :]]
    spectrum = np.fft.rfft(frames * np.hanning(_WINDOW).astype(np.float32), n=_FFT, axis=1)
    return spectrum.real**2 + spectrum.imag**2


def _band(power: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    bins = np.fft.rfftfreq(_FFT, 1.0 / SAMPLE_RATE)
    return power[:, (bins >= low_hz) & (bins < high_hz)].sum(axis=1)


def loudness_curve(wav: np.ndarray) -> np.ndarray:
    """0 .. 1 per 10 ms: level of the voiced band (200 Hz .. 3 kHz) from ``_LOUDNESS_SPAN_DB``
    under the speech's loud level (0) up to it (1). Digital silence is 0."""
    power = _power_spectrogram(_checked(wav))
    level = 10 * np.log10(_band(power, 200, 3000) + 1e-12)
    return _normalised_level(level)


def _normalised_level(level: np.ndarray, loud_db: float | None = None) -> np.ndarray:
    """Levels (dB) mapped to 0 .. 1 under ``loud_db``: the given loud level, else the speech's own."""
    loud = loud_level_db(level) if loud_db is None else loud_db
    if loud is None:
        return np.zeros_like(level)
    return np.clip((level - (loud - _LOUDNESS_SPAN_DB)) / _LOUDNESS_SPAN_DB, 0.0, 1.0)


def loud_level_db(level: np.ndarray) -> float | None:
    """The speech's loud level: ``_LOUD_PERCENTILE`` of the voiced-band levels (dB) with sound in them;
    None when nothing sounds (a gated, zeroed stretch reads -120 dB)."""
    sounding = level[level > -100.0]
    return float(np.percentile(sounding, _LOUD_PERCENTILE)) if sounding.size else None


@dataclass(frozen=True)
class VoiceMeasures:
    """What the mouth shapes are made from, per 10 ms (``k / RATE`` seconds): the voiced band's level
    in dB, the vowel height (share of 500..1200 Hz in 200..1200 Hz) and the front-vowel energy
    (1.8..3.2 kHz against the voiced band). Each depends only on the 25 ms of audio around it, so a
    stream can measure as it goes (``musetalk.live``)."""

    level_db: np.ndarray
    height: np.ndarray
    front: np.ndarray


def voice_measures(wav: np.ndarray) -> VoiceMeasures:
    power = _power_spectrogram(_checked(wav))
    voiced = _band(power, 200, 3000) + 1e-12
    # Vowel height: an open vowel (a, aw, u in "sun") has its first formant above 500 Hz, a
    # close one (ee, oo) below; the share of 500..1200 Hz in 200..1200 Hz tells them apart.
    height = _band(power, 500, 1200) / (_band(power, 200, 1200) + 1e-12)
    # Front vowels (ee, i) put their second and third formants at 1.8..3.2 kHz; back ones do not.
    front = _band(power, 1800, 3200) / voiced
    return VoiceMeasures(10 * np.log10(voiced), height, front)


def targets_from_measures(measures: VoiceMeasures, loud_db: float | None = None,
                          gate: np.ndarray | None = None) -> MouthTargets:
    """Mouth targets from voice measures, loudness relative to ``loud_db`` (None: the measures' own loud
    level); ``gate``: per 10 ms step, True where the silence detector found speech (None: no gate)."""
    loudness = _normalised_level(measures.level_db, loud_db)
    height, front = measures.height, measures.front
    # Louder opens wider; a power above 1 keeps weak consonants nearly closed.
    opening = loudness**1.2 * (0.55 + 0.45 * height)
    spreading = np.clip((front - 0.10) / 0.15, 0.0, 1.0) * loudness
    roundness = np.clip((0.35 - height) / 0.3, 0.0, 1.0) * np.clip((0.12 - front) / 0.06, 0.0, 1.0) * loudness
    return _finish(opening, spreading - 0.8 * roundness, roundness, gate, "audio")


def targets_from_audio(wav: np.ndarray, speech: SpeechSegments | None = None) -> MouthTargets:
    """Mouth targets from a 16 kHz waveform (ideally already silence-gated)."""
    measures = voice_measures(wav)
    return targets_from_measures(measures, gate=_gate_mask(speech, len(measures.level_db)))


# --------------------------------------------------------------------------- from phoneme timings

# (open, spread, round) per mouth shape, and the eSpeak mnemonics that make it. Stress marks
# (' and ,) are removed before the lookup; a name not listed falls back on its first letter.
_VISEME_GROUPS: dict[tuple[float, float, float], str] = {
    (0.0, 0.0, 0.0): "p b m _ _: _! _^ ;",  # lips closed (bilabials) and pauses
    (0.06, 0.05, 0.0): "f v",  # lower lip on the upper teeth
    (0.16, 0.1, 0.0): "T D",  # tongue between the teeth
    (0.22, 0.15, 0.0): "t d n l t# d# n- l/ L l^ n^ *",  # tongue on the ridge, jaw nearly shut
    (0.12, 0.35, 0.0): "s z",  # teeth together, lips spread
    (0.14, -0.2, 0.55): "S Z tS dZ",  # lips pushed forward
    (0.3, 0.0, 0.0): "k g N x h ? Q",  # back of the tongue, jaw relaxed
    (0.14, -0.25, 0.5): "r r- R",  # English r rounds a little
    (0.06, -0.5, 0.9): "w W",  # tight rounding
    (0.14, 0.35, 0.0): "j",
    (0.88, 0.05, 0.0): "a a# A A: aa A@ a2 &",  # open
    (0.58, 0.0, 0.0): "V E E2 3 3: e@",  # open-mid
    (0.5, 0.15, 0.0): "e @ @L @2 @5 @- a#2",  # mid
    (0.3, 0.45, 0.0): "i i: I I# I2 i@ i@3",  # close front: spread
    (0.55, -0.25, 0.6): "0 O O: O@ o o: O2",  # back, rounded
    (0.26, -0.45, 0.9): "u u: U U@ u@ y Y",  # close, rounded
}
VISEMES: dict[str, tuple[float, float, float]] = {
    name: shape for shape, names in _VISEME_GROUPS.items() for name in names.split()
}
# Diphthongs glide from their first shape to their second.
DIPHTHONGS: dict[str, tuple[str, str]] = {
    "aI": ("a", "I"), "aU": ("a", "U"), "eI": ("e", "I"), "oU": ("O", "U"), "OI": ("O", "I"),
    "e@": ("E", "@"), "i@": ("i", "@"), "U@": ("U", "@"), "aI@": ("a", "@"), "aU@": ("a", "@"),
}
_VOWEL_LETTERS = set("aeiouAEIOUVY@036&")
_DEFAULT_VOWEL = (0.45, 0.0, 0.0)
_DEFAULT_CONSONANT = (0.22, 0.0, 0.0)


def viseme(phoneme: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(shape at the start, shape at the end) of an eSpeak phoneme mnemonic."""
    name = phoneme.strip().lstrip("',%=")
    if name in DIPHTHONGS:
        first, second = DIPHTHONGS[name]
        return VISEMES[first], VISEMES[second]
    for candidate in (name, name.rstrip(":"), name[:2], name[:1]):
        if candidate in VISEMES:
            return VISEMES[candidate], VISEMES[candidate]
    fallback = _DEFAULT_VOWEL if any(letter in _VOWEL_LETTERS for letter in name) else _DEFAULT_CONSONANT
    return fallback, fallback


def phoneme_spans(events: Iterable, duration: float) -> list[tuple[float, float, str]]:
    """(start, end, phoneme) from speech events: each phoneme lasts until the next one starts."""
    phonemes = sorted((float(e.time), str(e.text)) for e in events if getattr(e, "kind", "") == "phoneme")
    spans = []
    for index, (start, name) in enumerate(phonemes):
        end = phonemes[index + 1][0] if index + 1 < len(phonemes) else min(duration, start + _LAST_PHONEME_S)
        if end > start:
            spans.append((start, end, name))
    return spans


def targets_from_phonemes(events: Iterable, wav: np.ndarray,
                          speech: SpeechSegments | None = None) -> MouthTargets:
    """Mouth targets from phoneme timings, their openings scaled by the loudness of ``wav``."""
    wav = _checked(wav)
    duration = wav.size / SAMPLE_RATE
    steps = int(math.ceil(wav.size / (SAMPLE_RATE / RATE)))
    shapes = np.zeros((steps, 3))
    for start, end, name in phoneme_spans(events, duration):
        first, last = viseme(name)
        a, b = int(round(start * RATE)), min(steps, int(round(end * RATE)))
        if b <= a:
            continue
        middle = (a + b + 1) // 2
        shapes[a:middle] = first
        shapes[middle:b] = last
    loudness = loudness_curve(wav)
    scale = _PHONEME_LOUDNESS_FLOOR + (1 - _PHONEME_LOUDNESS_FLOOR) * _gaussian(loudness, 0.04)
    return _finish(shapes[:, 0] * scale * _PHONEME_GAIN, shapes[:, 1], shapes[:, 2], _gate_mask(speech, steps),
                   "phonemes")


# --------------------------------------------------------------------------- shared


def _gate_mask(speech: SpeechSegments | None, steps: int) -> np.ndarray | None:
    """Per 10 ms step, True inside the silence detector's speech spans; None without a detector."""
    return None if speech is None else speech.speech_mask(np.arange(steps) / RATE)


def _finish(opening, spread, roundness, gate: np.ndarray | None, source: str) -> MouthTargets:
    """Closed outside speech (``gate`` False), then smoothed without lag."""
    if gate is not None:
        gate = gate.astype(np.float64)
        opening, spread, roundness = opening * gate, spread * gate, roundness * gate
    curves = [np.clip(_gaussian(curve, _SMOOTH_S), low, 1.0).astype(np.float32)
              for curve, low in ((opening, 0.0), (spread, -1.0), (roundness, 0.0))]
    return MouthTargets(*curves, rate=RATE, source=source)


def _gaussian(curve: np.ndarray, sigma_s: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing of a 100 Hz curve (edges held)."""
    curve = np.asarray(curve, dtype=np.float64)
    sigma = sigma_s * RATE
    radius = max(1, int(math.ceil(3 * sigma)))
    if curve.size == 0:
        return curve
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return np.convolve(np.pad(curve, radius, mode="edge"), kernel, mode="valid")


def _checked(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.ndim != 1 or not np.issubdtype(wav.dtype, np.floating):
        raise InputError(f"expected a mono float waveform at {SAMPLE_RATE} Hz, got {wav.dtype} {wav.shape}")
    return wav.astype(np.float32, copy=False)
