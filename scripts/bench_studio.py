"""What the studio's extras cost: a preview dub alone against the studio's Generate (the dub with its
side-by-side video and scores), and how soon the first stream segment is there.

    python scripts/bench_studio.py                 # the example face, 7.6 s of the example speech
    python scripts/bench_studio.py --seconds 4 --rounds 5 --json

Each round runs the dub alone (the pipeline, as Generate runs it) and then Generate, both streaming
into a fresh folder, after one warm-up job (models loaded, the face's prepared avatar cached, as on
a second dub of the same video). Reported per round and as medians: the dub's seconds, Generate's,
their difference (the extras) and its share of the dub, the same in CPU seconds (this process and its
ffmpeg children: less swayed by other work on a shared machine than the wall clock), and the seconds
from the call to the first finished HLS segment. Figures go to docs/performance.md, never into tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
EXAMPLES = CHECKOUT / "examples"
POLL_SECONDS = 0.01  # how often the stream folder is looked at (the app looks every 0.2 s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(EXAMPLES / "face.mp4"))
    parser.add_argument("--audio", default=str(EXAMPLES / "speech.wav"))
    parser.add_argument("--seconds", type=float, default=None, help="cut the audio to this long (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(CHECKOUT))  # this checkout's musetalk, whatever another install puts on the path

    from musetalk.config import RunOptions
    from musetalk.studio import Speech, Studio, StudioConfig

    with tempfile.TemporaryDirectory(prefix="bench-studio-") as work:
        work = Path(work)
        audio = _cut_audio(args.audio, args.seconds, work) if args.seconds else args.audio
        studio = Studio(StudioConfig(work_dir=str(work / "studio")))
        options, speech = RunOptions(), Speech(audio=str(audio))
        pipeline = studio.pipeline(options.version, engine="preview")

        def dub(stream_dir: Path) -> object:
            return pipeline(args.video, str(audio), stream_dir / "dubbed.mp4", options, stream_dir=stream_dir)

        def generate(stream_dir: Path) -> object:
            return studio.generate(args.video, speech, options, engine="preview", stream_dir=stream_dir)

        _timed(generate, work / "warm-up")
        rounds = []
        for number in range(args.rounds):
            dub_seconds, dub_cpu, dub_first = _timed(dub, work / f"dub-{number}")
            job_seconds, job_cpu, job_first = _timed(generate, work / f"generate-{number}")
            rounds.append({"dub_s": dub_seconds, "generate_s": job_seconds, "extras_s": job_seconds - dub_seconds,
                           "extras_share": (job_seconds - dub_seconds) / dub_seconds,
                           "dub_cpu_s": dub_cpu, "generate_cpu_s": job_cpu,
                           "extras_cpu_share": (job_cpu - dub_cpu) / dub_cpu,
                           "first_segment_dub_s": dub_first, "first_segment_generate_s": job_first})
        studio.close()
    medians = {name: statistics.median(r[name] for r in rounds if r[name] is not None) for name in rounds[0]}
    if args.json:
        print(json.dumps({"rounds": rounds, "median": medians}, indent=2))
    else:
        for number, figures in enumerate(rounds, start=1):
            print(f"round {number}: " + _line(figures))
        print("median:  " + _line(medians))
    return 0


def _timed(work, stream_dir: Path) -> tuple[float, float, float | None]:
    """(seconds ``work(stream_dir)`` took, CPU seconds it used, seconds until the first stream segment
    was finished)."""
    from musetalk import studio as studio_lib

    stream_dir.mkdir(parents=True)
    cpu, started = _cpu_seconds(), time.perf_counter()
    first = None
    for kind, _value in studio_lib.watch(lambda progress: work(stream_dir), stream_dir, POLL_SECONDS):
        if kind == "segment" and first is None:
            first = time.perf_counter() - started
    return time.perf_counter() - started, _cpu_seconds() - cpu, first


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
    first = figures["first_segment_generate_s"]
    return (f"dub {figures['dub_s']:.2f} s, generate {figures['generate_s']:.2f} s, extras "
            f"{figures['extras_s']:+.2f} s ({100 * figures['extras_share']:+.0f}% of the dub; CPU "
            f"{figures['dub_cpu_s']:.2f} / {figures['generate_cpu_s']:.2f} s, "
            f"{100 * figures['extras_cpu_share']:+.0f}%), first segment "
            f"{figures['first_segment_dub_s']:.2f} s (dub) / " + (f"{first:.2f} s" if first is not None else "n/a")
            + " (generate)")


if __name__ == "__main__":
    sys.exit(main())
