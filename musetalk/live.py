"""Live: a prepared face speaks audio that arrives while it plays.

A ``LiveSession`` takes a video (or photo) whose avatar the pipeline prepared (face track,
crop boxes, the engine's states; cached like a dub's), then::

    session.push_audio(chunk)   # 16 kHz mono samples, any length, from any thread
    for frame in session.frames():   # LiveFrame: picture and its audio, in order, at the video's rate
        ...
    session.close()             # the stream ends: the audio pushed so far is played out, then frames() ends

Output frame ``k`` shows source frame ``k`` of the ping-pong schedule a dub uses, so with no
speech the avatar idles on its own frames with its mouth at rest (a silent frame's face is made
once per source frame and kept: idling costs only the blending).

Latency (``latency_s``, stated before the first frame): a frame is drawn once the audio its
features read is in (``context_s``: the engine's right context plus the silence gate's
lookahead), and a batch of frames takes up to its own duration to draw; a frame is due
``context_s + 2 * batch / fps + SCHEDULING_MARGIN_S`` after the start of its audio. For the
preview engine (batches of one frame at 25 fps) that is 287 ms: 72 ms of right context (its mouth
shapes are smoothed over +-60 ms and each reads 25 ms of audio), 94 ms of gate lookahead (speech
spans start one 32 ms VAD window before silero-vad hears speech, the dub's 80 ms pre-roll being
what MuseTalk streams keep, and fade in over 30 ms; the window being filled takes up to 32 ms),
a frame to gather and one to draw (80 ms) and 40 ms of slack (audio up to ``LATE_AUDIO_S``, 20 ms,
late still lands in its place; thread wake-ups). Paced sessions (the default) keep
to that clock: audio that does not arrive is silence, and frames the engine would deliver late
are drawn by the preview engine instead (a MuseTalk session; ``stats.frames_stood_in``) or skipped
(``on_late="skip"``, and the preview engine itself: each skipped frame repeats the last picture,
with its own audio, so sound and picture stay together; ``stats.frames_skipped``); the log says so
every few seconds. Unpaced sessions (tests, benchmarks) make every frame as soon as its audio is
in and never fall behind.

Nothing grows with the stream's length: pushed audio waits in a buffer of ``max_buffered_s`` (a
push blocks while it is full), finished frames in a queue of two batches, and the audio
history kept for the features is released as frames go out.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import wave
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musetalk import audio as audio_lib
from musetalk import blending, schedule, video_io, visemes
from musetalk.avatar import FaceFrame
from musetalk.config import RunOptions
from musetalk.errors import InputError, LiveError
from musetalk.pipeline import LipSyncPipeline, PreparedVideo, _landmarks_in_crop, _MaskMemo
from musetalk.timing import StageTimer

logger = logging.getLogger(__name__)

SAMPLE_RATE = audio_lib.SAMPLE_RATE
# Source frames held in memory for the idle loop and blending: a long video is cut to what fits.
SOURCE_FRAMES_BYTES = 768 * 1024 * 1024
# Audio that may wait ahead of the picture: a synthesized sentence arrives faster than it plays.
MAX_BUFFERED_S = 30.0
BATCHES_QUEUED = 2  # finished batches waiting for the consumer
REST_FACES_KEPT = 512  # silent faces kept per source frame (196 KB each)
STATES_KEPT = 64  # engine states kept when the engine's are not worth caching (the preview's crops)
# Audio may come this late and still land in its place (a thread or a network packet late by a few ms): the
# clock fills in silence only after it. Audio later than that follows the silence, and every frame after it
# is that much later, for good (a stream cannot take silence back).
LATE_AUDIO_S = 0.02
# The clock's slack: audio up to LATE_AUDIO_S late, thread wake-ups, a batch that draws a little slow.
SCHEDULING_MARGIN_S = 0.04
SKIP_LOG_EVERY_S = 2.0  # how often skipped frames are reported in the log
_POLL_S = 0.05
_DONE = object()


@dataclass
class LiveFrame:
    """One output frame with the audio that plays with it."""

    index: int  # output frame number from the session's start
    image: np.ndarray  # RGB uint8 [H, W, 3]
    audio: np.ndarray  # float32 16 kHz samples of this frame's time
    speaking: bool  # the engine drew it from speech (False: the resting face, or a face-less frame)
    skipped: bool = False  # generation was late: this repeats the last picture
    drawn_by: str = ""  # the engine that drew it from speech ("" for a resting, skipped or face-less frame)
    time: float = 0.0  # seconds of the stream at which this frame starts


@dataclass
class LiveStats:
    frames_out: int = 0
    frames_spoken: int = 0  # drawn by the engine from speech
    frames_rest: int = 0  # the resting face of their source frame
    frames_skipped: int = 0  # repeats because generation was late
    frames_stood_in: int = 0  # drawn by the preview engine because the session's engine was late
    batches: int = 0
    batch_seconds_max: float = 0.0
    buffered_samples_max: int = 0  # the most audio ever waiting ahead of the picture
    queued_frames_max: int = 0  # the most finished frames ever waiting for the consumer
    history_samples_max: int = 0  # the most audio ever kept behind the picture (for the features)
    timings: dict[str, float] = field(default_factory=dict)


class LiveSession:
    """A prepared face that speaks the audio pushed to it (module docstring)."""

    def __init__(self, pipeline: LipSyncPipeline, video: str | os.PathLike, options: RunOptions | None = None,
                 paced: bool = True, batch_size: int | None = None, max_buffered_s: float = MAX_BUFFERED_S,
                 clock: Callable[[], float] = time.monotonic, progress=None, on_late: str = "auto"):
        self.options = (options or RunOptions()).validate()
        self.pipeline = pipeline
        self.engine = pipeline.engine
        self.paced = paced
        self._clock = clock
        self.timer = StageTimer()
        self.prepared = pipeline.prepare(video, self.options, progress)
        self.fps = self.prepared.fps
        self._sources = _load_sources(pipeline, self.prepared)
        self._num_sources = len(self._sources)
        self.batch_size = int(batch_size or _default_batch_size(self.engine))
        if self.batch_size < 1:
            raise InputError(f"batch_size must be at least 1, not {batch_size}")
        self._features = _features_for(self.engine, self.fps, self.options)
        self._gate = (audio_lib.StreamingSpeechGate(speech_pad_s=self._features.speech_pad_s)
                      if self.options.silence_gate else _NoGate())
        self.context_s = (self._features.right_context + self._gate.lookahead_samples) / SAMPLE_RATE
        self.latency_s = self.context_s + 2 * self.batch_size / self.fps + SCHEDULING_MARGIN_S
        self.max_buffered = int(max_buffered_s * SAMPLE_RATE)
        self.stats = LiveStats()
        self._stand_in = _stand_in_for(self.engine, on_late, self.fps)
        self._masks = _MaskMemo(self.options)
        self._states = self._prepare_states()
        self._rest_faces: OrderedDict[int, np.ndarray] = OrderedDict()
        self._last_image = self._sources[0]
        self._out: queue.Queue = queue.Queue(maxsize=BATCHES_QUEUED * self.batch_size)
        self._lock = threading.Condition()
        self._incoming: list[np.ndarray] = []
        self._end = 0  # samples of the stream so far (pushed audio and the silence the clock filled in)
        self._played = 0  # samples whose frames have been made
        self._closed = False
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._start: float | None = None
        self._last_skip_log = 0.0
        self._skipped_since_log = 0
        self._thread = threading.Thread(target=self._run, name="live", daemon=True)
        logger.info("live session on %s: %d source frames at %g fps, %s engine, batches of %d, latency %.0f ms",
                    self.prepared.info.path, self._num_sources, self.fps, self.engine.name, self.batch_size,
                    self.latency_s * 1000)

    # ------------------------------------------------------------------ the caller's side

    def start(self) -> LiveSession:
        """Start the clock and the generation (``frames()`` and ``push_audio`` start it when needed)."""
        with self._lock:
            if self._start is None:
                self._start = self._clock()
                self._thread.start()
        return self

    def push_audio(self, chunk, timeout: float | None = None) -> int:
        """The next samples (16 kHz mono, float in [-1, 1] or int16). Blocks while ``max_buffered_s`` of
        audio already waits ahead of the picture; LiveError after ``timeout`` seconds of that, or after close.
        Returns the stream's sample at which the chunk starts (after any silence the clock filled in because
        the chunk came late): its frames are due ``latency_s`` after that sample's time."""
        samples = _as_samples(chunk)
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._fill_silence()
            while self._end - self._played + samples.size > self.max_buffered and self._played < self._end:
                self._check_open()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise LiveError(f"the live session's audio buffer ({self.max_buffered / SAMPLE_RATE:g} s) "
                                    "stayed full; push audio no faster than it plays")
                self._lock.wait(_POLL_S if remaining is None else min(_POLL_S, remaining))
                self._fill_silence()
            self._check_open()
            position = self._end
            self._incoming.append(samples)
            self._end += samples.size
            self.stats.buffered_samples_max = max(self.stats.buffered_samples_max, self._end - self._played)
            self._lock.notify_all()
        return position

    def pull(self, timeout: float | None = None) -> LiveFrame | None:
        """The next frame, when it is due (paced) or ready; None once the session has ended, or after
        ``timeout`` seconds without one."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._out.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self._error is not None:
                    raise LiveError(f"live generation failed: {self._error}") from self._error
                if deadline is not None and time.monotonic() >= deadline:
                    return None
        if item is _DONE:
            self._out.put(_DONE)  # every later pull sees the end too
            if self._error is not None:
                raise LiveError(f"live generation failed: {self._error}") from self._error
            return None
        if self.paced:
            wait = self.due(item.index) - self._clock()
            if wait > 0:
                time.sleep(wait)
        self.stats.frames_out += 1
        return item

    def frames(self) -> Iterator[LiveFrame]:
        """Every frame in order until the session ends."""
        while (frame := self.pull()) is not None:
            yield frame

    def close(self) -> None:
        """End the stream: what was pushed is still played out, then ``frames()`` ends."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def stop(self) -> None:
        """End now: nothing more is made; waits for the generation thread."""
        self.close()
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def ended(self) -> bool:
        """No more frames will be made (the stream was played out, stopped, or its generation failed)."""
        return self._thread.ident is not None and not self._thread.is_alive()

    def due(self, index: int) -> float:
        """When (on the session's clock) frame ``index`` is shown in a paced session."""
        return (self._start or 0.0) + self.latency_s + index / self.fps

    def frame_samples(self, index: int) -> tuple[int, int]:
        """The stream's samples that play with frame ``index``."""
        return _frame_start(index, self.fps), _frame_start(index + 1, self.fps)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return self._sources[0].shape[:2]

    def source_index(self, index: int) -> int:
        """The source frame output frame ``index`` shows (the dub's schedule)."""
        return int(schedule.source_frames(np.array([index]), self._num_sources, self.options.loop)[0])

    def _check_open(self) -> None:
        if self._error is not None:
            raise LiveError(f"live generation failed: {self._error}") from self._error
        if self._closed:
            raise LiveError("the live session is closed; start a new one to speak again")

    def _fill_silence(self) -> None:
        """Paced: audio that did not arrive ``LATE_AUDIO_S`` after its time is silence (the lock is held)."""
        if not self.paced or self._closed:
            return
        now = round((self._clock() - self._start - LATE_AUDIO_S) * SAMPLE_RATE)
        if now > self._end:
            self._incoming.append(np.zeros(now - self._end, np.float32))
            self._end = now

    # ------------------------------------------------------------------ the generation thread

    def _run(self) -> None:
        try:
            with self.pipeline.turns.clocked_session():
                self._generate_all()
        except BaseException as error:  # raised in the consumer's thread by pull()
            self._error = error
            logger.exception("live generation failed")
        finally:
            self._put(_DONE, final=True)

    def _generate_all(self) -> None:
        position = 0
        while not self._stopped.is_set():
            positions = self._next_batch(position)
            if not positions:
                break
            position = positions[-1] + 1
            self._emit_batch(positions)
            self._release(position)

    def _next_batch(self, position: int) -> list[int]:
        """Frames from ``position`` whose audio is in, up to a batch; waits for it (or the clock's silence).
        Empty when the stream is closed and every frame is made."""
        last_needed = self._features.influence(position + self.batch_size - 1)[1]
        while not self._stopped.is_set():
            with self._lock:
                self._fill_silence()
                incoming, closed = self._take_incoming(), self._closed
            # The gate (silero-vad) judges the new audio outside the lock, so a push never waits for it: a
            # push kept waiting would come late, and the clock would put silence before it.
            if incoming is not None:
                self._gate.feed(incoming)
            if self._gate.final_end >= last_needed:
                return list(range(position, position + self.batch_size))
            if closed:
                self._gate.close()
                total = schedule.frames_to_carry(self._end / SAMPLE_RATE, self.fps)
                return list(range(position, min(position + self.batch_size, total)))
            with self._lock:
                if not self._incoming and not self._closed:  # nothing came while the gate judged
                    self._lock.wait(self._wait_for(self._gate.samples_needed(last_needed)))
        return []

    def _wait_for(self, needed: int) -> float:
        if not self.paced:
            return _POLL_S
        arrives = self._start + needed / SAMPLE_RATE + LATE_AUDIO_S - self._clock()  # when the clock makes it silence
        return max(0.001, min(_POLL_S, arrives))

    def _take_incoming(self) -> np.ndarray | None:
        """The audio pushed (or filled in) since the last call, for the gate (the lock is held)."""
        if not self._incoming:
            return None
        samples = np.concatenate(self._incoming)
        self._incoming.clear()
        return samples

    def _emit_batch(self, positions: list[int]) -> None:
        started = time.perf_counter()
        late = [k for k in positions if self._is_late(k)] if self.paced else []
        if late and self._stand_in is not None:
            for frame in self._draw(late, self._stand_in):
                self._put(frame)
            self._report_late(len(late), "drawn by the preview engine")
        elif late:
            for k in late:
                self._put(self._held_frame(k))
            self._report_late(len(late), "skipped")
        drawn = positions[len(late):]
        if drawn:
            # The engine may be drawing a dub's batch now (a shared pipeline): this batch goes next, and the
            # frames go to the consumer after the turn (a put may wait for it). The stand-in above is an
            # engine of its own, and never waits.
            with self.pipeline.turns.take(clocked=True):
                frames = self._draw(drawn)
            for frame in frames:
                self._put(frame)
        seconds = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.batch_seconds_max = max(self.stats.batch_seconds_max, seconds)

    def _is_late(self, index: int) -> bool:
        """Paced: this frame could not be drawn before it is due (a batch's time is allowed for it)."""
        return self._clock() + self.batch_size / self.fps > self.due(index)

    def _report_late(self, count: int, what: str) -> None:
        if self._stand_in is not None:
            self.stats.frames_stood_in += count
        else:
            self.stats.frames_skipped += count
        self._skipped_since_log += count
        now = time.monotonic()
        if now - self._last_skip_log >= SKIP_LOG_EVERY_S:
            logger.warning("live: the %s engine is behind the clock; %d frame(s) %s (%d in all)", self.engine.name,
                           self._skipped_since_log, what, self.stats.frames_skipped + self.stats.frames_stood_in)
            self._last_skip_log, self._skipped_since_log = now, 0

    def _held_frame(self, index: int) -> LiveFrame:
        return self._frame(index, self._last_image, speaking=False, skipped=True)

    def _frame(self, index: int, image: np.ndarray, speaking: bool, skipped: bool = False,
               drawn_by: str = "") -> LiveFrame:
        start, stop = self.frame_samples(index)
        frame = LiveFrame(index, image, self._gate.raw(start, stop), speaking, skipped, drawn_by, index / self.fps)
        self._last_image = image
        return frame

    def _draw(self, positions: list[int], stand_in: _StandIn | None = None) -> list[LiveFrame]:
        """Each frame: the engine's face from speech, the resting face in silence, the source frame with no face.
        ``stand_in``: the preview engine draws them instead of the session's (which is late)."""
        features = stand_in.features if stand_in else self._features
        items = [self._face_frame(k) for k in positions]
        silent = [self._gate.is_silent(*features.influence(k)) for k in positions]
        spoken = [n for n, item in enumerate(items) if item.box is not None and not silent[n]]
        new_faces = dict(zip(spoken, self._generate([positions[n] for n in spoken], [items[n] for n in spoken],
                                                    stand_in)))
        drawn_by = (stand_in.engine if stand_in else self.engine).name
        frames = []
        for n, (k, item) in enumerate(zip(positions, items)):
            if item.box is None:
                frames.append(self._frame(k, item.frame, speaking=False))
                continue
            face = new_faces[n] if n in new_faces else self._rest_face(item, stand_in)
            with self.timer.stage("blend"):
                square, mask = self._masks.get(item)
                image = blending.paste_face(item.frame, face, item.box, square, mask)
            frames.append(self._frame(k, image, speaking=n in new_faces, drawn_by=drawn_by if n in new_faces else ""))
        self.stats.frames_spoken += len(new_faces)
        self.stats.frames_rest += sum(1 for n, item in enumerate(items) if item.box is not None and n not in new_faces)
        return frames

    def _face_frame(self, index: int) -> FaceFrame:
        source = self.source_index(index)
        return self.prepared.avatar.face_frame(source, self._sources[source])

    def _generate(self, positions: list[int], items: list[FaceFrame], stand_in: _StandIn | None = None
                  ) -> list[np.ndarray]:
        if not items:
            return []
        import torch

        closed_at = self._gate.closed_at
        if stand_in is not None:  # its states are the crops, cut now (a few ms): nothing is kept for it
            frame_audio = stand_in.features.batch_audio(positions, self._gate, closed_at)
            states = torch.stack(self._prepare(items, stand_in.engine))
            return list(stand_in.engine.generate(states, frame_audio, self.timer))
        frame_audio = self._features.batch_audio(positions, self._gate, closed_at)
        states = torch.stack([self._state(item) for item in items])
        return list(self.engine.generate(states, frame_audio, self.timer))

    def _rest_face(self, item: FaceFrame, stand_in: _StandIn | None = None) -> np.ndarray:
        """The source frame's face with the mouth at rest (what silence gives), made once and kept; the
        stand-in's, when the engine's is not made yet, is drawn now (the engine is late)."""
        if stand_in is not None and item.index not in self._rest_faces:
            import torch

            state = torch.stack(self._prepare([item], stand_in.engine))
            return stand_in.engine.generate(state, stand_in.features.rest_audio(), self.timer)[0]
        if item.index in self._rest_faces:
            self._rest_faces.move_to_end(item.index)
            return self._rest_faces[item.index]
        import torch

        rest_audio = self._features.rest_audio()
        face = self.engine.generate(torch.stack([self._state(item)]), rest_audio, self.timer)[0]
        self._rest_faces[item.index] = face
        if len(self._rest_faces) > REST_FACES_KEPT:
            self._rest_faces.popitem(last=False)
        return face

    def _state(self, item: FaceFrame):
        if item.index not in self._states:
            self._states[item.index] = self._prepare([item])[0]
            if not self._keeps_all_states and len(self._states) > STATES_KEPT:
                self._states.pop(next(iter(self._states)))
        return self._states[item.index]

    @property
    def _keeps_all_states(self) -> bool:
        return self.engine.cache_id is not None

    def _prepare(self, items: list[FaceFrame], engine=None) -> list:
        with self.timer.stage("crop"):
            crops = np.stack([blending.crop_face(item.frame, item.box) for item in items])
            landmarks = np.stack([_landmarks_in_crop(item.landmarks, item.box) for item in items])
        return list((engine or self.engine).prepare(crops, landmarks, self.timer).detach().to("cpu"))

    def _prepare_states(self) -> dict:
        """Engine states of every source frame when the engine's are worth keeping (MuseTalk's latents:
        made now, in batches, so the stream never waits on the VAE encoder, and saved in the avatar
        cache); the preview's are cut as frames need them."""
        avatar = self.prepared.avatar
        if not self._keeps_all_states:
            return {}
        states = dict(avatar.states)
        missing = [s for s in range(self._num_sources) if avatar.usable[s] and s not in states]
        for first in range(0, len(missing), 8):
            chunk = [avatar.face_frame(s, self._sources[s]) for s in missing[first:first + 8]]
            with self.pipeline.turns.take():  # no clock runs yet: a dub's batches need not wait for these
                states.update(zip(missing[first:first + 8], self._prepare(chunk)))
        if missing:
            avatar.states = states
            self.pipeline.save_states(self.prepared)
        return states

    def _put(self, item, final: bool = False) -> None:
        """Into the bounded queue of finished frames; waits for the consumer (unless stopped)."""
        while not self._stopped.is_set() or final:
            try:
                self._out.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                if final and self._stopped.is_set():
                    _drain_one(self._out)
        self.stats.queued_frames_max = max(self.stats.queued_frames_max, self._out.qsize())

    def _release(self, position: int) -> None:
        """Frames before ``position`` are made: their audio leaves the buffer, the history the features
        no longer need is dropped."""
        with self._lock:
            self._played = min(self._end, _frame_start(position, self.fps))
            self._lock.notify_all()
        keep_from = min(self._features.keep_from(position, self._gate), _frame_start(position, self.fps))
        self._gate.release(keep_from)
        history = max(0, self._played - self._gate.kept_from)
        self.stats.history_samples_max = max(self.stats.history_samples_max, history)


