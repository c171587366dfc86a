"""Live sessions over WebRTC: the browser's microphone in, the face's picture and voice out.

The transport is fastrtc's server side (``fastrtc.Stream``, aiortc under it), behind a route on
the app's own web server, ``/live/webrtc/offer`` (fastrtc loads at the first offer). fastrtc's Gradio component is not used: its
front end is built for Gradio 5 and does not load in Gradio 6 (the page stops at "Loading...":
``Cannot destructure property 'SvelteComponent' of window.__gradio__svelte__internal``), so the
page (``musetalk.live_page``) carries a small WebRTC client of its own that speaks fastrtc's offer
protocol.

A page first asks for a face (``LiveRegistry.prepare``: the avatar is prepared and cached) and
gets a token; its WebRTC connection uses the token as its id, and the handler opens a
``LiveSession`` for it. Text is spoken into the same session through ``LiveRegistry.say``, and
``start_recording`` / ``stop_recording`` save what the face did as an mp4.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musetalk.config import RunOptions
from musetalk.errors import InputError, LiveError
from musetalk.live import SAMPLE_RATE, LiveRecorder, LiveSession

logger = logging.getLogger(__name__)

OFFER_PATH = "/live"  # the fastrtc routes live under this prefix: POST /live/webrtc/offer
MAX_SESSIONS = 4  # faces prepared and waiting or connected at once; the oldest idle one goes first
IDLE_SECONDS = 1800  # a prepared face nobody connected to for this long is forgotten
VIDEO_FPS = 25  # what the WebRTC video track is paced at (a face at another rate is resampled by the clock)


@dataclass
class LiveEntry:
    """One page's live face: how to open its session, the session once connected, its recorder."""

    make_session: Callable[[], LiveSession]
    folder: Path  # where its recordings go
    microphone: bool = True  # the microphone's audio is spoken (False: only typed text is)
    session: LiveSession | None = None
    recorder: LiveRecorder | None = None
    created: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LiveRegistry:
    """The live faces of one server, by token."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._entries: OrderedDict[str, LiveEntry] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self, pipeline, video: str | os.PathLike, options: RunOptions | None = None) -> str:
        """Prepare ``video``'s face (cached for next time) and return the token a connection uses."""
        pipeline.prepare(video, options)  # face analysis now, not when the person starts talking
        token = secrets.token_hex(12)
        folder = self.folder / token
        folder.mkdir(parents=True, exist_ok=True)
        entry = LiveEntry(lambda: LiveSession(pipeline, video, options), folder)
        with self._lock:
            self._forget_old()
            self._entries[token] = entry
        return token

    def _forget_old(self) -> None:
        now = time.monotonic()
        for token in [t for t, e in self._entries.items() if e.session is None and now - e.created > IDLE_SECONDS]:
            self._entries.pop(token)
        while len(self._entries) >= MAX_SESSIONS:
            token, entry = self._entries.popitem(last=False)
            logger.info("live: too many faces at once; closing the oldest (%s)", token[:6])
            if entry.session is not None:
                entry.session.stop()

    def entry(self, token: str) -> LiveEntry:
        with self._lock:
            entry = self._entries.get(token or "")
        if entry is None:
            raise InputError("this live face is no longer prepared; choose the face again")
        return entry

    def open(self, token: str) -> LiveSession:
        """The token's session, started (a connection's first call)."""
        entry = self.entry(token)
        with entry.lock:
            if entry.session is None:
                entry.session = entry.make_session().start()
            return entry.session

    def session(self, token: str) -> LiveSession:
        entry = self.entry(token)
        if entry.session is None:
            raise LiveError("the face is not connected yet; press Start first")
        return entry.session

    def use_microphone(self, token: str, on: bool) -> None:
        self.entry(token).microphone = bool(on)

    def say(self, token: str, clips) -> float:
        """Push speech clips (16 kHz waveforms, one per sentence, as they are synthesized) into the
        session; returns the seconds pushed. Blocks while the session's buffer is full."""
        session = self.session(token)
        seconds = 0.0
        for clip in clips:
            session.push_audio(clip)
            seconds += len(clip) / SAMPLE_RATE
        return seconds

    def start_recording(self, token: str) -> None:
        entry = self.entry(token)
        session = self.session(token)
        with entry.lock:
            if entry.recorder is None:
                height, width = session.frame_size
                entry.recorder = LiveRecorder(entry.folder / f"live-{int(time.time())}.mp4", width, height,
                                              session.fps)

    def stop_recording(self, token: str) -> str:
        """Finish the recording; returns the mp4's path."""
        entry = self.entry(token)
        with entry.lock:
            recorder, entry.recorder = entry.recorder, None
        if recorder is None:
            raise LiveError("nothing is being recorded; press Record first")
        return str(recorder.finish())

    def close(self, token: str) -> None:
        with self._lock:
            entry = self._entries.pop(token, None)
        if entry is None:
            return
        if entry.recorder is not None:
            entry.recorder.finish()
        if entry.session is not None:
            entry.session.stop()

    def close_all(self) -> None:
        for token in list(self._entries):
            self.close(token)


