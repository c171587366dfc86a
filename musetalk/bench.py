"""``musetalk bench``: the real pipeline on a clip, timed per stage, against the plain
decode + encode of the same clip (the floor no dubbing job can beat).

Models: ``tiny`` (the test models: what the pipeline around the model costs), ``full`` (the
full-size architectures with random weights: the real cost, nothing to download) or
``weights`` (the installed checkpoints). ``engine="draft"`` decodes with TAESD (random or installed,
as the model kind says); ``engine="preview"`` times the preview engine instead (no model: the model kind
does not apply). Two runs: the first prepares the avatar, the second
finds it in the cache, as a second dub of the same video does.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from musetalk.config import RunOptions
from musetalk.errors import InputError

logger = logging.getLogger(__name__)

MODEL_KINDS = ("tiny", "full", "weights")
# The engine's per-frame work: the model's own time, which the other stages should add little to.
MODEL_STAGES = ("vae_encode", "unet", "vae_decode", "render")
STAGE_ORDER = ("probe", "cache_lookup", "face", "audio_decode", "silence_gate", "whisper", "mouth_shapes", "decode",
               "crop", "vae_encode", "unet", "vae_decode", "render", "blend", "encode", "cache_save")


@dataclass
class RunReport:
    seconds: float  # wall time of the whole job
    frames: int
    fps: float  # output frames per second of wall time
    realtime_factor: float  # wall time / video duration (below 1 is faster than real time)
    peak_ram_mb: float
    peak_gpu_mb: float | None
    stages: dict[str, float]  # seconds per stage (overlapping stages each count their own time)
    batch_size: int  # frames per model call at the end of the run
    model_seconds: float  # the engine's per-frame work (MODEL_STAGES)
    outside_model_percent: float | None  # how much the whole job's time exceeds the model's, in percent


@dataclass
class BenchReport:
    clip: str
    width: int
    height: int
    fps: float
    duration: float
    model: str
    device: str
    dtype: str
    batch_size: int | None  # asked for; None: automatic
    floor_seconds: float  # plain decode + encode of the same clip
    floor_fps: float
    runs: list[RunReport] = field(default_factory=list)
    compiled: bool = False  # the models went through torch.compile
    draft: bool = False  # TAESD decoded the faces
    cpu_workers: int = 1  # threads for each per-frame CPU step (face analysis; crops and blending)
    torch_threads: int = 1  # torch's threads per model call (OMP_NUM_THREADS sets it before the start)

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class PeakMemory:
    """Highest resident memory of this process while in the ``with`` block, sampled every 20 ms
    (ru_maxrss cannot be reset between runs)."""

    def __init__(self):
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-memory")

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            try:
                with open("/proc/self/statm") as handle:
                    self.peak_bytes = max(self.peak_bytes, int(handle.read().split()[1]) * page)
            except OSError:
                return
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        if self.peak_bytes == 0:  # no /proc: the lifetime peak is the best we have
            import resource

            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_clip(path: Path, width: int, height: int, seconds: float, fps: float) -> Path:
    """A face (the packaged public-domain portrait) moving slowly in a ``width`` x ``height`` frame,
    with a tone whose loudness rises and falls like syllables as its sound."""
    from musetalk.video_io import run_ffmpeg

    face = resources.files("musetalk.assets").joinpath("face.jpg")
    side = max(64, (min(width, height) * 2 // 3) // 2 * 2)
    travel = max(0, width - side)
    overlay_x = f"{travel}/2+{travel}/4*sin(2*PI*t/8)"
    graph = (f"color=c=0x304050:s={width}x{height}:r={fps}:d={seconds}[bg];"
             f"[0:v]scale={side}:{side}[face];[bg][face]overlay=x='{overlay_x}':y={(height - side) // 2}:"
             f"shortest=1,format=yuv420p[v]")
    with resources.as_file(face) as face_path:
        run_ffmpeg(["-y", "-loop", "1", "-framerate", str(fps), "-i", str(face_path),
                    "-f", "lavfi", "-i", f"sine=f=220:d={seconds},tremolo=f=3:d=0.9",
                    "-filter_complex", graph, "-map", "[v]", "-map", "1:a", "-t", str(seconds),
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-c:a", "aac", str(path)],
                   "make the benchmark clip")
    return path


def time_floor(clip: Path, out_dir: Path, crf: int) -> float:
    """Seconds to decode every frame of the clip and encode it again with its audio: no model, no faces."""
    from musetalk.video_io import FrameReader, FrameWriter, probe

    info = probe(clip)
    started = time.perf_counter()
    with FrameReader(clip, info=info) as reader:
        with FrameWriter(out_dir / "floor.mp4", info.width, info.height, reader.output_fps, audio_path=str(clip),
                         crf=crf, total_frames=info.num_frames) as writer:
            for frame in reader:
                writer.write(frame)
    return time.perf_counter() - started


def build_pipeline(model: str, models_dir, device: str, dtype, cache_dir: Path, work_dir: Path,
                   engine: str = "musetalk", compile: bool = False):
    from musetalk.pipeline import LipSyncPipeline
    from musetalk.testing import save_taesd, save_tiny_models

    if engine == "preview":
        return LipSyncPipeline.from_pretrained(cache_dir=cache_dir, engine="preview")
    if model == "tiny":
        tiny_models = save_tiny_models(work_dir / "models", ("v15",))
        if engine == "draft":
            save_taesd(tiny_models)
        return LipSyncPipeline.from_pretrained(tiny_models, "v15", device, dtype, cache_dir=cache_dir,
                                               engine=engine, compile=compile)
    if model == "weights":
        return LipSyncPipeline.from_pretrained(models_dir, "v15", device, dtype, cache_dir=cache_dir,
                                               engine=engine, compile=compile)
    return _full_size_pipeline(device, dtype, cache_dir, compile, draft=engine == "draft")


def _full_size_pipeline(device: str, dtype, cache_dir: Path, compile: bool = False, draft: bool = False):
    """The official architectures at full size with random weights (same cost as the real ones)."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from musetalk import models
    from musetalk.audio import WhisperAudioEncoder
    from musetalk.avatar import AvatarCache
    from musetalk.engines.musetalk import MuseTalkEngine
    from musetalk.pipeline import LipSyncPipeline
    from musetalk.testing import full_unet_config, model_config

    torch_device = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(torch_device, dtype)
    with torch_device:  # random weights drawn where they will run: seconds on a GPU, not 25 s on the CPU
        unet = models.for_inference(models.build_unet(full_unet_config()), torch_device, torch_dtype)
        vae = models.for_inference(AutoencoderKL.from_config(model_config("sd-vae.json")), torch_device, torch_dtype)
        whisper = WhisperModel(WhisperConfig(**model_config("whisper-tiny.json"))).encoder
    encoder = WhisperAudioEncoder(whisper, WhisperFeatureExtractor(feature_size=80), torch_device, torch_dtype)
    engine = MuseTalkEngine(unet, vae, encoder, torch_device, torch_dtype, cache_id=f"random-full|{torch_dtype}",
                            compile=compile)
    if draft:
        engine = engine.with_draft_decoder(models.for_inference(AutoencoderTiny(), torch_device, torch_dtype))
    return LipSyncPipeline(engine, "v15", torch_device, AvatarCache(cache_dir))


