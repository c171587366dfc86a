"""LipSyncPipeline: a video (or photo) and an audio file in, a dubbed video out.

``__call__`` reads as the job's steps. Frames stream from the decoder through the model to
the encoder; what is kept per source frame is small (landmarks, a crop box, the engine's
latents while they will be used again), so memory stays flat in the video's length.

One pipeline serves a dub and live sessions (``musetalk.live``) at the same time, from their own
threads (the studio and ``musetalk live`` share it). Its engine runs one batch at a time: every
call into it (a dub's batch: the face states and the new faces; one encoder batch of its Whisper
features; a live session's batch of frames) takes a turn of the pipeline's ``EngineTurns``, and
the turns go to live sessions first. A live batch has a clock and waits for at most the one batch
being drawn, and while a live session generates a dub's batches are ``SHARED_BATCH`` frames (its
output is the same); a dub's batch waits while a live one is waiting. A live frame that the wait makes late
is drawn by the preview engine or skipped, as when the engine itself is slow (``musetalk.live``).
Pipelines made by ``with_draft_decoder`` share the models, and so the turns.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from musetalk import audio as audio_lib
from musetalk import blending, face, schedule, stopping, video_io, weights
from musetalk.avatar import Avatar, AvatarCache, FaceFrame, avatar_key, file_hash
from musetalk.batching import BatchSize
from musetalk.config import RunOptions
from musetalk.engines import CROP_SIZE, ENGINES, Engine
from musetalk.errors import GPUMemoryError, InputError, MuseTalkError, WeightsMissingError
from musetalk.face_stream import FaceStream, analyse
from musetalk.stages import BackgroundCall, cpu_workers, ordered_map, prefetch, thread_pool, worker
from musetalk.timing import StageTimer

logger = logging.getLogger(__name__)

# (stage, done, total): "faces" over source frames, "generate" over output frames.
ProgressCallback = Callable[[str, int, int], None]

OUTPUT_SUFFIXES = tuple(video_io.OUTPUT_CONTAINERS)  # the container follows the name
FRAMES_AHEAD = 16  # decoded frames waiting for the model
BATCHES_BEHIND = 2  # generated batches waiting to be blended and encoded
IMAGE_FPS = 25.0  # a photo is animated at the model's training rate
# Input rates kept as they are; outside, the dub is made at MODEL_FPS: below about 10 fps the lips
# cannot follow speech (a 1 fps clip would show one mouth shape a second), above 120 the frames cost
# more than they show. MODEL_FPS is the rate MuseTalk was trained at.
KEPT_FPS = (10.0, 120.0)
MODEL_FPS = 25.0
# Declared rates outside these are not believed (no camera films them; a few kilobytes can declare
# 100,000 or 0.001 fps): the file's frames are taken one after another at MODEL_FPS instead.
BELIEVABLE_FPS = (1.0, 240.0)
TRIM_EVERY_BATCHES = 8  # how often a long job hands freed memory back to the system
MASKS_KEPT = 32  # blend masks a job keeps for source frames shown again


@dataclass
class LipSyncResult:
    output_path: str
    num_frames: int
    fps: float
    width: int
    height: int
    duration: float
    frames_with_face: int  # output frames the engine redrew; the rest passed through
    engine: str
    version: str
    timings: dict[str, float]  # seconds per stage
    speech_spans: list[tuple[float, float]] = field(default_factory=list)  # what the silence gate kept
    metrics: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0  # frames per model call at the end (an automatic or halved size differs from the option)
    notes: list[str] = field(default_factory=list)  # what the job changed of its own accord (the frame rate)


@dataclass
class PreparedVideo:
    """A video ready to be dubbed or streamed: what was probed, the rate it is dubbed at, its avatar."""

    info: video_io.MediaInfo
    fps: float
    avatar: Avatar


@dataclass(frozen=True)
class OutputPlan:
    """What a job's output will be, known before its first frame is made: what a frame sink opens with."""

    num_frames: int
    fps: float
    width: int
    height: int
    audio_path: str  # the speech the output carries
    audio_offset_s: float  # > 0 delays the speech, < 0 skips its start (RunOptions.av_offset_ms)


class FrameSink(Protocol):
    """A consumer of a job's output frames beside the encoder (the studio's scores, made from the frames in
    hand instead of decoding the output again).

    ``start`` is called once before the first frame; ``add`` with every output frame in order, from the
    thread that encodes, with the source frame and the face the job found in it (``source.landmarks`` and
    ``source.box`` None where it found none). ``add`` must return quickly: a slow sink holds the encoder
    back (heavy work goes to the sink's own thread). Finishing and aborting belong to whoever made it."""

    def start(self, plan: OutputPlan) -> None: ...

    def add(self, position: int, source: FaceFrame, frame: np.ndarray) -> None: ...


