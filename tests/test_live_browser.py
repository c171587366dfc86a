"""The live page in a real browser: headless Chromium whose fake microphone plays a WAV file (speech
and pauses, over and over) talks to ``musetalk live`` over WebRTC on loopback; the face's frames,
taken from the page's <video>, open the mouth with the file's loudness and rest in its pauses. Then
text typed on the page, and text sent through the API, make the face speak, and a recording is
saved as an mp4. The server runs in its own process, as a person starts it: the WebRTC stack stays
out of the test process (tests/test_load.py measures that process's memory). The studio's Live tab
is the same page, checked here through its API.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio as audio_lib
from musetalk import face, live_rtc, metrics
from musetalk.video_io import probe

from conftest import EXAMPLES
from test_app import free_port, launched_app, services  # noqa: F401  (services: the studio, preview on this CPU)
from test_browser import CHROMEDRIVER, CHROMIUM, WAIT_FOR_PAGE, chromium, keep_screenshot, wait_for

ROOT = Path(__file__).resolve().parent.parent

SR = audio_lib.SAMPLE_RATE
FPS = 25
# The fake microphone's file: pause, speech, pause, speech (it loops).
PATTERN = (("pause", 1.5), ("speech", 2.0), ("pause", 2.0), ("speech", 2.0), ("pause", 1.5))
CAPTURE_S = 11.0  # a loop of the file and a bit

pytestmark = pytest.mark.skipif(not live_rtc.available()[0], reason=live_rtc.available()[1])
needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs the Chromium browser and its driver: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The WAV the fake microphone plays, and where it speaks (the silence detector's spans) at 100 Hz."""
    from musetalk.speech import write_wav

    speech = audio_lib.load_audio(EXAMPLES / "speech.wav")
    parts, used = [], 0
    for kind, seconds in PATTERN:
        count = int(seconds * SR)
        if kind == "pause":
            parts.append(np.zeros(count, np.float32))
        else:
            parts.append(speech[used:used + count])
            used += count
    wav = np.concatenate(parts)
    path = tmp_path_factory.mktemp("microphone") / "microphone.wav"
    write_wav(path, wav, SR)
    spans = audio_lib.detect_speech(wav)
    return path, spans.speech_mask(np.arange(int(wav.size / SR * 100)) / 100)


@pytest.fixture(scope="module")
def live_browser(microphone_wav, tmp_path_factory):
    # Chromium's fake microphone plays the WAV file, and the page may use it without asking.
    with chromium(tmp_path_factory.mktemp("chromium-live-profile"), "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={microphone_wav[0]}",
                  height=1600) as driver:
        yield driver


CAPTURE_JS = """
const video = document.querySelector('#live-video');
const canvas = document.createElement('canvas');
canvas.width = video.videoWidth; canvas.height = video.videoHeight;
const context = canvas.getContext('2d');
window.liveCapture = {frames: [], times: []};
window.liveCaptureTimer = setInterval(() => {
  context.drawImage(video, 0, 0);
  window.liveCapture.frames.push(canvas.toDataURL('image/png'));
  window.liveCapture.times.push(performance.now());
}, 1000 / %d);
""" % FPS


