"""ffmpeg: locating the binary, probing media, streaming frames in and out.

ffmpeg always runs from an argument list (never a shell), reads local files only, and
frames travel through pipes: no per-frame files and memory flat in a video's length.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import lru_cache

from musetalk.errors import FFmpegError

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The ffmpeg binary: $MUSETALK_FFMPEG, else the system's, else the one imageio-ffmpeg ships."""
    configured = os.environ.get("MUSETALK_FFMPEG")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise FFmpegError(f"MUSETALK_FFMPEG={configured} is not an executable file; fix the path or unset it")
        return configured
    system = shutil.which("ffmpeg")
    if system:
        return system
    try:
        import imageio_ffmpeg
    except ImportError:
        imageio_ffmpeg = None
    if imageio_ffmpeg is not None:
        return imageio_ffmpeg.get_ffmpeg_exe()
    raise FFmpegError(
        "ffmpeg was not found: install the system package, `pip install imageio-ffmpeg`, "
        "or set MUSETALK_FFMPEG to an ffmpeg binary"
    )
