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
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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

TURNSERVER = shutil.which("turnserver")  # coturn's

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


def wait_until_serving(process: subprocess.Popen, log: Path, name: str, answers: Callable[[], object],
                       seconds: float, pause: float) -> None:
    """Until ``answers()`` stops raising OSError; fails with the process's log if it exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"{name} exited: {log.read_text()[-2000:]}"
        try:
            answers()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{name} did not answer: {log.read_text()[-2000:]}"
            time.sleep(pause)


@contextlib.contextmanager
def running_live_server(face_clip: Path, log: Path, *options: str, live_options: tuple[str, ...] = (),
                        environment: dict[str, str] | None = None):
    """``musetalk [options] live --video <face> --engine preview [live_options]`` in its own process, with
    ``environment`` added to this one's; yields (URL, process)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(environment or {})}
    with open(log, "wb") as output:
        server = subprocess.Popen([sys.executable, "-m", "musetalk", *options, "live", "--video", str(face_clip),
                                   "--engine", "preview", "--port", str(port), *live_options], cwd=ROOT, env=env,
                                  stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        # Our own route, not just any page: a port taken in the moment since free_port() (another server on
        # a busy machine) must fail here, with this server's log, not later with a 404.
        wait_until_serving(server, log, "musetalk live",
                           lambda: urllib.request.urlopen(url + "live/webrtc/status", timeout=2).close(),
                           WAIT_FOR_PAGE, 0.5)
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


def test_the_studio_gives_its_live_tab_the_configured_ice_servers(tmp_path, monkeypatch):
    from musetalk.studio import Studio, StudioConfig

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    servers = '[{"urls": "turn:turn.example.com:3478", "username": "live", "credential": "%s"}]' % CREDENTIAL
    config = StudioConfig.from_env({"MUSETALK_ICE_SERVERS": servers, "MUSETALK_ICE_RELAY_ONLY": "1"},
                                   work_dir=str(tmp_path), device="cpu")
    studio = Studio(config)
    try:
        with launched_app(studio) as url:
            assert get_json(url + "live/webrtc/config") == {
                "iceServers": [{"urls": ["turn:turn.example.com:3478"], "username": "live", "credential": CREDENTIAL}],
                "iceTransportPolicy": "relay"}
    finally:
        studio.close()


@needs_chromium
def test_the_face_answers_the_microphone_text_and_the_api_over_webrtc(live_server, live_browser, microphone_wav):
    from gradio_client import Client
    from selenium.webdriver.common.by import By

    driver = live_browser
    url = live_server
    token = prepare_live_face(driver, url)
    press_start(driver)

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


TOKEN_BOX = "#live-token textarea, #live-token input"


def prepare_live_face(driver, url: str) -> str:
    """Open the live page and wait until it has prepared its face; returns the face's token."""
    driver.get(url)
    return wait_for(driver, lambda d: d.execute_script(f"return document.querySelector('{TOKEN_BOX}')?.value"),
                    WAIT_FOR_PAGE, "the face prepared")


def press_start(driver) -> None:
    """Start the page's WebRTC connection and wait until the face's picture plays."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "live-start").click()
    wait_for(driver, lambda d: d.execute_script("return document.querySelector('#live-video').videoWidth > 64"),
             WAIT_FOR_PAGE, "the face over WebRTC")


def server_status(url: str) -> dict:
    return get_json(url + "live/webrtc/status")


def post_offer(url: str, body: bytes) -> tuple[int, dict]:
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
    driver = live_browser
    prepare_live_face(driver, live_server)
    before = server_status(live_server)
    press_start(driver)
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
    log = tmp_path / "server.log"
    with running_live_server(face_clip, log, "--verbose") as (url, server):
        start_live_face(live_browser, url)
        server.terminate()  # SIGTERM, as `docker stop` or a supervisor sends it
        server.wait(30)
    text = log.read_text()
    assert "live: closing 1 connection(s)" in text and "live: disconnected" in text, text[-3000:]
    live_browser.get("about:blank")


# --------------------------------------------------------------------------- STUN and TURN servers

CREDENTIAL = "not-in-any-log-7f3a"  # the TURN servers' password in these tests: the server must not log it

# Before the page's own scripts: every RTCPeerConnection the page makes is kept in window.livePeers, so
# the test can ask it what configuration it was made with and which candidates it sent and got.
RECORD_PEERS_JS = """
(() => {
  const Original = window.RTCPeerConnection;
  if (!Original || Original.recorded) return;
  window.livePeers = [];
  function Recorded(configuration) { const pc = new Original(configuration); window.livePeers.push(pc); return pc; }
  Recorded.prototype = Original.prototype;
  Recorded.recorded = true;
  window.RTCPeerConnection = Recorded;
})();
"""
STUN_COOKIE = bytes.fromhex("2112a442")  # in every STUN message, TURN's too
BINDING_REQUEST, ALLOCATE_REQUEST = 0x0001, 0x0003


class SilentIceServer:
    """A UDP port on loopback that hears STUN and TURN requests and never answers: a server that is down."""

    def __init__(self):
        import socket
        import threading

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.heard: list[tuple[tuple[str, int], int]] = []  # (sender, STUN message type)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="silent-ice", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.socket.recvfrom(2048)
            except OSError:
                continue
            if len(data) >= 20 and data[4:8] == STUN_COOKIE:
                self.heard.append((sender, int.from_bytes(data[:2], "big")))

    def senders(self, message_type: int) -> set[tuple[str, int]]:
        return {sender for sender, kind in self.heard if kind == message_type}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close()


def candidates(sdp: str, kind: str) -> set[tuple[str, int]]:
    """The (address, port) of the SDP's UDP candidates of ``kind`` (host, srflx, relay)."""
    found = set()
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            if fields[2].lower() == "udp" and fields[fields.index("typ") + 1] == kind:
                found.add((fields[4], int(fields[5])))
    return found


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def recorded_peers(driver):
    """While inside, the pages the driver opens keep their peer connections in window.livePeers."""
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_PEERS_JS})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


