"""musetalk-studio: lip-sync dubbing with MuseTalk.

Importing this package is cheap: torch, diffusers, transformers and MediaPipe load only
when a pipeline or model is built.
"""

from musetalk.errors import (
    FFmpegError,
    InputError,
    MuseTalkError,
    NoFaceError,
    WeightsMismatchError,
    WeightsMissingError,
)

__version__ = "0.1.0"

__all__ = [
    "FFmpegError",
    "InputError",
    "MuseTalkError",
    "NoFaceError",
    "WeightsMismatchError",
    "WeightsMissingError",
    "__version__",
]
