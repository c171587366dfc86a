"""The studio's work, free of any UI: what ``app.py`` calls and the tests call directly.

- limits on what a request may bring (upload size, duration, text length, variants);
- one folder per request under the work folder, removed on failure and pruned by age;
- the weights: what is missing, fetched on request (or on the first run) with progress;
- models loaded once per version and kept for the life of the process;
- the preview picture (crop box, paste-back square and blend mask on the first face frame);
- one dub with its scores and a table of what each stage took, then (on its own) its side-by-side video;
- a comparison of several variants of one job as a labelled grid and one row per variant;
- a browser session's history as plain data the UI keeps per session.

Progress goes to one callback, ``progress(fraction_of_the_request, what_is_happening)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musetalk import compare, live_ice, metrics, video_io, weights
from musetalk.config import RunOptions
from musetalk.engines import ENGINES, MODEL_ENGINES
from musetalk.errors import InputError, NoFaceError

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction of the request done, what is happening)

# Environment variables the app (and its container or Space) is configured with.
ENVIRONMENT = {
    "work_dir": "MUSETALK_WORK_DIR",
    "max_upload_mb": "MUSETALK_MAX_UPLOAD_MB",
    "max_seconds": "MUSETALK_MAX_SECONDS",
    "max_text_chars": "MUSETALK_MAX_TEXT_CHARS",
    "queue_size": "MUSETALK_QUEUE_SIZE",
    "keep_minutes": "MUSETALK_KEEP_MINUTES",
    "ice_servers": live_ice.SERVERS_VARIABLE,
    "ice_relay_only": live_ice.RELAY_ONLY_VARIABLE,
}
# The preview looks this far into the video for a first frame with a face.
PREVIEW_SEARCH_FRAMES = 50
HISTORY_LIMIT = 20
STAGE_NAMES = {
    "probe": "read the inputs",
    "face": "face analysis",
    "audio_decode": "audio decode",
    "silence_gate": "silence gate",
    "whisper": "audio features (Whisper)",
    "decode": "video decode",
    "crop": "face crops",
    "vae_encode": "VAE encode",
    "unet": "UNet",
    "vae_decode": "VAE decode",
    "blend": "blend",
    "encode": "video encode",
    "cache_lookup": "prepared faces: lookup",
    "cache_save": "prepared faces: save",
    "speech": "speech synthesis",
    "scores": "scores",
    "total": "whole job",
}


def _no_progress(fraction: float, text: str) -> None:
    """The default callback: progress is only logged."""
    logger.debug("%3.0f%% %s", fraction * 100, text)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class StudioConfig:
    # Weights folder (None: $MUSETALK_MODELS_DIR, else the per-user cache folder).
    models_dir: str | None = None
    # auto, cuda, cuda:N, mps or cpu.
    device: str = "auto"
    # auto (fp16 on CUDA, fp32 elsewhere), fp16, bf16 or fp32.
    dtype: str = "auto"
    # The model version loaded at start-up and preselected in the app.
    version: str = "v15"
    # Where request folders go (None: a new temporary folder, removed when the studio closes).
    work_dir: str | None = None
    # Largest upload accepted, in megabytes.
    max_upload_mb: int = 200
    # Longest video, audio or synthesized speech accepted, in seconds.
    max_seconds: float = 120.0
    # Longest text accepted for speech.
    max_text_chars: int = 3000
    # Most variants in one comparison.
    max_variants: int = 4
    # Requests waiting in line beyond the one running; more are turned away.
    queue_size: int = 16
    # Request folders older than this are removed (results stay downloadable this long).
    keep_minutes: float = 120.0
    # The STUN and TURN servers of live connections, for the server and the page (musetalk.live_ice).
    ice_servers: tuple[live_ice.IceServer, ...] = ()
    # Live connections use relayed (TURN) candidates only: to test the TURN server.
    ice_relay_only: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> StudioConfig:
        """Defaults, then the MUSETALK_* variables in ENVIRONMENT, then ``overrides`` (None ignored)."""
        environ = os.environ if environ is None else environ
        defaults = cls()
        values = {}
        for name, variable in ENVIRONMENT.items():
            if environ.get(variable):
                values[name] = _parse_setting(name, variable, environ[variable], getattr(defaults, name))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return dataclasses.replace(defaults, **values).validate()

    def validate(self) -> StudioConfig:
        for name in ("max_upload_mb", "max_seconds", "max_text_chars", "max_variants", "queue_size", "keep_minutes"):
            if getattr(self, name) <= 0:
                raise InputError(f"the studio setting {name} must be positive, not {getattr(self, name)!r}")
        if self.max_variants > compare.MAX_PANELS - 1:
            raise InputError(f"max_variants can be at most {compare.MAX_PANELS - 1} (one grid cell is the original)")
        self.ice_settings()  # relay only without a TURN server is refused at start, not at the first connection
        return self

    def ice_settings(self) -> live_ice.IceSettings:
        """The ICE settings of live connections, both ends."""
        return live_ice.IceSettings(self.ice_servers, self.ice_relay_only)


def _parse_setting(name: str, variable: str, text: str, default):
    if name == "ice_servers":
        return live_ice.parse_ice_servers(text, variable)
    if isinstance(default, bool):  # bool("0") would be True
        return live_ice.parse_switch(text, variable)
    try:
        return type(default)(text) if default is not None else text
    except ValueError:
        raise InputError(f"{variable}={text!r} is not a valid {type(default).__name__}; fix or unset it") from None


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Speech:
    """The new speech of a job: an audio file, or text for a speech source."""

    audio: str | None = None  # an uploaded or recorded audio file
    text: str | None = None
    source: str | None = None  # audio source id for text (None: espeak, the offline default)
    voice: str | None = None  # the source's voice id (None: the source's default)
    clone: bool = False  # imitate the voice of the video's own speech (sources that can clone)

    @property
    def is_text(self) -> bool:
        return bool(self.text and self.text.strip())

    def describe(self) -> str:
        if not self.is_text:
            return "the audio you gave" if self.audio else "no speech"
        voice = "voice cloned from the video" if self.clone else (self.voice or "default voice")
        return f"{self.source or 'espeak'}, {voice}"


@dataclass(frozen=True)
class Variant:
    """One cell of a comparison: its own speech, options and engine, the same video."""

    label: str
    speech: Speech
    options: RunOptions
    engine: str = "musetalk"


@dataclass
class Preview:
    image: np.ndarray  # RGB frame with the overlay drawn
    frame_index: int
    box: tuple[int, int, int, int]
    message: str


@dataclass
class JobResult:
    """One dub and what it took."""

    label: str
    speech: str  # what the speech was, in words
    options: RunOptions
    result: object  # musetalk.pipeline.LipSyncResult
    audio_path: str
    timings: dict[str, float]  # seconds per stage, the studio's own steps included
    scores: object | None = None  # musetalk.metrics.Scores, when the result was measured

    @property
    def output(self) -> str:
        return self.result.output_path

    @property
    def faces_reused(self) -> bool:
        """The video's face data came from the prepared-face cache (no face analysis this time)."""
        return "face" not in self.timings

    def timing_rows(self) -> list[list]:
        """[stage, seconds, output frames per second] for every stage, the whole job last."""
        frames = self.result.num_frames
        rows = []
        for stage, seconds in self.timings.items():
            if stage != "total":
                rows.append([STAGE_NAMES.get(stage, stage), round(seconds, 3), _rate(frames, seconds)])
        total = self.timings.get("total", sum(self.timings.values()))
        rows.append([STAGE_NAMES["total"], round(total, 3), _rate(frames, total)])
        return rows

    def summary(self) -> str:
        result = self.result
        line = (f"{result.num_frames} frames, {result.width}x{result.height} at {result.fps:g} fps, "
                f"{result.duration:.2f} s; the face was redrawn in {result.frames_with_face} frames "
                f"({result.engine} {result.version}, speech: {self.speech}).")
        return line

    def score_rows(self) -> list[list[str]]:
        """[score, value, what is good] per score (empty when the result was not measured)."""
        return [list(row) for row in self.scores.table_rows()] if self.scores is not None else []


