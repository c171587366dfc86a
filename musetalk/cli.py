"""The ``musetalk`` command: run, download, doctor.

A user mistake ends as one clear line on stderr and a non-zero exit, never a traceback,
and never with a partial output file left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from musetalk import __version__
from musetalk.config import LENGTH_MODES, LOOP_MODES, PARSING_MODES, RunOptions, option_names
from musetalk.errors import InputError, MuseTalkError

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.handler(args)
    except MuseTalkError as error:
        _say(f"musetalk: error: {error}", stream=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _say("musetalk: interrupted; nothing was written", stream=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetalk", description="Lip-sync dubbing with MuseTalk.")
    parser.add_argument("--version", action="version", version=f"musetalk-studio {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="dub a video (or photo) with new audio")
    run.add_argument("--video", help="the face video or photo")
    run.add_argument("--audio", help="the new speech (any audio file, or a video whose sound to use)")
    run.add_argument("--out", help="the output video (.mp4, .mov or .mkv)")
    run.add_argument("--config", help="a YAML file of jobs (official shape: one entry per job with "
                                      "video_path, audio_path and optional options), run in one model load")
    run.add_argument("--out-dir", default="results", help="where --config jobs write (default: results)")
    _add_model_arguments(run)
    _add_job_arguments(run)
    run.set_defaults(handler=_run)

    download = commands.add_parser("download", help="fetch the official weights once")
    download.add_argument("--models-dir", help="default: $MUSETALK_MODELS_DIR, else a per-user cache folder")
    download.add_argument("--version", dest="model_version", choices=("v15", "v1", "all"), default="v15")
    download.set_defaults(handler=_download)

    doctor = commands.add_parser("doctor", help="check ffmpeg, MediaPipe, weights, device and versions")
    doctor.add_argument("--models-dir")
    doctor.set_defaults(handler=_doctor)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", help="default: $MUSETALK_MODELS_DIR, else a per-user cache folder")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp16, bf16 or fp32")


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RunOptions field; unset flags keep the defaults (or the YAML entry's value)."""
    defaults = RunOptions()
    job = parser.add_argument_group("job options")
    job.add_argument("--version", dest="model_version", choices=("v15", "v1"), help="model version (default v15)")
    job.add_argument("--extra-margin", type=int, help=f"v1.5: pixels added below the chin (default {defaults.extra_margin})")
    job.add_argument("--bbox-shift", type=int, help="v1.0: move the box's middle line; positive opens the mouth more")
    job.add_argument("--face-index", type=int, help="which face when there are several, 0 = leftmost (default: the largest)")
    job.add_argument("--smoothing", type=float, help=f"temporal smoothing 0..1 (default {defaults.smoothing})")
    job.add_argument("--parsing-mode", choices=PARSING_MODES, help="blend mask (default jaw)")
    job.add_argument("--left-cheek-width", type=int, help=f"jaw mode cheek band (default {defaults.left_cheek_width})")
    job.add_argument("--right-cheek-width", type=int, help=f"jaw mode cheek band (default {defaults.right_cheek_width})")
    job.add_argument("--no-silence-gate", dest="silence_gate", action="store_const", const=False,
                     help="do not zero non-speech before the audio encoder")
    job.add_argument("--av-offset-ms", type=int, help="delay the audio by this much (negative: earlier)")
    job.add_argument("--loop", choices=LOOP_MODES, help="when the audio is longer than the video (default pingpong)")
    job.add_argument("--length", choices=LENGTH_MODES, help="output length follows the audio (default) or the video")
    job.add_argument("--fps", type=float, help="output frame rate (default: the input's; 25 is the model's)")
    job.add_argument("--batch-size", type=int, help=f"frames per model call (default {defaults.batch_size})")
    job.add_argument("--crf", type=int, help=f"output quality, 0 best .. 51 worst (default {defaults.crf})")