class LiveRecorder:
    """What a live face showed and said, saved as an mp4: the frames are encoded as they come, the
    audio goes to a WAV beside them, and ``finish`` puts the two together (the sound is only known
    at the end, and the encoder wants it at the start)."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float):
        self.path = Path(path)
        self._silent_video = self.path.with_name(f".{self.path.stem}.video.mp4")
        self._wav_path = self.path.with_name(f".{self.path.stem}.wav")
        self._writer = video_io.FrameWriter(self._silent_video, width, height, fps)
        self._wav = wave.open(str(self._wav_path), "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self.frames = 0
        self._lock = threading.Lock()
        self._finished = False

    def add(self, frame: LiveFrame) -> None:
        with self._lock:
            if self._finished:
                return
            self._writer.write(frame.image)
            self._wav.writeframes((np.clip(frame.audio, -1, 1) * 32767).astype("<i2").tobytes())
            self.frames += 1

    def finish(self) -> Path:
        """Close the recording; returns the mp4 (LiveError when not one frame was recorded)."""
        with self._lock:
            if self._finished:
                return self.path
            self._finished = True
            self._wav.close()
            try:
                if self.frames == 0:
                    self._writer.abort()
                    raise LiveError("the recording has no frames: nothing played while it ran")
                self._writer.close()
                video_io.run_ffmpeg(["-y", "-i", str(self._silent_video), "-i", str(self._wav_path), "-map", "0:v",
                                     "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-b:a", "192k", "-shortest",
                                     str(self.path)], "save the live recording")
            finally:
                self._silent_video.unlink(missing_ok=True)
                self._wav_path.unlink(missing_ok=True)
        return self.path


# --------------------------------------------------------------------------- engine features, streamed


class _PreviewFeatures:
    """The preview engine's mouth shapes (``visemes``) over a sliding window of the gated audio.

    Each shape reads the 25 ms of audio around its 10 ms step and is smoothed over +-60 ms, so a
    frame depends on ``margin`` samples either side of its middle, and those are exactly the
    whole-file values. What a stream cannot know is the clip's loud level (the 95th percentile of
    its voiced-band level): it is taken over the speech heard so far (the last ``HISTORY_S``).
    """

    HISTORY_S = 20.0
    # The gate's pre-roll: speech spans start this long before silero-vad first hears speech. The dub's is 80
    # ms, so that a consonant's start is not cut; the preview's mouth opens with the voiced band's loudness,
    # and the quiet start of a consonant opens it next to nothing. One VAD window instead takes 48 ms off the
    # latency (the gate cannot call a sample final before it has judged the pre-roll after it); the mouth
    # opens about 10 ms later at onsets that silero hears late (``musetalk bench --live``).
    speech_pad_s = 0.032

    def __init__(self, fps: float):
        self.fps = fps
        self.hop = int(SAMPLE_RATE / visemes.RATE)
        # The smoothing's radius and the interpolation between two steps, each step's half window, and a
        # step for the rounding of the window's start to the grid.
        radius = math.ceil(3 * visemes.SMOOTHING_S * visemes.RATE)
        self.margin = (radius + 1) * self.hop + visemes.ANALYSIS_WINDOW // 2 + self.hop
        self.right_context = self.margin - _frame_start(1, fps) // 2
        self._levels: deque = deque(maxlen=int(self.HISTORY_S * visemes.RATE))
        self._levels_until = 0  # 10 ms steps whose level is in the history

    def influence(self, index: int) -> tuple[int, int]:
        middle = (index + 0.5) / self.fps * SAMPLE_RATE
        return int(math.floor(middle)) - self.margin, int(math.ceil(middle)) + self.margin

    def keep_from(self, index: int, gate) -> int:
        return self.influence(index)[0] - self.hop

    def batch_audio(self, positions: list[int], gate, closed_at: int | None) -> np.ndarray:
        start = max(0, self.influence(positions[0])[0]) // self.hop * self.hop
        stop = self.influence(positions[-1])[1]
        measures = visemes.voice_measures(gate.gated(start, stop))
        self._remember_levels(measures.level_db, start, stop)
        grid = start // self.hop + np.arange(measures.level_db.size)
        speech = gate.speech_at(grid * self.hop)
        targets = visemes.targets_from_measures(measures, visemes.loud_level_db(np.array(self._levels)), speech)
        times = (np.asarray(positions, dtype=np.float64) + 0.5) / self.fps - start / SAMPLE_RATE
        return targets.at(times)

    def _remember_levels(self, level_db: np.ndarray, start: int, stop: int) -> None:
        """Add the levels of the steps whose 25 ms window lies inside the audio read, each step once."""
        half = visemes.ANALYSIS_WINDOW // 2
        first_step = start // self.hop + (0 if start == 0 else -(-half // self.hop))
        last_step = (stop - half) // self.hop  # exclusive
        for step in range(max(first_step, self._levels_until), last_step):
            level = level_db[step - start // self.hop]
            if level > -100.0:  # a gated, zeroed step is not speech
                self._levels.append(level)
        self._levels_until = max(self._levels_until, last_step)

    def rest_audio(self) -> np.ndarray:
        return np.zeros((1, 3), np.float32)


class _WhisperFeatures:
    """MuseTalk's per-frame windows of Whisper steps (facts section 3), from the gated stream.

    Whisper reads 30 s blocks, as the whole-file encoder does: a batch encodes the blocks its
    windows touch, with the audio heard so far; a finished block is encoded once more, whole, and
    its features kept while windows still reach into it. Whisper's attention spans the block, so
    a step's features also depend on audio far from it: a stream, not knowing the block's future,
    gives features close to, not equal to, the whole file's.
    """

    STEP = SAMPLE_RATE // audio_lib.WHISPER_STEPS_PER_SECOND  # 320 samples
    BLOCK = audio_lib.WHISPER_WINDOW_SECONDS * SAMPLE_RATE
    BLOCK_STEPS = audio_lib.WHISPER_WINDOW_SECONDS * audio_lib.WHISPER_STEPS_PER_SECOND
    # Samples around a step that its features read: the 25 ms mel window and two 3-tap convolutions.
    EDGE = 720
    speech_pad_s = audio_lib.SPEECH_PAD_S  # the dub's pre-roll: the model shapes the lips for consonants

    def __init__(self, engine, fps: float, options: RunOptions):
        self.encoder = engine.audio_encoder
        self.fps = fps
        self.steps_per_frame = audio_lib.WHISPER_STEPS_PER_SECOND / fps
        self.shift = math.ceil(self.steps_per_frame) * options.audio_padding_left
        self.width = audio_lib.window_length(options.audio_padding_left, options.audio_padding_right)
        self.right_context = self.influence(0)[1] - _frame_start(1, fps)
        self._finished: dict[int, np.ndarray] = {}  # block -> its features, encoded whole
        self._rest: np.ndarray | None = None

    def steps(self, index: int) -> tuple[int, int]:
        first = int(math.floor(index * self.steps_per_frame)) - self.shift
        return first, first + self.width

    def influence(self, index: int) -> tuple[int, int]:
        first, stop = self.steps(index)
        return first * self.STEP - self.EDGE, stop * self.STEP + self.EDGE

    def keep_from(self, index: int, gate) -> int:
        first_block = max(0, self.steps(index)[0]) // self.BLOCK_STEPS
        for block in [b for b in self._finished if b < first_block]:
            del self._finished[block]
        block = first_block
        while block in self._finished:  # a finished block's audio is not read again
            block += 1
        return block * self.BLOCK

    def batch_audio(self, positions: list[int], gate, closed_at: int | None) -> np.ndarray:
        indices = np.array([np.arange(*self.steps(k)) for k in positions])
        total = None if closed_at is None else audio_lib.num_whisper_steps(closed_at)
        valid = (indices >= 0) & (indices < (total if total is not None else np.iinfo(np.int64).max))
        blocks = {int(s) // self.BLOCK_STEPS for s in indices[valid]}
        features = {block: self._block_features(block, gate) for block in blocks}
        layers, width = self.encoder.num_hidden_states, self.encoder.d_model
        gathered = np.zeros(indices.shape + (layers, width), np.float32)
        for (row, column) in zip(*np.nonzero(valid)):
            step = int(indices[row, column])
            block_features = features[step // self.BLOCK_STEPS]
            local = step % self.BLOCK_STEPS
            if local < len(block_features):
                gathered[row, column] = block_features[local]
        return gathered.reshape(len(positions), self.width * layers, width)

    def _block_features(self, block: int, gate) -> np.ndarray:
        if block in self._finished:
            return self._finished[block]
        start = block * self.BLOCK
        stop = min(start + self.BLOCK, gate.final_end)
        features = self.encoder.encode(gate.gated(start, stop)) if stop > start else np.zeros((0, 1, 1), np.float32)
        if stop == start + self.BLOCK:
            self._finished[block] = features
        return features

    def rest_audio(self) -> np.ndarray:
        """A frame's window in the middle of a second of silence."""
        if self._rest is None:
            features = self.encoder.encode(np.zeros(SAMPLE_RATE, np.float32))
            middle = audio_lib.WHISPER_STEPS_PER_SECOND // 2
            window = features[middle - self.width // 2: middle - self.width // 2 + self.width]
            self._rest = window.reshape(1, -1, features.shape[-1])
        return self._rest


LATE_POLICIES = ("auto", "preview", "skip")


@dataclass
class _StandIn:
    """The preview engine, drawing the frames a model engine would deliver too late."""

    engine: object
    features: _PreviewFeatures


def _stand_in_for(engine, on_late: str, fps: float) -> _StandIn | None:
    """``on_late``: "preview" (the preview engine draws late frames), "skip" (they repeat the last picture),
    "auto" (preview for a model engine, skip for the preview engine itself)."""
    if on_late not in LATE_POLICIES:
        raise InputError(f"on_late must be one of {', '.join(LATE_POLICIES)}, not {on_late!r}")
    if on_late == "skip" or engine.name == "preview":
        return None
    from musetalk.engines.preview import PreviewEngine

    return _StandIn(PreviewEngine(), _PreviewFeatures(fps))


def _features_for(engine, fps: float, options: RunOptions):
    if engine.name == "preview":
        return _PreviewFeatures(fps)
    if hasattr(engine, "audio_encoder"):
        return _WhisperFeatures(engine, fps, options)
    raise InputError(f"the {engine.name} engine cannot stream; use the preview or MuseTalk engine")


class _NoGate:
    """``StreamingSpeechGate``'s interface with the gate off (``silence_gate=False``): every sample passes."""

    lookahead_samples = 0

    def __init__(self):
        self._raw = np.zeros(0, np.float32)
        self._offset = 0
        self.closed_at: int | None = None

    @property
    def end(self) -> int:
        return self._offset + self._raw.size

    @property
    def final_end(self) -> int:
        return self.end

    @property
    def kept_from(self) -> int:
        return self._offset

    def samples_needed(self, final: int) -> int:
        return final

    def feed(self, samples: np.ndarray) -> None:
        self._raw = np.concatenate([self._raw, samples])

    def close(self) -> None:
        self.closed_at = self.end

    def raw(self, start: int, stop: int) -> np.ndarray:
        return _slice(self._raw, self._offset, start, stop)

    def gated(self, start: int, stop: int) -> np.ndarray:
        return self.raw(start, stop)

    def speech_at(self, samples: np.ndarray) -> None:
        return None

    def is_silent(self, start: int, stop: int) -> bool:
        return not np.any(self.raw(start, stop))

    def release(self, before: int) -> None:
        drop = min(max(0, before - self._offset), self._raw.size)
        self._raw, self._offset = self._raw[drop:], self._offset + drop


def _slice(buffer: np.ndarray, offset: int, start: int, stop: int) -> np.ndarray:
    """``buffer``'s samples ``start .. stop`` (absolute), zeros where it has none."""
    out = np.zeros(max(0, stop - start), np.float32)
    low, high = max(start, offset), min(stop, offset + buffer.size)
    if high > low:
        out[low - start: high - start] = buffer[low - offset: high - offset]
    return out


# --------------------------------------------------------------------------- helpers


def _load_sources(pipeline: LipSyncPipeline, prepared: PreparedVideo) -> list[np.ndarray]:
    """The source frames the session shows, decoded once: as many as SOURCE_FRAMES_BYTES holds."""
    info = prepared.info
    limit = max(1, SOURCE_FRAMES_BYTES // max(1, info.frame_bytes))
    count = min(len(prepared.avatar), limit)
    if count < len(prepared.avatar):
        logger.warning("live: %s has %d frames; the face idles on the first %d (%.1f s), what memory holds",
                       info.path, len(prepared.avatar), count, count / prepared.fps)
    frames = list(pipeline.source_frames(prepared, count))
    if not frames:
        raise InputError(f"no frames could be read from {info.path}")
    return frames


def _default_batch_size(engine) -> int:
    """One frame at a time for the preview (each costs milliseconds: a batch would only add latency); for
    MuseTalk 4 on a GPU (its kernels want batches) and 1 on a CPU (it cannot keep up anyway)."""
    if engine.name == "preview":
        return 1
    device = getattr(engine, "device", None)
    return 4 if getattr(device, "type", "cpu") == "cuda" else 1


def _frame_start(index: int, fps: float) -> int:
    return int(round(index * SAMPLE_RATE / fps))


def _as_samples(chunk) -> np.ndarray:
    array = np.asarray(chunk)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise InputError(f"live audio must be mono samples (1-D), got shape {array.shape}; mix channels down first")
    if array.dtype == np.int16:
        return (array.astype(np.float32) / 32768.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"live audio must be float samples in [-1, 1] or int16, got {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise InputError("live audio contains NaN or infinite samples")
    return array


def _drain_one(target: queue.Queue) -> None:
    try:
        target.get_nowait()
    except queue.Empty:
        pass

