"""Batches on a real Ray cluster: a head node and a second node started here with `ray start`
(one CPU each, one worker each), the tiny models, outputs held against the run without Ray.

The cluster is started once for the module; every batch connects to it as the command line
does. The first tests need no cluster: the driver's choices are plain functions.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from musetalk import cli, cluster
from musetalk.cluster import BatchJob, WorkerSettings, choose_job, plan_workers
from musetalk.config import RunOptions
from musetalk.errors import ClusterError

from conftest import EXAMPLES, ffmpeg

# --------------------------------------------------------------------------- the driver's choices (no cluster)


def _key(video: str) -> tuple:
    return cluster.video_key(BatchJob(video, "a.wav", "out.mp4"))


def test_a_job_goes_to_the_node_that_prepared_its_video():
    pending = [(0, _key("/x.mp4")), (1, _key("/y.mp4")), (2, _key("/z.mp4"))]
    prepared = {_key("/y.mp4"): {"B"}, _key("/x.mp4"): {"A"}}
    assert choose_job(pending, "B", prepared, {}) == 1  # y was prepared on B
    assert choose_job(pending, "C", prepared, {}) == 2  # C takes the video no node has
    # nothing new left: the first job, though another node has its video (better than waiting)
    assert choose_job(pending[:2], "C", prepared, {}) == 0
    assert choose_job([], "A", prepared, {}) is None


def test_a_job_whose_worker_died_goes_elsewhere_first():
    pending = [(0, _key("/x.mp4")), (1, _key("/x.mp4"))]
    assert choose_job(pending, "A", {_key("/x.mp4"): {"A"}}, {0: {"A"}}) == 1
    assert choose_job(pending[:1], "A", {}, {0: {"A"}}) == 0  # the only job left: here after all


def _node(node_id: str, cpus: float, gpus: int = 0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": resources}


def test_workers_one_per_gpu_or_per_n_cpus():
    gpu_slots = plan_workers([_node("g", 16, gpus=2), _node("c", 8), _node("dead", 8, 4, alive=False)],
                             WorkerSettings())
    assert [(s.node_id, s.num_gpus, s.num_cpus, s.device) for s in gpu_slots] == [("g", 1, 8.0, "cuda")] * 2
    cpu_slots = plan_workers([_node("a", 5), _node("b", 2)], WorkerSettings(worker_cpus=2))
    assert [s.node_id for s in cpu_slots] == ["a", "a", "b"] and {s.device for s in cpu_slots} == {"cpu"}
    assert len(plan_workers([_node("g", 16, gpus=2)], WorkerSettings(device="cpu", worker_cpus=4))) == 4
    with pytest.raises(ClusterError, match="--worker-cpus 3 or fewer"):
        plan_workers([_node("a", 2), _node("b", 3)], WorkerSettings(worker_cpus=4))


# --------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_node(args: list[str], log: Path, cache: Path) -> subprocess.Popen:
    """`ray start --block` of one node; its own ports, so that two nodes share this machine."""
    ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    ray_command = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "MUSETALK_CACHE_DIR": str(cache)}
    return subprocess.Popen([ray_command, "start", "--block", "--num-cpus=1", "--num-gpus=0",
                             "--object-store-memory=100000000", "--disable-usage-stats", *ports, *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node and a second node joining it, each with one CPU and its own avatar cache (as
    two machines would have): {"address", "caches": {node id: cache folder}}."""
    # Ray's token authentication with a token of this cluster only (in the environment of both nodes
    # and of this driver), not one a user may keep in ~/.ray. Set before ray is imported: it reads
    # its settings then.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {name: os.environ.get(name) for name in [*token, "RAY_AUTH_TOKEN_PATH"]}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(token)
    import ray

    root = tmp_path_factory.mktemp("ray")
    address = f"127.0.0.1:{_free_port()}"
    head_cache, worker_cache = root / "cache-head", root / "cache-worker"
    nodes = [_start_node(["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false",
                          f"--temp-dir={root / 'tmp'}"], root / "head.log", head_cache)]
    try:
        deadline = time.monotonic() + 120
        while True:  # the head first: the second node joins it
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
                break
            except ConnectionError:
                assert time.monotonic() < deadline, (root / "head.log").read_text()
                time.sleep(0.5)
        nodes.append(_start_node([f"--address={address}"], root / "worker.log", worker_cache))
        while len([node for node in ray.nodes() if node["Alive"]]) < 2:
            assert time.monotonic() < deadline and nodes[1].poll() is None, (root / "worker.log").read_text()
            time.sleep(0.5)
        caches = {node["NodeID"]: head_cache if "node:__internal_head__" in node["Resources"] else worker_cache
                  for node in ray.nodes() if node["Alive"]}
        ray.shutdown()
        yield {"address": address, "caches": caches}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(nodes):  # SIGTERM: `ray start --block` stops what it started
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def media(tmp_path_factory, face_clip, speech_clip) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cluster-media")
    ffmpeg("-i", str(face_clip), "-vf", "hflip", "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p",
           str(folder / "mirror.mp4"))
    ffmpeg("-i", str(EXAMPLES / "speech.wav"), "-ss", "2", "-t", "1.2", str(folder / "other.wav"))
    ffmpeg("-i", str(EXAMPLES / "speech.wav"), "-t", "4", str(folder / "long.wav"))  # 100 frames
    (folder / "broken.mp4").write_text("not a video\n")
    return {"face": face_clip, "mirror": folder / "mirror.mp4", "speech": speech_clip,
            "other": folder / "other.wav", "long": folder / "long.wav", "broken": folder / "broken.mp4"}