def available() -> tuple[bool, str]:
    """(True, "") when fastrtc and aiortc are installed; else (False, what to install)."""
    import importlib.util

    missing = [name for name in ("fastrtc", "aiortc") if importlib.util.find_spec(name) is None]
    if not missing:
        return True, ""
    return False, (f"{' and '.join(missing)} not installed: pip install 'musetalk-studio[live]' and then "
                   "pip install --no-deps fastrtc (it declares gradio<6, but its server side works with Gradio 6)")


def mount(app, registry: LiveRegistry, path: str = OFFER_PATH) -> None:
    """Add the WebRTC offer route for ``registry``'s faces to a FastAPI app (``POST {path}/webrtc/offer``).

    fastrtc (and aiortc, PyAV, librosa under it) loads at the first offer, not with the app: it takes
    seconds to import, and a process that imported it was seen to grow about 0.5 GB more during
    concurrent dubs (tests/test_load.py), so a studio nobody uses live from never loads it."""
    import asyncio

    from starlette.responses import JSONResponse, Response

    streams: list = []
    lock = threading.Lock()

    def stream():
        with lock:
            if not streams:
                from fastrtc import Stream

                streams.append(Stream(handler_for(registry), modality="audio-video", mode="send-receive",
                                      concurrency_limit=MAX_SESSIONS, verbose=False))
            return streams[0]

    async def offer(request):
        from fastrtc.stream import Body

        body = Body(**await request.json())
        answer = await (await asyncio.to_thread(stream)).offer(body)
        return answer if isinstance(answer, Response) else JSONResponse(answer)

    # A plain Starlette route: the request as it came (fastrtc parses the body itself).
    app.add_route(f"{path}/webrtc/offer", offer, methods=["POST"])


def handler_for(registry: LiveRegistry):
    """A fastrtc audio-video handler serving ``registry``'s faces (fastrtc loads here, not at import)."""
    import asyncio

    from fastrtc import AsyncAudioVideoStreamHandler, get_current_context

    class LiveFaceHandler(AsyncAudioVideoStreamHandler):
        """One connection: its microphone into the session, the session's frames and audio out."""

        def __init__(self):
            super().__init__(expected_layout="mono", output_sample_rate=16000, input_sample_rate=16000,
                             fps=VIDEO_FPS)
            self.token: str | None = None
            self.session: LiveSession | None = None
            self.sound: asyncio.Queue = asyncio.Queue(maxsize=VIDEO_FPS * 2)  # the frames' audio, for emit()

        def copy(self):
            return LiveFaceHandler()

        async def start_up(self):
            self.token = get_current_context().webrtc_id
            try:
                self.session = await asyncio.to_thread(registry.open, self.token)
            except InputError as error:
                logger.warning("live: %s", error)

        async def receive(self, frame) -> None:
            if self.session is None or not registry.entry(self.token).microphone:
                return
            _, samples = frame
            await asyncio.to_thread(self.session.push_audio, np.asarray(samples).reshape(-1), 1.0)

        async def emit(self):
            samples = await self.sound.get()
            return 16000, (np.clip(samples, -1, 1) * 32767).astype(np.int16).reshape(1, -1)

        async def video_receive(self, frame) -> None:
            return None  # the page sends a blank picture only because the protocol wants one

        async def video_emit(self):
            if self.session is None:
                await asyncio.sleep(1 / VIDEO_FPS)
                return np.zeros((64, 64, 3), np.uint8)
            frame = await asyncio.to_thread(self.session.pull, 1.0)
            if frame is None:
                return None
            if self.sound.full():
                self.sound.get_nowait()  # a listener that stopped taking sound does not hold frames back
            self.sound.put_nowait(frame.audio)
            entry = registry.entry(self.token)
            if entry.recorder is not None:
                entry.recorder.add(frame)
            return np.ascontiguousarray(frame.image[:, :, ::-1])  # fastrtc sends BGR

        def shutdown(self) -> None:
            if self.token is not None:
                registry.close(self.token)

    return LiveFaceHandler()