@dataclass
class Comparison:
    grid: str
    results: list[JobResult]
    audio_from: str  # label of the variant whose sound the grid carries

    def table_headers(self) -> list[str]:
        return COMPARISON_COLUMNS + self._score_labels()

    def _score_labels(self) -> list[str]:
        """Scores that at least one variant has a value for, in the metrics' own order."""
        measured = [dict((row[0], row[1]) for row in job.score_rows()) for job in self.results]
        labels = [label for label, _value, _good in (self.results[0].score_rows() if measured else [])]
        return [label for label in labels if any(not rows.get(label, "n/a").startswith("n/a") for rows in measured)]

    def table_rows(self) -> list[list]:
        labels = self._score_labels()
        rows = []
        for job in self.results:
            total = job.timings.get("total", 0.0)
            values = {row[0]: row[1] for row in job.score_rows()}
            rows.append([
                job.label, job.result.engine, job.speech, job.options.version, job.options.mask_mode(),
                job.options.extra_margin,
                "reused" if job.faces_reused else "analysed", job.result.num_frames, round(job.result.duration, 2),
                round(total, 2),
                _rate(job.result.num_frames, total),
            ] + ["n/a" if values.get(label, "n/a").startswith("n/a") else values[label] for label in labels])
        return rows


def _rate(frames: int, seconds: float) -> float | None:
    return round(frames / seconds, 1) if seconds > 0 else None


# --------------------------------------------------------------------------- progress


class _Span:
    """A part of a request: maps the part's own 0..1 progress into [start, end] of the whole."""

    def __init__(self, progress: Progress, start: float = 0.0, end: float = 1.0):
        self.progress, self.start, self.end = progress, start, end

    def __call__(self, fraction: float, text: str) -> None:
        self.progress(self.start + (self.end - self.start) * min(1.0, max(0.0, fraction)), text)

    def part(self, start: float, end: float) -> _Span:
        width = self.end - self.start
        return _Span(self.progress, self.start + width * start, self.start + width * end)


