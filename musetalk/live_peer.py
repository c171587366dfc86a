"""One page's WebRTC connection, served with aiortc: its microphone into a ``LiveSession``, the
session's picture and voice back to it.

``musetalk.live_rtc`` imports this module at the first offer, not with the app: aiortc and PyAV
take seconds to load, and a studio nobody uses live from should not carry them.

Picture and sound stay together: the video track pulls each frame from the session (paced by the
session's clock) and hands the frame's audio to the audio track through a small queue; when the
queue is full (the listener stopped taking sound) its oldest audio is dropped, so sound never
holds the picture back.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections.abc import Awaitable, Callable

import av
import numpy as np
from aiortc import (MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection,
                    RTCSessionDescription, VideoStreamTrack)
from aiortc.mediastreams import MediaStreamError

from musetalk.errors import InputError, LiveError
from musetalk.live import SAMPLE_RATE, LiveFrame, LiveSession
from musetalk.live_ice import IceSettings

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90000  # RTP's clock for video
PULL_TIMEOUT_S = 0.5  # how long one pull waits before the track looks again whether it was stopped
SOUND_QUEUE_FRAMES = 50  # frames' audio waiting for the audio track (2 s at 25 fps)
MICROPHONE_PUSH_TIMEOUT_S = 1.0  # a full session buffer this long drops the microphone's chunk


class FaceVideoTrack(VideoStreamTrack):
    """The session's frames as video; each frame's audio goes on to ``sound``, and to the recorder."""

    def __init__(self, session: LiveSession, entry, sound: asyncio.Queue):
        super().__init__()
        self.session = session
        self.entry = entry  # a LiveEntry: its recorder may start and stop while the track plays
        self.sound = sound

    async def recv(self) -> av.VideoFrame:
        frame = await self._next_frame()
        self._hand_on_sound(frame)
        picture = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
        picture.pts = round(frame.time * VIDEO_CLOCK)  # the stream's own time: the same clock as the sound's
        picture.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return picture

    async def _next_frame(self) -> LiveFrame:
        while self.readyState == "live":
            frame = await asyncio.to_thread(self._pull_and_record)
            if frame is not None:
                return frame
            if self.session.ended:
                break
        raise MediaStreamError  # the session ended: so does the track

    def _pull_and_record(self) -> LiveFrame | None:
        """In a worker thread: the session's pull waits for the frame's time, the recorder encodes it."""
        frame = self.session.pull(PULL_TIMEOUT_S)
        recorder = self.entry.recorder
        if frame is not None and recorder is not None:
            recorder.add(frame)
        return frame

    def _hand_on_sound(self, frame: LiveFrame) -> None:
        if self.sound.full():
            self.sound.get_nowait()  # a listener that stopped taking sound does not hold frames back
        self.sound.put_nowait(frame.audio)


class FaceAudioTrack(MediaStreamTrack):
    """The frames' audio, as the video track hands it on: s16 mono at 16 kHz, pts in samples."""

    kind = "audio"

    def __init__(self, sound: asyncio.Queue):
        super().__init__()
        self.sound = sound
        self._samples_sent = 0

    async def recv(self) -> av.AudioFrame:
        samples = await self.sound.get()
        while samples.size == 0:
            samples = await self.sound.get()
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._samples_sent
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._samples_sent += pcm.shape[1]
        return frame


class LivePeer:
    """One page's peer connection and the tasks that serve it; ``close`` ends them all (once).

    Two steps, so that a bad offer is refused before a session starts: ``take_offer`` reads the page's
    offer, ``answer`` connects it to the session and returns the SDP answer."""

    def __init__(self, token: str, entry, on_closed: Callable[[LivePeer], Awaitable[None]],
                 ice: IceSettings | None = None):
        self.token = token
        self.entry = entry  # a LiveEntry: its microphone flag and recorder change while the connection runs
        self.session: LiveSession | None = None
        self.pc = RTCPeerConnection(rtc_configuration(ice or IceSettings()))
        self.tasks: set[asyncio.Task] = set()
        self._incoming: list = []  # the page's tracks, read once the session is there
        self._on_closed = on_closed
        self._closing: asyncio.Task | None = None
        self.tracks: list[MediaStreamTrack] = []
        self.pc.on("track", self._incoming.append)
        self.pc.on("connectionstatechange", self._on_state)

    async def take_offer(self, sdp: str, kind: str) -> None:
        """Read the page's offer; InputError when it cannot be answered."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        except Exception as error:  # aiortc's parser raises whatever the bad text trips on
            raise InputError(f"the offer's SDP could not be used ({error or type(error).__name__}); "
                             "send the browser's own offer") from error
        offered = {transceiver.kind for transceiver in self.pc.getTransceivers()}
        if not {"audio", "video"} <= offered:
            raise InputError("the offer must carry an audio and a video section (the microphone, and "
                             "a video to receive the face); offered: " + (", ".join(sorted(offered)) or "nothing"))

    async def answer(self, session: LiveSession) -> RTCSessionDescription:
        """The SDP answer, ``session`` on its tracks (aiortc gathers its candidates before it returns)."""
        self.session = session
        sound: asyncio.Queue = asyncio.Queue(maxsize=SOUND_QUEUE_FRAMES)
        self.tracks = [FaceVideoTrack(session, self.entry, sound), FaceAudioTrack(sound)]
        for track in self.tracks:  # on the offer's transceivers: the face goes back the way the offer asked
            self.pc.addTrack(track)
        for track in self._incoming:
            self._read(track)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription

    def close(self) -> asyncio.Task:
        """Close the connection and end its tasks (from the event loop); every caller waits on the same close."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        return self._closing

    async def _close(self) -> None:
        await self.pc.close()
        for track in self.tracks + self._incoming:
            track.stop()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._on_closed(self)

    def _read(self, track) -> None:
        reader = self._hear(track) if track.kind == "audio" else _drain(track)
        task = asyncio.ensure_future(reader)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        logger.info("live: connection %s (%s)", state, self.token[:6])
        if state in ("failed", "closed"):
            await self.close()

    async def _hear(self, track) -> None:
        """The microphone, 16 kHz mono, into the session while the entry's microphone is on."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return  # the page's track ended
            # Resampled even while the microphone is off: the resampler's stream stays continuous.
            samples = [part.to_ndarray().reshape(-1) for part in resampler.resample(frame)]
            if not samples or not self.entry.microphone:
                continue
            try:
                await asyncio.to_thread(self.session.push_audio, np.concatenate(samples), MICROPHONE_PUSH_TIMEOUT_S)
            except LiveError as error:
                logger.warning("live: the microphone's audio was dropped: %s", error)
                if self.session.ended:
                    return


def rtc_configuration(ice: IceSettings) -> RTCConfiguration:
    """aiortc's configuration for ``ice``: the page's servers, the page's policy.

    aiortc uses the first stun: URL and the first TURN URL it can (turn: over UDP or TCP, turns: over
    TCP); the browser tries them all. An empty list, never None: with None aiortc asks Google's STUN
    server, which a server should not do unasked."""
    servers = [RTCIceServer(urls=list(server.urls), username=server.username, credential=server.credential)
               for server in ice.servers]
    policy = RTCIceTransportPolicy.RELAY if ice.relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


async def _drain(track) -> None:
    """Read and drop a track nobody needs (aiortc keeps what is not read)."""
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return