SHARED_BATCH = 2  # a dub's frames per engine call while a live session shares the engine (EngineTurns)


class EngineTurns:
    """Calls into one engine, one at a time, those with a clock first (the module docstring).

    ``with turns.take(clocked=True):`` for a live session's batch, ``with turns.take():`` for the rest:
    a clocked call waits only for the call running now; the others also wait while a clocked one waits.
    A turn is not taken again inside itself (that would wait for itself: it raises instead)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._holder: int | None = None  # the thread whose call runs now
        self._clocked_waiting = 0
        self._clocked_running = 0  # live sessions generating now (``clocked_session``)

    @contextmanager
    def clocked_session(self) -> Iterator[None]:
        """Around a live session's generation: while one runs, a dub's batches are ``SHARED_BATCH`` frames at
        most, so that a live batch waits for little (a CPU dub's batch of 8 preview frames is ~0.1 s)."""
        with self._changed:
            self._clocked_running += 1
        try:
            yield
        finally:
            with self._changed:
                self._clocked_running -= 1

    def batch_limit(self, size: int) -> int:
        """The dub's next batch size: ``size``, or ``SHARED_BATCH`` while a live session generates."""
        return min(size, SHARED_BATCH) if self._clocked_running else size

    @contextmanager
    def take(self, clocked: bool = False) -> Iterator[None]:
        me = threading.get_ident()
        with self._changed:
            if self._holder == me:
                raise RuntimeError("this thread already has the engine's turn; a turn is not taken inside itself")
            self._clocked_waiting += clocked
            try:
                while self._holder is not None or (not clocked and self._clocked_waiting):
                    self._changed.wait()
            finally:
                self._clocked_waiting -= clocked
            self._holder = me
        try:
            yield
        finally:
            with self._changed:
                self._holder = None
                self._changed.notify_all()


class LipSyncPipeline:
    def __init__(self, engine: Engine, version: str = "v15", device=None, avatar_cache: AvatarCache | None = None,
                 overlap: bool = True, cpu_workers: int | None = None, turns: EngineTurns | None = None):
        self.engine = engine
        self.turns = turns or EngineTurns()  # the engine's calls take turns: a dub's and live sessions' (above)
        self.version = version
        self.device = device
        self.avatar_cache = avatar_cache  # None: every run analyses the faces again
        self.overlap = overlap  # False: decode, model, blend and encode take turns on one thread
        # Threads for each per-frame CPU step (face analysis; crops and blending); None: by the CPU cores.
        self.cpu_workers = cpu_workers

    @classmethod
    def from_pretrained(cls, models_dir: str | os.PathLike | None = None, version: str = "v15",
                        device: str = "auto", dtype=None,
                        cache_dir: str | os.PathLike | None | bool = None, engine: str = "musetalk",
                        compile: bool = False) -> LipSyncPipeline:
        """Build every model from its config and load its weights (official layout or HF cache).

        ``cache_dir``: where prepared avatars are kept (None: the per-user default, False: no cache).
        ``engine``: "musetalk" (the model), "draft" (the model, decoding with TAESD: ``musetalk download
        --draft``), or "preview" (no weights, no GPU: a real-time CPU preview; ``models_dir``, ``device``
        and ``dtype`` are then not used).
        ``compile``: ``torch.compile`` the models (minutes at the first batch; see MuseTalkEngine._compile).
        """
        from musetalk import models
        from musetalk.engines.musetalk import MuseTalkEngine

        if engine not in ENGINES:
            raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        avatar_cache = None if cache_dir is False else AvatarCache(cache_dir or None)
        # The silence gate's and the face analysis' models load with the others, not in the first job.
        audio_lib.load_vad_model()
        face.load_models()
        if engine == "preview":
            from musetalk.engines.preview import PreviewEngine

            return cls(PreviewEngine(), version, None, avatar_cache)
        files = weights.resolve(version, models_dir, draft=engine == "draft")
        if engine == "draft":
            weights.draft_decoder_dir(models_dir)  # a missing TAESD is said now, not after loading the rest
        torch_device = models.resolve_device(device)
        torch_dtype = models.resolve_dtype(torch_device, dtype)
        root = weights.models_dir_or_default(models_dir)
        logger.info("loading MuseTalk %s on %s (%s)", version, torch_device, torch_dtype)
        with _corrupt_files_reported(files.unet.weights, version, root):
            unet = models.load_unet(files.unet.config, files.unet.weights, torch_device, torch_dtype)
        with _corrupt_files_reported(files.vae_dir, version, root):
            vae = models.load_vae(files.vae_dir, torch_device, torch_dtype)
        with _corrupt_files_reported(files.whisper_dir, version, root):
            encoder = audio_lib.WhisperAudioEncoder.from_pretrained(files.whisper_dir, torch_device, torch_dtype)
        model = MuseTalkEngine(unet, vae, encoder, torch_device, torch_dtype,
                               cache_id=_weights_id(files.vae_dir, torch_dtype), compile=compile)
        pipeline = cls(model, version, torch_device, avatar_cache)
        return pipeline.with_draft_decoder(models_dir) if engine == "draft" else pipeline

    def with_draft_decoder(self, models_dir: str | os.PathLike | None = None) -> LipSyncPipeline:
        """The draft engine on this pipeline's models: TAESD (``musetalk download --draft``) decodes, the
        UNet, VAE and Whisper are shared (a studio that offers both qualities holds one copy)."""
        from musetalk.engines.musetalk import MuseTalkEngine

        if not isinstance(self.engine, MuseTalkEngine) or self.engine.draft_decoder is not None:
            raise InputError(f"the draft engine is built on a MuseTalk pipeline, not a {self.engine.name} one")
        decoder = _load_draft_decoder(models_dir, self.engine.device, self.engine.dtype)
        return LipSyncPipeline(self.engine.with_draft_decoder(decoder), self.version, self.device, self.avatar_cache,
                               self.overlap, self.cpu_workers, self.turns)

    # ------------------------------------------------------------------ the job

    def __call__(self, video: str | os.PathLike, audio, output: str | os.PathLike,
                 options: RunOptions | None = None, progress: ProgressCallback | None = None,
                 stream_dir: str | os.PathLike | None = None, sinks: Sequence[FrameSink] = ()) -> LipSyncResult:
        """``audio``: a file, or an ``AudioClip`` from a speech source (its phoneme timings, when it
        has them, drive the preview engine's mouth shapes). ``stream_dir``: an existing folder where
        the output is also cut into short HLS segments as it is encoded (video_io.FrameWriter).
        ``sinks``: FrameSinks handed every output frame as it is encoded (the output file is the same
        with or without them)."""
        progress = progress or (lambda stage, done, total: None)
        audio, events = (audio.path, tuple(audio.events)) if hasattr(audio, "events") else (audio, ())
        timer = StageTimer(self._synchronize)
        started = time.perf_counter()

        # 1. Check inputs
        options = (options or RunOptions()).validate()
        with timer.stage("probe"):
            video_info, audio_info = self.check_inputs(video, audio, output, options)
        fps = _output_fps(video_info, options)
        notes = _rate_notes(video_info, fps, options)
        for note in notes:  # also in the result, which the command line prints
            logger.info("%s", note)

        # 2. Audio features (decode, silence gate, the engine's features) in a thread, beside the face analysis
        abandoned = threading.Event()  # the job failed: the audio thread stops at its next step
        audio_job = BackgroundCall(self._audio_features, audio_info.path, events, video_info, options, timer,
                                   abandoned, threaded=self.overlap)

        # 3. Faces: the prepared avatar from the cache, or a face analysis that generation follows
        try:
            faces = self._faces(video_info, fps, options, timer, progress)
        except BaseException:
            _abandon(audio_job, abandoned)
            raise
        try:
            try:
                wav_seconds, features, speech = audio_job.result()
            except BaseException:
                _abandon(audio_job, abandoned)
                raise

            # 4. Output length; as long as the video: its frame count is known once every frame is analysed
            if options.length == "video" and not video_info.is_image and isinstance(faces, FaceStream):
                faces = faces.result()
            num_frames = self._output_length(wav_seconds, fps, faces, video_info, options)

            # 5. Generate, blend and encode: analysis, decoding, the model and blending + encoding overlap
            with video_io.folders_for(output):  # new output folders go again if the job fails
                redrawn, batch_size, states, states_before, avatar = self._dub(
                    output, video_info, audio_info, fps, num_frames, faces, features, options, timer, progress,
                    stream_dir, sinks)
        except BaseException:
            if isinstance(faces, FaceStream):
                faces.close()
            raise

        # 6. Keep what was prepared for the next run of this video
        if self.avatar_cache is not None and not stopping.requested():
            avatar.states, avatar.states_changed = states, len(states) > states_before
            with timer.stage("cache_save"):
                self.avatar_cache.save(avatar, self.engine.cache_id, video_info.path)

        # 7. The result
        timings = timer.as_dict()
        timings["total"] = round(time.perf_counter() - started, 4)
        return LipSyncResult(
            output_path=str(output), num_frames=num_frames, fps=fps, width=video_info.width,
            height=video_info.height, duration=num_frames / fps, frames_with_face=redrawn,
            engine=self.engine.name, version=options.version, timings=timings,
            speech_spans=list(speech.spans) if speech else [], batch_size=batch_size, notes=notes,
        )

    def _dub(self, output, video_info, audio_info, fps: float, num_frames: int, faces, features,
             options: RunOptions, timer: StageTimer, progress: ProgressCallback, stream_dir=None,
             sinks: Sequence[FrameSink] = ()):
        """Step 5: the frames through the engine into the output file, which exists only when all went well."""
        writer = video_io.FrameWriter(
            output, video_info.width, video_info.height, fps, audio_path=audio_info.path, crf=options.crf,
            audio_offset_s=options.av_offset_ms / 1000.0, protect=[video_info.path, audio_info.path],
            total_frames=num_frames, stream_dir=stream_dir,
        )
        states = faces.states if isinstance(faces, Avatar) else {}  # engine states by source frame
        states_before = len(states)
        try:
            plan = OutputPlan(num_frames, fps, video_info.width, video_info.height, audio_info.path,
                              options.av_offset_ms / 1000.0)
            for sink in sinks:
                sink.start(plan)
            redrawn, batch_size = self._generate(video_info, fps, num_frames, faces, states, features, options,
                                                 writer, timer, progress, sinks)
            avatar = faces.result() if isinstance(faces, FaceStream) else faces
            stopping.check()  # the last moment a stop leaves nothing: the file is moved into place next
            with timer.stage("encode"):
                writer.close()  # flushes the encoder and moves the finished file into place
        except BaseException:
            writer.abort()  # no partial output, no temp file
            raise
        return redrawn, batch_size, states, states_before, avatar

    def prepare(self, video: str | os.PathLike, options: RunOptions | None = None,
                progress: ProgressCallback | None = None) -> PreparedVideo:
        """The video's prepared avatar (face track, crop boxes, cached engine states) without dubbing it:
        what a live session (``musetalk.live``) starts from. Found in the avatar cache, or analysed and
        saved there; the engine states are left to the caller."""
        options = (options or RunOptions()).validate()
        if options.version != self.version:
            raise InputError(f"this pipeline was loaded with the {self.version} weights, not {options.version}")
        info = video_io.probe(_existing_file(video, "video"))
        if not info.has_video:
            raise InputError(f"{video} has no video stream; give a video or a photo of a face")
        info = _with_believable_timing(_within_pixel_limit(info, options))
        fps = _output_fps(info, options)
        timer = StageTimer(self._synchronize)
        faces = self._faces(info, fps, options, timer, progress or (lambda stage, done, total: None))
        cached = isinstance(faces, Avatar)
        avatar = faces if cached else faces.result()
        if self.avatar_cache is not None and not cached:
            self.avatar_cache.save(avatar, self.engine.cache_id, info.path)
        return PreparedVideo(info, fps, avatar)

    def save_states(self, prepared: PreparedVideo) -> None:
        """Keep the engine states a caller added to ``prepared.avatar.states`` in the avatar cache."""
        if self.avatar_cache is not None and self.engine.cache_id is not None:
            prepared.avatar.states_changed = True
            self.avatar_cache.save(prepared.avatar, self.engine.cache_id, prepared.info.path)

    def source_frames(self, prepared: PreparedVideo, limit: int | None = None) -> Iterator[np.ndarray]:
        """The video's frames at the rate it is dubbed at (a photo: its one frame), up to ``limit``."""
        yield from self._open_reader(prepared.info, prepared.fps, 0, limit)

    def check_inputs(self, video, audio, output, options: RunOptions):
        """Probe both inputs and check the output path; InputError says what is wrong and what to do."""
        if options.version != self.version:
            raise InputError(
                f"this pipeline was loaded with the {self.version} weights; load a {options.version} "
                f"pipeline (LipSyncPipeline.from_pretrained(version={options.version!r})) to run it"
            )
        video_info = video_io.probe(_existing_file(video, "video"))
        if not video_info.has_video:
            raise InputError(f"{video} has no video stream; give a video or a photo of a face")
        video_info = _within_pixel_limit(video_info, options)
        audio_info = video_io.probe(_existing_file(audio, "audio"))
        if not audio_info.has_audio:
            raise InputError(f"{audio} has no audio stream; give an audio file or a video with sound")
        output = Path(output)
        if output.is_dir():
            raise InputError(f"the output {output} is a folder; give a file name such as {output / 'dubbed.mp4'}")
        video_io.require_output_suffix(output)
        for given in (video, audio):
            # resolve() sees through symbolic links, samefile() through hard links too
            if output.resolve() == Path(given).resolve() or (output.exists() and os.path.samefile(output, given)):
                raise InputError(f"the output {output} is also an input; choose another output path")
        video_io.check_output_path(output)  # creates nothing: a refused job leaves no folders
        video_info = _with_believable_timing(video_info)
        _require_output_space(output, video_info, audio_info, options)
        return video_info, audio_info

    # ------------------------------------------------------------------ steps

    def worker_count(self) -> int:
        """Threads for each per-frame CPU step in this pipeline's jobs (``cpu_workers``, or by the cores)."""
        return self.cpu_workers or cpu_workers()

    def _synchronize(self) -> None:
        if self.device is not None and getattr(self.device, "type", "") == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _open_reader(self, info, fps: float, start: int = 0, count: int | None = None) -> Iterator[np.ndarray]:
        """Source frames at the output rate (a photo yields its one frame)."""
        rate = None if info.is_image else fps
        with video_io.FrameReader(info.path, info=info, fps=rate, start_frame=start, max_frames=count) as reader:
            yield from reader

    def _faces(self, info, fps, options: RunOptions, timer: StageTimer, progress: ProgressCallback
               ) -> Avatar | FaceStream:
        """The cached avatar of this video and options, else a face analysis of every source frame:
        running in a thread that generation follows (overlap), or done now (no overlap)."""
        key = ""
        if self.avatar_cache is not None:
            with timer.stage("cache_lookup"):
                key = avatar_key(file_hash(info.path), fps, options)
                cached = self.avatar_cache.load(key, self.engine.cache_id)
            if cached is not None:
                logger.info("prepared faces found in the cache (%d frames)", len(cached))
                progress("faces", len(cached), len(cached))
                return cached
        expected = 1 if info.is_image else max(1, int(round(info.duration * fps)))
        frames = prefetch(self._open_reader(info, fps), FRAMES_AHEAD, "decode-faces", self.overlap)
        report = lambda done: progress("faces", done, max(done, expected))  # noqa: E731
        if self.overlap:
            return FaceStream(frames, key, info.width, info.height, fps, options, timer, report, info.path,
                              self.worker_count())
        try:
            return analyse(frames, key, info.width, info.height, fps, options, timer, progress=report,
                           source=info.path, workers=self.worker_count())
        finally:
            frames.close()

    def _audio_features(self, path: str, events: Sequence, video_info, options: RunOptions, timer: StageTimer,
                        abandoned: threading.Event):
        """(seconds of audio, the engine's features of it, what the silence gate kept)."""
        with timer.stage("audio_decode"):
            wav = audio_lib.load_audio(path)
        _check_not_abandoned(abandoned)
        seconds = len(wav) / audio_lib.SAMPLE_RATE
        if options.length == "video" and not video_info.is_image:
            # The output may outlast the audio: the rest is silence, encoded like any pause.
            wav = audio_lib.fit_length(wav, max(len(wav), int((video_info.duration + 1) * audio_lib.SAMPLE_RATE)))
        speech = None
        if options.silence_gate:
            with timer.stage("silence_gate"):
                speech = audio_lib.detect_speech(wav)
                wav = audio_lib.gate_silence(wav, speech)
        _check_not_abandoned(abandoned)
        return seconds, self.engine.audio_features(wav, speech, events, timer, turn=self.turns.take), speech

    def _output_length(self, audio_seconds: float, fps: float, faces, video_info, options) -> int:
        """Frames of the output: as many as the video has, or enough to carry the whole audio (rounded
        up: the official code rounds down and drops up to a frame of speech, 0.45 s at 1 fps)."""
        if options.length == "video" and not video_info.is_image:
            return len(faces)
        frames = audio_seconds * fps
        if frames < 1 - 1e-6:
            raise InputError(
                f"the audio lasts {audio_seconds:.3f} s, shorter than one frame at {fps:g} fps; give a longer audio"
            )
        return max(1, schedule.frames_to_carry(audio_seconds, fps))

    def _frames_to_dub(self, info, fps, num_frames: int, faces: Avatar | FaceStream, states: dict,
                       options: RunOptions, timer: StageTimer, pool) -> Iterator[FaceFrame]:
        """Each output frame's source frame with its face, in output order, cropped for the engine
        where it has no state for that frame yet (on ``pool``'s threads, not on the model's, which a
        GPU would otherwise wait on).

        Output frame i shows source frame i for as long as the video lasts (every loop mode starts
        so): those come from the face analysis as it finishes them. The rest of a schedule (the
        audio outlasts the video) needs the whole avatar, and decodes its frames again."""

        def cut(item: FaceFrame) -> FaceFrame:
            if item.box is not None and item.index not in states:
                with timer.stage("crop"):
                    item.crop = blending.crop_face(item.frame, item.box)
            return item

        yield from ordered_map(cut, self._source_frames(info, fps, num_frames, faces, options), pool,
                               self.worker_count())

    def _source_frames(self, info, fps, num_frames: int, faces: Avatar | FaceStream,
                       options: RunOptions) -> Iterator[FaceFrame]:
        done = 0
        if isinstance(faces, FaceStream):
            for item in faces.frames(num_frames):
                yield item
                done += 1
            if done == num_frames:
                return
            faces = faces.result()
        sources = schedule.frame_schedule(num_frames, len(faces), options.loop)[done:]
        open_frames = lambda start, count: self._open_reader(info, fps, start, count)  # noqa: E731
        for source, frame in zip(sources, schedule.scheduled_frames(sources, open_frames, info.frame_bytes)):
            yield faces.face_frame(int(source), frame)

    def _generate(self, info, fps, num_frames: int, faces: Avatar | FaceStream, states: dict, features,
                  options: RunOptions, writer, timer: StageTimer, progress: ProgressCallback,
                  sinks: Sequence[FrameSink] = ()) -> tuple[int, int]:
        """Stream output frames through the engine in batches; returns how many had a face, and the
        batch size at the end.

        Three threads beside the face analysis: one brings source frames in output order, this one
        runs the model, one blends and encodes (and hands each frame to the sinks); bounded queues
        between them keep memory flat. Crops and blending run on a pool of ``cpu_workers`` threads, so
        no one core limits them."""
        with thread_pool(self.worker_count(), "frames") as pool:
            return self._generate_on(info, fps, num_frames, faces, states, features, options, writer, timer,
                                     progress, pool, sinks)

    def _generate_on(self, info, fps, num_frames: int, faces: Avatar | FaceStream, states: dict, features,
                     options: RunOptions, writer, timer: StageTimer, progress: ProgressCallback,
                     pool, sinks: Sequence[FrameSink] = ()) -> tuple[int, int]:
        """``_generate`` with crops and blending spread over ``pool`` (None: one thread each)."""

        masks = _MaskMemo(options)

        def blend(pair: tuple[FaceFrame, np.ndarray | None]) -> np.ndarray:
            item, new_face = pair
            if new_face is None:
                return item.frame
            with timer.stage("blend"):
                square, mask = masks.get(item)
                return blending.paste_face(item.frame, new_face, item.box, square, mask)

        def blend_and_write(batch) -> None:
            last_position, items, new_faces = batch
            pairs = [(item, new_faces.get(k)) for k, item in enumerate(items)]
            first_position = last_position + 1 - len(items)
            for position, item, frame in zip(itertools.count(first_position), items,
                                             ordered_map(blend, pairs, pool, len(pairs))):
                with timer.stage("encode"):
                    writer.write(frame)
                for sink in sinks:
                    sink.add(position, item, frame)
            progress("generate", last_position + 1, num_frames)

        batch_size = BatchSize(options.batch_size, self.device)
        decoded = prefetch(self._frames_to_dub(info, fps, num_frames, faces, states, options, timer, pool),
                           FRAMES_AHEAD, "decode", self.overlap)
        writing = worker(blend_and_write, BATCHES_BEHIND, "blend-encode", self.overlap)
        redrawn = 0
        positions = range(0)
        try:
            for batch_number in itertools.count():
                size = self.turns.batch_limit(batch_size.size)  # smaller while a live session shares the engine
                positions = range(positions.stop, min(positions.stop + size, num_frames))
                if not positions:
                    break
                with timer.stage("decode"):
                    items = [next(decoded) for _ in positions]
                with_face = [k for k, item in enumerate(items) if item.landmarks is not None]
                audio_batch = self.engine.frame_audio(features, np.array([positions[k] for k in with_face]), fps,
                                                      options)
                batch_size.before_batch()
                with stopping.interruptible():  # seconds a batch on a CPU: a signal stops it at once
                    new_faces = self._redraw_within_memory([items[k] for k in with_face], audio_batch, states,
                                                           timer, batch_size)
                batch_size.after_batch(len(with_face))
                writing.put((positions[-1], items, dict(zip(with_face, new_faces))))
                redrawn += len(with_face)
                if batch_number % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
                    return_freed_memory()
            writing.finish()
        except BaseException:
            writing.abort()
            raise
        finally:
            decoded.close()
        return redrawn, batch_size.size

    def _redraw_within_memory(self, items: list[FaceFrame], audio_batch: np.ndarray, states: dict,
                              timer: StageTimer, batch_size: BatchSize) -> list[np.ndarray]:
        """``_redraw``; a batch that runs the GPU out of memory is redrawn in halves, and later batches are smaller."""
        import torch

        try:
            with self.turns.take():
                return self._redraw(items, audio_batch, states, timer)
        except torch.OutOfMemoryError as error:
            if len(items) <= 1:
                raise GPUMemoryError(
                    "the GPU ran out of memory running the model on a single frame; close other programs that "
                    "use the GPU, or run on the CPU (--device cpu)"
                ) from error
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed batch held goes back before the halves run
        batch_size.halve(len(items))
        half = len(items) // 2
        return (self._redraw_within_memory(items[:half], audio_batch[:half], states, timer, batch_size)
                + self._redraw_within_memory(items[half:], audio_batch[half:], states, timer, batch_size))

    def _redraw(self, items: list[FaceFrame], audio_batch: np.ndarray, states: dict,
                timer: StageTimer) -> list[np.ndarray]:
        """New face crops for these frames. Engine states are kept by source frame when the engine's
        are worth keeping (MuseTalk's latents: a VAE encode saved); the preview's are cut again."""
        import torch

        if not items:
            return []
        missing = {item.index: item for item in items if item.index not in states}
        prepared = {}
        if missing:
            with timer.stage("crop"):
                crops = np.stack([item.crop for item in missing.values()])  # cut by _frames_to_dub
                landmarks = np.stack([_landmarks_in_crop(item.landmarks, item.box) for item in missing.values()])
            new_states = self.engine.prepare(crops, landmarks, timer).detach().to("cpu")
            prepared = dict(zip(missing, new_states))
            if self.engine.cache_id is not None:
                states.update(prepared)
        batch = torch.stack([states[item.index] if item.index in states else prepared[item.index] for item in items])
        return list(self.engine.generate(batch, audio_batch, timer))


class _MaskMemo:
    """One job's blend masks by source frame: a frame shown again (ping-pong, a photo) reuses its mask,
    which costs a few ms to build. The most recently used ``MASKS_KEPT`` are kept."""

    def __init__(self, options: RunOptions):
        self.options = options
        self._masks: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item: FaceFrame) -> tuple:
        """(square, mask) for the frame's face."""
        with self._lock:
            if item.index in self._masks:
                self._masks.move_to_end(item.index)
                return self._masks[item.index]
        height, width = item.frame.shape[:2]
        square = blending.face_square(item.box, width, height)
        options = self.options
        mask = blending.blend_mask(
            item.landmarks, item.box, square, mode=options.mask_mode(),
            left_cheek_width=options.left_cheek_width, right_cheek_width=options.right_cheek_width,
            upper_boundary_ratio=options.upper_boundary_ratio,
        )
        with self._lock:
            self._masks[item.index] = (square, mask)
            if len(self._masks) > MASKS_KEPT:
                self._masks.popitem(last=False)
        return square, mask


