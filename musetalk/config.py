"""Options of one lip-sync job, and the jobs of a batch file. Defaults are the official MuseTalk
ones unless a comment says why not.

One flat dataclass so the command line, the YAML job files and the app all map onto the
same names; ``validate()`` turns a bad value (of the wrong type or out of range) into an
``InputError`` that names the option. ``plan_batch`` reads a jobs file and checks the whole
batch (every field, every path, outputs that clash or are inputs) before the first job runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

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
        for option in dataclasses.fields(self):
            _of_type(option.name, getattr(self, option.name), option.type)
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


_TYPE_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a word"}


def _of_type(name: str, value, annotation: str) -> None:
    """InputError unless value fits the field's annotation ('int | None', 'float', 'bool' ...): a job file's
    'no' (a string) is no boolean, 1.5 no frame count, true no number."""
    kinds = [kind.strip() for kind in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    kind = next(kind for kind in kinds if kind != "None")
    fits = {"bool": lambda: isinstance(value, bool),
            "int": lambda: isinstance(value, int) and not isinstance(value, bool),
            "float": lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": lambda: isinstance(value, str)}[kind]()
    if not fits:
        words = _TYPE_WORDS[kind] + (" (or left out)" if "None" in kinds else "")
        raise InputError(f"{name} must be {words}, not {value!r}")


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def _in_range(name: str, value, low, high) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(f"{name} must be a number from {low} to {high}, not {value!r}")


# --------------------------------------------------------------------------- batch files

# Keys of a job entry that are not options: its inputs (relative to the file's folder) and its output.
JOB_INPUT_KEYS = ("video_path", "audio_path")
JOB_OUTPUT_KEYS = ("output_path", "result_name")  # the official files use either


@dataclass(frozen=True)
class BatchJob:
    """One job of a batch file, checked: inputs that exist, an output that may be written, valid options."""

    name: str
    video: str
    audio: str
    output: str
    options: RunOptions


def plan_batch(config_path: str | os.PathLike, out_dir: str | os.PathLike,
               overrides: dict | None = None) -> list[BatchJob]:
    """Every job of a YAML jobs file (the official shape: job name -> video_path, audio_path, an optional
    output_path or result_name and options by name), checked as a whole before any of them runs.

    Inputs are relative to the file's folder. Outputs are under ``out_dir``: a relative output_path is
    taken inside it (one that climbs out of it with '..' is refused), an absolute one is used as it is,
    and a job without one writes ``<video>_<audio>.mp4`` there. ``overrides`` (the command line's
    options) win over the file's. InputError, naming the job, for any bad field or path, for two jobs
    writing the same file, and for a job writing a file that a job reads (by any name)."""
    from musetalk import video_io

    path = Path(config_path)
    entries = _read_jobs_file(path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"the output folder {out_dir} is a file; give a folder for --out-dir")
    jobs = []
    for name, entry in entries.items():
        where = f"job {name!r} in {path}"
        try:
            jobs.append(_plan_job(str(name), entry, path.parent, out_dir, overrides or {}))
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
    _refuse_clashes(jobs, path)
    for job in jobs:
        try:
            video_io.check_output_path(job.output)
        except InputError as error:
            raise InputError(f"job {job.name!r} in {path}: {error}") from None
    return jobs


def _read_jobs_file(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise InputError(f"the job file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not a valid YAML file: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path} must map job names to entries with video_path and audio_path")
    return data


def _plan_job(name: str, entry, folder: Path, out_dir: Path, overrides: dict) -> BatchJob:
    from musetalk import video_io

    if not isinstance(entry, dict):
        raise InputError("an entry needs video_path and audio_path (and options by name)")
    entry = dict(entry)
    inputs = []
    for key in JOB_INPUT_KEYS:
        value = entry.pop(key, None)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{key} must be the path of a file, not {value!r}")
        given = Path(value) if os.path.isabs(value) else folder / value
        if not given.is_file():
            raise InputError(f"{key} {given} does not exist (paths are relative to the job file's folder)")
        inputs.append(str(given))
    outputs = [entry.pop(key) for key in JOB_OUTPUT_KEYS if key in entry]
    if len(outputs) > 1:
        raise InputError(f"give either {' or '.join(JOB_OUTPUT_KEYS)}, not both")
    output = _job_output(outputs[0] if outputs else None, inputs, out_dir)
    video_io.require_output_suffix(output)
    if entry.get("batch_size") == "auto":
        entry["batch_size"] = None
    options = RunOptions().replace(**entry).replace(**overrides).validate()
    return BatchJob(name, inputs[0], inputs[1], str(output), options)


def _job_output(value, inputs: list[str], out_dir: Path) -> Path:
    if value is None:
        return out_dir / f"{Path(inputs[0]).stem}_{Path(inputs[1]).stem}.mp4"
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"output_path must be a file name, not {value!r}")
    if os.path.isabs(value):
        return Path(value)
    inside = os.path.normpath(value)
    if inside == ".." or inside.startswith(".." + os.sep):
        raise InputError(f"output_path {value} leaves the output folder {out_dir}; give a path inside it "
                         f"(it is relative to --out-dir) or an absolute one")
    return out_dir / inside


def _refuse_clashes(jobs: list[BatchJob], path: Path) -> None:
    """Two jobs writing one file, or a job writing what a job reads: refused by name, before any runs."""
    written: dict[str, BatchJob] = {}
    for job in jobs:
        key = _file_key(job.output)
        if key in written:
            raise InputError(f"jobs {written[key].name!r} and {job.name!r} in {path} both write {job.output}; give "
                             f"one of them another output_path (the second would overwrite the first)")
        written[key] = job
    for reader in jobs:
        for role, given in (("video", reader.video), ("audio", reader.audio)):
            for writer in jobs:
                if _same_file(writer.output, given):
                    raise InputError(
                        f"job {writer.name!r} in {path} writes {writer.output}, which job {reader.name!r} reads as "
                        f"its {role}; give it another output_path (inputs are never overwritten)")


def _file_key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return _file_key(a) == _file_key(b)
