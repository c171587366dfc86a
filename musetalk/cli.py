"""The ``musetalk`` command: run, download, doctor, voices, tts.

A user mistake ends as one clear line on stderr and a non-zero exit, never a traceback,
and never with a partial output file left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

from musetalk import __version__
from musetalk.batching import CPU_BATCH
from musetalk import live_ice, stopping
from musetalk.config import (LENGTH_MODES, LOOP_MODES, OVERSIZE_MODES, PARSING_MODES, RunOptions, option_names,
                             plan_batch)
from musetalk.engines import ENGINES
from musetalk.errors import InputError, MuseTalkError, WeightsMissingError

logger = logging.getLogger(__name__)

EXIT_JOBS_FAILED = 1  # a batch on a Ray cluster ran, and some of its jobs failed (the summary says which)
EXIT_USER_ERROR = 2
# A command stopped by a signal exits with 128 + the signal's number, as a shell reports it: 130 for
# SIGINT (Ctrl-C), 143 for SIGTERM (kill, docker stop), 129 for SIGHUP (its terminal closed).
EXIT_SIGNAL_BASE = 128
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT
# After a stop, how long the console command waits for the job's threads to end before it leaves
# without running the interpreter's exit (a native thread still running then can abort the process).
THREADS_GRACE_S = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        with stopping.stop_on_signals():
            try:
                return args.handler(args)
            except BaseException as error:
                if stopping.requested() and not isinstance(error, stopping.Stopped):
                    # Whatever failed while the job was stopping (an import cut short, an ffmpeg that
                    # was stopped) is the stop, not an error of its own.
                    stop = stopping.Stopped(stopping.requested_signal())
                    stop.results_kept = getattr(error, "results_kept", 0)
                    raise stop from error
                raise
    except MuseTalkError as error:
        _say(f"musetalk: error: {_first_line(str(error), args.verbose)}", stream=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:  # Stopped (a signal), or Ctrl-C outside a command's stop handling
        number = getattr(stop, "signal_number", None) or signal.SIGINT
        kept = getattr(stop, "results_kept", 0)
        _say(f"musetalk: interrupted by {stopping.signal_name(number)}; the job in progress was stopped and "
             f"nothing of it was written" + (f" ({kept} finished job(s) kept their results)" if kept else ""),
             stream=sys.stderr)
        return EXIT_SIGNAL_BASE + number


def console_main() -> None:
    """The ``musetalk`` console command: ``main``, then, after a stop, a wait for the job's threads."""
    code = main()
    if code > EXIT_SIGNAL_BASE:
        deadline = time.monotonic() + THREADS_GRACE_S
        for thread in threading.enumerate():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threading.enumerate() if thread is not threading.current_thread()):
            # Everything of ours is cleaned up; a library thread still inside native code would make
            # the interpreter's exit abort (signal 6), so leave without it.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)
    sys.exit(code)