def capture(driver, seconds: float) -> list[np.ndarray]:
    """The <video>'s pictures, FPS times a second for ``seconds``."""
    import cv2

    driver.execute_script(CAPTURE_JS)
    time.sleep(seconds)
    driver.execute_script("clearInterval(window.liveCaptureTimer)")
    count = driver.execute_script("return window.liveCapture.frames.length")
    frames = []
    for first in range(0, count, 40):
        for url in driver.execute_script(f"return window.liveCapture.frames.slice({first}, {first + 40})"):
            data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
            frames.append(cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return frames


def openings(frames: list[np.ndarray]) -> np.ndarray:
    with face.FaceAnalyzer() as analyzer:
        track = analyzer.analyze(frames)
    return metrics.mouth_track(track, FPS).opening


def best_alignment(opening: np.ndarray, speech_mask: np.ndarray) -> tuple[float, np.ndarray]:
    """(correlation, the file's speech mask under each frame) at the loop phase that fits best: when the
    fake microphone started playing is not known."""
    period = len(speech_mask)  # 10 ms steps
    frame_steps = (np.arange(len(opening)) * 100 / FPS).astype(int)
    valid = np.isfinite(opening)
    best = (-1.0, None)
    for shift in range(0, period, 2):
        under = speech_mask[(frame_steps + shift) % period]
        if under[valid].all() or not under[valid].any():
            continue
        correlation = float(np.corrcoef(opening[valid], under[valid].astype(float))[0, 1])
        if correlation > best[0]:
            best = (correlation, under)
    return best


@contextlib.contextmanager
def running_live_server(face_clip: Path, log: Path, *options: str):
    """``musetalk [options] live --video <face> --engine preview`` in its own process; yields (URL, process)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as output:
        server = subprocess.Popen([sys.executable, "-m", "musetalk", *options, "live", "--video", str(face_clip),
                                   "--engine", "preview", "--port", str(port)], cwd=ROOT, env=env, stdout=output,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT_FOR_PAGE
        while True:
            assert server.poll() is None, f"musetalk live exited: {log.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"musetalk live did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def live_server(face_clip, tmp_path_factory):
    """The live page's server for this module's tests; yields its URL."""
    with running_live_server(face_clip, tmp_path_factory.mktemp("live-server") / "server.log") as (url, _):
        yield url


def test_the_studio_has_the_live_tab_and_its_api(services, face_clip, monkeypatch):  # noqa: F811
    from gradio_client import Client, handle_file

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with launched_app(services) as url:
        client = Client(url, verbose=False)
        token, status = client.predict(handle_file(str(face_clip)), "preview", api_name="/live_prepare")
        assert len(token) == 24 and status.startswith("The face is ready (preview engine)")
        with pytest.raises(Exception, match="not connected yet"):
            client.predict(token, "Hello.", "espeak", "", api_name="/live_say")
        assert "aiortc" not in sys.modules, "the WebRTC stack loads at the first connection, not with the app"


@needs_chromium
def test_the_face_answers_the_microphone_text_and_the_api_over_webrtc(live_server, live_browser, microphone_wav):
    from gradio_client import Client
    from selenium.webdriver.common.by import By

    driver = live_browser
    url = live_server
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.ID, "live-start"), WAIT_FOR_PAGE, "the live page")
    token_box = "#live-token textarea, #live-token input"
    wait_for(driver, lambda d: d.execute_script(f"return document.querySelector('{token_box}').value"),
             WAIT_FOR_PAGE, "the face prepared")
    token = driver.execute_script(f"return document.querySelector('{token_box}').value")
    driver.find_element(By.ID, "live-start").click()
    wait_for(driver, lambda d: d.execute_script("return document.querySelector('#live-video').videoWidth > 64"),
             WAIT_FOR_PAGE, "the face over WebRTC")

    # 1. The microphone: the mouth follows the file's speech and rests in its pauses.
    frames = capture(driver, CAPTURE_S)
    keep_screenshot(driver, "live-page.png")
    assert len(frames) > CAPTURE_S * FPS * 0.8, "frames keep coming at about the video's rate"
    assert frames[0].shape[:2] == (252, 216)
    opening = openings(frames)
    correlation, under_speech = best_alignment(opening, microphone_wav[1])
    assert correlation > 0.45, f"the mouth follows the microphone's speech (correlation {correlation:.2f})"
    in_pause = ~under_speech & np.isfinite(opening)
    rest_share = np.mean(opening[in_pause] < metrics.CLOSED_OPENING)
    assert rest_share > 0.8, f"it rests in the pauses ({rest_share:.0%} closed)"
    # ... and opens to speak (not on every frame of it: between syllables the lips close).
    assert np.nanpercentile(opening[under_speech], 90) > 2 * metrics.CLOSED_OPENING, "and opens to speak"

    # 2. Typed text, the microphone off: only the text moves the mouth.
    driver.find_element(By.CSS_SELECTOR, "#live-microphone input").click()
    wait_for(driver, lambda d: "Only typed text" in d.find_element(By.ID, "live-status").text, WAIT_FOR_PAGE,
             "the microphone off")
    # Frames made from the microphone's last audio are still on their way for a moment (the session's
    # stated latency, about 0.34 s, then the browser's jitter buffer): a CI run caught one of them.
    time.sleep(1.0)
    silent = openings(capture(driver, 2.0))
    assert np.nanmax(silent) < metrics.CLOSED_OPENING, "with the microphone off, the face rests"
    driver.find_element(By.CSS_SELECTOR, "#live-text textarea").send_keys("Hello there. How are you today?")
    driver.find_element(By.ID, "live-say").click()
    spoken = openings(capture(driver, 4.0))
    assert np.nanmax(spoken) > 2 * metrics.CLOSED_OPENING, "the typed text is spoken"

    # 3. The same through the API, with the page's token; and a recording of it.
    driver.find_element(By.ID, "live-record").click()
    wait_for(driver, lambda d: "Recording" in d.find_element(By.ID, "live-status").text, WAIT_FOR_PAGE,
             "recording")
    client = Client(url, verbose=False)
    said = client.predict(token, "Good morning to you.", "espeak", "", api_name="/live_say")
    assert said.startswith("Said ")
    time.sleep(float(said.split()[1]) + 1.0)  # it plays on the session's clock: let it be said
    recording, status = client.predict(token, api_name="/live_stop_recording")
    assert status == "Saved the recording."
    made = probe(recording)
    assert made.has_video and made.has_audio and made.duration > 1.0
    with face.FaceAnalyzer() as analyzer:
        from musetalk.video_io import read_frames

        track = analyzer.analyze(list(read_frames(recording)))
    assert np.nanmax(metrics.mouth_track(track, FPS).opening) > 2 * metrics.CLOSED_OPENING
    shutil.copy(recording, Path(keep_screenshot(driver, "live-after.png")).with_name("live-recording.mp4"))

    driver.find_element(By.ID, "live-stop").click()


def server_status(url: str) -> dict:
    import json

    with urllib.request.urlopen(url + "live/webrtc/status", timeout=5) as response:
        return json.load(response)


def post_offer(url: str, body: bytes) -> tuple[int, dict]:
    import json

    request = urllib.request.Request(url + "live/webrtc/offer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


# Threads that come and stay as the server works, idle between uses: thread pools' workers.
POOL_THREADS = ("asyncio_", "AnyIO worker thread", "ThreadPoolExecutor")


@needs_chromium
def test_closing_the_page_ends_its_connection_and_session(live_server, live_browser):
    from selenium.webdriver.common.by import By

    driver = live_browser
    driver.get(live_server)
    token_box = "#live-token textarea, #live-token input"
    wait_for(driver, lambda d: d.execute_script(f"return document.querySelector('{token_box}')?.value"),
             WAIT_FOR_PAGE, "the face prepared")
    before = server_status(live_server)
    driver.find_element(By.ID, "live-start").click()
    wait_for(driver, lambda d: d.execute_script("return document.querySelector('#live-video').videoWidth > 64"),
             WAIT_FOR_PAGE, "the face over WebRTC")
    during = server_status(live_server)
    assert during["connections"] == 1 and during["sessions"] == 1 and during["webrtc_tasks"] > 0
    assert "live" in during["threads"], "the session's generation thread runs"

    driver.get("about:blank")  # the page goes away without pressing Stop
    deadline = time.monotonic() + 5.0
    while (after := server_status(live_server))["connections"] or after["sessions"] or after["webrtc_tasks"]:
        assert time.monotonic() < deadline, f"the server still holds the closed page's connection: {after}"
        time.sleep(0.2)
    left = [name for name in after["threads"] if not name.startswith(POOL_THREADS)]
    kept = [name for name in before["threads"] if not name.startswith(POOL_THREADS)]
    assert sorted(left) == sorted(kept), "no thread of the connection or its session is left"


def test_a_bad_offer_is_refused_with_a_reason(live_server, face_clip):
    import json

    from gradio_client import Client, handle_file

    status, answer = post_offer(live_server, b"not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = post_offer(live_server, json.dumps({"type": "offer", "token": "abc"}).encode())
    assert status == 400 and "lacks sdp" in answer["error"]
    status, answer = post_offer(live_server, json.dumps({"sdp": "v=0", "type": "offer", "token": "abc"}).encode())
    assert status == 404 and "no longer prepared" in answer["error"]

    # A real token with an SDP that is not a browser's offer: refused, and no session is left open.
    client = Client(live_server, verbose=False)
    token, _ = client.predict(handle_file(str(face_clip)), "preview", api_name="/live_prepare")
    status, answer = post_offer(live_server, json.dumps({"sdp": "garbage", "type": "offer", "token": token}).encode())
    assert status == 400 and "audio and a video" in answer["error"]
    status, answer = post_offer(live_server, json.dumps({"sdp": "x", "type": "answer", "token": token}).encode())
    assert status == 400 and "must be 'offer'" in answer["error"]
    assert server_status(live_server)["sessions"] == 0


@needs_chromium
def test_stopping_the_server_closes_its_connections(face_clip, live_browser, tmp_path):
    from selenium.webdriver.common.by import By

    log = tmp_path / "server.log"
    with running_live_server(face_clip, log, "--verbose") as (url, server):
        driver = live_browser
        driver.get(url)
        token_box = "#live-token textarea, #live-token input"
        wait_for(driver, lambda d: d.execute_script(f"return document.querySelector('{token_box}')?.value"),
                 WAIT_FOR_PAGE, "the face prepared")
        driver.find_element(By.ID, "live-start").click()
        wait_for(driver, lambda d: d.execute_script("return document.querySelector('#live-video').videoWidth > 64"),
                 WAIT_FOR_PAGE, "the face over WebRTC")
        server.terminate()  # SIGTERM, as `docker stop` or a supervisor sends it
        server.wait(30)
    text = log.read_text()
    assert "live: closing 1 connection(s)" in text and "live: disconnected" in text, text[-3000:]
    driver.get("about:blank")
