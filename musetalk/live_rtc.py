"""Live sessions over WebRTC: the browser's microphone in, the face's picture and voice out.

The transport is aiortc, behind a route on the app's own web server: the page
(``musetalk.live_page``) posts its SDP offer, ``{sdp, type, token}``, to ``POST /live/webrtc/offer``
and gets the answer, ``{sdp, type}``; a refused offer gets a 4xx with ``{error}`` saying why.
Each page has one peer connection (``musetalk.live_peer``, loaded at the first offer): its
microphone, resampled to 16 kHz mono, goes into the token's ``LiveSession``; the session's frames
come back as a video track and their audio as an audio track, together. When the connection
closes (the page closes it as it goes away) or fails (a page that vanished without closing: ICE's
consent checks give up after about 30 s), the session is closed; when the server stops, every
connection is closed. ``GET /live/webrtc/status`` says what the server holds, and
``GET /live/webrtc/config`` gives the page the RTCConfiguration its client is made with: the same
STUN/TURN servers as the server's connections use (``musetalk.live_ice``).

A page first asks for a face (``LiveRegistry.prepare``: the avatar is prepared and cached) and
gets a token; its offer carries the token, and the connection opens a ``LiveSession`` for it.
Text is spoken into the same session through ``LiveRegistry.say``, and ``start_recording`` /
``stop_recording`` save what the face did as an mp4.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from musetalk.config import RunOptions
from musetalk.errors import InputError, LiveError, MuseTalkError
from musetalk.live import SAMPLE_RATE, LiveRecorder, LiveSession
from musetalk.live_ice import IceSettings

logger = logging.getLogger(__name__)

OFFER_PATH = "/live"  # the WebRTC routes live under this prefix: POST /live/webrtc/offer
MAX_SESSIONS = 4  # faces prepared and waiting or connected at once; the oldest idle one goes first
IDLE_SECONDS = 1800  # a prepared face nobody connected to for this long is forgotten


@dataclass
class LiveEntry:
    """One page's live face: how to open its session, the session once connected, its recorder."""

    make_session: Callable[[], LiveSession]
    folder: Path  # where its recordings go
    microphone: bool = True  # the microphone's audio is spoken (False: only typed text is)
    session: LiveSession | None = None
    recorder: LiveRecorder | None = None
    disconnect: Callable[[], None] | None = None  # closes its WebRTC connection (set while one is open)
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
            _end(entry)

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
        if entry is not None:
            _end(entry)

    def close_all(self) -> None:
        for token in list(self._entries):
            self.close(token)

    def connected(self) -> int:
        """How many faces have a session open."""
        with self._lock:
            return sum(entry.session is not None for entry in self._entries.values())


def _end(entry: LiveEntry) -> None:
    """Save its recording, close its connection, stop its session."""
    if entry.recorder is not None:
        try:
            entry.recorder.finish()
        except LiveError as error:  # an empty recording: nothing to keep
            logger.info("live: %s", error)
    if entry.disconnect is not None:
        entry.disconnect()
    if entry.session is not None:
        entry.session.stop()


def available() -> tuple[bool, str]:
    """(True, "") when aiortc and PyAV are installed; else (False, what to install)."""
    import importlib.util

    missing = [name for name in ("aiortc", "av") if importlib.util.find_spec(name) is None]
    if not missing:
        return True, ""
    return False, f"{' and '.join(missing)} not installed: pip install 'musetalk-studio[live]'"