# How long a failed job waits for its audio thread when a stop was asked for: the silence gate on
# minutes of speech takes seconds, and cannot be interrupted; the thread ends on its own soon after.
ABANDON_WAIT_S = 1.0


def _abandon(audio_job: BackgroundCall, abandoned: threading.Event) -> None:
    """The job failed or was stopped: the audio thread stops at its next step. It is waited for (its
    thread ends before the job does), but only briefly when the job is stopped by a signal."""
    abandoned.set()
    audio_job.wait(ABANDON_WAIT_S if stopping.requested() else None)


def _check_not_abandoned(abandoned: threading.Event) -> None:
    stopping.check()
    if abandoned.is_set():
        raise InputError("the job was given up")  # nobody reads it: the job already failed


def return_freed_memory() -> None:
    """Give the heap memory this process has freed back to the system (glibc only; elsewhere a no-op).

    glibc keeps what a thread frees for that thread's next allocations; with frames and tensors of
    megabytes freed by several threads, a long job's resident memory crept up by 0.3 MB a frame
    although nothing was kept (measured on a 30 s 720p clip: 950 -> 1220 MB; with a trim every
    few seconds it stayed at 840 to 950 MB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _landmarks_in_crop(landmarks: np.ndarray, box) -> np.ndarray:
    """Frame-pixel landmarks [468, 2] mapped into the box's 256x256 crop (as crop_face resizes it)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    scale = np.array([CROP_SIZE / (x2 - x1), CROP_SIZE / (y2 - y1)], dtype=np.float32)
    return (landmarks - np.array([x1, y1], dtype=np.float32)) * scale


