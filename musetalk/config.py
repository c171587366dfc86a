"""Options of one lip-sync job. Defaults are the official MuseTalk ones unless a comment says why not.

One flat dataclass so the command line, the YAML job files and the app all map onto the
same names; ``validate()`` turns a bad value into an ``InputError`` that names the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from musetalk.errors import InputError

VERSIONS = ("v15", "v1")
PARSING_MODES = ("jaw", "raw", "mouth")
LOOP_MODES = ("pingpong", "loop", "freeze")
LENGTH_MODES = ("audio", "video")
OVERSIZE_MODES = ("downscale", "refuse")


@dataclass(frozen=True)
class RunOptions:
    # Model version: "v15" (MuseTalk 1.5, default) or "v1" (MuseTalk 1.0, its own weights).
    version: str = "v15"
    # v1.5 only: pixels added below the chin to the crop box (official default 10).
    extra_margin: int = 10
    # v1.0 only: pixels the box's middle line moves; positive opens the mouth more.
    bbox_shift: int = 0
    # Which face to dub when there are several: None = the largest, else 0-based, left to right.
    face_index: int | None = None
    # Strength of the temporal smoothing of landmarks and boxes, 0 = off, 1 = strong.
    smoothing: float = 0.5
    # Blend mask: "jaw" (official v1.5 default), "raw" (official v1.0: the lower face as segmented) or
    # "mouth" (ours: lips and a margin); None: the official one of the version.
    parsing_mode: str | None = None
    # Width in pixels, on a 512 canvas of the face square, kept left/right of the centre in jaw mode.
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    # Only the part of the face square below this fraction of its height is replaced.
    upper_boundary_ratio: float = 0.5
    # Zero non-speech before the audio encoder so the mouth rests in pauses.
    silence_gate: bool = True
    # Audio context in whisper steps-per-frame units on each side (official 2 and 2).
    audio_padding_left: int = 2
    audio_padding_right: int = 2
    # Shift the audio against the video, in milliseconds; positive delays the audio.
    av_offset_ms: int = 0
    # When the audio is longer than the video: "pingpong" (official), "loop" or "freeze".
    loop: str = "pingpong"
    # Output length follows the "audio" (default) or the "video" (audio padded with silence or cut).
    length: str = "audio"
    # Output frame rate; None keeps the input's (25 is the model's training rate).
    fps: float | None = None
    # Frames per model call; None: 8 on a CPU, as many as the GPU's free memory holds (up to 64) on a GPU.
    batch_size: int | None = None
    # H.264 constant rate factor of the output: 0 lossless .. 51 worst; 18 is visually lossless.
    crf: int = 18
    # Largest picture worked on, in pixels (default 4K UHD, 3840x2160); the model sees a 256 px face
    # either way, so more only costs memory and time.
    max_pixels: int = 3840 * 2160
    # A video or photo above max_pixels: "downscale" (to fit, same shape; the output is that size) or "refuse".
    oversize: str = "downscale"

    def validate(self) -> RunOptions:
        """Return self, or raise InputError naming the first bad option and its allowed values."""
        _one_of("version", self.version, VERSIONS)
        if self.parsing_mode is not None:
            _one_of("parsing_mode", self.parsing_mode, PARSING_MODES)
        _one_of("loop", self.loop, LOOP_MODES)
        _one_of("length", self.length, LENGTH_MODES)
        _one_of("oversize", self.oversize, OVERSIZE_MODES)
        _in_range("extra_margin", self.extra_margin, 0, 200)
        _in_range("bbox_shift", self.bbox_shift, -100, 100)
        _in_range("smoothing", self.smoothing, 0.0, 1.0)
        _in_range("left_cheek_width", self.left_cheek_width, 0, 256)
        _in_range("right_cheek_width", self.right_cheek_width, 0, 256)
        _in_range("upper_boundary_ratio", self.upper_boundary_ratio, 0.2, 0.8)
        _in_range("audio_padding_left", self.audio_padding_left, 0, 8)
        _in_range("audio_padding_right", self.audio_padding_right, 0, 8)
        _in_range("av_offset_ms", self.av_offset_ms, -5000, 5000)
        if self.batch_size is not None:
            _in_range("batch_size", self.batch_size, 1, 256)
        _in_range("crf", self.crf, 0, 51)
        _in_range("max_pixels", self.max_pixels, 64 * 64, 100_000_000)  # video_io.MAX_INPUT_PIXELS
        if self.face_index is not None:
            _in_range("face_index", self.face_index, 0, 32)
        if self.fps is not None:
            _in_range("fps", self.fps, 1, 120)
        return self

    def mask_mode(self) -> str:
        """The blend mask this job uses: the one asked for, else the official one of its version."""
        return self.parsing_mode or ("jaw" if self.version == "v15" else "raw")

    def replace(self, **changes) -> RunOptions:
        """A copy with some fields changed; unknown names raise InputError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(option_names())}")
        return dataclasses.replace(self, **changes)


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunOptions)]


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def _in_range(name: str, value, low, high) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(f"{name} must be a number from {low} to {high}, not {value!r}")