def run_bench(model: str = "tiny", video: str | None = None, width: int = 1280, height: int = 720,
              seconds: float = 10.0, fps: float = 25.0, models_dir=None, device: str = "auto", dtype=None,
              batch_size: int | None = None, runs: int = 2, progress=None, engine: str = "musetalk",
              compile: bool = False, cpu_workers: int | None = None) -> BenchReport:
    """``cpu_workers``: threads for each per-frame CPU step (None: by the cores, as a job has them)."""
    import torch

    from musetalk.engines import ENGINES

    if model not in MODEL_KINDS:
        raise InputError(f"--model must be one of {', '.join(MODEL_KINDS)}, not {model!r}")
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if cpu_workers is not None and cpu_workers < 1:
        raise InputError(f"--cpu-workers must be 1 or more, not {cpu_workers}")
    from musetalk.video_io import probe

    with tempfile.TemporaryDirectory(prefix="musetalk-bench-") as temp:
        work = Path(temp)
        clip = Path(video) if video else make_clip(work / "clip.mp4", width, height, seconds, fps)
        info = probe(clip)
        if not info.has_audio:
            raise InputError(f"{clip} has no audio track; the benchmark dubs a clip with its own sound")
        options = RunOptions(batch_size=batch_size)
        floor = time_floor(clip, work, options.crf)
        pipeline = build_pipeline(model, models_dir, device, dtype, work / "avatar-cache", work, engine, compile)
        pipeline.cpu_workers = cpu_workers
        report = BenchReport(str(video or f"generated {width}x{height}"), info.width, info.height, info.fps,
                             info.duration, engine if engine == "preview" else model, str(pipeline.device or "cpu"),
                             str(getattr(pipeline.engine, "dtype", "-")),
                             batch_size, round(floor, 3), round(info.num_frames / floor, 2),
                             compiled=bool(getattr(pipeline.engine, "compiled", False)),
                             draft=engine == "draft", cpu_workers=pipeline.worker_count(),
                             torch_threads=torch.get_num_threads())
        for index in range(runs):
            report.runs.append(_one_run(pipeline, clip, work / f"run{index}.mp4", options, progress))
        return report


