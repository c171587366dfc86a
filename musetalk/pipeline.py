"""LipSyncPipeline: a video (or photo) and an audio file in, a dubbed video out.

``__call__`` reads as the job's steps. Frames stream from the decoder through the model to
the encoder; what is kept per source frame is small (landmarks, a crop box, the engine's
latents while they will be used again), so memory stays flat in the video's length.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musetalk import audio as audio_lib
from musetalk import blending, face, schedule, video_io, weights
from musetalk.config import RunOptions
from musetalk.engines import Engine
from musetalk.errors import InputError, MuseTalkError
from musetalk.timing import StageTimer

logger = logging.getLogger(__name__)

# (stage, done, total): "faces" over source frames, "generate" over output frames.
ProgressCallback = Callable[[str, int, int], None]

OUTPUT_SUFFIXES = (".mp4", ".mov", ".mkv")
IMAGE_FPS = 25.0  # a photo is animated at the model's training rate


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


@dataclass
class SourceFaces:
    """Face analysis of every source frame, in the output frame rate."""

    track: face.FaceTrack
    boxes: np.ndarray  # [N, 4] crop boxes, -1 rows where there is no face
    usable: np.ndarray  # [N] the engine redraws these: a face was found and its crop box has an area

    def __len__(self) -> int:
        return len(self.track)


class LipSyncPipeline:
    def __init__(self, engine: Engine, audio_encoder: audio_lib.WhisperAudioEncoder, version: str = "v15",
                 device=None):
        self.engine = engine
        self.audio_encoder = audio_encoder
        self.version = version
        self.device = device

    @classmethod
    def from_pretrained(cls, models_dir: str | os.PathLike | None = None, version: str = "v15",
                        device: str = "auto", dtype=None) -> LipSyncPipeline:
        """Build every model from its config and load its weights (official layout or HF cache)."""
        from musetalk import models
        from musetalk.engines.musetalk import MuseTalkEngine

        files = weights.resolve(version, models_dir)
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
        return cls(MuseTalkEngine(unet, vae, torch_device, torch_dtype), encoder, version, torch_device)

    # ------------------------------------------------------------------ the job

    def __call__(self, video: str | os.PathLike, audio: str | os.PathLike, output: str | os.PathLike,
                 options: RunOptions | None = None, progress: ProgressCallback | None = None) -> LipSyncResult:
        progress = progress or (lambda stage, done, total: None)
        timer = StageTimer(self._synchronize)

        # 1. Check inputs
        options = (options or RunOptions()).validate()
        with timer.stage("probe"):
            video_info, audio_info = self.check_inputs(video, audio, output, options)
        fps = options.fps or (IMAGE_FPS if video_info.is_image else video_info.fps)

        # 2. Analyse the face in every source frame (landmarks, smoothing, crop boxes)
        faces = self._analyze_faces(video_info, fps, options, timer, progress)

        # 3. Output length and which source frame each output frame shows
        wav = self._load_audio(audio_info.path, options, timer)
        num_frames = self._output_length(wav, fps, len(faces), video_info, options)
        frame_sources = schedule.frame_schedule(num_frames, len(faces), options.loop)

        # 4. Audio features: silence gate, whisper encoder, per-frame windows
        wav = audio_lib.fit_length(wav, int(round(num_frames / fps * audio_lib.SAMPLE_RATE)))
        features, speech = self._audio_features(wav, options, timer)
        windows = audio_lib.chunk_indices(num_frames, fps, options.version, options.audio_padding_left,
                                          options.audio_padding_right, num_steps=len(features))

        # 5. Generate, blend and encode, streaming in batches
        width, height = video_info.width, video_info.height
        writer = video_io.FrameWriter(
            output, width, height, fps, audio_path=audio_info.path, crf=options.crf,
            audio_offset_s=options.av_offset_ms / 1000.0, protect=[video_info.path, audio_info.path],
            total_frames=num_frames,
        )
        try:
            redrawn = self._generate(video_info, fps, frame_sources, faces, features, windows, options,
                                     writer, timer, progress)
            with timer.stage("encode"):
                writer.close()  # flushes the encoder and moves the finished file into place
        except BaseException:
            writer.abort()  # no partial output, no temp file
            raise

        # 6. The result
        return LipSyncResult(
            output_path=str(output), num_frames=num_frames, fps=fps, width=width, height=height,
            duration=num_frames / fps, frames_with_face=redrawn, engine=self.engine.name,
            version=options.version, timings=timer.as_dict(), speech_spans=list(speech.spans) if speech else [],
        )

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
        audio_info = video_io.probe(_existing_file(audio, "audio"))
        if not audio_info.has_audio:
            raise InputError(f"{audio} has no audio stream; give an audio file or a video with sound")
        output = Path(output)
        if output.suffix.lower() not in OUTPUT_SUFFIXES:
            raise InputError(f"the output {output} must end in {', '.join(OUTPUT_SUFFIXES)}")
        for given in (video, audio):
            if output.resolve() == Path(given).resolve():
                raise InputError(f"the output {output} is also an input; choose another output path")
        if output.is_dir():
            raise InputError(f"the output {output} is a folder; give a file name such as {output / 'dubbed.mp4'}")
        output.parent.mkdir(parents=True, exist_ok=True)
        return video_info, audio_info

    # ------------------------------------------------------------------ steps

    def _synchronize(self) -> None:
        if self.device is not None and getattr(self.device, "type", "") == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _open_reader(self, info, fps: float, start: int = 0, count: int | None = None) -> Iterator[np.ndarray]:
        """Source frames at the output rate (a photo yields its one frame)."""
        rate = None if info.is_image else fps
        with video_io.FrameReader(info.path, info=info, fps=rate, start_frame=start, max_frames=count) as reader:
            yield from reader

    def _analyze_faces(self, info, fps, options: RunOptions, timer: StageTimer,
                       progress: ProgressCallback) -> SourceFaces:
        expected = 1 if info.is_image else max(1, int(round(info.duration * fps)))

        def frames_with_progress():
            for index, frame in enumerate(self._open_reader(info, fps)):
                progress("faces", index + 1, expected)
                yield frame

        with timer.stage("face"), face.FaceAnalyzer(face_index=options.face_index) as analyzer:
            track = analyzer.analyze(frames_with_progress())
            if len(track) == 0:
                raise InputError(f"no frame could be decoded from {info.path}; the file may be damaged")
            track = face.smooth_track(track.require_face(info.path), strength=options.smoothing, fps=fps)
            boxes = face.crop_boxes(track, options.version, options.extra_margin, options.bbox_shift)
        usable = track.has_face & (boxes[:, 0] >= 0)
        logger.info("faces in %d of %d source frames", int(usable.sum()), len(track))
        return SourceFaces(track, boxes, usable)

    def _load_audio(self, path: str, options: RunOptions, timer: StageTimer) -> np.ndarray:
        with timer.stage("audio_decode"):
            return audio_lib.load_audio(path)

    def _output_length(self, wav: np.ndarray, fps: float, num_source: int, video_info, options) -> int:
        if options.length == "video" and not video_info.is_image:
            return num_source
        num_frames = int(len(wav) / audio_lib.SAMPLE_RATE * fps)
        if num_frames < 1:
            raise InputError(
                f"the audio lasts {len(wav) / audio_lib.SAMPLE_RATE:.3f} s, shorter than one frame at "
                f"{fps:g} fps; give a longer audio"
            )
        return num_frames

    def _audio_features(self, wav: np.ndarray, options: RunOptions, timer: StageTimer):
        speech = None
        if options.silence_gate:
            with timer.stage("silence_gate"):
                speech = audio_lib.detect_speech(wav)
                wav = audio_lib.gate_silence(wav, speech)
        with timer.stage("whisper"):
            features = self.audio_encoder.encode(wav)
        return features, speech

    def _generate(self, info, fps, frame_sources: np.ndarray, faces: SourceFaces, features: np.ndarray,
                  windows: np.ndarray, options: RunOptions, writer, timer: StageTimer,
                  progress: ProgressCallback) -> int:
        """Stream output frames through the engine in batches; returns how many had a face."""
        states: dict[int, object] = {}  # engine state per source frame, kept until its last use
        last_use = {int(s): i for i, s in enumerate(frame_sources)}
        frames = schedule.scheduled_frames(frame_sources, lambda start, count: self._open_reader(info, fps, start, count))
        redrawn = 0
        for batch_start in range(0, len(frame_sources), options.batch_size):
            positions = range(batch_start, min(batch_start + options.batch_size, len(frame_sources)))
            with timer.stage("decode"):
                batch_frames = [next(frames) for _ in positions]
            sources = [int(frame_sources[i]) for i in positions]
            with_face = [k for k, s in enumerate(sources) if faces.usable[s]]
            if with_face:
                self._prepare_states(states, [sources[k] for k in with_face], [batch_frames[k] for k in with_face],
                                     faces, timer)
                audio_batch = audio_lib.frame_features(features, windows[[positions[k] for k in with_face]])
                new_faces = self.engine.generate([states[sources[k]] for k in with_face], audio_batch, timer)
                with timer.stage("blend"):
                    for k, new_face in zip(with_face, new_faces):
                        batch_frames[k] = _blend(batch_frames[k], new_face, faces, sources[k], options)
                redrawn += len(with_face)
            with timer.stage("encode"):
                for frame in batch_frames:
                    writer.write(frame)
            for position, source in zip(positions, sources):
                if last_use[source] == position:
                    states.pop(source, None)
            progress("generate", positions[-1] + 1, len(frame_sources))
        return redrawn

    def _prepare_states(self, states: dict, sources: list[int], frames: list[np.ndarray], faces: SourceFaces,
                        timer: StageTimer) -> None:
        """Run the engine's per-source-frame preparation for the sources not prepared yet."""
        todo = {}
        for source, frame in zip(sources, frames):
            if source not in states and source not in todo:
                todo[source] = frame
        if not todo:
            return
        with timer.stage("crop"):
            crops = np.stack([blending.crop_face(frame, faces.boxes[s]) for s, frame in todo.items()])
        states.update(zip(todo, self.engine.prepare(crops, timer)))


def _blend(frame: np.ndarray, new_face: np.ndarray, faces: SourceFaces, source: int, options: RunOptions) -> np.ndarray:
    height, width = frame.shape[:2]
    box = faces.boxes[source]
    square = blending.face_square(box, width, height)
    mask = blending.blend_mask(
        faces.track.landmarks[source], box, square, mode=options.parsing_mode,
        left_cheek_width=options.left_cheek_width, right_cheek_width=options.right_cheek_width,
        upper_boundary_ratio=options.upper_boundary_ratio,
    )
    return blending.paste_face(frame, new_face, box, square, mask)


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


def _existing_file(path, role: str) -> str:
    if not Path(path).is_file():
        raise InputError(f"the {role} file {path} does not exist; check the path")
    return str(path)