def job_options(args: argparse.Namespace, entry: dict | None = None) -> RunOptions:
    """RunOptions from the defaults, then a YAML entry, then the flags the user gave."""
    options = RunOptions()
    if entry:
        options = options.replace(**entry)
    given = {name: getattr(args, name, None) for name in option_names() if name != "version"}
    given["version"] = getattr(args, "model_version", None)
    return options.replace(**{k: v for k, v in given.items() if v is not None}).validate()


def _run(args: argparse.Namespace) -> int:
    if args.config:
        if args.video or args.audio or args.out:
            raise InputError("give either --config or --video/--audio/--out, not both")
        jobs = load_jobs(args.config, Path(args.out_dir))
    else:
        missing = [flag for flag, value in (("--video", args.video), ("--audio", args.audio), ("--out", args.out))
                   if not value]
        if missing:
            raise InputError(f"musetalk run needs {', '.join(missing)} (or --config jobs.yaml)")
        jobs = [(args.video, args.audio, args.out, {})]

    pipelines: dict[str, object] = {}  # one model load per version for all jobs
    for video, audio, out, entry in jobs:
        options = job_options(args, entry)
        pipeline = pipelines.get(options.version)
        if pipeline is None:
            from musetalk.pipeline import LipSyncPipeline

            pipeline = LipSyncPipeline.from_pretrained(args.models_dir, options.version, args.device, args.dtype)
            pipelines[options.version] = pipeline
        with _ProgressBars() as bars:
            result = pipeline(video, audio, out, options, progress=bars.update)
        _say(f"wrote {result.output_path}: {result.num_frames} frames at {result.fps:g} fps, "
             f"{result.width}x{result.height}, {result.duration:.2f} s, face in {result.frames_with_face} frames")
        _say("  time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    return 0


def load_jobs(config_path: str, out_dir: Path) -> list[tuple[str, str, str, dict]]:
    """Jobs of a YAML file in the official shape; paths are relative to the file's folder."""
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise InputError(f"the job file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path} must map job names to entries with video_path and audio_path")
    jobs = []
    for name, entry in data.items():
        if not isinstance(entry, dict) or "video_path" not in entry or "audio_path" not in entry:
            raise InputError(f"job {name!r} in {path} needs video_path and audio_path")
        entry = dict(entry)
        video = _relative_to(path.parent, entry.pop("video_path"))
        audio = _relative_to(path.parent, entry.pop("audio_path"))
        output = entry.pop("output_path", None) or entry.pop("result_name", None)
        output = _relative_to(path.parent, output) if output else out_dir / f"{Path(video).stem}_{Path(audio).stem}.mp4"
        jobs.append((video, audio, str(output), entry))
    return jobs


def _relative_to(folder: Path, value) -> str:
    return str(Path(value) if os.path.isabs(str(value)) else folder / str(value))


def _download(args: argparse.Namespace) -> int:
    from musetalk import weights

    paths = weights.download(args.model_version, args.models_dir)
    _say(f"{len(paths)} files ready in {weights.models_dir_or_default(args.models_dir)}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from musetalk import doctor

    report = doctor.check(args.models_dir)
    width = max(len(row.name) for row in report)
    for row in report:
        _say(f"{'ok  ' if row.ok else 'FAIL'} {row.name.ljust(width)}  {row.detail}")
    return 0 if all(row.ok or not row.required for row in report) else 1


class _ProgressBars:
    """One tqdm bar per pipeline stage, on stderr."""

    LABELS = {"faces": "face analysis", "generate": "generating"}

    def __init__(self):
        self.bars: dict[str, object] = {}

    def update(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=self.LABELS.get(stage, stage), unit="frame",
                                          leave=False, file=sys.stderr)
        if total != bar.total:
            bar.total = max(total, done)
        bar.update(done - bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()


def _say(line: str, stream=None) -> None:
    """The command's own output (results, tables, errors), as opposed to logging."""
    (stream or sys.stdout).write(line + "\n")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
