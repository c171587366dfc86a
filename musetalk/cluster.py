"""Batch dubbing on a Ray cluster: the jobs of a YAML file, across the cluster's workers.

One worker (a Ray actor) per GPU, or per ``worker_cpus`` CPUs on a cluster without GPUs,
loads the models once and runs jobs one after another. This process, the driver, hands the
jobs out itself rather than leaving that to Ray, because it knows things Ray does not:

- the prepared-avatar cache is per node, so a job goes to a node that already prepared its
  video when that node has a free worker (``choose_job``);
- a job whose worker died (killed, out of memory, node lost) runs again on another worker, up
  to ``retries`` times, and what the dead worker's encoder left of the output is removed;
- a job that fails for its input (no face, a bad file) is not retried: its error goes into
  the summary.

Jobs carry paths, never video bytes: inputs, outputs and (optionally) the models live on
storage that every node and the driver mount at the same path (docs/cluster.md).

This is the only module that imports ray, and only inside functions: without
``pip install 'musetalk-studio[ray]'`` the rest of the package works as before.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from musetalk.avatar import FACE_OPTIONS
from musetalk.config import RunOptions
from musetalk.errors import ClusterError, MuseTalkError

logger = logging.getLogger(__name__)

DEFAULT_RETRIES = 2  # a job's worker may die this many times; the job then fails
DEFAULT_WORKER_CPUS = 2  # CPUs of one worker where the cluster has no GPU
POLL_SECONDS = 0.25  # how often the driver looks at the workers' progress
REPORT_SECONDS = 0.25  # how often a worker reports a job's progress
# A dead worker's ffmpeg finishes its temporary file on its own once its input pipe closes; the
# file is removed when nothing has written to it for this long (or after PARTIAL_PATIENCE_SECONDS).
PARTIAL_QUIET_SECONDS = 2.0
PARTIAL_PATIENCE_SECONDS = 120.0
CONNECT_SECONDS = 5.0  # to find out that nothing listens at a cluster's address
START_FAILURES_PER_NODE = 2  # workers that died while loading their models before a node is left out


@dataclass(frozen=True)
class BatchJob:
    """One job: absolute paths, as every node sees them, and its options."""

    video: str
    audio: str
    output: str
    options: RunOptions = field(default_factory=RunOptions)

    @property
    def name(self) -> str:
        return Path(self.output).name


@dataclass(frozen=True)
class WorkerSettings:
    """How each worker loads its models (the flags of ``musetalk run`` that are not job options)."""

    models_dir: str | None = None  # None: each node's MUSETALK_MODELS_DIR, else its per-user cache
    device: str = "auto"  # "cpu" keeps the workers off the GPUs; otherwise one worker per GPU when there are any
    dtype: str | None = "auto"
    engine: str = "musetalk"
    compile: bool = False
    use_cache: bool = True  # the node's prepared-avatar cache
    score: bool = False  # measure each result on its worker (musetalk score)
    worker_cpus: int = DEFAULT_WORKER_CPUS  # CPUs per worker on a cluster without GPUs


@dataclass
class JobOutcome:
    job: BatchJob
    status: str = "pending"  # "done", "skipped" (--resume found it complete) or "failed"
    node_id: str = ""  # the Ray node the last attempt ran on
    node: str = ""  # that node's address and the start of its id, for people
    worker: str = ""  # which worker: "w3 (pid 1234)"
    attempts: int = 0
    seconds: float = 0.0  # the last attempt, on its worker
    round_trip_seconds: float = 0.0  # the last attempt as the driver saw it: handed out to result back
    frames: int = 0
    cache_hit: bool | None = None  # the node had the video's prepared avatar (None: no cache, or not run)
    scores: dict[str, float | None] = field(default_factory=dict)
    error: str = ""


@dataclass
class BatchReport:
    outcomes: list[JobOutcome]
    seconds: float  # the whole batch: connecting, starting the workers, every job
    workers: int  # workers that took part (replacements of dead ones included)
    start_seconds: float = 0.0  # until the first worker had loaded its models
    run_seconds: float = 0.0  # from the first job handed out to the last result
    interrupted: bool = False  # Ctrl-C or SIGTERM stopped it: the jobs not done are "failed"

    @property
    def ok(self) -> bool:
        return all(outcome.status in ("done", "skipped") for outcome in self.outcomes)


@dataclass(frozen=True)
class RunningJob:
    name: str
    worker: str
    pid: int
    frames_done: int
    frames_total: int  # 0 until the job knows its length


@dataclass(frozen=True)
class BatchProgress:
    total: int
    finished: int  # done, failed or skipped
    failed: int
    running: tuple[RunningJob, ...]
    workers: int  # workers with their models loaded
    frames_done: int
    fps: float  # output frames per second of the whole batch, since its first job started
    seconds_left: float | None  # None until a job has said how long it is


# --------------------------------------------------------------------------- planning


def plan_jobs(config: str | os.PathLike, out_dir: str | os.PathLike = "results",
              flags: argparse.Namespace | None = None) -> list[BatchJob]:
    """The jobs of a YAML file, planned exactly as ``musetalk run --config`` plans them.
    ``flags``: ``musetalk run``'s parsed arguments, whose job options override the file's
    (None: the file's own options)."""
    from musetalk.cli import flag_options
    from musetalk.config import plan_batch

    overrides = flag_options(flags) if flags is not None else {}
    return batch_jobs([(job.video, job.audio, job.output, job.options)
                       for job in plan_batch(config, out_dir, overrides)])


def batch_jobs(planned: list[tuple]) -> list[BatchJob]:
    """Planned jobs (video, audio, output, RunOptions: ``config.plan_batch``'s, the same rules as without
    Ray) with absolute paths, as the workers need them."""
    return [BatchJob(os.path.abspath(video), os.path.abspath(audio), os.path.abspath(output), options)
            for video, audio, output, options in planned]


def is_complete(output: str | os.PathLike) -> bool:
    """The output exists and is a readable video. A writer renames its temporary file into place
    only once the file is whole, so an output that exists is one a job finished."""
    from musetalk import video_io

    if not os.path.isfile(output):
        return False
    try:
        info = video_io.probe(output)
    except MuseTalkError:
        return False
    return info.has_video and info.num_frames > 0


def video_key(job: BatchJob) -> tuple:
    """What decides whether a node's prepared avatar fits a job: the video and the face options
    (the avatar cache's own key hashes the same things, with the file's bytes)."""
    return (job.video, job.options.fps, *(getattr(job.options, name) for name in FACE_OPTIONS))


def choose_job(pending: list[tuple[int, tuple]], node: str, prepared_on: dict[tuple, set[str]],
               died_on: dict[int, set[str]]) -> int | None:
    """The job an idle worker on ``node`` takes next, from ``pending`` (job index, video key) in file
    order: first one whose video this node prepared, else one whose video no node has yet, else
    the first (another node has its video but no free worker: preparing it again here beats
    waiting). A job whose worker died on this node comes after every other."""
    if not pending:
        return None

    def rank(item: tuple[int, tuple]) -> tuple:
        index, key = item
        nodes = prepared_on.get(key, set())
        preference = 0 if node in nodes else 1 if not nodes else 2
        return (node in died_on.get(index, ()), preference, index)

    return min(pending, key=rank)[0]


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker goes and what it reserves there."""

    node_id: str
    address: str
    num_cpus: float
    num_gpus: int
    device: str


def plan_workers(nodes: list[dict], settings: WorkerSettings) -> list[WorkerSlot]:
    """One worker per GPU when the cluster has GPUs (each with its share of its node's CPUs), else one
    per ``worker_cpus`` CPUs. ``nodes``: ``ray.nodes()``."""
    alive = [node for node in nodes if node.get("Alive")]
    use_gpus = settings.device != "cpu" and any(node["Resources"].get("GPU", 0) >= 1 for node in alive)
    slots = []
    for node in alive:
        cpus = float(node["Resources"].get("CPU", 0))
        gpus = int(node["Resources"].get("GPU", 0))
        address = node.get("NodeManagerAddress", "?")
        if use_gpus:
            slots += [WorkerSlot(node["NodeID"], address, float(cpus // gpus) if gpus else 0.0, 1, "cuda")] * gpus
        else:
            count = int(cpus // settings.worker_cpus)
            slots += [WorkerSlot(node["NodeID"], address, float(settings.worker_cpus), 0, "cpu")] * count
    if not slots:
        largest = max((int(node["Resources"].get("CPU", 0)) for node in alive), default=0)
        raise ClusterError(f"no node of the Ray cluster ({len(alive)} node(s), at most {largest} CPUs each, no GPU) "
                           f"has room for a worker of {settings.worker_cpus} CPUs; give --worker-cpus "
                           f"{max(1, largest)} or fewer, or add nodes")
    return slots


def unfinished(jobs: list[BatchJob]) -> tuple[list[BatchJob], list[BatchJob]]:
    """(jobs still to run, jobs whose output is already complete): what ``--resume`` skips."""
    done = [job for job in jobs if is_complete(job.output)]
    return [job for job in jobs if job not in done], done


# --------------------------------------------------------------------------- the batch


def run_batch(jobs: list[BatchJob], address: str | None = None, settings: WorkerSettings | None = None,
              resume: bool = False, retries: int = DEFAULT_RETRIES,
              progress: Callable[[BatchProgress], None] | None = None, worker_logs: bool = False) -> BatchReport:
    """Run ``jobs`` on the Ray cluster at ``address`` and return what became of each.

    ``address``: what ``ray.init`` takes ("auto", "HOST:6379", "ray://HOST:10001"); None: Ray's own
    rule (RAY_ADDRESS, else the cluster this machine belongs to, else a new one here). When Ray is already initialised in
    this process, that connection is used and left open. ``resume``: skip jobs whose output is
    complete. ``progress``: called with a ``BatchProgress`` every POLL_SECONDS or so.
    ``worker_logs``: show the workers' log lines here too.
    A job that fails is in the report, not raised; a problem of the whole batch (Ray missing,
    the cluster unreachable, weights missing on the workers) raises a ``MuseTalkError``. An
    interrupt (KeyboardInterrupt) stops the workers and returns the report, ``interrupted`` set."""
    settings = settings or WorkerSettings()
    if retries < 0:
        raise ClusterError(f"retries must be 0 or more, not {retries}")
    started = time.perf_counter()
    outcomes = [JobOutcome(job) for job in jobs]
    if resume:
        _, done = unfinished(jobs)
        for outcome in outcomes:
            if outcome.job in done:
                outcome.status = "skipped"
    if all(outcome.status == "skipped" for outcome in outcomes):
        return BatchReport(outcomes, time.perf_counter() - started, 0)
    ray, connected_here = _connect(address, worker_logs)
    batch = _Batch(ray, outcomes, settings, retries, progress)
    interrupted = False
    try:
        batch.run()
    except KeyboardInterrupt:  # what finished stays; the report says what did not
        interrupted = True
    finally:
        batch.close()
        if connected_here:
            ray.shutdown()
    return BatchReport(outcomes, time.perf_counter() - started, batch.workers_started, batch.start_seconds,
                       batch.run_seconds, interrupted)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray on this machine and on every node: pip install 'musetalk-studio[ray]'") \
            from None
    return ray


def _connect(address: str | None, worker_logs: bool):
    """(the ray module, whether this call connected it: then run_batch also disconnects)."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    _check_listening(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=worker_logs)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:  # RayError: a wrong token
        raise ClusterError(f"could not reach a Ray cluster at {address or 'RAY_ADDRESS or this machine'}: {error}; "
                           f"start one with `ray start --head` (docs/cluster.md) or check the address") from error
    return ray, True


def _check_listening(address: str | None) -> None:
    """A HOST:PORT with nothing listening is said at once: ray.init would retry it for minutes."""
    host, colon, port = (address or "").rpartition(":")
    if not colon or "://" in address or not port.isdigit():
        return  # "auto", "local", a ray:// client address, or none: Ray's own rules
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise ClusterError(f"no Ray cluster answers at {address} ({error}); start one there with "
                           f"`ray start --head --port={port}` (docs/cluster.md) or check the address") from None


@dataclass
class _Worker:
    """A worker the driver knows about: its actor, where it is, what it is doing."""

    label: str
    slot: WorkerSlot
    actor: object
    ready: bool = False  # its models are loaded
    pid: int = 0
    job: int | None = None  # index of the job it runs
    attempt: int = 0
    job_started: float = 0.0  # when the driver handed the job out


class _Batch:
    """The driver's loop: start the workers, hand out jobs, collect results, retry lost jobs."""

    def __init__(self, ray, outcomes: list[JobOutcome], settings: WorkerSettings, retries: int,
                 progress: Callable[[BatchProgress], None] | None):
        self.ray = ray
        self.outcomes = outcomes
        self.settings = settings
        self.retries = retries
        self.progress = progress
        self.pending = [index for index, outcome in enumerate(outcomes) if outcome.status == "pending"]
        self.versions = sorted({outcomes[index].job.options.version for index in self.pending})
        self.workers: list[_Worker] = []  # alive or starting
        self.calls: dict[object, _Worker] = {}  # the call each busy worker is on (start or run), by its reference
        self.prepared_on: dict[tuple, set[str]] = {}  # video key -> nodes that prepared it
        self.died_on: dict[int, set[str]] = {}  # job index -> nodes where its worker died
        self.start_failures: dict[str, int] = {}
        self.orphaned: set[str] = set()  # outputs whose writer died
        self.started_at = time.perf_counter()
        self.first_job_at: float | None = None
        self.start_seconds = 0.0
        self.run_seconds = 0.0
        self.workers_started = 0
        self.last_error = ""
        self.board = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        self.board = self.ray.remote(ProgressBoard).options(num_cpus=0).remote()
        slots = plan_workers(self.ray.nodes(), self.settings)
        logger.info("starting %d workers", len(slots))
        for slot in slots:
            self._start_worker(slot)
        last_report = 0.0
        while self.pending or any(worker.job is not None for worker in self.workers):
            if not self.workers:
                raise ClusterError(f"no worker is left to run the remaining jobs: {self.last_error}")
            self._dispatch()
            ready, _ = self.ray.wait(list(self.calls), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                worker = self.calls.pop(ref)
                if worker.ready:
                    self._job_finished(ref, worker)
                else:
                    self._worker_started(ref, worker)
            if self.progress and time.perf_counter() - last_report >= POLL_SECONDS:
                self.progress(self._snapshot())
                last_report = time.perf_counter()
        self.run_seconds = time.perf_counter() - (self.first_job_at or time.perf_counter())
        if self.progress:
            self.progress(self._snapshot())

    def close(self) -> None:
        """Stop every worker (an interrupted batch's running jobs with them) and remove what the
        writers of the jobs they were running left behind."""
        for worker in self.workers:
            if worker.job is not None:
                self.orphaned.add(self.outcomes[worker.job].job.output)
            _kill(self.ray, worker.actor)
        self.workers, self.calls = [], {}
        if self.board is not None:
            _kill(self.ray, self.board)
        for outcome in self.outcomes:
            if outcome.status == "pending":
                outcome.status, outcome.error = "failed", "not run: the batch stopped"
        remove_partials(sorted(self.orphaned))

    # ------------------------------------------------------------------ workers

    def _start_worker(self, slot: WorkerSlot) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.workers_started += 1
        # soft: the replacement of a worker whose node is gone goes wherever there is room
        actor = self.ray.remote(DubbingWorker).options(
            num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=True),
        ).remote(self.settings, slot.device, slot.num_cpus, self.board)
        worker = _Worker(f"w{self.workers_started}", slot, actor)
        self.workers.append(worker)
        self.calls[actor.start.remote(self.versions)] = worker

    def _worker_started(self, ref, worker: _Worker) -> None:
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, MuseTalkError):  # weights missing, say: every worker would fail the same way
                raise error.cause from None
            raise ClusterError(f"a worker failed to load the models: {error.cause}") from error
        except self.ray.exceptions.RayError as error:
            self._worker_lost(worker, f"a worker died while loading the models: {_first_line(error)}")
            return
        worker.ready, worker.pid = True, info["pid"]
        if info["node_id"] != worker.slot.node_id:  # a replacement that landed elsewhere
            worker.slot = self._slot_on(info["node_id"], worker.slot)
        self.start_seconds = self.start_seconds or time.perf_counter() - self.started_at
        logger.info("%s ready on %s (pid %d) in %.1f s", worker.label, worker.slot.address, worker.pid,
                    info["seconds"])

    def _slot_on(self, node_id: str, like: WorkerSlot) -> WorkerSlot:
        address = next((node.get("NodeManagerAddress", "?") for node in self.ray.nodes() if node["NodeID"] == node_id),
                       "?")
        return WorkerSlot(node_id, address, like.num_cpus, like.num_gpus, like.device)

    def _worker_lost(self, worker: _Worker, reason: str) -> None:
        """Start a new worker in the dead one's place, unless its node keeps losing them at start."""
        self.last_error = reason
        _kill(self.ray, worker.actor)
        self.workers.remove(worker)
        node = worker.slot.node_id
        if not worker.ready:
            self.start_failures[node] = self.start_failures.get(node, 0) + 1
            if self.start_failures[node] >= START_FAILURES_PER_NODE:
                logger.warning("no more workers on node %s: %s", worker.slot.address, reason)
                return
        self._start_worker(worker.slot)

    # ------------------------------------------------------------------ jobs

    def _dispatch(self) -> None:
        for worker in [w for w in self.workers if w.ready and w.job is None]:
            pending = [(index, video_key(self.outcomes[index].job)) for index in self.pending]
            index = choose_job(pending, worker.slot.node_id, self.prepared_on, self.died_on)
            if index is None:
                return
            self.pending.remove(index)
            outcome = self.outcomes[index]
            outcome.attempts += 1
            worker.job, worker.attempt, worker.job_started = index, outcome.attempts, time.perf_counter()
            outcome.node_id, outcome.node = worker.slot.node_id, _node_label(worker.slot)
            outcome.worker = f"{worker.label} (pid {worker.pid})"
            self.prepared_on.setdefault(video_key(outcome.job), set()).add(worker.slot.node_id)
            self.first_job_at = self.first_job_at or time.perf_counter()
            self.calls[worker.actor.run.remote(index, outcome.attempts, outcome.job)] = worker

    def _job_finished(self, ref, worker: _Worker) -> None:
        index, outcome = worker.job, self.outcomes[worker.job]
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as error:  # a bug, not the input: retrying would fail again
            worker.job = None
            outcome.status, outcome.error = "failed", f"{type(error.cause).__name__}: {error.cause}"
            return
        except self.ray.exceptions.RayError as error:  # the worker died: killed, out of memory, node lost
            self.orphaned.add(outcome.job.output)
            self.died_on.setdefault(index, set()).add(worker.slot.node_id)
            reason = f"its worker died ({_first_line(error)})"
            logger.warning("%s: %s; attempt %d of %d", outcome.job.name, reason, outcome.attempts, self.retries + 1)
            if outcome.attempts <= self.retries:
                self.pending = sorted(self.pending + [index])
            else:
                outcome.status, outcome.error = "failed", f"{reason} on each of {outcome.attempts} attempts"
            self._worker_lost(worker, reason)
            return
        worker.job = None
        outcome.round_trip_seconds = time.perf_counter() - worker.job_started
        outcome.seconds, outcome.frames = result["seconds"], result.get("frames", 0)
        outcome.cache_hit, outcome.scores = result.get("cache_hit"), result.get("scores", {})
        outcome.status = "done" if result["ok"] else "failed"
        outcome.error = result.get("error", "")

    # ------------------------------------------------------------------ progress

    def _snapshot(self) -> BatchProgress:
        try:
            reports = self.ray.get(self.board.snapshot.remote(), timeout=10)
        except self.ray.exceptions.RayError:
            reports = {}
        running, frames_done, lengths, left_frames = [], 0, [], 0
        for outcome in self.outcomes:
            if outcome.status == "done":
                frames_done += outcome.frames
                lengths.append(outcome.frames)
        for worker in self.workers:
            if worker.job is None:
                continue
            done, total = reports.get((worker.job, worker.attempt), (0, 0))
            running.append(RunningJob(self.outcomes[worker.job].job.name, worker.label, worker.pid, done, total))
            frames_done += done
            if total:
                lengths.append(total)
                left_frames += total - done
        elapsed = time.perf_counter() - (self.first_job_at or time.perf_counter())
        fps = frames_done / elapsed if elapsed > 0 else 0.0
        seconds_left = None
        if lengths and fps > 0:
            unknown = len(self.pending) + sum(1 for job in running if not job.frames_total)
            seconds_left = (left_frames + unknown * sum(lengths) / len(lengths)) / fps
        finished = sum(1 for outcome in self.outcomes if outcome.status in ("done", "failed", "skipped"))
        failed = sum(1 for outcome in self.outcomes if outcome.status == "failed")
        workers = sum(1 for worker in self.workers if worker.ready)
        return BatchProgress(len(self.outcomes), finished, failed, tuple(running), workers, frames_done, fps,
                             seconds_left)


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # already gone
        pass


def remove_partials(outputs: list[str], quiet_seconds: float = PARTIAL_QUIET_SECONDS,
                    patience: float = PARTIAL_PATIENCE_SECONDS) -> None:
    """Remove the temporary files that writers of ``outputs`` left when their worker died. A dead
    worker's ffmpeg finishes its file on its own, after the worker is gone: a file goes once
    nothing has written to it for ``quiet_seconds`` (or once ``patience`` has run out)."""
    from musetalk import video_io

    deadline = time.monotonic() + patience
    while True:
        busy = False
        for output in outputs:
            for path in video_io.partial_files(output):
                try:
                    quiet = time.time() - os.path.getmtime(path) >= quiet_seconds
                    if quiet or time.monotonic() > deadline:
                        os.remove(path)
                        logger.info("removed %s, left by a worker that died", path)
                    else:
                        busy = True
                except FileNotFoundError:
                    continue
        if not busy:
            return
        time.sleep(0.5)


def _node_label(slot: WorkerSlot) -> str:
    return f"{slot.address}/{slot.node_id[:6]}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


# --------------------------------------------------------------------------- on the workers


class ProgressBoard:
    """A Ray actor where workers post each job's progress and the driver reads it (frames only:
    nothing large goes through Ray)."""

    def __init__(self):
        self.jobs: dict[tuple[int, int], tuple[int, int]] = {}

    def report(self, index: int, attempt: int, done: int, total: int) -> None:
        self.jobs[(index, attempt)] = (done, total)

    def snapshot(self) -> dict[tuple[int, int], tuple[int, int]]:
        return dict(self.jobs)


class DubbingWorker:
    """A Ray actor: loads the models once (``start``), then runs jobs (``run``) from paths."""

    def __init__(self, settings: WorkerSettings, device: str, cpus: float, board):
        self.settings, self.device, self.cpus, self.board = settings, device, cpus, board
        self.pipelines: dict[str, object] = {}

    def start(self, versions: list[str]) -> dict:
        import ray
        import torch

        from musetalk.pipeline import LipSyncPipeline

        started = time.perf_counter()
        threads = max(1, int(self.cpus))
        torch.set_num_threads(threads)  # its share of the node, not every core of it
        for version in versions:
            pipeline = LipSyncPipeline.from_pretrained(
                self.settings.models_dir, version, self.device, self.settings.dtype,
                cache_dir=None if self.settings.use_cache else False, engine=self.settings.engine,
                compile=self.settings.compile)
            pipeline.cpu_workers = max(1, min(4, threads // 2))  # the stages' rule, on this worker's CPUs
            self.pipelines[version] = pipeline
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "seconds": time.perf_counter() - started}

    def run(self, index: int, attempt: int, job: BatchJob) -> dict:
        started = time.perf_counter()
        last = [0.0]

        def report(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if stage == "generate" and (now - last[0] >= REPORT_SECONDS or done == total):
                last[0] = now
                self.board.report.remote(index, attempt, done, total)

        try:
            result = self.pipelines[job.options.version](job.video, job.audio, job.output, job.options,
                                                         progress=report)
        except MuseTalkError as error:  # the input's fault: the summary says it, no retry
            return {"ok": False, "error": str(error), "seconds": time.perf_counter() - started}
        outcome = {"ok": True, "frames": result.num_frames,
                   "cache_hit": "face" not in result.timings if self.settings.use_cache else None}
        if self.settings.score:
            outcome.update(self._scores(job))
        outcome["seconds"] = time.perf_counter() - started
        return outcome

    def _scores(self, job: BatchJob) -> dict:
        from musetalk import metrics

        try:
            scores = metrics.score_video(job.output, source=job.video, audio=job.audio,
                                         models_dir=self.settings.models_dir, loop=job.options.loop,
                                         device=self.device)
        except MuseTalkError as error:  # the result stands; only its scores are missing
            return {"error": f"scores: {error}"}
        return {"scores": scores.as_dict()}


# --------------------------------------------------------------------------- the summary

SUMMARY_SCORES = ("sync_correlation", "silent_closed_share", "identity_ssim")


def format_summary(report: BatchReport) -> list[str]:
    """The summary table: per job where it ran, its time, frames, scores (when measured) and error."""
    scored = any(outcome.scores for outcome in report.outcomes)
    headers = ["job", "status", "node", "worker", "tries", "seconds", "frames", "avatar"]
    headers += list(SUMMARY_SCORES) if scored else []
    rows = []
    for outcome in report.outcomes:
        ran = outcome.status != "skipped" and outcome.attempts > 0
        avatar = {True: "cached", False: "prepared", None: ""}[outcome.cache_hit] if outcome.status == "done" else ""
        row = [outcome.job.name, outcome.status, outcome.node if ran else "", outcome.worker if ran else "",
               str(outcome.attempts) if ran else "", f"{outcome.seconds:.1f}" if ran else "",
               str(outcome.frames) if outcome.frames else "", avatar]
        if scored:
            row += [_score_text(outcome.scores.get(name)) for name in SUMMARY_SCORES]
        rows.append(row)
    widths = [max(len(row[column]) for row in [headers, *rows]) for column in range(len(headers))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(headers, widths)).rstrip()]
    for row, outcome in zip(rows, report.outcomes):
        lines.append("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
        if outcome.error:
            lines.append(f"    {outcome.error}")
    counts = {status: sum(1 for o in report.outcomes if o.status == status) for status in ("done", "skipped", "failed")}
    lines.append(f"{counts['done']} done, {counts['skipped']} skipped (already complete), {counts['failed']} failed "
                 f"in {report.seconds:.1f} s on {report.workers} worker(s)")
    return lines


def _score_text(value) -> str:
    return "" if value is None else f"{value:.3f}"
