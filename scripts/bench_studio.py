"""What the studio's extras cost: a preview dub alone against the studio's Generate (the dub with its
scores), then the side-by-side video made after it, and how soon the first stream segment is there.

    python scripts/bench_studio.py                 # the example face, all 7.6 s of the example speech
    python scripts/bench_studio.py --seconds 4 --rounds 5 --json

After one warm-up job (models loaded), each round runs, in turn, the dub alone (the pipeline, as
Generate runs it) and Generate, both streaming into a fresh folder, then the side-by-side of
Generate's dub (as the page asks for it once the dub is there): first with the video's faces
analysed again (the first dub of a video: its prepared-avatar cache emptied before), then with them
cached (a second dub of the same video). Reported per round and as medians: the dub's seconds,
Generate's, their difference (the extras) and its share of the dub; the same in CPU seconds (this
process and its ffmpeg children: less swayed by other work on a shared machine than the wall clock);
the side-by-side's seconds and CPU seconds; and the seconds from the call to the first finished HLS
segment. Figures go to docs/performance.md, never into tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
EXAMPLES = CHECKOUT / "examples"
POLL_SECONDS = 0.01  # how often the stream folder is looked at (the app looks every 0.2 s)
CASES = ("first", "cached")  # the video's faces analysed in the job, or found in the avatar cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(EXAMPLES / "face.mp4"))
    parser.add_argument("--audio", default=str(EXAMPLES / "speech.wav"))
    parser.add_argument("--seconds", type=float, default=None, help="cut the audio to this long (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(CHECKOUT))  # this checkout's musetalk, whatever another install puts on the path

    with tempfile.TemporaryDirectory(prefix="bench-studio-") as work:
        results = _bench(args, Path(work))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for case in CASES:
            for number, figures in enumerate(results[case]["rounds"], start=1):
                print(f"{case} dub, round {number}: " + _line(figures))
            print(f"{case} dub, median:  " + _line(results[case]["median"]))
    return 0


def _bench(args, work: Path) -> dict:
    from musetalk.avatar import CACHE_DIR_ENV

    cache = work / "avatar-cache"
    os.environ[CACHE_DIR_ENV] = str(cache)  # the pipeline's cache, emptied for the first-dub case

    from musetalk.config import RunOptions
    from musetalk.studio import Speech, Studio, StudioConfig

    audio = _cut_audio(args.audio, args.seconds, work) if args.seconds else args.audio
    studio = Studio(StudioConfig(work_dir=str(work / "studio")))
    options, speech = RunOptions(), Speech(audio=str(audio))
    pipeline = studio.pipeline(options.version, engine="preview")

    def dub(stream_dir: Path) -> object:
        return pipeline(args.video, str(audio), stream_dir / "dubbed.mp4", options, stream_dir=stream_dir)

    jobs = []

    def generate(stream_dir: Path) -> object:
        jobs.append(studio.generate(args.video, speech, options, engine="preview", stream_dir=stream_dir))

    def side_by_side() -> tuple[float, float]:
        cpu, started = _cpu_seconds(), time.perf_counter()
        studio.side_by_side(args.video, jobs[-1].output, options.loop)
        return time.perf_counter() - started, _cpu_seconds() - cpu

    _timed(generate, work / "warm-up")
    side_by_side()
    rounds: dict[str, list[dict]] = {case: [] for case in CASES}
    for number in range(args.rounds):
        for case in CASES:
            measured = {}
            for name, work_of in (("dub", dub), ("generate", generate)):
                if case == "first":
                    shutil.rmtree(cache, ignore_errors=True)
                measured[name] = _timed(work_of, work / f"{case}-{name}-{number}")
            rounds[case].append(_figures(measured["dub"], measured["generate"], side_by_side()))
    studio.close()
    return {case: {"rounds": found, "median": _medians(found)} for case, found in rounds.items()}


def _figures(dub: tuple, generate: tuple, side_by_side: tuple) -> dict:
    (dub_s, dub_cpu, dub_first), (job_s, job_cpu, job_first), (side_s, side_cpu) = dub, generate, side_by_side
    return {"dub_s": dub_s, "generate_s": job_s, "extras_s": job_s - dub_s, "extras_share": (job_s - dub_s) / dub_s,
            "dub_cpu_s": dub_cpu, "generate_cpu_s": job_cpu, "extras_cpu_share": (job_cpu - dub_cpu) / dub_cpu,
            "side_by_side_s": side_s, "side_by_side_cpu_s": side_cpu,
            "first_segment_dub_s": dub_first, "first_segment_generate_s": job_first}


def _medians(rounds: list[dict]) -> dict:
    return {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}


def _timed(work, stream_dir: Path) -> tuple[float, float, float]:
    """(seconds ``work(stream_dir)`` took, CPU seconds it used, seconds until the first stream segment
    was finished: the job's whole time when it finished none before it ended)."""
    from musetalk import studio as studio_lib

    stream_dir.mkdir(parents=True)
    cpu, started = _cpu_seconds(), time.perf_counter()
    first = None
    for kind, _value in studio_lib.watch(lambda progress: work(stream_dir), stream_dir, POLL_SECONDS):
        if kind == "segment" and first is None:
            first = time.perf_counter() - started
    seconds = time.perf_counter() - started
    return seconds, _cpu_seconds() - cpu, first if first is not None else seconds


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process and of its children that ended (ffmpeg's are waited for)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cut_audio(path: str, seconds: float, work: Path) -> Path:
    from musetalk import video_io

    cut = work / "speech.wav"
    video_io.run_ffmpeg(["-i", path, "-t", f"{seconds:.3f}", "-y", str(cut)], "cut the benchmark's audio")
    return cut


def _line(figures: dict) -> str:
    return (f"dub {figures['dub_s']:.2f} s, generate {figures['generate_s']:.2f} s, extras "
            f"{figures['extras_s']:+.2f} s ({100 * figures['extras_share']:+.0f}% of the dub; CPU "
            f"{figures['dub_cpu_s']:.2f} / {figures['generate_cpu_s']:.2f} s, "
            f"{100 * figures['extras_cpu_share']:+.0f}%); then the side-by-side {figures['side_by_side_s']:.2f} s "
            f"(CPU {figures['side_by_side_cpu_s']:.2f} s); first segment {figures['first_segment_dub_s']:.2f} s "
            f"(dub) / {figures['first_segment_generate_s']:.2f} s (generate)")


if __name__ == "__main__":
    sys.exit(main())