def start_live_face(driver, url: str) -> None:
    """Open the live page, let it prepare its face, press Start and wait for the face over WebRTC."""
    prepare_live_face(driver, url)
    press_start(driver)


def connect_page(driver, url: str) -> dict:
    """``start_live_face``; returns what the page's peer connection holds (window.livePeers, recorded): its
    configuration, its offer's SDP and the server's answer's."""
    start_live_face(driver, url)
    return driver.execute_script("""
        const pc = window.livePeers[window.livePeers.length - 1];
        return {configuration: pc.getConfiguration(), offer: pc.localDescription.sdp,
                answer: pc.remoteDescription.sdp, state: pc.connectionState};""")


@needs_chromium
def test_stun_and_turn_servers_that_do_not_answer_leave_a_lan_session_working(face_clip, live_browser, tmp_path):
    """Both ends get the configured servers (the page's RTCPeerConnection is made with them, and both the
    server and the browser send them requests), and with those servers down the direct (host) path
    still connects: a bad or unreachable server does not break a session on a LAN."""
    silent = SilentIceServer()
    servers = [{"urls": [f"stun:127.0.0.1:{silent.port}"]},
               {"urls": [f"turn:127.0.0.1:{silent.port}"], "username": "live", "credential": CREDENTIAL}]
    log = tmp_path / "server.log"
    try:
        with running_live_server(face_clip, log, "--verbose",
                                 environment={"MUSETALK_ICE_SERVERS": json.dumps(servers)}) as (url, _):
            config = get_json(url + "live/webrtc/config")
            assert config == {"iceServers": servers, "iceTransportPolicy": "all"}
            with recorded_peers(live_browser):
                started = time.monotonic()
                held = connect_page(live_browser, url)
                took = time.monotonic() - started
            frames = capture(live_browser, 2.0)
            assert len(frames) > 2.0 * FPS * 0.8 and held["state"] == "connected", "the face streams"
            assert server_status(url)["connections"] == 1
            live_browser.get("about:blank")
    finally:
        silent.close()
    used = held["configuration"]
    as_chromium_says = [{"username": "", "credential": "", **server} for server in servers]  # it fills in ""
    assert used["iceServers"] == as_chromium_says and used["iceTransportPolicy"] == "all", "the page's client has them"
    # Each end asks the STUN server from its host candidates' sockets: who asked says which end had it.
    server_hosts, browser_hosts = candidates(held["answer"], "host"), candidates(held["offer"], "host")
    asked = silent.senders(BINDING_REQUEST)
    assert asked & server_hosts, f"the server's aiortc asked the STUN server ({asked}, server {server_hosts})"
    assert asked & browser_hosts, f"the browser asked the STUN server ({asked}, browser {browser_hosts})"
    # TURN is asked from sockets of its own, at both ends: which end asked is not told apart here (the
    # relay test below has both ends relay through a real TURN server).
    assert silent.senders(ALLOCATE_REQUEST), "the TURN server was asked for a relay"
    text = log.read_text()
    assert f"live: ICE servers: stun:127.0.0.1:{silent.port}, turn:127.0.0.1:{silent.port}" in text, text[-3000:]
    assert CREDENTIAL not in text, "the TURN credential is never logged"
    print(f"connected in {took:.1f} s with the STUN and TURN servers down")


