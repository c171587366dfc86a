"""Under load, through the API as clients use it (the app in this process, tiny models, gradio_client):

- several clients at once: every job finishes with its own correct output, light requests are
  answered while the model works, memory stays bounded, no temporary file remains;
- a job whose encoder is killed mid-run fails with a clear message and leaves nothing behind,
  and a client that walks away from its job mid-run: the server keeps serving either way.

Set MUSETALK_LOAD_REPORT=path.json to keep the figures (wall time, per-job time, peak memory);
docs/robustness.md quotes them. Nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from musetalk.studio import Studio, StudioConfig
from musetalk.video_io import probe, read_frames

from conftest import ffmpeg
from test_app import CLIENT_HTTPX, launched_app
from test_robustness import FACE_JPG, SIDE, audio_frames, encoders, ffmpeg_children, speech

COLOURS = [(230, 40, 40), (40, 200, 40), (40, 60, 230)]  # one corner mark per job
MARK = 16  # the top-left square carrying a job's colour; the face and its blend area are elsewhere


def marked_clip(out: Path, colour: tuple[int, int, int]) -> Path:
    hex_colour = "0x%02x%02x%02x" % colour
    ffmpeg("-loop", "1", "-framerate", "25", "-i", str(FACE_JPG), "-t", "0.24", "-vf",
           f"scale={SIDE}:{SIDE},drawbox=x=0:y=0:w={MARK}:h={MARK}:color={hex_colour}:t=fill",
           "-pix_fmt", "yuv420p", "-crf", "10", str(out))
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list[dict]:
    """One (video, audio, expected frames, colour) per client: a different mark and a different length each."""
    folder = tmp_path_factory.mktemp("load-inputs")
    made = []
    for index, colour in enumerate(COLOURS):
        video = marked_clip(folder / f"client{index}.mp4", colour)
        audio = speech(folder / f"client{index}.wav", 0.24 + 0.08 * index)
        made.append({"video": video, "audio": audio, "frames": audio_frames(audio, 25), "colour": colour})
    assert len({job["frames"] for job in made}) == len(made), "each job has its own length"
    return made


def children_memory(me: psutil.Process) -> dict[str, int]:
    """The resident bytes of this process's children, by command.

    A child caught between its fork and its exec is left out: it still runs this process's
    command in this process's memory (a vfork shares it outright), so its resident size is ours
    counted twice. A loaded machine widens that window; CI once caught a 1.3 GB "growth" in it."""
    own_command = me.cmdline()
    by_name: dict[str, int] = {}
    for child in me.children(recursive=True):
        try:
            if child.cmdline() == own_command:
                continue
            name = " ".join(child.cmdline()[:1] + child.cmdline()[-1:])
            by_name[name] = by_name.get(name, 0) + child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return by_name


class MemoryWatch:
    """Samples the resident memory of this process and its children until stopped."""

    def __init__(self, interval: float = 0.05):
        self.samples: list[int] = []
        self.children_at_peak: dict[str, int] = {}  # the children when they used the most
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        me = psutil.Process()
        while not self._stop.wait(interval):
            children = children_memory(me)
            self.samples.append(me.memory_info().rss + sum(children.values()))
            if sum(children.values()) > sum(self.children_at_peak.values()):
                self.children_at_peak = children

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def temporary_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or "partial" in p.name or p.suffix == ".tmp"]


def corner_colour(path) -> np.ndarray:
    frame = next(read_frames(path))
    return frame[3:MARK - 3, 3:MARK - 3].reshape(-1, 3).mean(axis=0)


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    config = StudioConfig(models_dir=str(models_dir), device="cpu", work_dir=str(tmp_path_factory.mktemp("work")),
                          max_seconds=20, max_upload_mb=20, queue_size=16)
    studio = Studio(config)
    assert studio.load_models()
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def url(services, monkeypatch_module):
    monkeypatch_module.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with launched_app(services) as address:
        yield address


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def new_client(url: str, downloads: Path):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads),
                  httpx_kwargs=CLIENT_HTTPX)


def submit_generate(client, job: dict):
    from gradio_client import handle_file

    return client.submit(video=handle_file(str(job["video"])), audio=handle_file(str(job["audio"])),
                         engine="musetalk", measure=False, api_name="/generate")


def test_several_clients_at_once_each_get_their_own_correct_result(url, services, jobs, tmp_path):
    clients = [new_client(url, tmp_path / f"downloads{index}") for index in range(len(jobs))]
    watcher = new_client(url, tmp_path / "watcher")
    from gradio_client import handle_file

    me = psutil.Process()
    baseline = me.memory_info().rss + sum(children_memory(me).values())  # as the samples are: children too
    status_waits = []
    with MemoryWatch() as memory:
        started = time.perf_counter()
        pending = [submit_generate(client, job) for client, job in zip(clients, jobs)]
        previews = [watcher.submit(video=handle_file(str(jobs[0]["video"])), api_name="/preview")]
        while not all(job.done() for job in pending):
            asked = time.perf_counter()
            assert "ready" in watcher.predict(api_name="/status")  # light requests never wait behind a dub
            status_waits.append(time.perf_counter() - asked)
            time.sleep(0.2)
        results = [job.result() for job in pending]
        # Each client's side-by-side, all at once too (they wait in a line of their own).
        beside = [client.submit(video=handle_file(str(job["video"])), dubbed=handle_file(result[1]),
                                api_name="/side_by_side") for client, job, result in zip(clients, jobs, results)]
        sides = [made.result() for made in beside]
        wall = time.perf_counter() - started
        for preview in previews:
            image, note = preview.result()
            assert note.startswith("Frame 0:")

    for job, side, (_stream, dub, summary, timings, _scores) in zip(jobs, sides, results):
        info = probe(dub)
        assert info.num_frames == job["frames"] and (info.width, info.height) == (SIDE, SIDE) and info.has_audio
        assert np.abs(corner_colour(dub) - job["colour"]).max() < 25, "a client got another client's video"
        assert probe(side).num_frames == job["frames"]
        assert f"{job['frames']} frames" in summary
    assert not temporary_leftovers(services.work_dir), temporary_leftovers(services.work_dir)
    assert not ffmpeg_children()

    per_job = [dict((row[0], row[1]) for row in result[3]["data"])["whole job"] for result in results]
    figures = {
        "clients": len(jobs), "frames_per_job": [job["frames"] for job in jobs],
        "wall_seconds": round(wall, 2), "per_job_seconds": [round(s, 2) for s in per_job],
        "rss_before_mb": round(baseline / 2**20), "peak_rss_mb": round(max(memory.samples) / 2**20),
        "peak_growth_mb": round((max(memory.samples) - baseline) / 2**20),
        "children_at_their_peak_mb": {name: round(rss / 2**20) for name, rss in memory.children_at_peak.items()},
        "status_answers": len(status_waits), "slowest_status_seconds": round(max(status_waits, default=0), 3),
    }
    if os.environ.get("MUSETALK_LOAD_REPORT"):
        Path(os.environ["MUSETALK_LOAD_REPORT"]).write_text(json.dumps(figures, indent=2))
    # Bounded: queued jobs cost what one costs (frames stream; one model job runs at a time).
    assert max(memory.samples) - baseline < 1.5 * 2**30, figures


def test_a_job_killed_mid_run_fails_cleanly_and_the_server_keeps_serving(url, services, jobs, tmp_path):
    """The encoder of a running job is killed (as the kernel's OOM killer would): that client gets
    the library's message, nothing half-written stays, and the next client is served."""
    from gradio_client.exceptions import AppError

    client = new_client(url, tmp_path / "downloads")
    folders = sorted(services.work_dir.iterdir())
    running = submit_generate(client, jobs[2])
    killed = _kill_encoder_when_it_runs(timeout=120)
    assert killed, "the job never reached its encoder"
    with pytest.raises(AppError) as failure:
        running.result()
    assert "ffmpeg" in str(failure.value) and "Traceback" not in str(failure.value)
    assert sorted(services.work_dir.iterdir()) == folders, "the failed request's folder was kept"
    assert not temporary_leftovers(services.work_dir)

    dub = submit_generate(client, jobs[0]).result()[1]
    assert probe(dub).num_frames == jobs[0]["frames"]
    assert not ffmpeg_children()


class CountingPipeline:
    """Stands in front of the loaded pipeline and records how many jobs ran on it at once."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self.running = self.most = 0

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self._pipeline(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


def test_a_client_that_walks_away_mid_run_does_not_stop_the_server(url, services, jobs, tmp_path, monkeypatch):
    """A client cancels its running job (or disappears): its queue slot is freed at once while the
    job's thread runs to its end; the next client's job waits for it (never two jobs on one
    pipeline) and is served."""
    counting = CountingPipeline(services.pipeline("v15"))
    monkeypatch.setitem(services._pipelines, ("musetalk", "v15"), counting)
    leaving = new_client(url, tmp_path / "leaving")
    abandoned = submit_generate(leaving, jobs[2])
    _wait_for_encoder(timeout=120)
    abandoned.cancel()
    leaving.close()

    staying = new_client(url, tmp_path / "staying")
    assert "ready" in staying.predict(api_name="/status")
    dub = submit_generate(staying, jobs[1]).result()[1]
    assert probe(dub).num_frames == jobs[1]["frames"]
    assert np.abs(corner_colour(dub) - jobs[1]["colour"]).max() < 25
    deadline = time.monotonic() + 120
    while ffmpeg_children() and time.monotonic() < deadline:  # the abandoned job finishing in the background
        time.sleep(0.2)
    assert not ffmpeg_children()
    assert not temporary_leftovers(services.work_dir)
    assert counting.most == 1, "two jobs ran on one pipeline at once"


def _wait_for_encoder(timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = encoders()
        if found:
            return found
        time.sleep(0.02)
    return []


def _kill_encoder_when_it_runs(timeout: float) -> bool:
    for encoder in _wait_for_encoder(timeout):
        try:
            encoder.kill()
            return True
        except psutil.NoSuchProcess:  # it finished first: this job is past its encoder
            continue
    return False