def _weights_id(vae_dir: Path, dtype) -> str:
    """What the engine's prepared states depend on: the VAE's files (by size and time) and the dtype."""
    described = [str(dtype)]
    for path in sorted(Path(vae_dir).iterdir()):
        if path.is_file():
            stat = path.stat()
            described.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "musetalk|" + "|".join(described)


def _load_draft_decoder(models_dir, device, dtype):
    from musetalk import models

    taesd_dir = weights.draft_decoder_dir(models_dir)
    try:
        return models.load_draft_decoder(taesd_dir, device, dtype)
    except Exception as error:
        raise WeightsMissingError(
            f"the draft decoder in {taesd_dir} is damaged ({type(error).__name__}: {error}). Delete the folder and "
            f"fetch it again with: musetalk download --draft"
        ) from error


@contextmanager
def _corrupt_files_reported(path: Path, version: str, models_dir: Path) -> Iterator[None]:
    """Our own errors pass as they are; anything else a loader raises means a damaged file
    (a truncated or garbled checkpoint fails deep inside torch or safetensors)."""
    try:
        yield
    except MuseTalkError:
        raise
    except Exception as error:
        raise weights.corrupt_weights_error(path, version, models_dir, error) from error


def _within_pixel_limit(info: video_io.MediaInfo, options: RunOptions) -> video_io.MediaInfo:
    """The video as the job reads it: downscaled to fit options.max_pixels, or refused (options.oversize)."""
    pixels = info.width * info.height
    if pixels <= options.max_pixels:
        return info
    if options.oversize == "refuse":
        raise InputError(
            f"{info.path} is {info.width}x{info.height} ({pixels / 1e6:.1f} megapixels), above max_pixels="
            f"{options.max_pixels}; scale it down, raise max_pixels, or let it be downscaled (oversize=downscale)"
        )
    width, height = video_io.fit_pixels(info.width, info.height, options.max_pixels)
    logger.warning("%s is %dx%d: working at %dx%d (max_pixels=%d); the output has that size",
                   info.path, info.width, info.height, width, height, options.max_pixels)
    return info.resized(width, height)


