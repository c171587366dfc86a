"""ffmpeg: locating the binary, probing media, streaming frames in and out.

ffmpeg always runs from an argument list (never a shell), reads local files only, and
frames travel through pipes: no per-frame files and memory flat in a video's length.

What an input may make ffmpeg do is bounded: only the ``file`` protocol, only the demuxers
in ``INPUT_FORMATS`` (no playlists or lists that name other files or URLs, no image-sequence
patterns), decoders refuse frames above ``MAX_INPUT_PIXELS``, every command that runs to
completion has a time limit, and a reader whose ffmpeg stops delivering is stopped.

There is no ffprobe here on purpose (imageio-ffmpeg ships ffmpeg alone), so ``probe`` reads
the stream list that ``ffmpeg -i`` prints and counts frames by demuxing the video packets
without decoding them (``-c copy -f framecrc``), which is cheap even for long videos.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from musetalk import stopping
from musetalk.errors import DiskSpaceError, FFmpegError, InputError

try:
    import resource  # POSIX: CPU-time limits for ffmpeg children
except ImportError:  # Windows
    resource = None

logger = logging.getLogger(__name__)

# Rate given to a still picture, the rate MuseTalk was trained on.
IMAGE_FPS = 25.0
# Codecs whose single frame is a photo rather than a one-frame video.
STILL_IMAGE_CODECS = frozenset(
    {"png", "mjpeg", "jpeg2000", "jpegls", "jpegxl", "webp", "bmp", "tiff", "gif", "ppm", "pgm",
     "pgmyuv", "pbm", "pam", "qoi", "sgi", "targa", "dpx", "exr", "pcx", "xbm", "xwd", "sunrast",
     "photocd", "hdr", "psd", "vbn", "apng"}
)
# Frame rates cameras and editors use; NTSC ones are exact fractions.
STANDARD_RATES = tuple(
    Fraction(n, d) for n, d in [(24000, 1001), (24, 1), (25, 1), (30000, 1001), (30, 1), (48, 1), (50, 1),
                                (60000, 1001), (60, 1), (90, 1), (100, 1), (120000, 1001), (120, 1),
                                (12, 1), (15, 1), (10, 1), (5, 1)]
)
# Containers whose key-frame index makes seeking land at or before the target; others are read
# from the start when a reader begins at a later frame.
INDEXED_FORMATS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})
AUDIO_BITRATE = "192k"
# H.264 bits per pixel of a frame at crf 18, a generous figure for the disk-space check: a talking
# head takes about 0.1 (the example clip: 525 kb/s at 432x504, 25 fps); x264 doubles the size every
# 6 crf steps down (lossless: about 2). Film grain or noise can take more; the check is a floor.
BITS_PER_PIXEL_CRF18 = 0.3
# Kept free beyond the estimate: the temporary file, the container, the rest of the system.
DISK_MARGIN_BYTES = 64 * 1024 * 1024
# Lines of ffmpeg's log kept for error messages.
STDERR_TAIL_LINES = 40
# Demuxers an input may be read with: the containers, audio files and pictures people upload.
# Left out on purpose: playlists and lists (hls, concat, dash, ...) that open further files or
# URLs named inside them. image2 (pictures by extension) reads a '%d' in a path as a pattern and
# opens the other files it matches, so it is allowed only for paths without '%'.
INPUT_FORMATS = (
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "asf",
    "ogg", "ivf", "gif", "mp3", "aac", "ac3", "flac", "wav", "w64", "aiff", "caf", "amr", "wv",
    "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif_pipe", "jpegxl_pipe", "qoi_pipe",
)
SEQUENCE_FORMAT = "image2"
# Formats nobody films: drawings a renderer draws (an SVG of 4 KB can keep librsvg busy for many
# minutes: dozens of blurs on an 8000x8000 canvas), documents and scripts. ffmpeg's image reader picks
# its decoder by the extension, so these are refused by name, and by their first bytes under any
# other name, before any ffmpeg sees them.
UNFILMED_SUFFIXES = {
    ".svg": "an SVG drawing", ".svgz": "an SVG drawing", ".eps": "a PostScript drawing",
    ".ps": "a PostScript document", ".pdf": "a PDF document", ".ai": "an Illustrator drawing",
    ".wmf": "a Windows metafile drawing", ".emf": "a Windows metafile drawing", ".swf": "a Flash animation",
    ".html": "a web page", ".htm": "a web page", ".xml": "an XML document", ".avs": "an AviSynth script",
    ".vpy": "a VapourSynth script",
}
_UNFILMED_CONTENT = (
    (re.compile(rb"^(\xef\xbb\xbf)?\s*<(\?xml|svg|!doctype|html|!--)", re.IGNORECASE), "markup (SVG, XML or HTML)"),
    (re.compile(rb"^%!PS"), "a PostScript document"),
    (re.compile(rb"^%PDF-"), "a PDF document"),
)
# Probing reads every packet (no decoding but a picture's first frame): this long for any file,
# plus a second per PROBE_BYTES_PER_S of it, of wall-clock time and of CPU time.
PROBE_BASE_S = 10.0
PROBE_BYTES_PER_S = 20e6
# What a probe decodes (a few frames to learn the codec's parameters, a photo) needs one thread.
_PROBE_THREADS = ["-threads", "1"]
# Larger pictures are refused before anything decodes them: a PNG of a few kilobytes can declare
# 30000x30000 pixels (gigabytes once decoded). 100 MP still admits 8K video and most camera photos.
MAX_INPUT_PIXELS = 100_000_000
# Seconds an ffmpeg command that runs to completion (probe, audio decoding) may take; far more
# than an hour-long file needs, so reaching it means ffmpeg is stuck on a damaged file.
COMMAND_TIMEOUT_S = 600.0
# How often a wait on ffmpeg looks whether the job was asked to stop.
_POLL_S = 0.1
# Seconds a FrameReader waits for ffmpeg to deliver one frame before it stops ffmpeg.
STALL_TIMEOUT_S = 120.0
# A writer's temporary file untouched this long belongs to a process that was killed.
STALE_PARTIAL_SECONDS = 3600
# The oldest ffmpeg this project supports: 5.1 brought -fps_mode, which the reader uses (Debian 12
# ships 5.1). What else it must offer (musetalk doctor checks each):
MIN_FFMPEG_VERSION = (5, 1)
REQUIRED_ENCODERS = ("libx264", "aac")
REQUIRED_MUXERS = ("mp4", "mov", "matroska", "framecrc", "rawvideo", "wav")
REQUIRED_FILTERS = ("fps", "trim", "select", "scale", "setpts", "apad", "atrim", "adelay")
# framecrc prints AV_NOPTS_VALUE for a missing timestamp.
NO_PTS = -(2**63)
# A packet that the demuxer flags AV_PKT_FLAG_DISCARD (before an mp4 edit list's start) is never shown.
PACKET_FLAG_DISCARD = 0x4


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The ffmpeg binary: $MUSETALK_FFMPEG, else the one imageio-ffmpeg ships, else the system's.

    The bundled binary comes first on purpose: it is one known version (9.x) with known demuxers,
    decoders and flags, the one the tests run. A system ffmpeg may be older (Debian 12 has 5.1) or
    built with other libraries and demuxers; it is used when no bundled binary exists for the
    platform, or when MUSETALK_FFMPEG names it. The oldest ffmpeg supported is MIN_FFMPEG_VERSION;
    ``musetalk doctor`` says when the one found is older or lacks an encoder, muxer or filter."""
    configured = os.environ.get("MUSETALK_FFMPEG")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise FFmpegError(f"MUSETALK_FFMPEG={configured} is not an executable file; fix the path or unset it")
        return configured
    bundled = bundled_ffmpeg()
    if bundled:
        return bundled
    system = shutil.which("ffmpeg")
    if system:
        return system
    raise FFmpegError(
        "ffmpeg was not found: `pip install imageio-ffmpeg` (it ships one), install the system package, "
        "or set MUSETALK_FFMPEG to an ffmpeg binary"
    )