# The pipeline's stages as parts of one bar: face analysis and generation run at the same time (the
# analysis streams ahead), so the bar follows both at once and each keeps its own share.
_PIPELINE_SHARES = {"faces": 0.30, "generate": 0.57}  # of the bar, after 0.05 for loading
_STAGE_WORDS = {"faces": "face analysis", "generate": "generating"}


def pipeline_progress(span: _Span, label: str = "") -> Callable[[str, int, int], None]:
    """The pipeline's (stage, done, total) reports, from whatever thread makes them, as one bar: every
    running stage with its frame count, and the time left once the rate is known."""
    prefix = f"{label}: " if label else ""
    counts: dict[str, tuple[int, int]] = {}
    clocks: dict[str, _StageClock] = {}
    lock = threading.Lock()

    def report(stage: str, done: int, total: int) -> None:
        with lock:
            counts[stage] = (done, total)
            left = clocks.setdefault(stage, _StageClock()).seconds_left(done, total)
            fraction = 0.05 + sum(share * (d / t if t else 1.0) for name, share in _PIPELINE_SHARES.items()
                                  for d, t in [counts.get(name, (0, 1))])
            parts = [f"{_STAGE_WORDS.get(name, name)}, frame {d} of {t}" for name, (d, t) in counts.items()
                     if d < t or name == stage]
            if stage == "generate" and done >= total:
                parts, fraction = ["encoding the video"], 0.93
            text = prefix + "; ".join(parts)
            if left is not None and done < total:
                text += f", {_time_words(left)} left"
        span(min(fraction, 0.93), text)

    return report


def _frames_progress(report: Progress, what: str) -> Callable[[int, int], None]:
    """(done, total) frame counts as ``report``'s fraction and words, with the time left once it is known."""
    clock = _StageClock()

    def frames(done: int, total: int) -> None:
        left = clock.seconds_left(done, total)
        text = f"{what}: frame {done} of {total}"
        if left is not None and done < total:
            text += f", {_time_words(left)} left"
        report(done / total if total else 1.0, text)

    return frames


class _StageClock:
    """The time a stage has left, from its rate since its first report (once that is worth trusting)."""

    MIN_SECONDS = 1.0  # of the stage seen
    MIN_FRAMES = 3

    def __init__(self):
        self.started = time.monotonic()
        self.first_done: int | None = None

    def seconds_left(self, done: int, total: int) -> float | None:
        if self.first_done is None:
            self.first_done, self.started = done, time.monotonic()
            return None
        elapsed, progressed = time.monotonic() - self.started, done - self.first_done
        if elapsed < self.MIN_SECONDS or progressed < self.MIN_FRAMES:
            return None
        return elapsed / progressed * max(0, total - done)