def _output_fps(video_info, options: RunOptions) -> float:
    """The option's rate, else a photo's IMAGE_FPS, else the video's own when lips can follow it (KEPT_FPS),
    else MODEL_FPS."""
    if options.fps:
        return options.fps
    if video_info.is_image:
        return IMAGE_FPS
    low, high = KEPT_FPS
    return video_info.fps if low <= video_info.fps <= high else MODEL_FPS


def _with_believable_timing(info: video_io.MediaInfo) -> video_io.MediaInfo:
    """A video whose declared rate is outside BELIEVABLE_FPS, retimed: its frames one after another at MODEL_FPS."""
    low, high = BELIEVABLE_FPS
    if info.is_image or low <= info.fps <= high:
        return info
    return info.retimed(MODEL_FPS)


def _rate_notes(info: video_io.MediaInfo, fps: float, options: RunOptions) -> list[str]:
    """What was done to the frame rate without being asked, said in words."""
    if info.retimed_from is not None:
        return [f"{info.path} declares {info.retimed_from:g} frames per second, which no camera films: its "
                f"{info.num_frames} frame(s) are taken one after another at {info.fps:g} fps"
                + (f" and the dub is made at {fps:g} fps" if abs(fps - info.fps) > 1e-6 else "")]
    if info.is_image or options.fps or abs(fps - info.fps) < 1e-6:
        return []
    if info.fps < KEPT_FPS[0]:
        return [f"{info.path} runs at {info.fps:g} fps, too slow for lips to follow speech: the dub is made at "
                f"{fps:g} fps (each frame held; --fps sets another rate)"]
    return [f"{info.path} runs at {info.fps:g} fps: the dub is made at {fps:g} fps, the model's rate "
            f"(--fps sets another rate up to {KEPT_FPS[1]:g})"]


def _require_output_space(output: Path, video_info, audio_info, options: RunOptions) -> None:
    """DiskSpaceError before any work when the output folder cannot hold the result."""
    fps = _output_fps(video_info, options)
    seconds = video_info.duration if options.length == "video" and not video_info.is_image else audio_info.duration
    needed = video_io.estimated_mp4_bytes(video_info.width, video_info.height, fps, seconds, options.crf)
    video_io.require_free_space(video_io.existing_folder(output), needed, f"the output {output.name}")


def _existing_file(path, role: str) -> str:
    if not Path(path).is_file():
        raise InputError(f"the {role} file {path} does not exist; check the path")
    return str(path)
