"""The overlapped pipeline and the prepared-avatar cache change no output."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk import face
from musetalk.avatar import AvatarCache
from musetalk.batching import CPU_BATCH, MAX_AUTO_BATCH, BatchSize, fitting_batch_size
from musetalk.config import RunOptions
from musetalk.engines import musetalk as musetalk_engine
from musetalk.errors import GPUMemoryError, InputError, WeightsMissingError
from musetalk.face import LandmarkSmoother
from musetalk.face_stream import FRAMES_HANDED_ON, FaceStream, analyse
from musetalk.pipeline import LipSyncPipeline
from musetalk.stages import ordered_map, thread_pool
from musetalk.testing import save_taesd, save_tiny_models
from musetalk.timing import StageTimer
from musetalk.video_io import read_frames

from conftest import ffmpeg

FACE_JPG = Path(__file__).parent / "data" / "face.jpg"


def frames_of(path) -> list[np.ndarray]:
    return list(read_frames(path))


@pytest.fixture(scope="module")
def lossless() -> RunOptions:
    return RunOptions(crf=0, batch_size=4)


@pytest.fixture(scope="module")
def clip(face_clip, tmp_path_factory):
    """The first 12 frames of the face clip: these tests compare runs, so short is enough."""
    path = tmp_path_factory.mktemp("speed") / "clip.mp4"
    ffmpeg("-i", str(face_clip), "-frames:v", "12", "-c:v", "libx264", "-crf", "12", str(path))
    return path


@pytest.fixture(scope="module")
def speech(speech_clip, tmp_path_factory):
    """0.8 s of speech: 20 frames, so the 12 source frames play forward and back."""
    path = tmp_path_factory.mktemp("speed") / "speech.wav"
    ffmpeg("-i", str(speech_clip), "-t", "0.8", str(path))
    return path


def test_overlapped_run_equals_one_at_a_time(models_dir, clip, speech, tmp_path, lossless):
    threaded = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=False)
    threaded.cpu_workers = 3  # the analysis, the crops and the blending spread over threads as well
    serial = LipSyncPipeline(threaded.engine, overlap=False, cpu_workers=1)
    threaded(clip, speech, tmp_path / "threaded.mp4", lossless)
    serial(clip, speech, tmp_path / "serial.mp4", lossless)
    for a, b in zip(frames_of(tmp_path / "threaded.mp4"), frames_of(tmp_path / "serial.mp4"), strict=True):
        assert np.array_equal(a, b)


def test_cache_hit_equals_miss_and_skips_the_work(models_dir, clip, speech, tmp_path, lossless):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    miss = pipeline(clip, speech, tmp_path / "miss.mp4", lossless)
    assert "face" in miss.timings and miss.timings["vae_encode"] > 0
    assert len(cache.entries()) == 1
    hit = pipeline(clip, speech, tmp_path / "hit.mp4", lossless)
    assert "face" not in hit.timings and "vae_encode" not in hit.timings
    for a, b in zip(frames_of(tmp_path / "miss.mp4"), frames_of(tmp_path / "hit.mp4"), strict=True):
        assert np.array_equal(a, b)


def test_a_face_option_change_misses_and_a_mask_change_hits(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    pipeline(clip, speech, tmp_path / "a.mp4", RunOptions())
    changed = pipeline(clip, speech, tmp_path / "b.mp4", RunOptions(extra_margin=20))
    assert "face" in changed.timings
    assert len(cache.entries()) == 2
    mask_only = pipeline(clip, speech, tmp_path / "c.mp4", RunOptions(parsing_mode="mouth"))
    assert "face" not in mask_only.timings


def test_an_edited_video_never_uses_the_old_entry(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    copy = tmp_path / "clip.mp4"
    copy.write_bytes(clip.read_bytes())
    pipeline(copy, speech, tmp_path / "a.mp4", RunOptions())
    copy.write_bytes(clip.read_bytes() + b"\0")  # same name, other bytes
    assert "face" in pipeline(copy, speech, tmp_path / "b.mp4", RunOptions()).timings


def test_the_cache_keeps_to_its_limit_and_clears(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    pipeline(clip, speech, tmp_path / "a.mp4", RunOptions())
    pipeline(clip, speech, tmp_path / "b.mp4", RunOptions(smoothing=0.2))
    entries = cache.entries()
    assert len(entries) == 2
    small = AvatarCache(cache.root, limit_bytes=entries[0].size)
    assert small.prune() == [entries[1].key]  # the least recently used goes
    assert [e.key for e in small.entries()] == [entries[0].key]
    assert small.clear() == entries[0].size and small.entries() == []


def test_a_damaged_entry_is_a_miss(models_dir, clip, speech, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    pipeline(clip, speech, tmp_path / "a.mp4", RunOptions())
    for path in (cache.root / cache.entries()[0].key).iterdir():
        path.write_bytes(b"garbage")
    again = pipeline(clip, speech, tmp_path / "b.mp4", RunOptions())
    assert "face" in again.timings
    third = pipeline(clip, speech, tmp_path / "c.mp4", RunOptions())
    assert "face" not in third.timings, "the damaged entry was replaced by a good one"


def moving_face_frames(count: int):
    """``count`` frames of the test face drifting right, one pixel a frame."""
    import cv2

    face = cv2.cvtColor(cv2.imread(str(FACE_JPG)), cv2.COLOR_BGR2RGB)
    for index in range(count):
        frame = np.full((face.shape[0], face.shape[1] + count, 3), 90, np.uint8)
        frame[:, index : index + face.shape[1]] = face
        yield frame


def test_generation_gets_frames_while_the_analysis_is_still_running():
    """The stream hands frame 0 on long before the last frame is decoded, and ends with the same
    avatar as a whole-video analysis."""
    count = 80
    pulled = []

    def counted():
        for frame in moving_face_frames(count):
            pulled.append(1)
            yield frame

    options = RunOptions()
    height, width = next(moving_face_frames(count)).shape[:2]
    stream = FaceStream(counted(), "key", width, height, 25.0, options, StageTimer())
    items = stream.frames(count)
    first = next(items)
    assert first.index == 0 and first.landmarks is not None and first.frame.shape[0] > 0
    latency = LandmarkSmoother(options.smoothing, 25.0).latency
    assert len(pulled) <= latency + FRAMES_HANDED_ON + 3 < count
    rest = list(items)
    assert [item.index for item in rest] == list(range(1, count))
    streamed = stream.result()
    whole = analyse(moving_face_frames(count), "key", width, height, 25.0, options, StageTimer())
    assert np.array_equal(streamed.track.landmarks, whole.track.landmarks)
    assert np.array_equal(streamed.boxes, whole.boxes) and np.array_equal(streamed.usable, whole.usable)
    for item in [first, *rest]:
        assert np.array_equal(item.landmarks, whole.track.landmarks[item.index])


def test_a_short_audio_still_prepares_every_frame_of_the_video(models_dir, face_clip, speech, tmp_path, lossless):
    """20 output frames from a 30-frame video: generation stops taking frames, the analysis goes
    on to the end for the cache, and the output equals a run that analysed everything first."""
    cache = AvatarCache(tmp_path / "cache")
    streamed = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache.root)
    serial = LipSyncPipeline(streamed.engine, overlap=False)
    result = streamed(face_clip, speech, tmp_path / "streamed.mp4", lossless)
    serial(face_clip, speech, tmp_path / "serial.mp4", lossless)
    assert result.num_frames == 20
    for a, b in zip(frames_of(tmp_path / "streamed.mp4"), frames_of(tmp_path / "serial.mp4"), strict=True):
        assert np.array_equal(a, b)
    (entry,) = cache.entries()
    assert entry.frames == 30


def test_face_analysis_over_several_threads_equals_one(face_clip):
    frames = frames_of(face_clip)  # 30 frames: segments of 5 handed out to the workers in turn
    options = RunOptions()
    one = analyse(iter(frames), "k", 216, 252, 25.0, options, StageTimer(), workers=1)
    three = analyse(iter(frames), "k", 216, 252, 25.0, options, StageTimer(), workers=3)
    assert one.track.has_face.all()
    assert np.array_equal(one.track.landmarks, three.track.landmarks)
    assert np.array_equal(one.boxes, three.boxes)


def test_parallel_face_analysis_stops_its_threads_and_reports_bad_frames(face_clip):
    frames = frames_of(face_clip)
    before = {thread.name for thread in threading.enumerate()}
    found = face.stream_landmarks(iter(frames), workers=2)
    next(found)
    found.close()  # the consumer stops early
    assert {thread.name for thread in threading.enumerate()} - before == set()
    wrong_size = frames[:7] + [frames[7][:100]] + frames[8:]
    with pytest.raises(InputError, match="Frame 7 is"):
        list(face.stream_landmarks(iter(wrong_size), workers=2))


class OutOfMemoryAbove:
    """The tiny MuseTalk engine whose model calls fail as on a GPU without the memory for more than
    ``limit`` frames at once (the error torch raises there)."""

    def __init__(self, engine, limit: int):
        self._engine, self.limit, self.calls = engine, limit, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, states, frame_audio, timer):
        self.calls.append(len(states))
        if len(states) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._engine.generate(states, frame_audio, timer)


def test_a_batch_that_runs_out_of_memory_is_redrawn_in_halves(models_dir, clip, speech, tmp_path, lossless):
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=False)
    pipeline(clip, speech, tmp_path / "pairs.mp4", lossless.replace(batch_size=2))
    pipeline.engine = OutOfMemoryAbove(pipeline.engine, limit=2)
    result = pipeline(clip, speech, tmp_path / "halved.mp4", lossless.replace(batch_size=8))
    # 8 fails, its halves of 4 fail, their halves of 2 run; the job goes on at 2.
    assert pipeline.engine.calls[:7] == [8, 4, 2, 2, 4, 2, 2]
    assert set(pipeline.engine.calls[7:]) == {2} and result.batch_size == 2
    for a, b in zip(frames_of(tmp_path / "pairs.mp4"), frames_of(tmp_path / "halved.mp4"), strict=True):
        assert np.array_equal(a, b)


def test_no_memory_for_one_frame_is_a_clear_error_and_leaves_no_output(models_dir, clip, speech, tmp_path):
    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=False)
    pipeline.engine = OutOfMemoryAbove(pipeline.engine, limit=0)
    with pytest.raises(GPUMemoryError, match="single frame.*--device cpu"):
        pipeline(clip, speech, tmp_path / "out.mp4", RunOptions(batch_size=4))
    assert list(tmp_path.iterdir()) == []


def test_the_automatic_batch_size_fits_the_free_memory():
    assert BatchSize(None, torch.device("cpu")).size == CPU_BATCH  # no memory to measure: the CPU's size
    assert BatchSize(3, torch.device("cuda")).size == 3  # asked for: kept
    gib = 2**30
    assert fitting_batch_size(40 * gib, 0.35 * gib) == MAX_AUTO_BATCH
    assert fitting_batch_size(10 * gib, 0.35 * gib) == 16  # 20 frames fit: the power of two below
    assert fitting_batch_size(2 * gib, 0.35 * gib) == 4
    assert fitting_batch_size(0, 0.35 * gib) == 1


def test_the_first_gpu_batch_is_measured_and_sizes_the_rest(monkeypatch):
    # No GPU here: torch.cuda's memory readings are played as a GPU would give them (each name must exist).
    mib = 2**20
    readings = {"allocated": 1000 * mib, "peak": 0, "reserved": 1200 * mib, "free": 20000 * mib}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: readings["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: readings["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: readings["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (readings["free"], 80000 * mib))
    batch = BatchSize(None, torch.device("cuda"))
    assert batch.size == CPU_BATCH
    batch.before_batch()
    readings["peak"] = 1000 * mib + 6 * 300 * mib  # 6 of the 8 frames had a face: 300 MB each
    batch.after_batch(6)
    # (20000 free + 200 held by torch, unused) * 0.7 / 300 = 47 frames fit: 32
    assert batch.size == 32
    readings["peak"] = 10**12  # later batches are not measured again
    batch.before_batch()
    batch.after_batch(32)
    assert batch.size == 32
    batch.halve(32)
    assert batch.size == 16

    waiting = BatchSize(None, torch.device("cuda"))  # a first batch without a face measures nothing
    waiting.before_batch()
    waiting.after_batch(0)
    assert waiting.size == CPU_BATCH
    waiting.before_batch()
    readings["peak"] = 1000 * mib + 8 * 1200 * mib
    waiting.after_batch(8)
    assert waiting.size == 8  # 20200 * 0.7 / 1200 = 11 frames fit


def test_compiled_models_give_the_same_frames(models_dir, clip, speech, tmp_path, lossless, monkeypatch):
    # Inductor writes and builds C++ for each model and batch shape: about 2 minutes per model on a
    # 2-core machine, so the test compiles through the same graph capture with the "aot_eager" code
    # generator (no C++). Inductor itself was checked by hand: the tiny UNet within 2e-6 of eager.
    monkeypatch.setattr(musetalk_engine, "COMPILE_BACKEND", "aot_eager")
    eager = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=False)
    compiled = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=False, compile=True)
    assert compiled.engine.compiled
    options = lossless.replace(batch_size=6)  # 20 frames: batches of 6 and a last one of 2, padded to 8 and 2
    eager(clip, speech, tmp_path / "eager.mp4", options)
    compiled(clip, speech, tmp_path / "compiled.mp4", options)
    for a, b in zip(frames_of(tmp_path / "eager.mp4"), frames_of(tmp_path / "compiled.mp4"), strict=True):
        # Rounding only: padded batches round differently in a few places, and the random tiny models
        # amplify that (measured: at most 1.1% of the pixels differ, by up to 8 levels). A padded frame
        # out of place would change most of the face (a third of the picture).
        assert (a != b).mean() < 0.02


def test_the_draft_decoder_redraws_the_face_from_the_same_latents(clip, speech, tmp_path, lossless, monkeypatch):
    models = save_tiny_models(tmp_path / "models", ("v15",))
    with monkeypatch.context() as patch:  # said before the UNet (gigabytes) would load
        patch.setattr("musetalk.models.load_unet", lambda *args: pytest.fail("the UNet was loaded"))
        with pytest.raises(WeightsMissingError, match="musetalk download --draft"):
            LipSyncPipeline.from_pretrained(models, device="cpu", cache_dir=False, engine="draft")
    save_taesd(models)  # as madebyollin/taesd is laid out
    vae = LipSyncPipeline.from_pretrained(models, device="cpu", cache_dir=tmp_path / "cache")
    draft = LipSyncPipeline.from_pretrained(models, device="cpu", cache_dir=tmp_path / "cache", engine="draft")
    vae(clip, speech, tmp_path / "vae.mp4", lossless)
    result = draft(clip, speech, tmp_path / "draft.mp4", lossless)
    assert "vae_encode" not in result.timings  # the same prepared latents: the cache is shared
    assert result.engine == "draft"
    pairs = list(zip(frames_of(tmp_path / "vae.mp4"), frames_of(tmp_path / "draft.mp4"), strict=True))
    assert all(np.array_equal(a[:40], b[:40]) for a, b in pairs)  # above the face: untouched by either
    assert all(not np.array_equal(a, b) for a, b in pairs)  # the lower face: another decoder drew it

    # Built on a loaded pipeline (as the studio does), the draft engine shares its models and draws the same.
    shared = vae.with_draft_decoder(models)
    assert shared.engine.unet is vae.engine.unet and shared.engine.vae is vae.engine.vae
    assert shared.engine.audio_encoder is vae.engine.audio_encoder and vae.engine.name == "musetalk"
    shared(clip, speech, tmp_path / "shared.mp4", lossless)
    for a, b in zip(frames_of(tmp_path / "draft.mp4"), frames_of(tmp_path / "shared.mp4"), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(InputError, match="built on a MuseTalk pipeline"):
        shared.with_draft_decoder(models)
    compiled = LipSyncPipeline.from_pretrained(models, device="cpu", cache_dir=False, compile=True)
    compiled_draft = compiled.with_draft_decoder(models).engine
    assert compiled_draft.compiled and isinstance(compiled_draft.decoder.decoder, torch._dynamo.eval_frame.OptimizedModule)


def test_half_precision_runs_the_whole_job_and_keeps_its_own_latents(models_dir, clip, speech, tmp_path, lossless):
    # fp16 is what a GPU runs by default; the CPU runs it too (slowly), so dtype slips (a float32
    # tensor meeting fp16 weights, a half tensor turned into numpy) show here, not first on a GPU.
    cache = tmp_path / "cache"
    full = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=cache)
    half = LipSyncPipeline.from_pretrained(models_dir, device="cpu", dtype="fp16", cache_dir=cache)
    assert next(half.engine.unet.parameters()).dtype == torch.float16
    full(clip, speech, tmp_path / "fp32.mp4", lossless)
    result = half(clip, speech, tmp_path / "fp16.mp4", lossless)
    assert result.frames_with_face == result.num_frames == 20
    assert result.timings["vae_encode"] > 0  # the fp32 latents in the cache are not the fp16 ones
    again = half(clip, speech, tmp_path / "fp16-again.mp4", lossless)
    assert "vae_encode" not in again.timings
    for a, b in zip(frames_of(tmp_path / "fp32.mp4"), frames_of(tmp_path / "fp16.mp4"), strict=True):
        # Rounding only (measured: mean 0.04 levels, at most 0.02% of the values off by more than 8); an
        # overflow to inf or NaN would blank the face, a third of the picture.
        difference = np.abs(a.astype(int) - b.astype(int))
        assert difference.mean() < 0.5 and (difference > 8).mean() < 0.005


def test_ordered_map_keeps_the_order_bounds_the_calls_and_passes_errors_on():
    started, running, most = [], [0], [0]
    lock = threading.Lock()

    def slow_square(value: int) -> int:
        with lock:
            started.append(value)
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.02 * (value % 3))  # later calls often end first
        with lock:
            running[0] -= 1
        return value * value

    with thread_pool(3, "test") as pool:
        assert list(ordered_map(slow_square, range(12), pool, 3)) == [v * v for v in range(12)]
        assert most[0] > 1  # the calls did run side by side
        started.clear()
        results = ordered_map(slow_square, range(100), pool, 3)
        assert next(results) == 0
        results.close()  # stopping early: what was not started is dropped
    assert len(started) <= 4  # ahead + 1 were submitted when the first result came back

    def fails_on_five(value: int) -> int:
        if value == 5:
            raise InputError("frame 5 is broken")
        return value

    with thread_pool(2, "test") as pool:
        with pytest.raises(InputError, match="frame 5"):
            list(ordered_map(fails_on_five, range(10), pool, 2))
    with thread_pool(1, "test") as pool:
        assert pool is None and list(ordered_map(slow_square, range(4), pool, 1)) == [0, 1, 4, 9]


def test_only_the_models_stages_wait_for_the_device(models_dir, clip, speech, tmp_path, lossless):
    # On a GPU the timer synchronizes around the model's stages; a synchronize from the face analysis,
    # crop, blend or encode threads would stall them on the model's work, so those never call it.
    timer_calls = []
    timer = StageTimer(lambda: timer_calls.append(1))
    with timer.stage("blend"):
        pass
    assert timer_calls == []
    with timer.stage("unet", device=True):
        pass
    assert timer_calls == [1, 1]

    pipeline = LipSyncPipeline.from_pretrained(models_dir, device="cpu", cache_dir=False)
    pipeline.cpu_workers = 2
    threads = []
    pipeline._synchronize = lambda: threads.append(threading.current_thread().name)
    result = pipeline(clip, speech, tmp_path / "out.mp4", lossless)
    assert {"face", "crop", "blend", "encode"} <= set(result.timings)
    # The model runs on the caller's thread, Whisper on the audio thread: 2 calls per model stage.
    assert set(threads) == {"MainThread", "_audio_features"}
    assert threads.count("_audio_features") == 2