def bundled_ffmpeg() -> str | None:
    """The binary of the imageio-ffmpeg package, None without the package (or without a binary for
    this platform, where the package itself would hand out the system's)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # no binary for this platform and no system ffmpeg either
        return None
    return shutil.which(exe) or (exe if os.path.isfile(exe) else None)


# --------------------------------------------------------------------------- helpers


def _ffmpeg_base(loglevel: str = "warning") -> list[str]:
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", loglevel]


def _file_input(path: str) -> list[str]:
    """Input arguments for a local file: only the file protocol, only the demuxers of
    INPUT_FORMATS (and image2 where the path holds no pattern), and a `file:` prefix so that a
    name containing ':' is never read as a protocol (e.g. 'http:x.mp4') nor one starting with
    '-' as an option."""
    path = os.path.abspath(path)
    refuse_unfilmed_formats(path)
    formats = INPUT_FORMATS if "%" in path else (*INPUT_FORMATS, SEQUENCE_FORMAT)
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(formats), "-i", "file:" + path]


def refuse_unfilmed_formats(path: str) -> None:
    """InputError for a drawing, document or script (by its name, then by its first bytes): formats
    nobody films, some of which a renderer can be made to work on for minutes."""
    suffix = os.path.splitext(path)[1].lower()
    kind = UNFILMED_SUFFIXES.get(suffix)
    if kind is None:
        try:
            with open(path, "rb") as handle:
                head = handle.read(512)
        except OSError:
            return  # unreadable: the usual checks say so
        kind = next((name for pattern, name in _UNFILMED_CONTENT if pattern.match(head)), None)
    if kind is not None:
        raise InputError(
            f"{path} is {kind}, not a video, photo or audio file; such files are not opened here (they are "
            f"drawn by a renderer, not filmed). Give an mp4/mov/mkv/webm video, a jpg/png/webp photo or a "
            f"wav/mp3/m4a audio file"
        )


def probe_time_limit(path: str) -> float:
    """Seconds (wall clock and CPU) a probe of this file may take: a few, plus one per PROBE_BYTES_PER_S."""
    return PROBE_BASE_S + os.path.getsize(path) / PROBE_BYTES_PER_S


def _decoding_limits() -> list[str]:
    """Input options for a decoding command: frames above MAX_INPUT_PIXELS are refused, whatever the header said."""
    return ["-max_pixels", str(MAX_INPUT_PIXELS)]


def _rate_arg(fps: float) -> str:
    """fps as the exact fraction ffmpeg should use (29.97002997 -> 30000/1001)."""
    rate = Fraction(fps).limit_denominator(1001)
    return f"{rate.numerator}/{rate.denominator}"


def _tail(lines: Iterable[str], count: int = 12) -> str:
    kept = [line for line in lines if line.strip()][-count:]
    return "\n".join(kept) if kept else "(ffmpeg printed nothing)"


def _require_file(path: str, what: str = "input") -> None:
    if not os.path.exists(path):
        raise InputError(f"{what} file not found: {path}; check the path")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} is not a regular file (a folder?); give the path of a media file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} file {path} is not readable; check its permissions")
    if os.path.getsize(path) == 0:
        raise InputError(f"{what} file {path} is empty; give a video, image or audio file")


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


class _StderrDrain:
    """Reads a child's stderr in a thread so the pipe never fills up and blocks ffmpeg;
    keeps the last lines for error messages."""

    def __init__(self, stream) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name="ffmpeg-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            logger.debug("ffmpeg: %s", line)
        self._stream.close()

    def join(self) -> None:
        self._thread.join(timeout=10)

    def tail(self, count: int = 12) -> str:
        return _tail(self.lines, count)


class _Watchdog:
    """Kills a child that keeps its reader waiting more than ``limit`` seconds for output (a
    damaged file must never hold a job forever). Waiting for the reader's own consumer never counts."""

    def __init__(self, proc: subprocess.Popen, limit: float) -> None:
        self._proc, self._limit = proc, limit
        self._waiting_since: float | None = None
        self._stop = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="ffmpeg-watchdog", daemon=True)
        self._thread.start()

    def waiting(self) -> None:
        self._waiting_since = time.monotonic()

    def served(self) -> None:
        self._waiting_since = None

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self._limit / 4)):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self._limit:
                self.fired = True
                if self._proc.poll() is None:
                    self._proc.kill()
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def _stop_process(proc: subprocess.Popen) -> None:
    """Kill (if still running) and reap a child so it never outlives its owner."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _run_bounded(cmd: list[str], what: str, time_limit: float | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion within ``time_limit`` seconds (default COMMAND_TIMEOUT_S) of
    wall-clock time and as many seconds of CPU time; past either, ffmpeg is stopped. A stop request
    (a signal to the command) stops it too. The child is always reaped."""
    limit = COMMAND_TIMEOUT_S if time_limit is None else min(time_limit, COMMAND_TIMEOUT_S)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _limit_cpu_time(proc.pid, limit)
    deadline = time.monotonic() + limit
    try:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=max(0.01, min(_POLL_S, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                stopping.check()
                if time.monotonic() >= deadline:
                    raise FFmpegError(
                        f"ffmpeg did not finish within {limit:.3g} s to {what}; the file is probably damaged (or far "
                        f"too long, or made to keep a decoder busy): give a shorter or re-encoded file"
                    ) from None
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode == -getattr(signal, "SIGXCPU", -1):
        raise FFmpegError(
            f"ffmpeg used more than {limit:.3g} s of processor time to {what} and was stopped; the file is made "
            f"to keep a decoder busy (or is damaged): give another file"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _limit_cpu_time(pid: int, seconds: float) -> None:
    """Let the process use at most about ``seconds`` of CPU time (the kernel stops it with SIGXCPU), so
    a file that keeps several decoder threads busy is stopped in proportion, not only by the clock.
    Linux only (elsewhere the wall-clock limit alone holds)."""
    if not hasattr(resource, "prlimit"):
        return
    soft = max(1, math.ceil(seconds))
    try:
        resource.prlimit(pid, resource.RLIMIT_CPU, (soft, soft + 5))
    except (OSError, ValueError):
        pass  # ended already, or not allowed here: the wall-clock limit still holds


def run_ffmpeg(args: list[str], what: str) -> subprocess.CompletedProcess:
    """Run one ffmpeg command to completion; FFmpegError with the tail of its log if it fails."""
    cmd = _ffmpeg_base("error") + args
    logger.debug("running %s", cmd)
    result = _run_bounded(cmd, what)
    if result.returncode != 0:
        log = result.stderr.decode("utf-8", "replace").splitlines()
        raise FFmpegError(f"ffmpeg failed to {what} (exit code {result.returncode}):\n{_tail(log)}")
    return result


# --------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class MediaInfo:
    """What a media file holds, as far as this project cares."""

    path: str
    has_video: bool
    has_audio: bool
    width: int  # display width, after the rotation metadata is applied (0 without video)
    height: int  # display height after rotation
    rotation: int  # clockwise degrees the stored picture is turned for display: 0, 90, 180 or 270
    fps: float  # average frame rate; IMAGE_FPS for a still picture; 0.0 without video
    num_frames: int  # video frames shown (packets counted, edit-list discards excluded); 1 for an image
    duration: float  # seconds: the video stream's, else the audio's, else the container's
    is_vfr: bool  # video timestamps are not evenly spaced
    is_image: bool  # a still picture
    audio_sample_rate: int | None
    audio_channels: int | None
    video_codec: str | None = None
    audio_codec: str | None = None
    format_name: str = ""
    # Seconds from the container's start to the first shown video frame, and the container's own
    # start timestamp (MPEG-TS often starts at 1.4 s); the reader's seeks need both.
    video_start: float = 0.0
    container_start: float = 0.0
    # (width, height) the file's frames have when width/height were changed by resized(): a
    # FrameReader then scales every frame down to width x height. None: frames are read as stored.
    native_size: tuple[int, int] | None = None
    # The rate the file declares when that timing was not believed (see retimed()); None: as declared.
    retimed_from: float | None = None

    @property
    def frame_bytes(self) -> int:
        """The size of one frame as a FrameReader yields it (RGB, width x height)."""
        return self.width * self.height * 3

    def retimed(self, fps: float) -> MediaInfo:
        """The same frames, one after another at ``fps``: for a file whose declared timing is absurd
        (100,000 or 0.001 fps). A FrameReader then counts frames, not timestamps."""
        return dataclasses.replace(self, fps=float(fps), duration=self.num_frames / fps, is_vfr=False,
                                   video_start=0.0, retimed_from=self.retimed_from or self.fps)

    def resized(self, width: int, height: int) -> MediaInfo:
        """The same file, read at width x height (FrameReader scales each frame)."""
        native = self.native_size or (self.width, self.height)
        if (width, height) == native:
            return dataclasses.replace(self, width=width, height=height, native_size=None)
        return dataclasses.replace(self, width=int(width), height=int(height), native_size=native)


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest even size with the same aspect ratio and at most max_pixels pixels
    (width x height itself when it already fits)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    fitted_width = max(2, int(width * scale) // 2 * 2)
    fitted_height = max(2, int(height * scale) // 2 * 2)
    return fitted_width, fitted_height


@dataclass
class _Stream:
    index: int
    kind: str
    codec: str
    details: str
    rotation_ccw: float = 0.0


@dataclass
class _Header:
    format_name: str
    duration: float | None
    start: float
    streams: list[_Stream]


@dataclass
class _Packets:
    time_base: Fraction
    pts: list[int]
    durations: list[int]


_INPUT_RE = re.compile(r"^Input #0, (.+?), from ")
_DURATION_RE = re.compile(r"^\s*Duration: (N/A|\d+:\d+:\d+(?:\.\d+)?)(?:, start: (-?[\d.]+))?")
_STREAM_RE = re.compile(r"^\s*Stream #0:(\d+)\S*?: (Video|Audio|Subtitle|Data|Attachment): ([^\s,]+)(.*)$")
_ROTATION_RE = re.compile(r"display ?matrix: rotation of (-?[\d.]+) degrees", re.IGNORECASE)
_SIZE_RE = re.compile(r"(?:^|[\s,])(\d+)x(\d+)(?=[\s,\[]|$)")
_FPS_RE = re.compile(r", ([\d.]+)(k?) fps")
_SAMPLE_RATE_RE = re.compile(r", (\d+) Hz")
_CHANNEL_NAMES = {"mono": 1, "stereo": 2, "quad": 4, "hexagonal": 6, "octagonal": 8, "downmix": 2}


def _parse_header(stderr: str) -> _Header:
    """Read the 'Input #0' block of `ffmpeg -i` output: container, duration, streams, rotation."""
    format_name, duration, start, streams = "", None, 0.0, []
    for line in stderr.splitlines():
        if line.startswith(("Stream mapping:", "Output #0")):
            break
        if m := _INPUT_RE.match(line):
            format_name = m.group(1)
        elif m := _DURATION_RE.match(line):
            duration = None if m.group(1) == "N/A" else _clock_seconds(m.group(1))
            start = float(m.group(2)) if m.group(2) else 0.0
        elif m := _STREAM_RE.match(line):
            streams.append(_Stream(int(m.group(1)), m.group(2), m.group(3), m.group(4)))
        elif (m := _ROTATION_RE.search(line)) and streams:
            streams[-1].rotation_ccw = float(m.group(1))
    return _Header(format_name, duration, start, streams)


def _clock_seconds(clock: str) -> float:
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _channel_count(details: str) -> int | None:
    fields = [f.strip() for f in details.split(",")]
    for field in fields:
        layout = field.split("(")[0]
        if layout in _CHANNEL_NAMES:
            return _CHANNEL_NAMES[layout]
        if m := re.fullmatch(r"(\d+) channels", field):
            return int(m.group(1))
        if m := re.fullmatch(r"(\d+)\.(\d+)", layout):
            return int(m.group(1)) + int(m.group(2))
    return None


def _parse_packets(stdout: str) -> dict[str, _Packets]:
    """framecrc output -> shown packets' pts and durations per media type ('video', 'audio')."""
    time_bases: dict[int, Fraction] = {}
    kinds: dict[int, str] = {}
    per_stream: dict[int, tuple[list[int], list[int]]] = {}
    for line in stdout.splitlines():
        if line.startswith("#tb "):
            index, value = line[4:].split(":", 1)
            num, den = value.strip().split("/")
            time_bases[int(index)] = Fraction(int(num), int(den))
        elif line.startswith("#media_type "):
            index, value = line[12:].split(":", 1)
            kinds[int(index)] = value.strip()
        elif line and line[0].isdigit():
            fields = [f.strip() for f in line.split(",")]
            flags = 1
            for extra in fields[6:]:
                if extra.startswith("F="):
                    flags = int(extra[2:], 16)
            if flags & PACKET_FLAG_DISCARD:
                continue
            dts, pts = int(fields[1]), int(fields[2])
            pts_list, dur_list = per_stream.setdefault(int(fields[0]), ([], []))
            pts_list.append(pts if pts != NO_PTS else dts)
            dur_list.append(int(fields[3]))
    packets = {}
    for index, (pts_list, dur_list) in per_stream.items():
        if index in kinds and index in time_bases:
            packets[kinds[index]] = _Packets(time_bases[index], pts_list, dur_list)
    return packets


def _stream_span(packets: _Packets) -> tuple[float, float]:
    """(start, duration) in seconds of a stream from its packets (pts sorted: B-frames come in decode order)."""
    order = sorted(range(len(packets.pts)), key=packets.pts.__getitem__)
    first, last = order[0], order[-1]
    last_duration = packets.durations[last]
    if last_duration <= 0 and len(order) > 1:
        last_duration = packets.pts[last] - packets.pts[order[-2]]
    ticks = packets.pts[last] + last_duration - packets.pts[first]
    return float(packets.pts[first] * packets.time_base), float(ticks * packets.time_base)


def _frame_timing(packets: _Packets, header_fps: float | None) -> tuple[float, bool]:
    """(average fps, is_vfr) from the shown frames' timestamps."""
    pts = sorted(set(packets.pts))
    deltas = [b - a for a, b in zip(pts, pts[1:])]
    if not deltas:
        return (header_fps or IMAGE_FPS), False
    median = sorted(deltas)[len(deltas) // 2]
    # Containers round timestamps to their time base (1 ms in mkv: 33/34 ms at 29.97 fps), so allow
    # one tick of jitter; a real frame-rate change moves a gap by far more than 10 %.
    tolerance = max(1.0, 0.1 * median)
    is_vfr = any(abs(d - median) > tolerance for d in deltas)
    if not is_vfr:
        mean = Fraction(pts[-1] - pts[0], len(deltas))
        return _snap_rate(float(1 / (mean * packets.time_base))), False
    _, duration = _stream_span(packets)
    return len(packets.pts) / duration, True


def _snap_rate(fps: float) -> float:
    """A rate measured from rounded timestamps (mkv counts milliseconds: 29.966 for 30000/1001)
    snapped to the standard rate it is within 0.2 % of, else as measured."""
    nearest = min(STANDARD_RATES, key=lambda standard: abs(fps - standard))
    return float(nearest) if abs(fps - nearest) <= 0.002 * nearest else fps


def probe(path) -> MediaInfo:
    """Describe a video, image or audio file. InputError if it is missing, not media, or corrupt."""
    path = os.fspath(path)
    _require_file(path)
    cmd = (  # the pixel limit too: finding a picture's size decodes it, and a bomb must not be decoded
        _ffmpeg_base("info") + _decoding_limits() + _PROBE_THREADS + _file_input(path)
        + ["-map", "0:V:0?", "-map", "0:a:0?", "-c", "copy", "-f", "framecrc", "-"]
    )
    logger.debug("probing %s", path)
    result = _run_bounded(cmd, f"read the streams of {path}", probe_time_limit(path))
    stderr = result.stderr.decode("utf-8", "replace")
    header = _parse_header(stderr)
    _raise_for_unreadable(path, result.returncode, stderr, header)
    packets = _parse_packets(result.stdout.decode("utf-8", "replace"))
    return _media_info(path, header, packets)


def _raise_for_unreadable(path: str, returncode: int, stderr: str, header: _Header) -> None:
    """One clear line for a file ffmpeg cannot read; its log goes to the log (musetalk -v shows it)."""
    lines = stderr.splitlines()
    if "Format not on whitelist" in stderr:
        _raise_refused_format(path)
    if m := _OVER_LIMIT_RE.search(stderr) or _INVALID_SIZE_RE.search(stderr):
        _check_pixel_count(path, int(m.group(1)), int(m.group(2)))
    media = [s for s in header.streams if s.kind in ("Video", "Audio") and "(attached pic)" not in s.details]
    pictures_without_size = [s for s in media if s.kind == "Video" and not _SIZE_RE.search(s.details)]
    if returncode != 0 or not header.format_name or pictures_without_size:
        logger.info("ffmpeg's log for %s:\n%s", path, _tail(lines, STDERR_TAIL_LINES))
    said = first_error(lines)
    if not header.format_name:
        raise InputError(
            f"{path} is not a video, image or audio file that ffmpeg can read (or it is corrupt or cut "
            f"short); give an mp4/mov/mkv/webm video, a jpg/png/webp image or a wav/mp3 audio file. "
            f"ffmpeg said: {said}"
        )
    if "partial file" in stderr:
        raise InputError(f"{path} is cut short (an incomplete download or copy?); give the complete file")
    if not media:
        raise InputError(f"{path} holds no video, picture or audio stream; give a media file with a picture or sound")
    if pictures_without_size and "Invalid image size" in stderr:
        raise InputError(
            f"{path} declares a picture size that cannot be decoded (too large or invalid; at most "
            f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels are read): scale it down or give another picture"
        )
    if pictures_without_size:
        raise InputError(
            f"the picture of {path} cannot be decoded ({said}): the file is damaged or not what its name "
            f"says; give another file"
        )
    if returncode != 0:
        raise InputError(f"ffmpeg could not read the streams of {path} ({said}); is it damaged? Give another file")


_LOG_TAG_RE = re.compile(r"^(\[[^\]]*@ ?0x[0-9a-f]+\]\s*)+", re.IGNORECASE)
_LOG_NOISE = ("Input #", "Output #", "Duration:", "Stream ", "Consider increasing", "Press [q]", "Last message",
              "Error initializing", "Could not write header", "Stream mapping", "Metadata:", "Side data:",
              "Conversion failed", "Error opening output", "Error while opening")


def first_error(lines: Iterable[str]) -> str:
    """ffmpeg's first line that says what went wrong, without its '[png @ 0x...]' tags."""
    for line in lines:
        text = _LOG_TAG_RE.sub("", line.strip()).strip()
        if text and not text.startswith(_LOG_NOISE) and not line.startswith(" "):
            return text.rstrip(".")
    return "no reason given"


def _raise_refused_format(path: str) -> None:
    if "%" in os.path.abspath(path):
        raise InputError(
            f"the path {path} contains '%', which ffmpeg would read as a pattern naming other files; rename "
            f"the file (or its folder) without it"
        )
    raise InputError(
        f"{path} is a kind of file this studio does not open (a playlist, a list of other files, or an "
        f"unusual container); give an mp4/mov/mkv/webm/avi video, a jpg/png/webp image or a "
        f"wav/mp3/m4a/ogg/flac audio file"
    )


def _media_info(path: str, header: _Header, packets: dict[str, _Packets]) -> MediaInfo:
    video = next((s for s in header.streams if s.kind == "Video" and "(attached pic)" not in s.details), None)
    audio = next((s for s in header.streams if s.kind == "Audio"), None)
    video_packets = packets.get("video") if video else None
    audio_packets = packets.get("audio") if audio else None
    if video is not None and not (video_packets and video_packets.pts):
        raise InputError(f"the video stream of {path} holds no frames; the file is damaged or empty")

    width = height = rotation = num_frames = 0
    fps, is_vfr, is_image, video_start, duration = 0.0, False, False, 0.0, None
    if video is not None:
        width, height, rotation = _display_size(path, video)
        _check_pixel_count(path, width, height)
        num_frames = len(video_packets.pts)
        fps, is_vfr = _frame_timing(video_packets, _header_fps(video))
        is_image = num_frames == 1 and audio is None and video.codec in STILL_IMAGE_CODECS
        if is_image:
            fps, duration = IMAGE_FPS, 1 / IMAGE_FPS
            width, height, rotation = _decoded_image_size(path, (width, height, rotation))
        else:
            video_start, duration = _stream_span(video_packets)
    if duration is None and audio_packets and audio_packets.pts:
        duration = _stream_span(audio_packets)[1]
    if duration is None:
        duration = header.duration or 0.0

    return MediaInfo(
        path=path, has_video=video is not None, has_audio=audio is not None,
        width=width, height=height, rotation=rotation, fps=fps, num_frames=num_frames,
        duration=duration, is_vfr=is_vfr, is_image=is_image,
        audio_sample_rate=_sample_rate(audio), audio_channels=_channel_count(audio.details) if audio else None,
        video_codec=video.codec if video else None, audio_codec=audio.codec if audio else None,
        format_name=header.format_name, video_start=video_start, container_start=header.start,
    )


def _display_size(path: str, video: _Stream) -> tuple[int, int, int]:
    m = _SIZE_RE.search(video.details)
    if not m:
        raise InputError(f"ffmpeg reports no picture size for the video of {path}; the file is damaged")
    width, height = int(m.group(1)), int(m.group(2))
    # The display matrix angle is counter-clockwise; phones store 'rotate=90' (clockwise) as -90.
    rotation = int(round(-video.rotation_ccw / 90.0)) * 90 % 360
    if rotation in (90, 270):
        width, height = height, width
    return width, height, rotation


_OVER_LIMIT_RE = re.compile(r"Picture size (\d+)x(\d+) exceeds specified max pixel count")
_INVALID_SIZE_RE = re.compile(r"Picture size (\d+)x(\d+) is invalid")


def _check_pixel_count(path: str, width: int, height: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            f"the picture of {path} is {width}x{height}, {width * height / 1e6:.0f} megapixels; at most "
            f"{MAX_INPUT_PIXELS / 1e6:.0f} are read: scale it down first (e.g. to 3840x2160)"
        )


_DIMENSIONS_RE = re.compile(r"^#dimensions 0: (\d+)x(\d+)", re.MULTILINE)
_TRANSPOSE_RE = re.compile(r"\[transpose @ [^\]]*\].*rotation:(clockwise|counterclockwise)")


def _decoded_image_size(path: str, from_header: tuple[int, int, int]) -> tuple[int, int, int]:
    """A photo's EXIF orientation is applied by ffmpeg's decoder but not listed in its header, so
    decode the picture once (cheap) to learn the size the reader will really deliver."""
    result = _run_bounded(
        _ffmpeg_base("verbose") + _decoding_limits() + _PROBE_THREADS + _file_input(path)
        + ["-map", "0:V:0", "-frames:v", "1", "-f", "framecrc", "-"],
        f"decode the picture {path}", probe_time_limit(path),
    )
    stderr = result.stderr.decode("utf-8", "replace")
    dimensions = _DIMENSIONS_RE.search(result.stdout.decode("utf-8", "replace"))
    if result.returncode != 0 or not dimensions:
        logger.info("ffmpeg's log for %s:\n%s", path, _tail(stderr.splitlines(), STDERR_TAIL_LINES))
        if m := _OVER_LIMIT_RE.search(stderr) or _INVALID_SIZE_RE.search(stderr):
            _check_pixel_count(path, int(m.group(1)), int(m.group(2)))
        raise InputError(f"the picture {path} cannot be decoded ({first_error(stderr.splitlines())}); is it damaged? "
                         f"Give another file")
    width, height = int(dimensions.group(1)), int(dimensions.group(2))
    if (width, height) == from_header[:2]:
        # Upside down (EXIF 3) leaves no trace in the log: the pixels come out right, the angle says 0.
        return from_header
    turn = _TRANSPOSE_RE.search(stderr)
    rotation = 270 if turn and turn.group(1) == "counterclockwise" else 90
    return width, height, rotation


def _header_fps(video: _Stream) -> float | None:
    m = _FPS_RE.search(video.details)
    if not m:
        return None
    return float(m.group(1)) * (1000 if m.group(2) else 1)


def _sample_rate(audio: _Stream | None) -> int | None:
    if audio is None:
        return None
    m = _SAMPLE_RATE_RE.search(audio.details)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- reading frames


class FrameReader:
    """Iterate a video's frames as RGB uint8 arrays of shape (height, width, 3), display-rotated.

    fps=None keeps the source's frames one for one, except a variable-frame-rate source, which is
    resampled to its average rate; fps=X resamples to X frames per second (ffmpeg's fps filter:
    frames are repeated or dropped, never blended). start_frame counts frames at the output rate and
    seeks instead of decoding from the beginning; max_frames stops early. A still picture yields one
    frame whatever start_frame is (every frame of a still is the same). An info made by
    MediaInfo.resized() makes ffmpeg scale every frame to its width x height. every=N yields frames 0, N,
    2N ... only (of those start_frame and fps give): ffmpeg still decodes each frame, but converts and
    pipes only the ones kept, a fraction of the work of reading them all.

    Use as a context manager or iterate to the end; close() kills and reaps ffmpeg either way.
    ffmpeg is stopped (FFmpegError) when it delivers no frame for STALL_TIMEOUT_S seconds.
    """

    def __init__(self, path, info: MediaInfo | None = None, fps: float | None = None,
                 start_frame: int = 0, max_frames: int | None = None, every: int = 1) -> None:
        self.path = os.fspath(path)
        self.info = info if info is not None else probe(self.path)
        if not self.info.has_video:
            raise InputError(f"{self.path} has no picture (audio only?); give a video or an image of a face")
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise InputError(f"fps must be a positive number, got {fps}")
        if start_frame < 0:
            raise InputError(f"start_frame must be 0 or more, got {start_frame}")
        if max_frames is not None and max_frames < 0:
            raise InputError(f"max_frames must be 0 or more, got {max_frames}")
        if every < 1:
            raise InputError(f"every must be 1 or more (1 = every frame), got {every}")
        self.every = int(every)
        self.width, self.height = self.info.width, self.info.height
        self.start_frame, self.max_frames = start_frame, max_frames
        self._resample = not self.info.is_image and (
            self.info.is_vfr or (fps is not None and abs(fps - self.info.fps) > 1e-6)
        )
        self._fps = float(fps) if fps is not None else self.info.fps
        self.frames_read = 0
        self._frame_bytes = self.info.frame_bytes
        self._proc: subprocess.Popen | None = None
        self._stderr: _StderrDrain | None = None
        self._watchdog: _Watchdog | None = None
        self._closed = False

    @property
    def output_fps(self) -> float:
        """Rate of the frames this reader yields."""
        return self._fps

    def _command(self) -> list[str]:
        cmd = _ffmpeg_base() + _decoding_limits()
        limit = self.max_frames
        if self.info.is_image:
            limit = 1 if limit is None else min(limit, 1)
            return cmd + _file_input(self.path) + self._output_args(limit, self._scale_filter())
        chain = ",".join(f for f in (self._video_filter(), self._sample_filter(), self._scale_filter()) if f)
        if self.info.retimed_from is not None:  # no seeking: the file's timestamps mean nothing here
            return cmd + _file_input(self.path) + self._output_args(limit, chain or None)
        return cmd + self._seeking_input() + self._output_args(limit, chain or None)

    def _sample_filter(self) -> str | None:
        # After the frame choice of start_frame and fps (their own filters come first): n counts what they kept.
        return f"select=not(mod(n\\,{self.every}))" if self.every > 1 else None

    def _scale_filter(self) -> str | None:
        if self.info.native_size is None or self.info.native_size == (self.width, self.height):
            return None
        # area averaging: the sharpest artefact-free way down; after the frame selection so only kept frames scale
        return f"scale={self.width}:{self.height}:flags=area"

    # Seeking: -copyts keeps the file's own timestamps, so a read that starts at start_frame sees
    # the same times as a read from the beginning; -noaccurate_seek starts decoding at the key
    # frame before the seek point and a filter drops what comes before the wanted frame. This is
    # exact where ffmpeg's own accurate seek is not: it rounds the seek time to the stream's time
    # base, which in coarse ones (AVI: 1/fps) can keep the frame before.

    def _seek_seconds(self) -> float:
        """Where decoding may start, relative to the container's start (as -ss counts)."""
        frames = self.start_frame if self._resample else self.start_frame - 0.5
        return max(0.0, self.info.video_start + frames / self._fps)

    def _seeking_input(self) -> list[str]:
        if self.start_frame == 0 or not _seeks_by_index(self.info.format_name):
            # No index of key frames (MPEG-TS, raw streams): a seek can land after the wanted frame,
            # so decode from the start and let the filter drop the frames before it.
            return ["-copyts"] + _file_input(self.path)
        return ["-copyts", "-noaccurate_seek", "-ss", f"{self._seek_seconds():.6f}"] + _file_input(self.path)

    def _video_filter(self) -> str | None:
        if self.info.retimed_from is not None:
            return self._retimed_filter()
        first_frame = self.info.container_start + self.info.video_start  # as -copyts timestamps count
        if self._resample:
            # start_time pins slot 0 to the first frame; after a seek, fps fills the slots before the
            # first decoded frame with copies, which trim drops, so slot k is frame k either way.
            chain = f"fps=fps={_rate_arg(self._fps)}:start_time={first_frame:.6f}"
            return chain + (f",trim=start_frame={self.start_frame}" if self.start_frame else "")
        if self.start_frame:
            # Source frame k shows at first_frame + k/fps, give or take timestamp rounding: keep
            # frames from half a frame before it, compared in seconds (no time-base rounding).
            cutoff = first_frame + (self.start_frame - 0.5) / self._fps
            return f"select=gte(t\\,{cutoff:.9f})"
        return None

    def _retimed_filter(self) -> str:
        """Frame k of the file at k / info.fps seconds (setpts), then resampled or skipped like any other."""
        chain = f"setpts=N/({_rate_arg(self.info.fps)}*TB)"
        if self._resample:
            chain += f",fps=fps={_rate_arg(self._fps)}:start_time=0"
            return chain + (f",trim=start_frame={self.start_frame}" if self.start_frame else "")
        return chain + (f",select=gte(n\\,{self.start_frame})" if self.start_frame else "")

    def _output_args(self, limit: int | None, video_filter: str | None) -> list[str]:
        args = ["-map", "0:V:0", "-an", "-sn", "-dn"]
        if video_filter:
            args += ["-vf", video_filter]
        if limit is not None:
            args += ["-frames:v", str(limit)]
        # passthrough: never let the muxer duplicate or drop frames behind our back.
        return args + ["-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]

    def _start(self) -> None:
        cmd = self._command()
        logger.debug("reading frames: %s", cmd)
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            bufsize=max(self._frame_bytes, 1 << 16),
        )
        self._stderr = _StderrDrain(self._proc.stderr)
        self._watchdog = _Watchdog(self._proc, STALL_TIMEOUT_S)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._closed:
            raise InputError("this FrameReader is closed; make a new one to read again")
        if self.max_frames == 0:
            self.close()
            return
        if self._proc is None:
            self._start()
        try:
            while True:
                frame = self._read_frame()
                if frame is None:
                    break
                self.frames_read += 1
                yield frame
            self._finish()
        finally:
            self.close()

    def _read_frame(self) -> np.ndarray | None:
        buffer = bytearray(self._frame_bytes)
        view = memoryview(buffer)
        filled = 0
        self._watchdog.waiting()
        while filled < self._frame_bytes:
            count = self._proc.stdout.readinto(view[filled:])
            if not count:
                break
            filled += count
        self._watchdog.served()
        self._raise_if_stalled()
        if filled == 0:
            return None
        if filled < self._frame_bytes:
            self._proc.wait()
            self._stderr.join()
            raise FFmpegError(
                f"ffmpeg sent a partial frame from {self.path} ({filled} of {self._frame_bytes} bytes): the "
                f"picture size does not match {self.width}x{self.height}. ffmpeg said:\n{self._stderr.tail()}"
            )
        return np.frombuffer(buffer, dtype=np.uint8).reshape(self.height, self.width, 3)

    def _raise_if_stalled(self) -> None:
        if self._watchdog.fired:
            self._proc.wait()
            raise FFmpegError(
                f"ffmpeg delivered no frame of {self.path} for {STALL_TIMEOUT_S:g} s after {self.frames_read} "
                f"frames and was stopped; the file is probably damaged: re-encode it or give another"
            )

    def _finish(self) -> None:
        returncode = self._proc.wait()
        self._stderr.join()
        if returncode != 0:
            raise FFmpegError(
                f"ffmpeg stopped with exit code {returncode} while decoding {self.path} after "
                f"{self.frames_read} frames:\n{self._stderr.tail()}"
            )
        logger.debug("read %d frames from %s", self.frames_read, self.path)

    def close(self) -> None:
        """Stop ffmpeg (if it still runs) and wait for it; safe to call more than once."""
        self._closed = True
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._watchdog is not None:
            self._watchdog.stop()
        _stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.join()

    @property
    def process(self) -> subprocess.Popen | None:
        """The running ffmpeg process, None before the first frame and after close()."""
        return self._proc

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort for a reader dropped without close(): never leave ffmpeg running.
        if getattr(self, "_proc", None) is not None:
            self.close()


def _seeks_by_index(format_name: str) -> bool:
    """Containers with an index of key frames, where a seek always lands at or before its target."""
    return bool(INDEXED_FORMATS & set(format_name.split(",")))


def read_frames(path, **kwargs) -> Iterator[np.ndarray]:
    """Yield the RGB frames of a video or image (same keyword arguments as FrameReader)."""
    with FrameReader(path, **kwargs) as reader:
        yield from reader


# --------------------------------------------------------------------------- writing frames

STREAM_SEGMENT_SECONDS = 1  # the length of the segments a FrameWriter streams while it writes
STREAM_PLAYLIST = "stream.m3u8"


def finished_segments(stream_dir) -> list[str]:
    """The segments a FrameWriter's stream has finished so far, in order (paths)."""
    try:
        with open(os.path.join(os.fspath(stream_dir), STREAM_PLAYLIST), encoding="utf-8") as playlist:
            names = [line.strip() for line in playlist if line.strip().endswith(".ts")]
    except FileNotFoundError:
        return []
    return [os.path.join(os.fspath(stream_dir), name) for name in names]



# What an output's extension asks for: the muxer that writes it. Every one holds H.264 video and AAC
# sound; other extensions (.webm, .avi, ...) are refused rather than written as something else.
OUTPUT_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


class FrameWriter:
    """Encode RGB uint8 frames to H.264 (yuv420p) and mux an audio file in the same pass, into the
    container the output's name says: MP4 (.mp4), QuickTime (.mov) or Matroska (.mkv).

    The output has exactly the frames written; the audio (AAC 192k) is cut to the video's length
    or padded with silence up to it, and audio_offset_s > 0 delays it (< 0 skips its start).
    Give total_frames when the length is known in advance: the audio is then cut and padded exactly
    in the one encoding pass. Without it ffmpeg's ``apad`` + ``-shortest`` is used, which can run the
    audio on for up to a second when frames arrive slowly, so close() then trims the audio by a
    stream copy (no re-encode) when it came out longer than the video.
    Frames are converted to yuv420p here (OpenCV: the same BT.601 limited-range matrix ffmpeg
    uses by default, in the writing thread) and piped at half the bytes of RGB, which takes a
    good part of the work off the encoder process. yuv420p needs even sizes: an odd width or
    height gets one more column or row, a copy of the edge next to it (no scaling, no lost
    pixels); ``encoded_size`` says what the file holds.

    The file is written under a temporary name in the same folder and renamed to out_path only
    when close() succeeds, so a failure or abort() never leaves a half-written out_path.

    ``encoder_threads``: how many threads x264 may use (None: its own choice, about 1.5 a core), for an
    encoding that runs beside others on cores they already keep busy.

    ``stream_dir``: the same encoding is also cut into HLS segments of ``STREAM_SEGMENT_SECONDS``
    there as it goes (``stream.m3u8`` lists the finished ones), so the start can be watched while the
    rest is made: one encoder for both, with a keyframe at every segment start (the file is a few
    percent bigger, frame for frame the same).
    """

    def __init__(self, out_path, width: int, height: int, fps: float, audio_path=None,
                 crf: int = 18, preset: str = "medium", audio_offset_s: float = 0.0,
                 protect: Iterable = (), total_frames: int | None = None, stream_dir=None,
                 encoder_threads: int | None = None) -> None:
        self.out_path = os.path.abspath(os.fspath(out_path))
        self.audio_path = os.fspath(audio_path) if audio_path is not None else None
        self._check_arguments(width, height, fps, crf, protect)
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self.crf, self.preset, self.audio_offset_s = int(crf), preset, float(audio_offset_s)
        if encoder_threads is not None and encoder_threads < 1:
            raise InputError(f"encoder_threads must be 1 or more (None: x264 chooses), got {encoder_threads}")
        self.encoder_threads = encoder_threads
        if total_frames is not None and total_frames < 1:
            raise InputError(f"total_frames must be 1 or more, got {total_frames}")
        self.total_frames = total_frames
        self.stream_dir = os.path.abspath(os.fspath(stream_dir)) if stream_dir is not None else None
        self.encoded_size = (self.width + self.width % 2, self.height + self.height % 2)
        self.frames_written = 0
        self._frame_shape = (self.height, self.width, 3)
        directory, name = os.path.split(self.out_path)
        stem, self._suffix = os.path.splitext(name)
        self._suffix = self._suffix.lower()
        self._muxer = OUTPUT_CONTAINERS[self._suffix]
        _remove_stale_partials(directory, stem)
        self._temp_path = os.path.join(directory, f".{stem}.{uuid.uuid4().hex[:8]}.partial{self._suffix}")
        self._proc: subprocess.Popen | None = None
        self._stderr: _StderrDrain | None = None
        self._done = False
        self._start()

    def _check_arguments(self, width, height, fps, crf, protect) -> None:
        if int(width) < 1 or int(height) < 1:
            raise InputError(f"frame size must be positive, got {width}x{height}")
        if not (math.isfinite(fps) and fps > 0):
            raise InputError(f"fps must be a positive number, got {fps}")
        if not 0 <= int(crf) <= 51:
            raise InputError(f"crf must be between 0 (lossless) and 51 (worst), got {crf}")
        directory = os.path.dirname(self.out_path)
        if not os.path.isdir(directory):
            raise InputError(f"the output folder {directory} does not exist; create it first")
        if os.path.isdir(self.out_path):
            raise InputError(f"the output path {self.out_path} is a folder; give a file name ending in .mp4")
        guarded = [p for p in (*protect, self.audio_path) if p is not None]
        for guarded_path in guarded:
            if _same_file(self.out_path, os.fspath(guarded_path)):
                raise InputError(
                    f"the output path {self.out_path} is one of the inputs; choose another output name"
                )
        require_output_suffix(self.out_path)
        if self.audio_path is not None:
            _require_file(self.audio_path, "audio")

    def _command(self) -> list[str]:
        width, height = self.encoded_size
        cmd = _ffmpeg_base() + [
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}",
            "-framerate", _rate_arg(self.fps), "-i", "pipe:0",
        ]
        if self.audio_path is not None:
            if self.audio_offset_s < 0:
                cmd += ["-ss", f"{-self.audio_offset_s:.6f}"]
            cmd += _file_input(self.audio_path)
        cmd += ["-map", "0:v:0"]
        cmd += ["-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf), "-pix_fmt", "yuv420p"]
        if self.encoder_threads is not None:
            cmd += ["-threads", str(self.encoder_threads)]
        if self.audio_path is not None:
            cmd += ["-map", "1:a:0", "-c:a", "aac", "-b:a", AUDIO_BITRATE, "-af", self._audio_filter()]
            if self.total_frames is None:
                # apad makes the audio endless; -shortest then ends it near the last video frame.
                cmd += ["-shortest"]
        if self.stream_dir is None:
            return cmd + self._container_args() + ["-y", self._temp_path]
        # One encoding, two outputs: the file, and the HLS segments a page plays while the rest is made.
        segments = os.path.join(self.stream_dir, "segment%05d.ts")
        faststart = ":movflags=+faststart" if self._muxer in ("mp4", "mov") else ""
        return cmd + [
            "-force_key_frames", f"expr:gte(t,n_forced*{STREAM_SEGMENT_SECONDS})", "-f", "tee", "-y",
            f"[f={self._muxer}{faststart}]{self._temp_path}|[f=hls:hls_time={STREAM_SEGMENT_SECONDS}:"
            f"hls_list_size=0:hls_segment_filename={segments}]{os.path.join(self.stream_dir, STREAM_PLAYLIST)}",
        ]

    def _container_args(self) -> list[str]:
        faststart = ["-movflags", "+faststart"] if self._muxer in ("mp4", "mov") else []  # playable while loading
        return faststart + ["-f", self._muxer]

    def _audio_filter(self) -> str:
        filters = []
        if self.audio_offset_s > 0:
            filters.append(f"adelay=delays={self.audio_offset_s * 1000:.3f}:all=1")
        if self.total_frames is None:
            filters.append("apad")
        else:
            seconds = f"{self.total_frames / self.fps:.6f}"
            filters += [f"atrim=end={seconds}", f"apad=whole_dur={seconds}"]
        return ",".join(filters)

    def _start(self) -> None:
        cmd = self._command()
        logger.debug("writing frames: %s", cmd)
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._stderr = _StderrDrain(self._proc.stderr)

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame of shape (height, width, 3)."""
        if self._done:
            raise InputError("this FrameWriter is closed; make a new one to write another file")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != self._frame_shape:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise InputError(f"a frame must be a uint8 array of shape {self._frame_shape}, got {got}")
        try:
            self._proc.stdin.write(memoryview(_to_i420(frame, self.encoded_size)).cast("B"))
        except (BrokenPipeError, OSError) as error:
            self.abort()
            raise FFmpegError(
                f"ffmpeg stopped while encoding {self.out_path} after {self.frames_written} frames:\n"
                f"{self._stderr.tail()}"
            ) from error
        self.frames_written += 1

    def close(self) -> str:
        """Finish the file and move it to out_path; returns out_path. FFmpegError if encoding failed."""
        if self._done:
            if os.path.exists(self.out_path) and self._proc is None and self.frames_written:
                return self.out_path
            raise InputError("this FrameWriter was aborted; nothing was written")
        if self.frames_written == 0:
            self.abort()
            raise InputError(f"no frames were written to {self.out_path}; an mp4 needs at least one frame")
        self._done = True
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
        except OSError:
            pass  # ffmpeg already gone: its exit code below tells why
        try:
            returncode = _wait_checking_stops(proc)
        except BaseException:  # a stop request while the encoder finishes: nothing is kept
            _stop_process(proc)
            self._stderr.join()
            self._remove_temp()
            raise
        self._stderr.join()
        if returncode != 0:
            self._remove_temp()
            raise FFmpegError(
                f"ffmpeg failed to finish {self.out_path} (exit code {returncode}):\n{self._stderr.tail()}"
            )
        if self.total_frames is not None and self.total_frames != self.frames_written:
            logger.warning(
                "%s: %d frames were announced but %d written; the audio was cut/padded to the announced length",
                self.out_path, self.total_frames, self.frames_written,
            )
        if self.audio_path is not None and self.total_frames is None:
            self._trim_audio_overrun()
        os.replace(self._temp_path, self.out_path)
        logger.debug("wrote %d frames to %s", self.frames_written, self.out_path)
        return self.out_path

    def _trim_audio_overrun(self) -> None:
        """Cut audio that -shortest let run past the last frame (stream copy, nothing re-encoded)."""
        video_seconds = self.frames_written / self.fps
        audio_seconds = _audio_stream_end(self._temp_path)
        # One AAC frame (1024 samples, about 21-23 ms) is the finest cut a stream copy can make.
        if audio_seconds <= video_seconds + 0.025:
            return
        logger.debug("%s: trimming audio from %.3f s to %.3f s", self.out_path, audio_seconds, video_seconds)
        trimmed = self._temp_path[: -len(self._suffix)] + ".trim" + self._suffix
        try:
            run_ffmpeg(
                _file_input(self._temp_path) + ["-map", "0", "-c", "copy", "-t", f"{video_seconds:.6f}",
                                                 *self._container_args(), "-y", trimmed],
                f"trim the audio of {self.out_path}",
            )
            os.replace(trimmed, self._temp_path)
        except BaseException:
            for leftover in (trimmed, self._temp_path):
                if os.path.exists(leftover):
                    os.remove(leftover)
            raise

    def abort(self) -> None:
        """Stop encoding and delete the partial file; out_path is left as it was."""
        self._done = True
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_process(proc)
            try:
                proc.stdin.close()
            except OSError:
                pass  # the pipe is broken because ffmpeg was killed: nothing left to flush
            self._stderr.join()
        self._remove_temp()

    def _remove_temp(self) -> None:
        try:
            os.remove(self._temp_path)
        except FileNotFoundError:
            pass

    @property
    def temp_path(self) -> str:
        """Where the file is being written until close() renames it."""
        return self._temp_path

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self.abort()


def _wait_checking_stops(proc: subprocess.Popen) -> int:
    """``proc.wait()``, raising ``Stopped`` when a stop of the job is requested meanwhile."""
    while True:
        try:
            return proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            stopping.check()


def require_output_suffix(path) -> None:
    """InputError unless the name ends in an extension FrameWriter writes."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in OUTPUT_CONTAINERS:
        kind = f"{suffix} files are not written here" if suffix else "a name without one is not written"
        raise InputError(
            f"the output {os.fspath(path)} must end in .mp4, .mov or .mkv (MP4, QuickTime or Matroska: H.264 "
            f"video with AAC sound); {kind}"
        )


def check_output_path(path) -> None:
    """InputError, before any work and creating nothing, when ``path`` cannot be written: it is a
    folder, a file stands where a folder of it should be, or its folder is not writable (read-only,
    not yours). Folders that do not exist yet are fine: ``folders_for`` creates them."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InputError(f"the output {path} is a folder; give a file name in it")
    folder = existing_folder(path)
    if not os.path.isdir(folder):
        raise InputError(f"the output {path} cannot be written: {folder} is a file, not a folder; "
                         f"choose another output path")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise InputError(f"the output folder {folder} is not writable ({error.strerror}); choose another "
                         f"folder or make it writable") from None


def existing_folder(path) -> str:
    """The nearest folder above ``path`` that exists (or a file standing where a folder should be)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


@contextlib.contextmanager
def folders_for(path) -> Iterator[None]:
    """Create the missing folders of ``path`` for the block; a block that fails removes them again
    (the ones it created, when still empty), so a refused or stopped job leaves no empty folders."""
    missing = []
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    made: list[str] = []
    for new in reversed(missing):
        try:
            os.mkdir(new)
            made.insert(0, new)
        except FileExistsError:
            continue  # made meanwhile by another job: not ours to remove
        except OSError as error:
            _remove_folders(made)
            raise InputError(f"cannot create the folder {new} ({error.strerror}); choose another output path") from None
    try:
        yield
    except BaseException:
        _remove_folders(made)
        raise


def _remove_folders(folders: list[str]) -> None:
    for folder in folders:  # the deepest first
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty (another job wrote there meanwhile) or not there: left as it is


def _remove_stale_partials(directory: str, stem: str) -> None:
    """Remove what a writer of the same output left when its process was killed outright (SIGKILL:
    no chance to clean up; its ffmpeg then finishes the temporary file on its own). A writer at
    work touches its file with every frame, so only files untouched for STALE_PARTIAL_SECONDS go."""
    cutoff = time.time() - STALE_PARTIAL_SECONDS
    pattern = _partial_pattern(stem)
    for name in os.listdir(directory):
        if not pattern.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.getmtime(path) < cutoff:
                os.remove(path)
                logger.info("removed %s, left by a writer that was killed", path)
        except FileNotFoundError:
            continue  # another process removed it first


def _partial_pattern(stem: str) -> re.Pattern:
    """The names FrameWriter gives its temporary files for an output named ``stem`` + suffix."""
    return re.compile(re.escape(f".{stem}.") + r"[0-9a-f]{8}\.partial(\.trim)?\.(mp4|mov|mkv)")


def partial_files(out_path) -> list[str]:
    """The temporary files of writers of ``out_path``: at work now, or left by a killed process."""
    directory, name = os.path.split(os.path.abspath(os.fspath(out_path)))
    if not os.path.isdir(directory):
        return []
    pattern = _partial_pattern(os.path.splitext(name)[0])
    return [os.path.join(directory, entry) for entry in os.listdir(directory) if pattern.fullmatch(entry)]


# --------------------------------------------------------------------------- disk space


def estimated_mp4_bytes(width: int, height: int, fps: float, seconds: float, crf: int = 18) -> int:
    """About how large FrameWriter's mp4 of this size, rate and length will be (on the large side)."""
    bits_per_pixel = min(12.0, BITS_PER_PIXEL_CRF18 * 2 ** ((18 - crf) / 6))
    video_bits = width * height * fps * max(seconds, 0.0) * bits_per_pixel
    audio_bits = int(AUDIO_BITRATE.rstrip("k")) * 1000 * max(seconds, 0.0)
    return int((video_bits + audio_bits) / 8)


def free_bytes(folder) -> int:
    """Bytes free for this user in the file system that holds ``folder``."""
    return shutil.disk_usage(os.fspath(folder)).free


def require_free_space(folder, needed_bytes: int, what: str = "the output") -> None:
    """DiskSpaceError unless ``folder`` has ``needed_bytes`` plus DISK_MARGIN_BYTES free."""
    free = free_bytes(folder)
    if free < needed_bytes + DISK_MARGIN_BYTES:
        raise DiskSpaceError(
            f"{what} needs about {_megabytes(needed_bytes)} but {folder} has only {_megabytes(free)} free "
            f"(and {_megabytes(DISK_MARGIN_BYTES)} are kept spare); free some space or write to another folder"
        )


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.0f} MB" if count >= 1e6 else f"{count / 1e6:.1f} MB"


# --------------------------------------------------------------------------- audio


def _audio_stream_end(path: str) -> float:
    """Seconds from the container's start to the end of the first audio stream (0.0 without audio)."""
    result = run_ffmpeg(
        _file_input(path) + ["-map", "0:a:0?", "-c", "copy", "-f", "framecrc", "-"],
        f"read the audio packets of {path}",
    )
    audio = _parse_packets(result.stdout.decode("utf-8", "replace")).get("audio")
    if not audio or not audio.pts:
        return 0.0
    start, duration = _stream_span(audio)
    return max(0.0, start) + duration


def _require_audio(path) -> str:
    path = os.fspath(path)
    info = probe(path)
    if not info.has_audio:
        raise InputError(f"{path} has no audio track; give an audio file or a video with sound")
    return path


def extract_audio(path, out_wav, sample_rate: int = 16000, channels: int = 1) -> str:
    """Write the audio of any audio or video file as 16-bit PCM WAV; returns out_wav."""
    path = _require_audio(path)
    out_wav = os.path.abspath(os.fspath(out_wav))
    if _same_file(out_wav, path):
        raise InputError(f"the output {out_wav} is the input file; choose another name")
    directory = os.path.dirname(out_wav)
    handle, temp_path = tempfile.mkstemp(prefix=".audio.", suffix=".partial.wav", dir=directory)
    os.close(handle)
    try:
        run_ffmpeg(
            _file_input(path) + ["-map", "0:a:0", "-vn", "-ac", str(channels), "-ar", str(sample_rate),
                                 "-c:a", "pcm_s16le", "-f", "wav", "-y", temp_path],
            f"extract the audio of {path}",
        )
        os.replace(temp_path, out_wav)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return out_wav


def decode_audio(path, sample_rate: int = 16000) -> np.ndarray:
    """The audio of a file as float32 mono samples in [-1, 1] at sample_rate."""
    path = _require_audio(path)
    result = run_ffmpeg(
        _file_input(path) + ["-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(sample_rate),
                             "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"],
        f"decode the audio of {path}",
    )
    samples = np.frombuffer(result.stdout, dtype=np.float32).copy()
    return np.clip(samples, -1.0, 1.0)


def _to_i420(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB frame as planar yuv420p bytes of ``size`` (odd sizes padded with copies of the edge)."""
    import cv2

    width, height = size
    if frame.shape[:2] != (height, width):
        frame = np.pad(frame, ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0)), mode="edge")
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2YUV_I420)