class OfferRefused(MuseTalkError):
    """An offer the server will not answer; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class LiveConnections:
    """The WebRTC side of a registry's faces: one peer connection per token, on the server's event loop.

    aiortc (``musetalk.live_peer``) loads at the first offer, not with the app: it takes seconds to
    import, so a studio nobody uses live from never loads it."""

    def __init__(self, registry: LiveRegistry, ice: IceSettings | None = None):
        self.registry = registry
        self.ice = ice or IceSettings()  # the STUN/TURN servers of both ends
        self._peers: dict = {}  # token -> LivePeer; touched only on the event loop
        logger.info("live: ICE servers: %s", self.ice.describe())

    def mount(self, app, path: str = OFFER_PATH) -> None:
        """Add ``POST {path}/webrtc/offer`` and ``GET {path}/webrtc/status`` and ``/config`` to a
        FastAPI/Starlette app."""
        app.add_route(f"{path}/webrtc/offer", self.offer_route, methods=["POST"])
        app.add_route(f"{path}/webrtc/status", self.status_route, methods=["GET"])
        app.add_route(f"{path}/webrtc/config", self.config_route, methods=["GET"])

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The app's lifespan: when the server stops, every connection closes (and its session)."""
        yield
        await self.close_all()

    async def offer_route(self, request):
        from starlette.responses import JSONResponse

        try:
            answer = await self.answer(await request.body())
        except OfferRefused as error:
            logger.warning("live: offer refused (%d): %s", error.status, error)
            return JSONResponse({"error": str(error)}, status_code=error.status)
        return JSONResponse(answer)

    async def status_route(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(self.status())

    async def config_route(self, request):
        """The page's RTCConfiguration. It holds the TURN credentials, as it must: the browser logs in to
        the TURN server itself; not cached, so a changed setting reaches the next Start."""
        from starlette.responses import JSONResponse

        return JSONResponse(self.ice.browser_configuration(), headers={"Cache-Control": "no-store"})

    async def answer(self, body: bytes) -> dict:
        """The SDP answer ``{sdp, type}`` to an offer ``{sdp, type, token}`` (OfferRefused says why not)."""
        sdp, kind, token = _read_offer(body)
        try:
            entry = self.registry.entry(token)
        except InputError as error:
            raise OfferRefused(404, str(error)) from error
        if token not in self._peers and len(self._peers) >= MAX_SESSIONS:
            raise OfferRefused(503, f"this server already has {MAX_SESSIONS} live connections; "
                                    "close another live page and press Start again")
        live_peer = await asyncio.to_thread(importlib.import_module, "musetalk.live_peer")
        peer = live_peer.LivePeer(token, entry, self._closed, self.ice)
        try:
            await peer.take_offer(sdp, kind)
            replaced = self._peers.pop(token, None)
            if replaced is not None:  # the page pressed Start again: the new connection takes over the session
                await replaced.close()
            description = await peer.answer(await self._open(token))
        except InputError as error:
            await peer.close()
            raise OfferRefused(400, str(error)) from error
        except BaseException:
            await peer.close()
            raise
        self._peers[token] = peer
        entry.disconnect = _on_loop(peer.close)
        logger.info("live: connected (%s); %d connection(s)", token[:6], len(self._peers))
        return {"sdp": description.sdp, "type": description.type}

    async def _open(self, token: str) -> LiveSession:
        try:
            return await asyncio.to_thread(self.registry.open, token)
        except InputError as error:
            raise OfferRefused(404, str(error)) from error
        except MuseTalkError as error:
            raise OfferRefused(500, f"the live face could not start: {error}") from error

    async def _closed(self, peer) -> None:
        """A connection closed or failed (the page went away): its session goes too, unless it was replaced."""
        if self._peers.get(peer.token) is not peer:
            return
        del self._peers[peer.token]
        logger.info("live: disconnected (%s); %d connection(s)", peer.token[:6], len(self._peers))
        await asyncio.to_thread(self.registry.close, peer.token)

    async def close_all(self) -> None:
        peers = list(self._peers.values())
        if peers:
            logger.info("live: closing %d connection(s)", len(peers))
        await asyncio.gather(*(peer.close() for peer in peers), return_exceptions=True)

    def status(self) -> dict:
        """What the server holds: connections, open sessions, their asyncio tasks and threads."""
        return {"connections": len(self._peers), "sessions": self.registry.connected(),
                "webrtc_tasks": len(_webrtc_tasks()), "threads": sorted(t.name for t in threading.enumerate())}


def _read_offer(body: bytes) -> tuple[str, str, str]:
    """(sdp, type, token) from the page's JSON, or OfferRefused(400) naming what is wrong."""
    try:
        offer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OfferRefused(400, f"the offer is not JSON ({error}); send {{sdp, type, token}}") from error
    if not isinstance(offer, dict):
        raise OfferRefused(400, "the offer must be a JSON object {sdp, type, token}")
    missing = [key for key in ("sdp", "type", "token") if not isinstance(offer.get(key), str) or not offer[key]]
    if missing:
        raise OfferRefused(400, f"the offer lacks {', '.join(missing)}; send {{sdp, type, token}} "
                                "(the token comes from preparing the face)")
    if offer["type"] != "offer":
        raise OfferRefused(400, f"the offer's type is {offer['type']!r}; it must be 'offer'")
    return offer["sdp"], offer["type"], offer["token"]


def _on_loop(close: Callable[[], object]) -> Callable[[], None]:
    """``close`` made callable from any thread: it runs on the current event loop."""
    loop = asyncio.get_running_loop()

    def call() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has stopped: its connections are gone with it
            loop.call_soon_threadsafe(close)

    return call


def _webrtc_tasks() -> list[asyncio.Task]:
    """The running loop's tasks that serve WebRTC (aiortc's, aioice's, and the peers' own)."""
    def serves_webrtc(task: asyncio.Task) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code is not None else ""
        return any(part in filename for part in ("/aiortc/", "/aioice/", "live_peer.py"))

    return [task for task in asyncio.all_tasks() if not task.done() and serves_webrtc(task)]

