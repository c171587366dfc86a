"""What the golden outputs of the official MuseTalk code were made from, and how to make it again.

Shared by ``tests/test_parity.py`` (which compares our stages with the goldens) and
``scripts/parity/make_inputs.py`` (which writes the inputs the official code is run on). The
goldens live in ``tests/data/parity/``; ``scripts/parity/regenerate`` remakes them from an
official checkout (tests/data/README.md says how).

Everything here is deterministic without any decoder or detector: audio is the example speech's
own samples tiled to each length, models are ``musetalk.testing.save_parity_models``. What does
depend on a detector (the face landmarks of the test photo and its boxes) is stored in the goldens.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "examples" / "speech.wav"
FACE_PHOTO = ROOT / "tests" / "data" / "face.jpg"
GOLDEN_DIR = ROOT / "tests" / "data" / "parity"
SAMPLE_RATE = 16000
NTSC = 30000 / 1001  # 29.97 fps as a video stores it

# (name, samples, frame rates). The lengths hit the official code's rounding edges: 9280 and 18560
# samples keep one Whisper step fewer in floating point than in exact arithmetic, 18560 one 25 fps
# frame fewer, 32032 one 29.97 fps frame fewer; 31 s needs two Whisper windows. 29 and 31 fps are
# where an epsilon in the window start moves frames; 60 fps is past the official code's limit.
AUDIO_CASES = (
    ("2.00s", 32000, (25.0, 30.0, 60.0)),
    ("2.37s", 37920, (25.0, 29.0, NTSC, 30.0, 31.0, 60.0)),
    ("edge-9280", 9280, (25.0, 30.0)),
    ("edge-18560", 18560, (25.0, 30.0)),
    ("edge-32032", 32032, (NTSC, 30.0)),
    ("31s", 496000, (25.0, NTSC)),
)
# The frames the UNet goldens cover: the first batch (8, the official default) of this case at 25 fps.
UNET_AUDIO = "2.00s"
UNET_FRAMES = 8
# Source frames and output lengths of the frame-schedule goldens (audio longer and shorter than the video).
SCHEDULES = ((3, 50), (7, 775), (30, 14))


def audio_samples(num_samples: int) -> np.ndarray:
    """int16 samples: the example speech tiled to ``num_samples``."""
    with wave.open(str(SPEECH), "rb") as handle:
        assert handle.getframerate() == SAMPLE_RATE and handle.getnchannels() == 1 and handle.getsampwidth() == 2
        speech = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    return np.resize(speech, num_samples)


def write_wav(path: Path, samples: np.ndarray) -> Path:
    """16 kHz mono 16-bit PCM, as the official code wants its audio."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return path


def fps_key(fps: float) -> str:
    """A name for a frame rate in the goldens' keys: 25, 29.97, 30 ..."""
    return f"{fps:.2f}".rstrip("0").rstrip(".")


def edge_frame(photo: np.ndarray) -> np.ndarray:
    """The photo cut so that the face's square reaches past the frame's top and left edges."""
    return np.ascontiguousarray(photo[70:, 60:])


EDGE_OFFSET = np.array([60, 70], dtype=np.float32)  # (x, y) of the edge frame in the photo

# Blending cases: (name, frame "photo" or "edge", version, mode, left and right cheek widths, bbox_shift).
BLEND_CASES = (
    ("v15-jaw", "photo", "v15", "jaw", 90, 90, 0),
    ("v15-jaw-cheeks", "photo", "v15", "jaw", 60, 120, 0),
    ("v15-raw", "photo", "v15", "raw", 90, 90, 0),
    ("v1-raw", "photo", "v1", "raw", 80, 80, 6),
    ("v15-jaw-edge", "edge", "v15", "jaw", 90, 90, 0),
)
# The crops the VAE and UNet goldens start from: the v15 box of the photo, and two boxes moved from it
# (a batch of three different faces-in-box).
CROP_SHIFTS = ((0, 0), (-7, 5), (9, -4))