def _first_line(message: str, verbose: bool) -> str:
    """An error's first line; the rest (ffmpeg's log) only with -v."""
    first, _, rest = message.partition("\n")
    if not rest.strip() or verbose:
        return message
    return f"{first.rstrip(':')} (musetalk -v ... shows ffmpeg's log)"


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
    run.add_argument("--no-cache", action="store_true",
                     help="neither use nor keep prepared faces (see `musetalk cache`)")
    run.add_argument("--engine", choices=ENGINES, default="musetalk",
                     help="musetalk (the model; needs its weights), draft (the model, decoding with TAESD: several "
                          "times faster, less detail; musetalk download --draft) or preview (no weights, no GPU: a "
                          "real-time CPU preview that redraws the mouth from the speech's loudness or phonemes)")
    run.add_argument("--score", action="store_true",
                     help="measure each result afterwards (lip-sync, silence, identity, stability; see `musetalk score`)")
    _add_speech_arguments(run, "imitate the voice of the video's own speaker (or of FILE); needs a source "
                               "that clones, such as coqui")
    _add_batch_arguments(run)
    _add_model_arguments(run)
    _add_job_arguments(run)
    run.set_defaults(handler=_run)

    voices = commands.add_parser("voices", help="list the audio sources (text to speech) and their voices")
    voices.add_argument("--source", help="only this source, with all its voices")
    voices.set_defaults(handler=_voices)

    tts = commands.add_parser("tts", help="speak text into a WAV file, without a video")
    tts.add_argument("--out", required=True, help="the WAV file to write")
    _add_speech_arguments(tts, "imitate the voice in FILE (a video or audio file); needs a source that clones")
    tts.set_defaults(handler=_tts)

    download = commands.add_parser("download", help="fetch the official weights once")
    download.add_argument("--models-dir", help="default: $MUSETALK_MODELS_DIR, else a per-user cache folder")
    download.add_argument("--version", dest="model_version", choices=("v15", "v1", "all"), default="v15")
    download.add_argument("--scoring", action="store_true",
                          help="also fetch LatentSync's SyncNet (1.4 GB) for the LSE-C/LSE-D scores of `musetalk score`")
    download.add_argument("--draft", action="store_true",
                          help="also fetch TAESD (10 MB), the fast decoder of `musetalk run --engine draft`")
    download.set_defaults(handler=_download)

    score = commands.add_parser("score", help="measure a result: lip-sync, silence, identity, stability, SyncNet")
    score.add_argument("--video", required=True, help="the result video to measure")
    score.add_argument("--source", help="the original video or photo it was made from (for the identity scores)")
    score.add_argument("--audio", help="the speech to judge against (default: the video's own sound)")
    score.add_argument("--loop", choices=LOOP_MODES, default="pingpong",
                       help="the --loop the result was made with, to pair its frames with the source's")
    score.add_argument("--syncnet-stride", type=int, default=1,
                       help="score every N-th SyncNet window only (N times faster on a CPU)")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")
    score.add_argument("--models-dir", help="where `musetalk download --scoring` put the SyncNet weights")
    score.add_argument("--device", default="auto", help="for SyncNet: auto, cuda, cuda:N, mps or cpu")
    score.set_defaults(handler=_score)

    bench = commands.add_parser("bench", help="time every stage of the real pipeline on a clip")
    bench.add_argument("--video", help="a clip with sound to dub with itself (default: a generated one)")
    bench.add_argument("--size", default="1280x720", help="generated clip size (default 1280x720)")
    bench.add_argument("--seconds", type=float, default=10.0, help="generated clip length (default 10)")
    bench.add_argument("--fps", type=float, default=25.0, help="generated clip frame rate (default 25)")
    bench.add_argument("--model", choices=("tiny", "full", "weights"), default="tiny",
                       help="tiny test models (pipeline overhead), full-size random weights, or the installed weights")
    bench.add_argument("--engine", choices=ENGINES, default="musetalk",
                       help="draft: MuseTalk with TAESD's decoder; preview: the preview engine (then --model "
                            "does not apply)")
    bench.add_argument("--batch-size", type=batch_size_argument, default=None,
                       help="frames per model call, or auto (default: 8 on a CPU, what the GPU's memory holds)")
    bench.add_argument("--runs", type=int, default=2, help="the second and later runs find the avatar in the cache")
    bench.add_argument("--cpu-workers", type=int, default=None,
                       help="threads for each per-frame CPU step: face analysis, crops, blending (default: one per "
                            "two cores, up to 4)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--variants", action="store_true",
                       help="time the model alone per frame, as is and in each GPU-path variant (bf16, channels-last, "
                            "attention, cuDNN autotuning, partial decode, tiny decoder; compile with --compile); "
                            "--model tiny or full")
    bench.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="a batch of --jobs short jobs (tiny models) on a Ray cluster against the same jobs one "
                            "after another here: throughput and Ray's cost per job (ADDRESS as for run --ray; "
                            "nothing: a new cluster on this machine, with all its CPUs)")
    bench.add_argument("--jobs", type=int, default=8, help="with --ray: jobs in the batch (default 8)")
    bench.add_argument("--worker-cpus", type=int, default=1, help="with --ray: CPUs per worker (default 1)")
    bench.add_argument("--live", action="store_true",
                       help="a live session fed like a microphone (speech with pauses, --seconds long, on --video or "
                            "the example face): sustained frames/s, skipped frames, mouth-to-speech latency")
    _add_model_arguments(bench)
    bench.set_defaults(handler=_bench)

    live = commands.add_parser("live", help="serve the live page: a prepared face speaks as you talk or type")
    live.add_argument("--video", required=True, help="the face video or photo")
    live.add_argument("--engine", choices=("musetalk", "preview"),
                      help="default: MuseTalk on a GPU with its weights here, else the preview engine")
    live.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    live.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    _add_model_arguments(live)
    live_ice.add_arguments(live)
    live.set_defaults(handler=_live)

    cache = commands.add_parser("cache", help="show or clear the prepared-avatar cache")
    cache.add_argument("action", choices=("list", "clear"), nargs="?", default="list")
    cache.set_defaults(handler=_cache)

    doctor = commands.add_parser("doctor", help="check ffmpeg, MediaPipe, weights, device and versions")
    doctor.add_argument("--models-dir")
    doctor.set_defaults(handler=_doctor)
    return parser