def _time_words(seconds: float) -> str:
    """'about 40 s', 'about 3 min', 'about 1 h 10 min'."""
    if seconds < 60:
        return f"about {max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"about {minutes} min" if minutes < 60 else f"about {minutes // 60} h {minutes % 60} min"


class ProgressRelay:
    """Progress reported from any thread, read by the thread that shows it: a web page's progress bar
    belongs to the thread of its request, and the job's stages report from their own threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest: tuple[float, str] | None = None
        self._count = 0

    def __call__(self, fraction: float, text: str) -> None:
        with self._lock:
            self._latest, self._count = (fraction, text), self._count + 1

    def latest(self) -> tuple[int, tuple[float, str] | None]:
        """(how many reports so far, the last one)."""
        with self._lock:
            return self._count, self._latest


def watch(work: Callable[[Progress], object], stream_dir=None, poll_seconds: float = 0.2
          ) -> Iterator[tuple[str, object]]:
    """Run ``work(progress)`` in a thread and follow it from this one: ("progress", (fraction, text)) when
    it reports, ("segment", path) for each stream segment finished in ``stream_dir``, and at the end
    ("result", what it returned); its exception is raised here."""
    relay = ProgressRelay()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work(relay)
        except BaseException as error:  # handed to the watching thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="studio-job", daemon=True)
    thread.start()
    shown, sent = 0, 0
    while True:
        thread.join(poll_seconds)
        finished = not thread.is_alive()
        count, latest = relay.latest()
        if count != shown and latest is not None:
            shown = count
            yield "progress", latest
        if stream_dir is not None:
            segments = video_io.finished_segments(stream_dir)[sent:]
            sent += len(segments)
            for segment in segments:
                yield "segment", segment
        if finished:
            break
    if "error" in outcome:
        raise outcome["error"]
    yield "result", outcome["result"]


# --------------------------------------------------------------------------- variants as table rows

# The comparison table's columns; an empty cell keeps what the job itself is set to.
VARIANT_COLUMNS = ["label", "speech source", "voice", "version", "mask", "extra margin", "engine"]
AUDIO_SOURCE_CELL = "audio"  # "speech source" cell for the uploaded or recorded audio
OFFICIAL_MASK_CELL = "official"  # "mask" cell for the official code's mask of the variant's version
# The comparison's table, before the scores that were measured.
COMPARISON_COLUMNS = ["variant", "engine", "speech", "version", "mask", "extra margin", "face data", "frames",
                      "seconds of video", "job seconds", "frames per second"]


def variants_from_rows(rows: Sequence[Sequence], speech: Speech, options: RunOptions,
                       engine: str = "musetalk") -> list[Variant]:
    """Variants from the table's rows; blank rows are skipped. A "speech source" of ``audio``
    uses the audio given for the job, a source id speaks the job's text with that source."""
    variants = []
    for number, row in enumerate(rows, start=1):
        cells = [str(cell).strip() if cell is not None else "" for cell in list(row) + [""] * len(VARIANT_COLUMNS)]
        label, source, voice, version, mask, margin, variant_engine = cells[: len(VARIANT_COLUMNS)]
        if not any((label, source, voice, version, mask, margin, variant_engine)):
            continue
        where = f"variant row {number}"
        if variant_engine:
            try:
                _check_engine(variant_engine)
            except InputError as error:
                raise InputError(f"{where}: {error}") from None
        variant_speech = _variant_speech(speech, source, voice, where)
        changes = {}
        if version:
            changes["version"] = version
        if mask:
            changes["parsing_mode"] = None if mask == OFFICIAL_MASK_CELL else mask
        if margin:
            try:
                changes["extra_margin"] = int(float(margin))
            except ValueError:
                raise InputError(f"{where}: extra margin must be a whole number of pixels, not {margin!r}") from None
        try:
            variant_options = options.replace(**changes).validate()
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        parts = [part for part in (variant_engine, source and variant_speech.describe(), version, mask,
                                   margin and f"margin {margin}") if part]
        variants.append(Variant(label or ", ".join(parts) or "as set above", variant_speech, variant_options,
                                variant_engine or engine))
    return _unique_labels(variants)


def _unique_labels(variants: list[Variant]) -> list[Variant]:
    """Labels made unique: a repeated one gets " (2)", " (3)" ... (they name cells and files)."""
    seen: dict[str, int] = {}
    unique = []
    for variant in variants:
        count = seen[variant.label] = seen.get(variant.label, 0) + 1
        unique.append(dataclasses.replace(variant, label=f"{variant.label} ({count})") if count > 1 else variant)
    return unique


def same_job(variants: Sequence[Variant]) -> tuple[int, int] | None:
    """The first pair of variants (0-based) that would make the same dub, or None."""
    first_of: dict[tuple, int] = {}
    for index, variant in enumerate(variants):
        job = (variant.engine, variant.speech, variant.options)
        if job in first_of:
            return first_of[job], index
        first_of[job] = index
    return None


def _variant_speech(speech: Speech, source: str, voice: str, where: str) -> Speech:
    if not source:
        return dataclasses.replace(speech, voice=voice or speech.voice) if speech.is_text else speech
    if source.lower() == AUDIO_SOURCE_CELL:
        if not speech.audio:
            raise InputError(f"{where} uses the audio, but no audio was given; upload or record it above")
        return Speech(audio=speech.audio)
    text = speech.text if speech.is_text else None
    if not text:
        raise InputError(f"{where} speaks with {source!r}, but there is no text; type it in the Text box above")
    return Speech(text=text, source=source, voice=voice or None, clone=speech.clone and source == speech.source)


# --------------------------------------------------------------------------- history


def history_add(history: list[dict] | None, kind: str, label: str, files: Sequence[str], summary: str) -> list[dict]:
    """A new history list with this result first (the UI keeps one list per browser session)."""
    entry = {"time": time.strftime("%H:%M:%S"), "kind": kind, "label": label, "files": [str(f) for f in files],
             "summary": summary}
    return [entry] + list(history or [])[: HISTORY_LIMIT - 1]


def history_rows(history: list[dict] | None) -> list[list[str]]:
    return [[entry["time"], entry["kind"], entry["label"], entry["summary"]] for entry in history or []]


def history_files(history: list[dict] | None) -> list[str]:
    """The session's result files that are still kept (old request folders are pruned)."""
    return [path for entry in history or [] for path in entry["files"] if os.path.isfile(path)]


# --------------------------------------------------------------------------- request folders


class JobFolders:
    """One folder per request under ``root``; folders older than ``keep_seconds`` are removed
    whenever a new one is made (so results stay downloadable for that long)."""

    def __init__(self, root: Path, keep_seconds: float):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_seconds = keep_seconds

    def new(self, kind: str) -> Path:
        self.prune()
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root))

    def prune(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed = 0
        for folder in self.root.iterdir():
            try:
                old = folder.is_dir() and now - folder.stat().st_mtime > self.keep_seconds
            except FileNotFoundError:
                continue  # removed by a request running beside this one
            if old:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            logger.info("removed %d request folders older than %.0f minutes", removed, self.keep_seconds / 60)
        return removed

    @staticmethod
    def discard(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- the studio


class Studio:
    """What the app does, behind plain method calls. The models of a version are loaded once,
    under a lock, and every request writes only into its own folder; one pipeline runs one job
    at a time (the app's queue sees to that)."""

    def __init__(self, config: StudioConfig | None = None, load_pipeline: Callable | None = None,
                 download_weights: Callable | None = None):
        self.config = (config or StudioConfig()).validate()
        self._load_pipeline = load_pipeline or _load_pipeline
        self._download_weights = download_weights or weights.download
        self._pipelines: dict[str, object] = {}
        self._lock = threading.Lock()
        self._model_job = threading.Lock()  # held while a pipeline runs: one job at a time
        self._seconds_per_frame: float | None = None  # MuseTalk's speed here, once calibrated
        self._live_registry = None  # the Live tab's faces, made on first use
        self._owns_work_dir = self.config.work_dir is None
        root = Path(self.config.work_dir) if self.config.work_dir else Path(tempfile.mkdtemp(prefix="musetalk-studio-"))
        self.jobs = JobFolders(root, self.config.keep_minutes * 60)

    @property
    def work_dir(self) -> Path:
        return self.jobs.root

    @property
    def live_registry(self):
        """The live faces of this studio's pages (``musetalk.live_rtc``), made on first use."""
        with self._lock:
            if self._live_registry is None:
                from musetalk.live_rtc import LiveRegistry

                self._live_registry = LiveRegistry(self.work_dir / "live")
            return self._live_registry

    def close(self) -> None:
        """End the live sessions; remove the work folder if the studio made it."""
        if self._live_registry is not None:
            self._live_registry.close_all()
        if self._owns_work_dir:
            shutil.rmtree(self.jobs.root, ignore_errors=True)

    # ------------------------------------------------------------------ weights and models

    def models_dir(self) -> Path:
        return weights.models_dir_or_default(self.config.models_dir)

    def missing_weights(self, version: str | None = None, engine: str = "musetalk") -> list[Path]:
        """What ``engine`` lacks to run ``version`` (the preview engine needs nothing)."""
        if engine not in MODEL_ENGINES:
            return []
        return weights.missing_files(version or self.config.version, self.config.models_dir, draft=engine == "draft")

    def weights_status(self) -> str:
        """One line per version: ready, or which files are missing and how they are fetched."""
        lines = []
        for version in ("v15", "v1"):
            missing = self.missing_weights(version)
            name = "MuseTalk 1.5" if version == "v15" else "MuseTalk 1.0"
            if not missing:
                loaded = " (loaded)" if ("musetalk", version) in self._pipelines else ""
                lines.append(f"{name}: ready{loaded}")
            else:
                names = ", ".join(str(path.relative_to(self.models_dir())) for path in missing)
                lines.append(f"{name}: missing {names}; fetched on the first run, or with Download weights")
        lines.append("Draft decoder (TAESD): " + ("ready" if weights.has_draft_decoder(self.config.models_dir) else
                                                  "fetched (10 MB) on the first run of the draft engine"))
        return "\n".join(lines)

    def fetch_weights(self, version: str | None = None, progress: Progress | None = None,
                      engine: str = "musetalk") -> str:
        """Download what ``engine`` lacks to run ``version`` (nothing when complete); returns the new status."""
        version = version or self.config.version
        progress = progress or _no_progress
        if self.missing_weights(version, engine):
            progress(0.0, f"downloading the MuseTalk {version} weights (once, about 3.6 GB for everything)")
            logger.info("fetching the %s weights into %s", version, self.models_dir())
            self._download_weights(version, self.config.models_dir, draft=engine == "draft")
        progress(1.0, "weights ready")
        return self.weights_status()

    def has_gpu(self) -> bool:
        """The studio's device is a GPU (CUDA or Apple's MPS)."""
        from musetalk.models import resolve_device

        try:
            return resolve_device(self.config.device).type != "cpu"
        except InputError:
            return False

    def default_engine(self) -> str:
        """MuseTalk on a GPU with its weights here; elsewhere the preview engine, which needs no weights and
        runs in real time on a CPU (MuseTalk takes minutes there: ``musetalk_estimate`` says how many)."""
        return "musetalk" if self.has_gpu() and not self.missing_weights() else "preview"

    def calibrate(self) -> float:
        """Seconds MuseTalk takes per output frame on this device (its VAE encode, UNet and decode on one
        frame), measured once with the loaded models and kept."""
        if self._seconds_per_frame is None:
            from musetalk.timing import StageTimer

            pipeline = self.pipeline(self.config.version)
            engine = pipeline.engine
            crops = np.zeros((1, 256, 256, 3), dtype=np.uint8)
            with self._model_job, pipeline.turns.take():  # a live session may share the engine
                started = time.perf_counter()
                states = engine.prepare(crops, None, StageTimer())
                audio = np.zeros((1, 50, engine.unet.config.cross_attention_dim), dtype=np.float32)
                engine.generate(states, audio, StageTimer())
                self._seconds_per_frame = time.perf_counter() - started
            logger.info("MuseTalk takes %.2f s a frame here", self._seconds_per_frame)
        return self._seconds_per_frame

    def musetalk_estimate(self, video_seconds: float = 10.0, fps: float = 25.0) -> str | None:
        """How long MuseTalk takes here for ``video_seconds`` of video, in words; None until calibrated."""
        if self._seconds_per_frame is None:
            return None
        return _time_words(self._seconds_per_frame * video_seconds * fps)

    def pipeline(self, version: str, progress: Progress | None = None, engine: str = "musetalk"):
        """The loaded pipeline of ``engine`` and ``version``: MuseTalk's weights are fetched and
        loaded on first use, then kept; the preview engine needs no weights. The draft engine is the
        MuseTalk pipeline's models with TAESD decoding: one copy of the models serves both."""
        _check_engine(engine)
        progress = progress or _no_progress
        key = (engine, version)
        with self._lock:
            if key not in self._pipelines:
                if self.missing_weights(version, engine):
                    self.fetch_weights(version, _Span(progress, 0.0, 0.8), engine)
                progress(0.85, f"loading the {engine} {version} models" if engine in MODEL_ENGINES
                         else "starting the preview engine")
                self._pipelines[key] = self._new_pipeline(version, engine)
            return self._pipelines[key]

    def _new_pipeline(self, version: str, engine: str):
        """Load ``engine``'s pipeline (the lock is held); the draft one is built on MuseTalk's, loaded first
        if it is not yet."""
        if engine != "draft":
            return self._load_pipeline(self.config.models_dir, version, self.config.device, self.config.dtype, engine)
        base = ("musetalk", version)
        if base not in self._pipelines:
            self._pipelines[base] = self._new_pipeline(version, "musetalk")
        return self._pipelines[base].with_draft_decoder(self.config.models_dir)

    def load_models(self, calibrate: bool = True) -> bool:
        """At start-up: load the default version when its weights are present; True when loaded. Without a
        GPU, MuseTalk's speed is then measured in the background (``musetalk_estimate``)."""
        missing = self.missing_weights()
        if missing:
            logger.warning("MuseTalk %s weights are missing (%s); the app will fetch them on request",
                           self.config.version, ", ".join(str(p) for p in missing))
            return False
        self.pipeline(self.config.version)
        if calibrate and not self.has_gpu():
            threading.Thread(target=self.calibrate, name="calibrate", daemon=True).start()
        return True

    # ------------------------------------------------------------------ limits

    def check_video(self, path) -> video_io.MediaInfo:
        """The upload as a video or photo within the limits, else InputError saying what to change."""
        if not path:
            raise InputError("upload a video or a photo of a face first")
        self._check_size(path, "video")
        info = video_io.probe(path)
        if not info.has_video:
            raise InputError(f"{Path(path).name} has no picture; upload a video or a photo of a face")
        if not info.is_image and info.duration > self.config.max_seconds:
            raise InputError(f"the video lasts {info.duration:.1f} s; this studio takes videos up to "
                             f"{self.config.max_seconds:g} s ({ENVIRONMENT['max_seconds']}); trim it first")
        return info

    def check_audio(self, path, what: str = "audio") -> video_io.MediaInfo:
        self._check_size(path, what)
        info = video_io.probe(path)
        if not info.has_audio:
            raise InputError(f"the {what} {Path(path).name} has no sound; give an audio file or a recording")
        if info.duration > self.config.max_seconds:
            raise InputError(f"the {what} lasts {info.duration:.1f} s; this studio takes up to "
                             f"{self.config.max_seconds:g} s of speech ({ENVIRONMENT['max_seconds']}); "
                             "use a shorter one")
        return info

    def _check_size(self, path, what: str) -> None:
        if not os.path.isfile(path):
            raise InputError(f"the {what} file {Path(path).name} does not exist; upload it again")
        megabytes = os.path.getsize(path) / 1e6
        if megabytes > self.config.max_upload_mb:
            raise InputError(f"the {what} is {megabytes:.0f} MB; this studio takes files up to "
                             f"{self.config.max_upload_mb} MB ({ENVIRONMENT['max_upload_mb']})")

    # ------------------------------------------------------------------ preview

    def preview(self, video, options: RunOptions | None = None) -> Preview:
        """The first frame with a face, with the crop box (yellow), the paste-back square (blue)
        and the area the model redraws (green) drawn on it. Needs no weights; about a second."""
        from musetalk import blending, face

        options = (options or RunOptions()).validate()
        info = self.check_video(video)
        index, frame, landmarks = self._first_face(info, options.face_index)
        track = face.FaceTrack.from_rows([landmarks], info.width, info.height)
        box = face.crop_boxes(track, options.version, options.extra_margin, options.bbox_shift)[0]
        if box[0] < 0:
            raise NoFaceError(f"the face in frame {index} lies outside the picture; use a video where the face "
                              "is whole")
        square = blending.face_square(box, info.width, info.height)
        mask = blending.blend_mask(landmarks, box, square, mode=options.mask_mode(),
                                   left_cheek_width=options.left_cheek_width,
                                   right_cheek_width=options.right_cheek_width,
                                   upper_boundary_ratio=options.upper_boundary_ratio)
        image = blending.draw_overlay(frame, box, square, mask)
        x1, y1, x2, y2 = (int(v) for v in box)
        message = (f"Frame {index}: the model sees the yellow box ({x2 - x1}x{y2 - y1} px), the new face is "
                   f"pasted back into the blue square, and only the green area changes "
                   f"({options.mask_mode()} mask).")
        return Preview(image, index, (x1, y1, x2, y2), message)

    @staticmethod
    def _first_face(info: video_io.MediaInfo, face_index: int | None):
        from musetalk.face import FaceAnalyzer

        with FaceAnalyzer(face_index=face_index) as analyzer, \
                video_io.FrameReader(info.path, info=info, max_frames=PREVIEW_SEARCH_FRAMES) as reader:
            for index, frame in enumerate(reader):
                landmarks = analyzer.landmarks(frame)
                if landmarks is not None:
                    return index, frame, landmarks
        which = "the largest face" if face_index is None else f"face number {face_index + 1} from the left"
        raise NoFaceError(f"no face ({which}) in the first {PREVIEW_SEARCH_FRAMES} frames; use a video where one "
                          "face is visible and reasonably lit, or change the face choice")

    # ------------------------------------------------------------------ speech

    def check_speech(self, speech: Speech) -> None:
        """The cheap checks of a speech request, made before any model loads or anything is spoken."""
        if speech.is_text and speech.audio:
            raise InputError("give the new speech either as audio or as text, not both")
        if speech.is_text:
            length = len(speech.text.strip())
            if length > self.config.max_text_chars:
                raise InputError(f"the text has {length} characters; this studio speaks up to "
                                 f"{self.config.max_text_chars} ({ENVIRONMENT['max_text_chars']}); shorten it")
        elif speech.audio:
            self.check_audio(speech.audio)
        else:
            raise InputError("give the new speech: upload or record audio, or type text and choose a voice")

    def speech_audio(self, speech: Speech, video: str, progress: Progress | None = None):
        """The job's speech: the given audio file's path, or the AudioClip an audio source spoke
        (whose phoneme timings, when it has them, drive the preview engine's mouth shapes)."""
        self.check_speech(speech)
        if speech.is_text:
            return self._synthesize(speech, video, progress or _no_progress)
        return speech.audio

    def _synthesize(self, speech: Speech, video: str, progress: Progress):
        from musetalk import speech as speech_lib

        text = speech.text.strip()
        source = speech.source or "espeak"
        what = f"speaking the text with {source}" + (" in the video's own voice" if speech.clone else "")
        progress(0.0, what)
        clip = speech_lib.speech_for_video(
            text, source, speech.voice or None, clone_from=video if speech.clone else None,
            progress=lambda done, total: progress(done / total if total else 1.0, f"{what}: part {done} of {total}"),
        )
        self.check_audio(clip.path, "synthesized speech")
        return clip

    # ------------------------------------------------------------------ one dub

    def generate(self, video, speech: Speech, options: RunOptions | None = None,
                 progress: Progress | None = None, score: bool = True, engine: str = "musetalk",
                 stream_dir=None) -> JobResult:
        """Dub ``video`` with ``speech``; the result, timings and (``score``) the result's scores.
        ``engine``: "musetalk", "draft" or "preview" (no weights). ``stream_dir``: a folder where the
        dub is also cut into short segments as it is encoded. The side-by-side video is
        ``side_by_side``'s, once the result is in hand."""
        options = (options or RunOptions()).validate()
        _check_engine(engine)
        self.check_video(video)
        self.check_speech(speech)
        span = _Span(progress or _no_progress)
        folder = self.jobs.new("generate")
        try:
            job = self._dub(video, speech, options, engine, folder, "Dubbed", "dubbed", span.part(0.0, 0.99),
                            score, stream_dir)
            span(1.0, "done")
            return job
        except BaseException:
            self.jobs.discard(folder)
            raise

    def _dub(self, video, speech: Speech, options: RunOptions, engine: str, folder: Path, label: str, name: str,
             span: _Span, score: bool, stream_dir=None) -> JobResult:
        """Speech to audio, then the pipeline: ``name``.mp4 in ``folder``. Its scores (``score``) are
        measured from the job's frames as they are encoded."""
        started = time.perf_counter()
        pipeline = self.pipeline(options.version, span.part(0.0, 0.05), engine)
        speech_started = time.perf_counter()
        spoken = self.speech_audio(speech, video, span.part(0.05, 0.1))
        audio = getattr(spoken, "path", spoken)
        speech_seconds = time.perf_counter() - speech_started
        output = folder / f"{name}.mp4"
        scorer = metrics.FrameScorer() if score else None
        try:
            with self._one_job_at_a_time(span, label):
                result = pipeline(video, spoken, output, options,
                                  progress=pipeline_progress(span.part(0.1, 0.95), label),
                                  stream_dir=stream_dir, sinks=[scorer] if scorer else [])
            if scorer:
                span(0.96, f"{label}: finishing the scores")
            scores = scorer.close(output, _scoring_progress(span.part(0.96, 1.0), label),
                                  _speech_found(result, options)) if scorer else None
        except BaseException:
            if scorer:
                scorer.abort()
            raise
        timings = dict(result.timings)
        if speech.is_text:
            timings["speech"] = round(speech_seconds, 4)
        if scorer:
            timings["scores"] = round(scorer.seconds, 4)  # on its own thread, beside the encoder
        timings["total"] = round(time.perf_counter() - started, 4)
        return JobResult(label=label, speech=speech.describe(), options=options, result=result, audio_path=audio,
                         timings=timings, scores=scores)

    # ------------------------------------------------------------------ the side-by-side video

    def side_by_side(self, video, dubbed, loop: str = "pingpong",
                     progress: Progress | None = None) -> compare.Composition:
        """The original ``video`` beside its dub ``dubbed`` (with the dub's sound), in a new request
        folder; the original plays on the dub's schedule (``loop`` as the job had it), so the two
        faces move together. Made from the two files once the dub is done: the dub's result and
        scores never wait for it, and the job's slot is free while it is made."""
        if not dubbed:
            raise InputError("there is no dub to put beside the original yet; generate one first")
        RunOptions(loop=loop).validate()
        self.check_video(video)
        dub = self.check_video(dubbed)
        report = progress or _no_progress
        folder = self.jobs.new("side-by-side")
        try:
            schedule = compare.dub_schedule(video, dub.num_frames, dub.fps, loop)
            report(0.0, "side-by-side video")
            return compare.side_by_side(
                str(video), str(dubbed), folder / "side_by_side.mp4", original_schedule=schedule,
                crf=compare.VIEW_CRF, preset=compare.VIEW_PRESET, fps=dub.fps, num_frames=dub.num_frames,
                progress=_frames_progress(report, "side-by-side video"),
            )
        except BaseException:
            self.jobs.discard(folder)
            raise

    @contextmanager
    def _one_job_at_a_time(self, span: _Span, label: str) -> Iterator[None]:
        """A pipeline runs one job at a time. The app's queue sees to that, except after a client
        cancels: Gradio frees the place at once while the job's thread runs on, so the next job
        waits here for it instead of sharing the models with it."""
        if not self._model_job.acquire(blocking=False):
            span(0.1, f"{label + ': ' if label else ''}waiting for the job before to finish")
            self._model_job.acquire()
        try:
            yield
        finally:
            self._model_job.release()

    # ------------------------------------------------------------------ comparisons

    def compare(self, video, variants: Sequence[Variant], progress: Progress | None = None,
                score: bool = True) -> Comparison:
        """Run every variant on the same video (its prepared faces are reused through the
        pipeline's avatar cache) and put them in one labelled grid beside the original."""
        variants = list(variants)
        if not 2 <= len(variants) <= self.config.max_variants:
            raise InputError(f"a comparison needs 2 to {self.config.max_variants} variants, not {len(variants)}")
        for variant in variants:
            variant.options.validate()
            self.check_speech(variant.speech)
        repeated = same_job(variants)
        if repeated:
            first, second = (variants[index] for index in repeated)
            raise InputError(f"variants {repeated[0] + 1} ({first.label}) and {repeated[1] + 1} ({second.label}) "
                             "would make the same dub; change the speech, engine, version, mask or margin of one")
        self.check_video(video)
        span = _Span(progress or _no_progress)
        folder = self.jobs.new("compare")
        try:
            share = 0.9 / len(variants)
            results = [
                self._dub(video, variant.speech, variant.options, variant.engine, folder, variant.label,
                          f"{index + 1}-{_slug(variant.label)}", span.part(index * share, (index + 1) * share), score)
                for index, variant in enumerate(variants)
            ]
            span(0.92, "composing the comparison grid")
            first = results[0]
            panels = [compare.Panel(str(video), "Original", compare.dub_schedule(
                video, first.result.num_frames, first.result.fps, first.options.loop))]
            panels += [compare.Panel(job.output, f"{job.label} (sound)" if job is first else job.label)
                       for job in results]
            grid = compare.compose_grid(panels, folder / "comparison.mp4", audio_path=first.output,
                                        fps=first.result.fps)
            span(1.0, "done")
            return Comparison(grid=grid.path, results=results, audio_from=first.label)
        except BaseException:
            self.jobs.discard(folder)
            raise


def _speech_found(result, options: RunOptions):
    """What the job's silence gate found in its audio (the voice-activity detector the scores run too), or
    None when the gate was off."""
    from musetalk.audio import SpeechSegments

    return SpeechSegments(list(result.speech_spans), result.duration) if options.silence_gate else None


# The scoring's stages, in the order they run, and the share of the bar each one takes.
_SCORING_STAGES = {"faces": (0.0, 0.6), "identity": (0.6, 0.8), "syncnet": (0.8, 1.0)}


def _scoring_progress(span: _Span, label: str) -> Callable[[str, int, int], None]:
    def report(stage: str, done: int, total: int) -> None:
        start, end = _SCORING_STAGES.get(stage, (0.0, 1.0))
        share = done / total if total else 1.0
        span(start + (end - start) * share, f"{label}: scores ({stage}, {done} of {total})")

    return report


def _load_pipeline(models_dir, version: str, device: str, dtype: str, engine: str):
    """``engine``: "musetalk" or "preview" (the studio derives the draft engine from MuseTalk's)."""
    from musetalk.pipeline import LipSyncPipeline

    return LipSyncPipeline.from_pretrained(models_dir, version, device, dtype, engine=engine)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")


def _slug(label: str) -> str:
    """A file name made from a label (labels come from users: nothing but safe characters)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()[:40]
    return slug or "result"