def _one_run(pipeline, clip: Path, out: Path, options: RunOptions, progress) -> RunReport:
    """One dub of the clip with its own sound, timed. On CUDA the peak GPU memory counts from the first
    model batch when the batch size is automatic (measuring that batch resets the peak): the models and
    every batch are in it, the audio encoder's brief use before it is not."""
    gpu = pipeline.device is not None and pipeline.device.type == "cuda"
    if gpu:
        import torch

        torch.cuda.reset_peak_memory_stats(pipeline.device)
    with PeakMemory() as memory:
        result = pipeline(clip, clip, out, options, progress=progress)
    total = result.timings["total"]
    peak_gpu = None
    if gpu:
        import torch

        peak_gpu = round(torch.cuda.max_memory_allocated(pipeline.device) / 2**20, 1)
    stages = {name: result.timings[name] for name in STAGE_ORDER if name in result.timings}
    model = sum(stages.get(name, 0.0) for name in MODEL_STAGES)
    outside = round(100 * (total / model - 1), 1) if model > 0 else None
    return RunReport(round(total, 3), result.num_frames, round(result.num_frames / total, 2),
                     round(total / result.duration, 3), round(memory.peak_bytes / 2**20, 1), peak_gpu, stages,
                     result.batch_size, round(model, 3), outside)


def format_report(report: BenchReport) -> list[str]:
    lines = [f"clip: {report.clip}, {report.width}x{report.height} at {report.fps:g} fps, {report.duration:.1f} s",
             f"model: {report.model} on {report.device} ({report.dtype}{', compiled' if report.compiled else ''}"
             f"{', draft decoder' if report.draft else ''}), "
             f"batch size {report.batch_size or 'auto'}, "
             f"{report.cpu_workers} CPU thread{'s' if report.cpu_workers > 1 else ''} per frame step, "
             f"{report.torch_threads} torch thread{'s' if report.torch_threads > 1 else ''} per model call",
             f"floor (decode + encode, no model): {report.floor_seconds:.2f} s, {report.floor_fps:.1f} frames/s"]
    for index, run in enumerate(report.runs):
        label = "first run (prepares the avatar)" if index == 0 else "again (avatar from the cache)"
        lines.append("")
        lines.append(f"{label}: {run.seconds:.2f} s, {run.fps:.1f} frames/s, "
                     f"{100 * run.fps / report.floor_fps:.0f}% of the floor, real-time factor {run.realtime_factor:.2f}, "
                     f"peak RAM {run.peak_ram_mb:.0f} MB"
                     + (f", peak GPU {run.peak_gpu_mb:.0f} MB" if run.peak_gpu_mb is not None else "")
                     + f", {run.batch_size} frames per model call")
        if run.outside_model_percent is not None:
            lines.append(f"  the model's own time {run.model_seconds:.2f} s; the whole job takes "
                         f"{run.outside_model_percent:.0f}% longer")
        lines.append(f"  {'stage':<14}{'seconds':>9}{'frames/s':>10}")
        for stage, value in run.stages.items():
            rate = f"{run.frames / value:.1f}" if value > 0 else "-"
            lines.append(f"  {stage:<14}{value:>9.2f}{rate:>10}")
    return lines