def _add_speech_arguments(parser: argparse.ArgumentParser, clone_help: str) -> None:
    speech = parser.add_argument_group("speech from text")
    speech.add_argument("--text", help="words to speak (instead of --audio)")
    speech.add_argument("--text-file", help="a UTF-8 text file to speak")
    speech.add_argument("--source", default="espeak", help="the audio source (default espeak, offline); "
                                                           "musetalk voices lists them")
    speech.add_argument("--voice", help="a voice id of the source (default: the source's own)")
    speech.add_argument("--tts-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of the source, e.g. rate=150 (repeatable)")
    speech.add_argument("--clone-voice", nargs="?", const=True, metavar="FILE", help=clone_help)


def _add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    batch = parser.add_argument_group("batches (--config)")
    batch.add_argument("--resume", action="store_true", help="skip the jobs whose output is already complete")
    batch.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run the jobs on a Ray cluster: ADDRESS as `ray start --head` printed it (HOST:6379), "
                            "auto, ray://HOST:10001, or nothing: $RAY_ADDRESS, else this machine's cluster, else a new one here "
                            "(pip install 'musetalk-studio[ray]'; docs/cluster.md)")
    batch.add_argument("--worker-cpus", type=int, help="with --ray on a cluster without GPUs: CPUs per worker "
                                                       "(default 2; with GPUs: one worker per GPU)")
    batch.add_argument("--retries", type=int, default=2,
                       help="with --ray: how often a job runs again when its worker dies (default 2)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", help="default: $MUSETALK_MODELS_DIR, else a per-user cache folder")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp16, bf16 or fp32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the models: faster batches after minutes of compiling (long videos)")


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RunOptions field; unset flags keep the defaults (or the YAML entry's value)."""
    defaults = RunOptions()
    job = parser.add_argument_group("job options")
    job.add_argument("--version", dest="model_version", choices=("v15", "v1"), help="model version (default v15)")
    job.add_argument("--extra-margin", type=int, help=f"v1.5: pixels added below the chin (default {defaults.extra_margin})")
    job.add_argument("--bbox-shift", type=int, help="v1.0: move the box's middle line; positive opens the mouth more")
    job.add_argument("--face-index", type=int, help="which face when there are several, 0 = leftmost (default: the largest)")
    job.add_argument("--smoothing", type=float, help=f"temporal smoothing 0..1 (default {defaults.smoothing})")
    job.add_argument("--parsing-mode", choices=PARSING_MODES, help="blend mask (default: the version's official one, jaw for v15, raw for v1)")
    job.add_argument("--left-cheek-width", type=int, help=f"jaw mode cheek band (default {defaults.left_cheek_width})")
    job.add_argument("--right-cheek-width", type=int, help=f"jaw mode cheek band (default {defaults.right_cheek_width})")
    job.add_argument("--no-silence-gate", dest="silence_gate", action="store_const", const=False,
                     help="do not zero non-speech before the audio encoder")
    job.add_argument("--av-offset-ms", type=int, help="delay the audio by this much (negative: earlier)")
    job.add_argument("--loop", choices=LOOP_MODES, help="when the audio is longer than the video (default pingpong)")
    job.add_argument("--length", choices=LENGTH_MODES, help="output length follows the audio (default) or the video")
    job.add_argument("--fps", type=float, help="output frame rate (default: the input's; 25 is the model's)")
    job.add_argument("--batch-size", type=batch_size_argument,
                     help="frames per model call, or auto (default: 8 on a CPU, what the GPU's memory holds)")
    job.add_argument("--crf", type=int, help=f"output quality, 0 best .. 51 worst (default {defaults.crf})")
    job.add_argument("--max-pixels", type=int,
                     help=f"largest picture worked on, in pixels (default {defaults.max_pixels}, 3840x2160)")
    job.add_argument("--oversize", choices=OVERSIZE_MODES,
                     help="a video above --max-pixels: downscale it (default) or refuse it")


def batch_size_argument(value: str) -> int | str:
    """--batch-size N or auto; a bad N is reported by RunOptions.validate, naming the option."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of frames or auto, not {value!r}") from None


def job_options(args: argparse.Namespace, entry: dict | None = None) -> RunOptions:
    """RunOptions from the defaults, then a YAML entry, then the flags the user gave."""
    options = RunOptions()
    if entry:
        options = options.replace(**entry)
    return options.replace(**flag_options(args)).validate()


def flag_options(args: argparse.Namespace) -> dict:
    """The job options given on the command line (they win over a job file's), by RunOptions name."""
    given = {name: getattr(args, name, None) for name in option_names() if name != "version"}
    given["version"] = getattr(args, "model_version", None)
    changes = {k: v for k, v in given.items() if v is not None}
    if changes.get("batch_size") == "auto":
        changes["batch_size"] = None  # said on the command line: it overrides a job file's number
    return changes


def _run(args: argparse.Namespace) -> int:
    from musetalk import video_io

    speech_given = args.text is not None or args.text_file is not None
    # 1. Every job checked before any model loads, speech is spoken or a file is written
    if args.config:
        if args.video or args.audio or args.out or speech_given:
            raise InputError("give either --config or --video/--audio (or --text)/--out, not both")
        jobs = [(job.video, job.audio, job.output, job.options)
                for job in plan_batch(args.config, args.out_dir, flag_options(args))]
        if args.ray is not None:
            return _run_on_ray(args, jobs)
        if args.resume:
            jobs = _without_finished(jobs)
    else:
        if args.ray is not None or args.resume:
            raise InputError("--ray and --resume go with --config jobs.yaml")
        if speech_given and args.audio:
            raise InputError("give either --audio or --text/--text-file, not both")
        if args.clone_voice is not None and not speech_given:
            raise InputError("--clone-voice goes with --text or --text-file")
        missing = [flag for flag, value in (("--video", args.video), ("--audio", args.audio or speech_given),
                                            ("--out", args.out)) if not value]
        if missing:
            raise InputError(f"musetalk run needs {', '.join(missing)} (--text or --text-file instead of --audio; "
                             f"or --config jobs.yaml)")
        options = job_options(args)
        video_io.check_output_path(args.out)
        video_io.require_output_suffix(args.out)
        jobs = [(args.video, None if speech_given else args.audio, args.out, options)]

    # 2. The jobs, one model load per version; a stop is noticed between frames, batches and sentences
    pipelines: dict[str, object] = {}
    done = 0
    try:
        with stopping.deferred():
            for video, audio, out, options in jobs:
                stopping.check()  # between jobs
                if audio is None:
                    audio = _speech_for_run(args)
                pipeline = pipelines.get(options.version)
                if pipeline is None:  # loading is not interrupted (a native import cut short fails oddly)
                    pipeline = pipelines[options.version] = _load_pipeline(args, options.version)
                    stopping.check()
                with _ProgressBars() as bars:
                    result = pipeline(video, audio, out, options, progress=bars.update)
                done += 1
                _say(f"wrote {result.output_path} ({result.engine} engine): {result.num_frames} frames at "
                     f"{result.fps:g} fps, {result.width}x{result.height}, {result.duration:.2f} s, face in "
                     f"{result.frames_with_face} frames")
                _say("  time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
                for note in result.notes:
                    _say(f"  note: {note}", stream=sys.stderr)
                if args.score:
                    with stopping.interruptible():
                        _score_result(result, video, getattr(audio, "path", audio), options, args)
    except BaseException as error:  # how many results are kept, for the message of a stop
        error.results_kept = done
        raise
    return 0


def _without_finished(jobs: list[tuple]) -> list[tuple]:
    from musetalk.cluster import is_complete

    left = [job for job in jobs if not is_complete(job[2])]
    if len(left) < len(jobs):
        _say(f"--resume: skipping {len(jobs) - len(left)} job(s) whose output is complete")
    return left


def _run_on_ray(args: argparse.Namespace, jobs: list[tuple]) -> int:
    """The jobs on a Ray cluster's workers, one progress bar for the batch, then the summary table."""
    from musetalk import cluster

    settings = cluster.WorkerSettings(
        models_dir=os.path.abspath(args.models_dir) if args.models_dir else None, device=args.device,
        dtype=args.dtype, engine=args.engine, compile=args.compile, use_cache=not args.no_cache, score=args.score,
        worker_cpus=args.worker_cpus or cluster.DEFAULT_WORKER_CPUS)
    if settings.worker_cpus < 1 or args.retries < 0:
        raise InputError("--worker-cpus must be 1 or more and --retries 0 or more")
    with _BatchBar() as bar:
        report = cluster.run_batch(cluster.batch_jobs(jobs), args.ray or None, settings, resume=args.resume,
                                   retries=args.retries, progress=bar.update, worker_logs=args.verbose)
    for line in cluster.format_summary(report):
        _say(line)
    if report.interrupted:
        return EXIT_INTERRUPTED
    return 0 if report.ok else EXIT_JOBS_FAILED


def _load_pipeline(args: argparse.Namespace, version: str):
    from musetalk.pipeline import LipSyncPipeline

    try:
        return LipSyncPipeline.from_pretrained(args.models_dir, version, args.device, args.dtype,
                                               cache_dir=False if args.no_cache else None, engine=args.engine,
                                               compile=args.compile)
    except WeightsMissingError as error:
        raise WeightsMissingError(f"{error} (or add --engine preview: a preview that needs no weights)") from error


def _score_result(result, video: str, audio: str, options: RunOptions, args: argparse.Namespace) -> None:
    """Measure a finished job against its inputs; fills ``result.metrics`` and prints the table."""
    from musetalk import metrics

    with _ProgressBars() as bars:
        scores = metrics.score_video(result.output_path, source=video, audio=audio, progress=bars.update,
                                     models_dir=args.models_dir, loop=options.loop, device=args.device)
    result.metrics.update({name: value for name, value in scores.as_dict().items() if value is not None})
    _say(metrics.format_table(scores))


def _score(args: argparse.Namespace) -> int:
    import json

    from musetalk import metrics

    with _ProgressBars() as bars:
        scores = metrics.score_video(args.video, source=args.source, audio=args.audio, progress=bars.update,
                                     models_dir=args.models_dir, loop=args.loop, device=args.device,
                                     syncnet_stride=args.syncnet_stride)
    if args.json:
        _say(json.dumps({"video": args.video, "source": args.source, "scores": scores.as_dict(),
                         "reasons": scores.reasons}, indent=2))
    else:
        _say(metrics.format_table(scores))
    return 0


def _speech_for_run(args: argparse.Namespace):
    """The speech to dub with (an AudioClip: its WAV, and its phoneme timings when the source gave
    them), spoken from --text / --text-file before any model loads."""
    if not os.path.isfile(args.video):
        raise InputError(f"the video {args.video} does not exist")
    clip = _speak(args, clone_from=args.video if args.clone_voice is True else args.clone_voice)
    _say(f"speech: {clip.duration:.2f} s from {clip.source} (voice {clip.voice})")
    return clip


def _speak(args: argparse.Namespace, clone_from: str | None, out_path: str | None = None):
    """Text of --text / --text-file spoken by the chosen source, with a progress bar over its sentences."""
    from musetalk import speech

    if args.text is not None and args.text_file is not None:
        raise InputError("give either --text or --text-file, not both")
    if args.text is None and args.text_file is None:
        raise InputError('give the words to speak: --text "..." or --text-file script.txt')
    text = speech.read_text_file(args.text_file) if args.text_file is not None else args.text
    options = {}
    for pair in args.tts_option:
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise InputError(f"--tts-option takes NAME=VALUE, got {pair!r}")
        options[name.strip()] = value
    with _ProgressBars() as bars:
        return speech.speech_for_video(text, args.source, args.voice, options, clone_from=clone_from,
                                       progress=lambda done, total: bars.update("speech", done, total),
                                       out_path=out_path)


def _voices(args: argparse.Namespace) -> int:
    from musetalk import plugins

    sources = [plugins.get_source(args.source)] if args.source else list(plugins.audio_sources().values())
    for source in sources:
        ok, reason = source.available()
        voices = source.voices() if ok is not False or args.source else []
        if ok is None:
            ok, reason = source.available()  # listing the voices may have reached an online service
        state = {True: "usable", False: "NOT usable", None: "not known to work here yet"}[ok]
        clones = ", clones voices" if source.can_clone else ""
        _say(f"{source.id}: {source.label} ({state}{clones}): {reason}")
        if source.options:
            _say("  options: " + ", ".join(f"{name}={value!r}" for name, value in source.options.items()))
        for voice in voices:
            _say(f"  {voice.id:<32} {voice.label}" + (f" [{voice.language}]" if voice.language else ""))
    for problem in plugins.plugin_problems():
        _say(f"plugin problem: {problem}", stream=sys.stderr)
    return 0


def _tts(args: argparse.Namespace) -> int:
    from musetalk import speech, video_io

    if args.clone_voice is True:
        raise InputError("musetalk tts --clone-voice needs FILE: the video or audio whose voice to imitate")
    speech.check_wav_output(args.out)  # before anything is spoken
    with stopping.deferred(), video_io.folders_for(args.out):
        clip = _speak(args, args.clone_voice, out_path=args.out)
    _say(f"wrote {clip.path}: {clip.duration:.2f} s of speech from {clip.source} (voice {clip.voice})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from musetalk import bench, model_bench

    batch_size = None if args.batch_size == "auto" else args.batch_size
    if args.ray is not None:
        return _bench_cluster(args)
    if args.live:
        return _bench_live(args)
    if args.variants:
        variants = model_bench.time_variants(args.model, args.device, args.dtype, batch_size or CPU_BATCH,
                                             with_compile=args.compile,
                                             progress=lambda name: _say(f"timing {name} ...", sys.stderr))
        for line in ([variants.as_json()] if args.json else model_bench.format_variants(variants)):
            _say(line)
        return 0

    width, height = _bench_size(args.size)
    with _ProgressBars() as bars:
        report = bench.run_bench(args.model, args.video, width, height, args.seconds, args.fps, args.models_dir,
                                 args.device, args.dtype, batch_size, args.runs, progress=bars.update,
                                 engine=args.engine, compile=args.compile, cpu_workers=args.cpu_workers)
    for line in ([report.as_json()] if args.json else bench.format_report(report)):
        _say(line)
    return 0


def _bench_live(args: argparse.Namespace) -> int:
    from pathlib import Path

    from musetalk import live_bench
    from musetalk.audio import load_audio
    from musetalk.pipeline import LipSyncPipeline

    examples = Path(__file__).resolve().parent.parent / "examples"
    video = args.video or str(examples / "face.mp4")
    if not Path(video).is_file():
        raise InputError(f"the face video {video} does not exist; give one with --video")
    speech = load_audio(video if args.video and _has_audio(video) else examples / "speech.wav")
    if args.engine == "preview":
        pipeline = LipSyncPipeline.from_pretrained(engine="preview", cache_dir=False)
    else:
        pipeline = LipSyncPipeline.from_pretrained(args.models_dir, device=args.device, dtype=args.dtype,
                                                   engine=args.engine, cache_dir=False)
    report = live_bench.run_live_bench(pipeline, video, speech, args.seconds)
    for line in ([report.as_json()] if args.json else live_bench.format_report(report)):
        _say(line)
    return 0


def _has_audio(path: str) -> bool:
    from musetalk.video_io import probe

    return probe(path).has_audio


def _live(args: argparse.Namespace) -> int:
    from musetalk import live_page
    from musetalk.live_rtc import LiveRegistry
    from musetalk.studio import Studio, StudioConfig

    video = os.path.abspath(args.video)
    if not os.path.isfile(video):
        raise InputError(f"the face video {args.video} does not exist; check the path")
    config = StudioConfig.from_env(models_dir=args.models_dir, device=args.device, dtype=args.dtype,
                                   **live_ice.from_arguments(args))
    services = Studio(config)
    registry = LiveRegistry(services.work_dir / "live")
    try:
        demo = live_page.build_live_page(services, registry, video, engine=args.engine)
        demo.queue(default_concurrency_limit=2)
        _say(f"musetalk live: http://{args.host}:{args.port} (Ctrl-C stops)", stream=sys.stderr)
        live_page.launch_with_live(demo, registry, config.ice_settings(), server_name=args.host,
                                   server_port=args.port, allowed_paths=[os.path.dirname(video)], quiet=True)
    finally:
        registry.close_all()
        services.close()
    return 0


def _bench_cluster(args: argparse.Namespace) -> int:
    from musetalk import cluster_bench

    width, height = _bench_size(args.size)
    with _BatchBar() as bar:
        report = cluster_bench.run_cluster_bench(args.ray or None, args.jobs, width, height, args.seconds, args.fps,
                                                 args.worker_cpus, progress=bar.update)
    for line in ([report.as_json()] if args.json else cluster_bench.format_cluster_report(report)):
        _say(line)
    return 0


def _bench_size(size: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise InputError(f"--size must look like 1280x720, not {size!r}") from None
    return width, height


def _cache(args: argparse.Namespace) -> int:
    from musetalk.avatar import AvatarCache

    cache = AvatarCache()
    if args.action == "clear":
        _say(f"removed {cache.clear() / 2**20:.1f} MB from {cache.root}")
        return 0
    entries = cache.entries()
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        _say(f"{entry.key}  {entry.size / 2**20:7.1f} MB  {entry.frames:6d} frames  used {used}  {entry.video}")
    _say(f"{len(entries)} entries, {sum(e.size for e in entries) / 2**20:.1f} MB of "
         f"{cache.limit_bytes / 2**20:.0f} MB in {cache.root}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from musetalk import weights

    paths = weights.download(args.model_version, args.models_dir, scoring=args.scoring, draft=args.draft)
    _say(f"{len(paths)} files ready in {weights.models_dir_or_default(args.models_dir)}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from musetalk import doctor

    report = doctor.check(args.models_dir)
    width = max(len(row.name) for row in report)
    for row in report:
        mark = "ok  " if row.ok else "FAIL" if row.required else "--  "  # optional and not there: no failure
        _say(f"{mark} {row.name.ljust(width)}  {row.detail}")
    return 0 if all(row.ok or not row.required for row in report) else 1


class _ProgressBars:
    """One tqdm bar per pipeline stage, on stderr. Never a reason for a job to fail or hang: a signal
    does not interrupt a bar's output (``stopping.shielded``), and a stderr that can no longer be
    written (a closed terminal, a reader gone) turns the bars off."""

    LABELS = {"faces": "face analysis", "generate": "generating", "speech": "speaking"}
    UNITS = {"speech": "sentence"}

    def __init__(self):
        self.bars: dict[str, object] = {}
        self._broken = False

    def update(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._broken:
            return
        with stopping.shielded():
            try:
                bar = self.bars.get(stage)
                if bar is None:
                    tqdm.monitor_interval = 0  # no monitor thread: nothing of tqdm's runs beside the job
                    bar = self.bars[stage] = tqdm(total=total, desc=self.LABELS.get(stage, stage),
                                                  unit=self.UNITS.get(stage, "frame"),
                                                  leave=False, file=sys.stderr)
                if total != bar.total:
                    bar.total = max(total, done)
                bar.update(done - bar.n)
            except (OSError, ValueError):  # stderr closed or gone (ValueError: a closed file)
                self._broken = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        # The lowest bar first, so the cursor ends where the first bar was and what is printed
        # next (a result, an error) starts on a clean line.
        with stopping.shielded():
            for bar in reversed(list(self.bars.values())):
                try:
                    bar.close()
                except (OSError, ValueError):
                    bar.disable = True  # its output has nowhere to go; it holds nothing else


class _BatchBar:
    """One bar for a batch on a cluster, on stderr: jobs finished, frames per second, time left."""

    def __init__(self):
        self.bar = None

    def update(self, progress) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=progress.total, desc="jobs", file=sys.stderr, mininterval=0.5,
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}")
        self.bar.update(progress.finished - self.bar.n)
        if not progress.workers:
            self.bar.set_postfix_str("starting the workers")
            return
        parts = [f"{progress.fps:.1f} frames/s", f"{len(progress.running)} running on {progress.workers} workers"]
        if progress.seconds_left is not None:
            parts.append(f"about {tqdm.format_interval(progress.seconds_left)} left")
        if progress.failed:
            parts.append(f"{progress.failed} failed")
        self.bar.set_postfix_str(", ".join(parts))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _say(line: str, stream=None) -> None:
    """The command's own output (results, tables, errors), as opposed to logging. A stream that can no
    longer be written (the terminal closed: SIGHUP) loses the line rather than failing the command."""
    with stopping.shielded():
        try:
            target = stream or sys.stdout
            target.write(line + "\n")
            target.flush()
        except (OSError, ValueError):
            pass


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


if __name__ == "__main__":
    console_main()