@contextlib.contextmanager
def running_turn_server(folder: Path, username: str, credential: str):
    """coturn on 127.0.0.1 at a free port, relaying on loopback (which it refuses unless told: a TURN server
    open to loopback peers reaches its own host's services); yields (port, its log)."""
    import socket

    port = free_port()
    log = folder / "turnserver.log"
    with open(log, "wb") as output:
        turn = subprocess.Popen(
            [TURNSERVER, "-n", "--no-cli", "--no-tls", "--no-dtls", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
             f"--listening-port={port}", "--allow-loopback-peers", "--lt-cred-mech", f"--user={username}:{credential}",
             "--realm=musetalk-test", f"--pidfile={folder / 'turnserver.pid'}", f"--userdb={folder / 'turndb'}",
             "--log-file=stdout", "--simple-log", "--verbose"], stdout=output, stderr=subprocess.STDOUT)
    try:
        # It listens on TCP and UDP at once: TCP says when it is up.
        wait_until_serving(turn, log, "turnserver",
                           lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close(), 30, 0.2)
        yield port, log
    finally:
        turn.terminate()
        turn.wait(30)


@needs_chromium
@pytest.mark.skipif(TURNSERVER is None, reason="needs coturn's turnserver: apt-get install coturn")
def test_relay_only_the_face_comes_through_a_turn_server(face_clip, live_browser, tmp_path):
    """With --ice-relay-only both ends offer relayed candidates only, so the media goes through the TURN
    server (coturn, logged in with the configured credential) or not at all: what a Space's Live tab needs."""
    with running_turn_server(tmp_path, "live", CREDENTIAL) as (turn_port, turn_log):
        servers = [{"urls": [f"turn:127.0.0.1:{turn_port}?transport=udp"], "username": "live",
                    "credential": CREDENTIAL}]
        log = tmp_path / "server.log"
        with running_live_server(face_clip, log, "--verbose",
                                 live_options=("--ice-servers", json.dumps(servers), "--ice-relay-only")) as (url, _):
            assert get_json(url + "live/webrtc/config") == {"iceServers": servers, "iceTransportPolicy": "relay"}
            with recorded_peers(live_browser):
                held = connect_page(live_browser, url)
            frames = capture(live_browser, 2.0)
            live_browser.get("about:blank")
        turn_text = turn_log.read_text()
    assert held["configuration"]["iceTransportPolicy"] == "relay"
    assert len(frames) > 2.0 * FPS * 0.8 and held["state"] == "connected", "the face streams through the relay"
    for end in ("offer", "answer"):  # the browser's and the server's (aiortc's)
        assert not candidates(held[end], "host") and not candidates(held[end], "srflx"), f"the {end}: relay only"
        relayed = candidates(held[end], "relay")
        assert relayed and all(address == "127.0.0.1" for address, _ in relayed), f"the {end}'s relay: {relayed}"
    assert turn_text.count("user <live>") >= 2 and "allocation" in turn_text.lower(), turn_text[-3000:]
    text = log.read_text()
    assert "(relay only)" in text and CREDENTIAL not in text, "relay only is logged, the credential is not"