def _job_file(folder: Path, jobs: dict[str, tuple[Path, Path, dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = {name: {"video_path": str(video), "audio_path": str(audio), **options}
               for name, (video, audio, options) in jobs.items()}
    path = folder / "jobs.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def _stray_files(folder: Path, expected: set[str]) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name not in expected)


@pytest.fixture(scope="module")
def four_jobs(tmp_path_factory, media) -> Path:
    """Two videos, each dubbed twice: a second dub of a video on the node that prepared it finds
    its avatar in that node's cache."""
    return _job_file(tmp_path_factory.mktemp("four-jobs"), {
        "a": (media["face"], media["speech"], {}),
        "b": (media["mirror"], media["speech"], {}),
        "c": (media["face"], media["other"], {"parsing_mode": "mouth"}),
        "d": (media["mirror"], media["other"], {"loop": "freeze"}),
    })


@pytest.fixture(scope="module")
def batch_on_the_cluster(ray_cluster, four_jobs, models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out-ray")
    jobs = cluster.plan_jobs(four_jobs, out)
    report = cluster.run_batch(jobs, ray_cluster["address"], WorkerSettings(models_dir=str(models_dir), worker_cpus=1))
    return out, jobs, report


def test_a_batch_on_two_nodes_writes_what_the_run_without_ray_writes(batch_on_the_cluster, ray_cluster, four_jobs,
                                                                      models_dir, tmp_path):
    out, jobs, report = batch_on_the_cluster
    assert report.ok and [o.status for o in report.outcomes] == ["done"] * 4, cluster.format_summary(report)
    plain = tmp_path / "out-plain"
    # With torch's threads as each worker has them (its one CPU): torch's CPU kernels split a batch by
    # threads, and a frame of a short last batch can then differ by a few levels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["run", "--config", str(four_jobs), "--out-dir", str(plain), "--models-dir",
                         str(models_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    for job in jobs:
        name = Path(job.output).name
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    assert _stray_files(out, {Path(job.output).name for job in jobs}) == []  # no partial files

    # Each node prepared each of its videos once (one worker per node: its jobs ran one after another)
    # and kept the avatar in its own cache.
    assert set(o.node_id for o in report.outcomes) <= set(ray_cluster["caches"])
    for node_id, cache in ray_cluster["caches"].items():
        ran_here = [o for o in report.outcomes if o.node_id == node_id]
        videos = {o.job.video for o in ran_here}
        assert sum(1 for o in ran_here if o.cache_hit is False) == len(videos)
        entries = [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else []
        assert len(entries) == len(videos)


def test_resume_skips_finished_outputs(batch_on_the_cluster, ray_cluster, four_jobs, models_dir, capsys):
    out, jobs, _ = batch_on_the_cluster
    times = {job.output: os.stat(job.output).st_mtime_ns for job in jobs}
    command = ["run", "--config", str(four_jobs), "--out-dir", str(out), "--models-dir", str(models_dir),
               "--ray", ray_cluster["address"], "--worker-cpus", "1", "--resume"]
    assert cli.main(command) == 0
    assert "0 done, 4 skipped" in capsys.readouterr().out
    os.remove(jobs[2].output)  # as if the batch had stopped before this job
    assert cli.main(command) == 0
    assert "1 done, 3 skipped" in capsys.readouterr().out
    for job in jobs:
        assert (os.stat(job.output).st_mtime_ns == times[job.output]) == (job is not jobs[2])
    # without Ray too
    plain = ["run", "--config", str(four_jobs), "--out-dir", str(out), "--models-dir", str(models_dir), "--resume"]
    assert cli.main(plain) == 0
    assert "skipping 4 job(s) whose output is complete" in capsys.readouterr().out


def test_a_job_whose_worker_is_killed_completes_on_another(ray_cluster, media, models_dir, tmp_path):
    out = tmp_path / "out"
    jobs = cluster.plan_jobs(_job_file(tmp_path, {
        "long": (media["face"], media["long"], {"output_path": str(out / "long.mp4")}),
        "short": (media["mirror"], media["speech"], {"output_path": str(out / "short.mp4")}),
    }), out)
    killed = []

    def kill_the_long_job(progress: cluster.BatchProgress) -> None:
        for job in progress.running:
            if job.name == "long.mp4" and job.frames_done >= 10 and not killed:
                os.kill(job.pid, signal.SIGKILL)  # mid-generation, its encoder at work
                killed.append((job.worker, job.pid))

    report = cluster.run_batch(jobs, ray_cluster["address"], WorkerSettings(models_dir=str(models_dir), worker_cpus=1),
                               progress=kill_the_long_job)
    assert killed, "the long job finished before the test could kill its worker"
    long_job = report.outcomes[0]
    assert report.ok, cluster.format_summary(report)
    assert long_job.attempts == 2 and not long_job.worker.startswith(killed[0][0] + " ")
    assert cluster.is_complete(out / "long.mp4") and cluster.is_complete(out / "short.mp4")
    from musetalk.video_io import probe

    assert probe(out / "long.mp4").num_frames == 100
    assert _stray_files(out, {"long.mp4", "short.mp4"}) == []  # the dead writer's partial file is gone


def test_a_bad_input_fails_alone_and_is_not_retried(ray_cluster, media, models_dir, tmp_path, capsys):
    out = tmp_path / "out"
    config = _job_file(tmp_path, {
        "good": (media["face"], media["speech"], {}),
        "bad": (media["broken"], media["speech"], {}),
        "also_good": (media["mirror"], media["other"], {}),
    })
    code = cli.main(["run", "--config", str(config), "--out-dir", str(out), "--models-dir", str(models_dir),
                     "--ray", ray_cluster["address"], "--worker-cpus", "1"])
    printed = capsys.readouterr().out
    assert code == cli.EXIT_JOBS_FAILED, printed
    row = re.search(r"^broken_speech\.mp4\s+failed\s+\S+\s+w\d+ \(pid \d+\)\s+(\d+)\s.*\n\s+(.+)$", printed, re.M)
    assert row and row.group(1) == "1", printed  # one try: an input error is not retried
    assert "broken.mp4" in row.group(2)  # the error names the file
    assert "2 done, 0 skipped (already complete), 1 failed" in printed
    assert _stray_files(out, {"face_speech.mp4", "mirror_other.mp4"}) == []
    assert all(cluster.is_complete(out / name) for name in ("face_speech.mp4", "mirror_other.mp4"))


def test_an_address_where_no_cluster_answers_is_said_at_once(four_jobs, tmp_path, capsys):
    started = time.monotonic()
    code = cli.main(["run", "--config", str(four_jobs), "--out-dir", str(tmp_path), "--ray", f"127.0.0.1:{_free_port()}"])
    assert code == cli.EXIT_USER_ERROR and "no Ray cluster answers at 127.0.0.1:" in capsys.readouterr().err
    assert time.monotonic() - started < 30 and list(tmp_path.iterdir()) == []


def test_without_ray_the_batch_options_are_refused(face_clip, speech_clip, tmp_path):
    assert cli.main(["run", "--video", str(face_clip), "--audio", str(speech_clip), "--out",
                     str(tmp_path / "x.mp4"), "--ray"]) == cli.EXIT_USER_ERROR
    assert not (tmp_path / "x.mp4").exists()


def test_job_options_are_planned_as_without_ray(four_jobs, tmp_path):
    jobs = cluster.plan_jobs(four_jobs, tmp_path)
    assert [job.options for job in jobs] == [
        RunOptions(), RunOptions(), RunOptions(parsing_mode="mouth"), RunOptions(loop="freeze")]
    assert all(os.path.isabs(p) for job in jobs for p in (job.video, job.audio, job.output))
