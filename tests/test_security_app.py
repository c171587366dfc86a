"""Nothing gets in through the app: it serves its own results and nothing else, fetches no URL
it is handed, reads odd upload names as plain files, and holds to its limits on upload size,
duration and queue length.

The app here has no weights (none are needed to be refused): its "download" stands in for a
slow model job, so the queue test costs seconds of sleeping, not of computing.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from musetalk.studio import Studio, StudioConfig

from conftest import ffmpeg
from test_app import CLIENT_HTTPX, launched_app
from test_robustness import FACE_JPG, face_video, speech
from test_security import Listener

QUEUE_SIZE = 1
# The model job's stand-in holds the queue's one slot until the test lets it go: however slowly a busy
# machine sends the requests, they all arrive while it runs.
HOLD = threading.Event()
HOLD.set()  # only the queue test holds it


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    def slow_download(version, models_dir, draft=False):
        """A model job's stand-in: holds the queue's one slot until released and fetches nothing."""
        HOLD.wait(120)

    root = tmp_path_factory.mktemp("app-security")
    config = StudioConfig(models_dir=str(root / "models"), device="cpu", work_dir=str(root / "work"),
                          max_upload_mb=1, max_seconds=2, queue_size=QUEUE_SIZE)
    (root / "models").mkdir()
    (root / "models" / "private.txt").write_text("weights and other private files")
    studio = Studio(config, download_weights=slow_download)
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def url(services):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        with launched_app(services) as address:
            yield address


@pytest.fixture(scope="module")
def client(url, tmp_path_factory):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("dl")),
                  httpx_kwargs=CLIENT_HTTPX)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def file_url(base: str, path: str) -> str:
    return f"{base.rstrip('/')}/gradio_api/file={urllib.parse.quote(path)}"


def test_only_the_apps_own_results_are_served(url, services, tmp_path):
    result = Path(services.jobs.new("generate")) / "dubbed.mp4"
    result.write_bytes(b"a result")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not the app's")
    assert http_status(file_url(url, str(result))) == 200
    refused = [
        "/etc/passwd",
        str(Path(services.config.models_dir) / "private.txt"),
        str(outside),
        f"{services.work_dir}/../models/private.txt",
        str(Path(__file__).resolve()),
    ]
    for path in refused:
        assert http_status(file_url(url, path)) in (403, 404), path


def test_urls_handed_to_the_app_are_not_fetched_from_inside(url, client):
    """The file route and a job's inputs both refuse a URL to a local service; nothing connects to it."""
    from gradio_client.exceptions import AppError

    listener = Listener()
    try:
        assert http_status(file_url(url, listener.url + "/secret.mp4")) in (403, 404)
        with pytest.raises(AppError):  # Gradio's download guard: no private or loopback hosts
            client.predict(video={"path": listener.url + "/face.mp4", "url": listener.url + "/face.mp4",
                                  "meta": {"_type": "gradio.FileData"}}, api_name="/preview")
        assert listener.connections() == 0
    finally:
        listener.close()


def test_odd_upload_names_are_plain_files(client, tmp_path):
    from gradio_client import handle_file

    for name in ("-i ;$(touch pwned) 'x'.mp4", "..%2F..%2Fetc.mp4", "concat:a|b.mp4"):
        odd = face_video(tmp_path / name, 0.12)
        image, note = client.predict(video=handle_file(str(odd)), api_name="/preview")
        assert note.startswith("Frame 0:"), name
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_uploads_above_the_size_limit_are_refused(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.wav"
    ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=16:r=48000", "-ac", "2", str(big))  # 3 MB
    assert big.stat().st_size > 2_000_000
    with pytest.raises(Exception, match="(?i)maximum|too large|exceeds"):
        client.predict(video=handle_file(str(FACE_JPG)), audio=handle_file(str(big)), api_name="/generate")


def test_long_videos_and_speech_are_refused_with_the_limit(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    long_video = face_video(tmp_path / "long.mp4", 3, fps=5, size="64:64")
    short_speech = speech(tmp_path / "short.wav", 0.5)
    with pytest.raises(AppError, match=r"the video lasts 3.0 s; this studio takes videos up to 2 s"):
        client.predict(video=handle_file(str(long_video)), audio=handle_file(str(short_speech)),
                       api_name="/generate")
    long_speech = speech(tmp_path / "long.wav", 2.6)
    with pytest.raises(AppError, match=r"the audio lasts 2.6 s"):
        client.predict(video=handle_file(str(FACE_JPG)), audio=handle_file(str(long_speech)), api_name="/generate")


def test_the_queue_turns_away_what_it_cannot_hold(client):
    """One model job runs, QUEUE_SIZE wait; the rest get a clear refusal at once, and every job taken finishes."""
    from gradio_client.exceptions import AppError

    HOLD.clear()
    try:
        jobs = [client.submit("v15", api_name="/download_weights") for _ in range(5)]
        deadline = time.monotonic() + 120
        while sum(job.done() for job in jobs) < len(jobs) - 1 - QUEUE_SIZE and time.monotonic() < deadline:
            time.sleep(0.05)  # the refusals come at once, while the first job holds its slot
    finally:
        HOLD.set()
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=60)
            outcomes.append("done")
        except AppError as error:
            outcomes.append(str(error))
        except Exception as error:  # the client's own refusal type differs between versions
            outcomes.append(f"{type(error).__name__}: {error}")
    refused = [outcome for outcome in outcomes if outcome != "done"]
    assert 1 <= outcomes.count("done") <= 1 + QUEUE_SIZE, outcomes
    assert refused and all("queue" in outcome.lower() and "full" in outcome.lower() for outcome in refused), outcomes
