"""``musetalk bench --ray``: a batch of short jobs on a Ray cluster against the same jobs run one
after another in this process, with the tiny test models (what the batch machinery costs, not
the model).

Both sides dub the same generated clip with its own sound, every job in full (the avatar cache
is off on both: a cached second dub would make the comparison one of cache hits). Reported:
the batch's wall time with and without the workers' start (their models loading), the
throughput ratio, and the time Ray adds to each job (from the driver handing it out to its
result coming back, less the job's own time on its worker).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from musetalk.config import RunOptions
from musetalk.errors import InputError


@dataclass
class ClusterBenchReport:
    jobs: int
    frames_per_job: int
    clip: str
    sequential_load_seconds: float  # this process loading the models
    sequential_seconds: float  # the jobs one after another, models loaded
    sequential_job_seconds: float  # mean time of one job there
    workers: int
    worker_cpus: int
    torch_threads: int  # this process' torch threads for the sequential side
    batch_seconds: float  # the whole batch: connecting, starting the workers, every job
    start_seconds: float  # until the first worker had its models loaded
    run_seconds: float  # first job handed out to last result
    worker_job_seconds: float  # mean time of one job on its worker
    overhead_seconds: float  # mean round trip less the job's own time: what Ray adds per job
    overhead_max_seconds: float
    speedup: float  # sequential_seconds / run_seconds (models loaded on both sides)
    speedup_with_start: float  # (load + sequential) / batch_seconds

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def run_cluster_bench(address: str | None = None, jobs: int = 8, width: int = 640, height: int = 360,
                      seconds: float = 2.0, fps: float = 25.0, worker_cpus: int = 1, progress=None
                      ) -> ClusterBenchReport:
    """``address``: the cluster (None: a new one on this machine, with all its CPUs).
    ``progress``: the batch's callback (``cluster.BatchProgress``)."""
    import torch

    from musetalk import cluster
    from musetalk.bench import make_clip
    from musetalk.pipeline import LipSyncPipeline
    from musetalk.testing import save_tiny_models

    if jobs < 1 or worker_cpus < 1:
        raise InputError("--jobs and --worker-cpus must be 1 or more")
    with tempfile.TemporaryDirectory(prefix="musetalk-cluster-bench-") as temp:
        work = Path(temp)
        models = save_tiny_models(work / "models", ("v15",))
        clip = make_clip(work / "clip.mp4", width, height, seconds, fps)
        batch = [cluster.BatchJob(str(clip), str(clip), str(work / "ray" / f"job{index}.mp4"), RunOptions())
                 for index in range(jobs)]

        started = time.perf_counter()
        pipeline = LipSyncPipeline.from_pretrained(models, "v15", "cpu", cache_dir=False)
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        frames = 0
        for job in batch:
            frames = pipeline(job.video, job.audio, work / "sequential" / Path(job.output).name, job.options).num_frames
        sequential = time.perf_counter() - started
        del pipeline

        settings = cluster.WorkerSettings(models_dir=str(models), device="cpu", use_cache=False,
                                          worker_cpus=worker_cpus)
        report = cluster.run_batch(batch, address or "local", settings, progress=progress)
        if not report.ok:
            raise InputError("the benchmark batch failed: " + "; ".join(o.error for o in report.outcomes if o.error))
    overheads = [o.round_trip_seconds - o.seconds for o in report.outcomes]
    return ClusterBenchReport(
        jobs, frames, f"generated {width}x{height}, {seconds:g} s at {fps:g} fps", round(load_seconds, 2),
        round(sequential, 2), round(sequential / jobs, 3), report.workers, worker_cpus, torch.get_num_threads(),
        round(report.seconds, 2), round(report.start_seconds, 2), round(report.run_seconds, 2),
        round(sum(o.seconds for o in report.outcomes) / jobs, 3), round(sum(overheads) / jobs, 4),
        round(max(overheads), 4), round(sequential / report.run_seconds, 2),
        round((load_seconds + sequential) / report.seconds, 2))


def format_cluster_report(report: ClusterBenchReport) -> list[str]:
    return [
        f"{report.jobs} jobs of {report.frames_per_job} frames ({report.clip}), tiny models, avatar cache off",
        f"one process ({report.torch_threads} torch threads): models {report.sequential_load_seconds:.2f} s, "
        f"jobs {report.sequential_seconds:.2f} s ({report.sequential_job_seconds:.2f} s a job)",
        f"cluster ({report.workers} workers of {report.worker_cpus} CPU{'s' if report.worker_cpus > 1 else ''}): "
        f"{report.batch_seconds:.2f} s in all, first worker ready after {report.start_seconds:.2f} s, "
        f"jobs {report.run_seconds:.2f} s ({report.worker_job_seconds:.2f} s a job on its worker)",
        f"throughput: {report.speedup:.2f}x one process once the models are loaded, "
        f"{report.speedup_with_start:.2f}x counting the start",
        f"Ray's cost per job (round trip less the job's own time): {1000 * report.overhead_seconds:.1f} ms "
        f"on average, {1000 * report.overhead_max_seconds:.1f} ms at most",
    ]
