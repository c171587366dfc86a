"""Robustness: the input matrix through the real pipeline (tiny models), and nothing lost.

Every case gets a typed error that says what to do, or a correct result. Cases already tested
elsewhere are listed in docs/robustness.md and not repeated here. Media are made on the fly
from the real face photo (MediaPipe needs a real face) at 160 px and a few frames, so each
pipeline run is a second or two; several runs check more than one case at a time (the audio
formats ride along with the video cases).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from musetalk import audio as audio_lib
from musetalk import avatar as avatar_lib
from musetalk import cli, face, video_io
from musetalk.avatar import AvatarCache
from musetalk.config import RunOptions
from musetalk.errors import DiskSpaceError, FFmpegError, InputError
from musetalk.pipeline import LipSyncPipeline
from musetalk.video_io import probe, read_frames

from conftest import EXAMPLES, ffmpeg

FACE_JPG = Path(__file__).parent / "data" / "face.jpg"
SIDE = 160  # frames are small: the face analysis and the blend cost little, the tiny model sees 256 px anyway


# --------------------------------------------------------------------------- media


def face_video(out: Path, seconds: float, fps: float | str = 25, size: str = f"{SIDE}:{SIDE}", extra: str = "",
               pix_fmt: str = "yuv420p", output_args: tuple[str, ...] = ()) -> Path:
    """The face photo as a still video (every frame has the face); yuv444p allows odd sizes."""
    ffmpeg("-loop", "1", "-framerate", str(fps), "-i", str(FACE_JPG), "-t", str(seconds),
           "-vf", f"scale={size}{extra}", "-pix_fmt", pix_fmt, *output_args, str(out))
    return out


def speech(out: Path, seconds: float, *args: str) -> Path:
    """A piece of the example speech in any container, rate and layout."""
    ffmpeg("-ss", "0.3", "-t", str(seconds), "-i", str(EXAMPLES / "speech.wav"), *args, str(out))
    return out


def sine(out: Path, seconds: float, rate: int, channels: int, *codec: str) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}",
           "-ac", str(channels), *codec, str(out))
    return out


def ffmpeg_children() -> list[psutil.Process]:
    """ffmpeg processes this test process started that are still alive (zombies count too)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "ffmpeg" in child.name():
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def encoders() -> list[psutil.Process]:
    """The running ffmpeg processes that write a temporary output (FrameWriter's)."""
    found = []
    for child in ffmpeg_children():
        try:
            if any(".partial." in arg for arg in child.cmdline()):
                found.append(child)
        except psutil.Error:  # ended (or a zombie) between the listing and this look
            continue
    return found


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "partial" in p.name)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("avatars")


@pytest.fixture(scope="module")
def pipeline(models_dir, cache_dir) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(models_dir, "v15", device="cpu", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """8 frames of the face, 25 fps."""
    return face_video(tmp_path_factory.mktemp("clip") / "face.mp4", 0.32)


@pytest.fixture(scope="module")
def voice(tmp_path_factory) -> Path:
    return speech(tmp_path_factory.mktemp("voice") / "speech.wav", 0.32)


@pytest.fixture(scope="module")
def analyzer():
    with face.FaceAnalyzer() as shared:
        yield shared


def redrawn_everywhere(result) -> bool:
    return result.num_frames > 0 and result.frames_with_face == result.num_frames


def audio_frames(path: Path, fps: float) -> int:
    """Frames that carry the whole audio (rounded up)."""
    return math.ceil(len(audio_lib.load_audio(path)) / audio_lib.SAMPLE_RATE * fps - 1e-6)


# --------------------------------------------------------------------------- videos through the pipeline


def test_rotated_phone_video_with_odd_size_and_8khz_mono_mp3(pipeline, tmp_path):
    """Stored 161x127 on its side with rotation metadata, as phones record: the output is upright
    127x161 (odd sizes kept), and the face is found in every frame (it is only found upright)."""
    stored = face_video(tmp_path / "stored.mp4", 0.2, size="127:161", extra=",transpose=clock", pix_fmt="yuv444p")
    phone = tmp_path / "phone.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(stored), "-c", "copy", str(phone))
    audio = speech(tmp_path / "voice.mp3", 0.2, "-ar", "8000", "-ac", "1")
    info = probe(phone)
    assert (info.width, info.height, info.rotation) == (127, 161, 270)
    result = pipeline(phone, audio, tmp_path / "out.mp4")
    assert (result.width, result.height) == (127, 161)
    assert redrawn_everywhere(result)
    out = probe(tmp_path / "out.mp4")
    assert (out.width, out.height, out.rotation) == (128, 162, 0)  # yuv420p: one edge row and column added
    # Upright: the top of the output (above the redrawn lower face) is the upright source's top.
    upright = list(read_frames(phone, max_frames=1))[0]
    written = list(read_frames(tmp_path / "out.mp4", max_frames=1))[0][:161, :127]
    top = slice(0, 161 // 3)
    assert np.abs(written[top].astype(int) - upright[top].astype(int)).mean() < 6


def test_variable_frame_rate_with_5_1_ogg(pipeline, tmp_path):
    """A VFR video (5 frames 40 ms apart, then 3 frames 100 ms apart) is read at its average rate."""
    vfr = face_video(tmp_path / "vfr.mp4", 0.5, extra=",setpts='(if(lt(N\\,4)\\,N*0.04\\,0.16+(N-4)*0.1))/TB'",
                     output_args=("-fps_mode", "passthrough"))
    info = probe(vfr)
    assert info.is_vfr and info.num_frames == 8
    audio = speech(tmp_path / "voice.ogg", 0.3, "-ac", "6", "-ar", "48000", "-c:a", "libvorbis")
    assert probe(audio).audio_channels == 6
    result = pipeline(vfr, audio, tmp_path / "out.mp4")
    assert result.fps == pytest.approx(info.fps)
    assert redrawn_everywhere(result) and result.num_frames == audio_frames(audio, info.fps)
    out = probe(tmp_path / "out.mp4")
    assert not out.is_vfr and out.fps == pytest.approx(info.fps, rel=1e-3)


def test_one_frame_per_second_with_96khz_stereo_flac(pipeline, tmp_path):
    """Lips cannot follow speech at 1 fps: the dub is made at 25 fps, each source frame held, and says so."""
    slow = face_video(tmp_path / "slow.mp4", 2, fps=1)
    assert probe(slow).fps == pytest.approx(1) and probe(slow).num_frames == 2
    audio = speech(tmp_path / "voice.flac", 2.0, "-ar", "96000", "-ac", "2")
    result = pipeline(slow, audio, tmp_path / "out.mp4")
    assert result.fps == 25 and result.num_frames == 50 and redrawn_everywhere(result)
    assert result.notes == [f"{slow} runs at 1 fps, too slow for lips to follow speech: the dub is made at 25 fps "
                            f"(each frame held; --fps sets another rate)"]
    assert probe(tmp_path / "out.mp4").duration == pytest.approx(2.0, abs=0.05)


def test_the_output_always_carries_the_whole_audio(pipeline, models_dir, tmp_path, capsys):
    """3.45 s of speech on a 1 fps clip gave 3.00 s (the official frame count rounds down); every
    length of speech is now carried whole, at 1 fps through the CLI as at 25 fps."""
    slow = face_video(tmp_path / "slow.mp4", 3, fps=1)
    audio = speech(tmp_path / "voice.wav", 3.45)
    assert cli.main(["run", "--engine", "preview", "--no-cache", "--video", str(slow), "--audio", str(audio),
                     "--out", str(tmp_path / "out.mp4")]) == 0
    captured = capsys.readouterr()
    assert "runs at 1 fps, too slow for lips to follow speech: the dub is made at 25 fps" in captured.err
    out = probe(tmp_path / "out.mp4")
    assert out.fps == 25 and out.num_frames == 87  # 3.45 s at 25 fps, rounded up: 3.48 s
    assert video_io._audio_stream_end(str(tmp_path / "out.mp4")) >= 3.45
    odd = speech(tmp_path / "odd.wav", 0.33)  # 8.25 frames at 25 fps: 9 frames, not 8
    result = pipeline(face_video(tmp_path / "clip.mp4", 0.2), odd, tmp_path / "odd.mp4", RunOptions(fps=25))
    assert result.num_frames == 9 and result.duration >= 0.33
    assert video_io._audio_stream_end(str(tmp_path / "odd.mp4")) >= 0.33 - 1e-3


@pytest.mark.parametrize("declared, frames, timing", [
    (100_000, 25, "setpts=N/100000/TB"),  # 6 KB that would plan 200,000 output frames for 2 s of speech
    (0.001, 3, "setpts=N*1000/TB"),  # 3 frames over 3000 s: 75,000 frames to analyse at 25 fps
])
def test_absurd_declared_rates_are_taken_frame_by_frame_at_25_fps(pipeline, tmp_path, declared, frames, timing):
    video = tmp_path / "declared.mp4"
    ffmpeg("-loop", "1", "-framerate", "25", "-i", str(FACE_JPG), "-frames:v", str(frames),
           "-vf", f"scale={SIDE}:{SIDE},{timing}", "-fps_mode", "passthrough",
           "-video_track_timescale", str(max(1000, int(declared))), "-pix_fmt", "yuv420p", str(video))
    info = probe(video)
    assert info.fps == pytest.approx(declared) and info.num_frames == frames
    audio = speech(tmp_path / "voice.wav", 0.6)
    result = pipeline(video, audio, tmp_path / "out.mp4", RunOptions(batch_size=8))
    assert result.fps == 25 and result.num_frames == 15 and redrawn_everywhere(result)
    assert result.notes == [f"{video} declares {declared:g} frames per second, which no camera films: its "
                            f"{frames} frame(s) are taken one after another at 25 fps"]
    out = probe(tmp_path / "out.mp4")
    assert out.fps == 25 and out.num_frames == 15


def test_sixty_frames_per_second_with_opus_webm_audio(pipeline, tmp_path):
    fast = face_video(tmp_path / "fast.mp4", 0.1, fps=60)
    audio = speech(tmp_path / "voice.webm", 0.1, "-c:a", "libopus")
    result = pipeline(fast, audio, tmp_path / "out.mp4")
    assert result.fps == 60 and result.num_frames == audio_frames(audio, 60) >= 5
    assert redrawn_everywhere(result)
    assert probe(tmp_path / "out.mp4").fps == pytest.approx(60)


def test_one_frame_video_with_audio_ten_times_longer_in_m4a(pipeline, tmp_path):
    """A video of a single frame (0.04 s) and 0.4 s of audio: the frame is held for the whole audio."""
    single = face_video(tmp_path / "single.mp4", 0.04)
    assert probe(single).num_frames == 1 and not probe(single).is_image
    audio = speech(tmp_path / "voice.m4a", 0.4, "-c:a", "aac")
    result = pipeline(single, audio, tmp_path / "out.mp4")
    assert result.num_frames == audio_frames(audio, 25) >= 9 and redrawn_everywhere(result)
    assert probe(tmp_path / "out.mp4").duration == pytest.approx(result.num_frames / 25, abs=0.05)


def test_several_faces_and_all_silence(pipeline, tmp_path):
    """Two faces: the largest is dubbed and the other left alone. All-silence audio is a valid
    dub: the silence gate keeps nothing, the mouth is drawn at rest."""
    two = tmp_path / "two.mp4"
    ffmpeg("-loop", "1", "-framerate", "25", "-i", str(FACE_JPG), "-t", "0.2", "-filter_complex",
           f"[0]scale={SIDE}:{SIDE}[big];[0]scale=96:96,pad=96:{SIDE}:0:64[small];[big][small]hstack",
           "-pix_fmt", "yuv420p", "-crf", "0", str(two))
    quiet = tmp_path / "silence.wav"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", "0.2", str(quiet))
    result = pipeline(two, quiet, tmp_path / "out.mp4", RunOptions(crf=0))
    assert result.speech_spans == [] and redrawn_everywhere(result)
    for before, after in zip(read_frames(two), read_frames(tmp_path / "out.mp4")):
        change = np.abs(before.astype(int) - after.astype(int)).mean(axis=2)
        assert change[:, SIDE + 2:].mean() < 1.0, "the smaller face was changed"
        assert change[:, :SIDE].mean() > 1.0, "the largest face was not redrawn"


# --------------------------------------------------------------------------- pictures


def test_huge_photo_is_downscaled_or_refused_as_configured(models_dir, tmp_path, capsys):
    """A 16-bit RGBA PNG of 1200x1200 with --max-pixels 40000: the job runs at 200x200; with
    --oversize refuse it is one clear line and nothing is written."""
    photo = tmp_path / "huge.png"
    ffmpeg("-i", str(FACE_JPG), "-vf", "scale=1200:1200,format=rgba64be", str(photo))
    audio = speech(tmp_path / "voice.wav", 0.2)
    base = ["run", "--models-dir", str(models_dir), "--device", "cpu", "--no-cache", "--video", str(photo),
            "--audio", str(audio), "--max-pixels", "40000"]
    assert cli.main([*base, "--out", str(tmp_path / "small.mp4")]) == 0
    out = probe(tmp_path / "small.mp4")
    assert (out.width, out.height) == (200, 200) and out.num_frames == 5
    capsys.readouterr()
    assert cli.main([*base, "--oversize", "refuse", "--out", str(tmp_path / "refused.mp4")]) == 2
    error = capsys.readouterr().err
    assert "1200x1200" in error and "max_pixels" in error and error.count("\n") == 1
    assert not (tmp_path / "refused.mp4").exists()


def cmyk_jpeg(out: Path) -> Path:
    from PIL import Image

    Image.open(FACE_JPG).resize((SIDE, SIDE)).convert("CMYK").save(out, "JPEG")
    return out


PICTURES = {
    "alpha.png": ["-vf", f"scale={SIDE}:{SIDE},format=rgba,colorchannelmixer=aa=0.5"],
    "grey.png": ["-vf", f"scale={SIDE}:{SIDE},format=gray"],
    "grey16.png": ["-vf", f"scale={SIDE}:{SIDE},format=gray16be"],
    "grey_alpha.png": ["-vf", f"scale={SIDE}:{SIDE},format=ya8"],
    "rgb48.png": ["-vf", f"scale={SIDE}:{SIDE},format=rgb48be"],
    "rgba64.png": ["-vf", f"scale={SIDE}:{SIDE},format=rgba64be"],
    "grey.jpg": ["-vf", f"scale={SIDE}:{SIDE},format=gray"],
    "rgb48.tiff": ["-vf", f"scale={SIDE}:{SIDE},format=rgb48le"],
    "alpha.webp": ["-vf", f"scale={SIDE}:{SIDE},format=yuva420p", "-c:v", "libwebp"],
    "odd.jpg": ["-vf", "scale=161:187"],
}


@pytest.mark.parametrize("name", [*PICTURES, "cmyk.jpg"])
def test_every_kind_of_picture_reads_as_rgb_with_the_face(tmp_path, analyzer, name):
    path = tmp_path / name
    if name == "cmyk.jpg":
        cmyk_jpeg(path)
    else:
        ffmpeg("-i", str(FACE_JPG), *PICTURES[name], "-frames:v", "1", str(path))
    info = probe(path)
    assert info.is_image and not info.has_audio
    frames = list(read_frames(path, info=info))
    assert len(frames) == 1
    frame = frames[0]
    assert frame.dtype == np.uint8 and frame.shape == (info.height, info.width, 3)
    if name.startswith("grey"):
        assert np.array_equal(frame[..., 0], frame[..., 1])
    assert 40 < frame.mean() < 220, "the picture came out black, white or inverted"
    assert analyzer.landmarks(frame) is not None, f"no face found in {name}"


# --------------------------------------------------------------------------- audio


AUDIO_CASES = [  # (extension, channels, sample rate, codec arguments): every format, layout and rate at least once
    ("wav", 1, 8000, []), ("wav", 2, 96000, []), ("wav", 6, 44100, []),
    ("mp3", 1, 22050, []), ("mp3", 2, 48000, []), ("mp3", 2, 8000, []),
    ("m4a", 1, 16000, []), ("m4a", 2, 44100, []), ("m4a", 6, 96000, []),
    ("ogg", 1, 96000, ["-c:a", "libvorbis"]), ("ogg", 2, 22050, ["-c:a", "libvorbis"]),
    ("ogg", 6, 48000, ["-c:a", "libvorbis"]),
    ("flac", 1, 44100, []), ("flac", 2, 8000, []), ("flac", 6, 96000, []),
    ("webm", 1, 8000, ["-c:a", "libopus"]), ("webm", 2, 48000, ["-c:a", "libopus"]),
    ("webm", 6, 48000, ["-c:a", "libopus", "-mapping_family", "1"]),
]


@pytest.mark.parametrize("extension,channels,rate,codec", AUDIO_CASES,
                         ids=[f"{e}-{c}ch-{r}" for e, c, r, _ in AUDIO_CASES])
def test_audio_in_every_format_layout_and_rate_decodes_to_16khz_mono(tmp_path, extension, channels, rate, codec):
    path = sine(tmp_path / f"tone.{extension}", 0.5, rate, channels, *codec)
    info = probe(path)
    assert info.has_audio and not info.has_video
    assert info.audio_channels == channels
    assert info.audio_sample_rate == (48000 if extension == "webm" else rate)  # Opus always decodes at 48 kHz
    wav = audio_lib.load_audio(path)
    assert len(wav) == pytest.approx(0.5 * audio_lib.SAMPLE_RATE, rel=0.1)
    assert 0.02 < float(np.sqrt(np.mean(wav[800:-800] ** 2))) < 0.5


# --------------------------------------------------------------------------- refusals


def test_bad_inputs_are_refused_before_any_work(pipeline, clip, voice, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    silent = tmp_path / "silent.mp4"
    ffmpeg("-i", str(clip), "-an", "-c", "copy", str(silent))
    empty_wav = tmp_path / "empty.wav"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-frames:a", "0", str(empty_wav))
    photo_as_audio = FACE_JPG
    no_frames = tmp_path / "no_frames.mkv"  # a video stream whose every packet was dropped
    ffmpeg("-i", str(clip), "-i", str(voice), "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-bsf:v", "noise=drop=1",
           str(no_frames))
    cases = [
        (text, voice, "not a video, image or audio file"),
        (clip, noise, "not a video, image or audio file"),
        (cut, voice, "cut short"),
        (voice, voice, "no video stream"),
        (clip, silent, "no audio stream"),
        (clip, photo_as_audio, "no audio stream"),
        (clip, empty_wav, "audio"),
        (no_frames, voice, "holds no frames"),
        (tmp_path, voice, "does not exist"),
    ]
    for video, audio, message in cases:
        with pytest.raises(InputError, match=message):
            pipeline(video, audio, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists() and not leftovers(tmp_path)


def test_an_input_is_never_the_output_by_any_name(pipeline, clip, voice, tmp_path):
    """The same file under another name (a symbolic or a hard link) is refused before any work."""
    copy = tmp_path / "face.mp4"
    copy.write_bytes(clip.read_bytes())
    (tmp_path / "symbolic.mp4").symlink_to(copy)
    os.link(copy, tmp_path / "hard.mp4")
    for name in ("symbolic.mp4", "hard.mp4"):
        with pytest.raises(InputError, match="is also an input"):
            pipeline(copy, voice, tmp_path / name)
    assert copy.read_bytes() == clip.read_bytes()


def test_audio_shorter_than_one_frame_is_refused(pipeline, clip, tmp_path):
    blip = tmp_path / "blip.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=sample_rate=16000:duration=0.02", str(blip))
    with pytest.raises(InputError, match="shorter than one frame"):
        pipeline(clip, blip, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--text", ""], "the text is empty"),
    (["--text", "   \n  "], "the text is empty"),
    (["--text", "x" * 20_001], "at most 20,000"),
])
def test_empty_or_enormous_text_is_one_clear_line(models_dir, clip, tmp_path, capsys, args, message):
    code = cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--video", str(clip),
                     "--out", str(tmp_path / "out.mp4"), *args])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1, error
    assert not (tmp_path / "out.mp4").exists()


# --------------------------------------------------------------------------- nothing lost


def assert_nothing_left(folder: Path, cache_dir: Path, entries_before: list) -> None:
    assert not leftovers(folder), leftovers(folder)
    assert not ffmpeg_children(), "an ffmpeg process outlived the job"
    assert [e.key for e in AvatarCache(cache_dir).entries()] == entries_before, "a cache entry was saved"
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")], "a half-written cache entry was left"


def test_a_job_cancelled_while_encoding_leaves_nothing_and_keeps_the_old_output(pipeline, clip, voice,
                                                                                 tmp_path, cache_dir):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"the previous result")
    entries = [e.key for e in AvatarCache(cache_dir).entries()]
    seen_partial = []

    def cancel(stage, done, total):
        if stage == "generate" and done >= 2:
            seen_partial.extend(encoders())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline(clip, voice, out, RunOptions(batch_size=2, smoothing=0.3), progress=cancel)
    assert seen_partial, "the job was not stopped while its encoder was writing"
    assert out.read_bytes() == b"the previous result"
    assert_nothing_left(tmp_path, cache_dir, entries)


def test_a_job_cancelled_during_face_analysis_leaves_nothing(pipeline, clip, voice, tmp_path, cache_dir):
    entries = [e.key for e in AvatarCache(cache_dir).entries()]

    def cancel(stage, done, total):
        if stage == "faces" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline(clip, voice, tmp_path / "out.mp4", RunOptions(smoothing=0.2), progress=cancel)
    assert not (tmp_path / "out.mp4").exists()
    assert_nothing_left(tmp_path, cache_dir, entries)


def test_an_engine_failure_mid_run_leaves_nothing(pipeline, clip, voice, tmp_path, cache_dir, monkeypatch):
    entries = [e.key for e in AvatarCache(cache_dir).entries()]
    calls = []
    real_generate = pipeline.engine.generate

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(pipeline.engine, "generate", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        pipeline(clip, voice, tmp_path / "out.mp4", RunOptions(batch_size=2, smoothing=0.1))
    assert not (tmp_path / "out.mp4").exists()
    assert_nothing_left(tmp_path, cache_dir, entries)


def test_sigterm_stops_the_command_cleanly(models_dir, clip, voice, tmp_path, capsys, monkeypatch):
    """`kill` (SIGTERM) unwinds like Ctrl-C: exit 130, no output, no temp file, no ffmpeg left."""
    real_redraw = LipSyncPipeline._redraw

    def redraw_then_get_killed(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs between bytecodes of this thread
        return real_redraw(self, *args, **kwargs)

    monkeypatch.setattr(LipSyncPipeline, "_redraw", redraw_then_get_killed)
    previous = signal.getsignal(signal.SIGTERM)
    code = cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--no-cache", "--video", str(clip),
                     "--audio", str(voice), "--out", str(tmp_path / "out.mp4")])
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == previous, "the command left its signal handler behind"
    assert not (tmp_path / "out.mp4").exists() and not leftovers(tmp_path)
    assert not ffmpeg_children()


def test_disk_space_is_checked_before_the_work(pipeline, clip, voice, tmp_path, monkeypatch, capsys, models_dir):
    monkeypatch.setattr(video_io, "free_bytes", lambda folder: 10 * 1024 * 1024)
    monkeypatch.setattr(LipSyncPipeline, "_faces", lambda *a: pytest.fail("work started"))
    with pytest.raises(DiskSpaceError, match="free some space or write to another folder"):
        pipeline(clip, voice, tmp_path / "out.mp4")
    assert cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--video", str(clip),
                     "--audio", str(voice), "--out", str(tmp_path / "out.mp4")]) == 2
    error = capsys.readouterr().err
    assert "has only 10 MB free" in error and error.count("\n") == 1
    assert not (tmp_path / "out.mp4").exists()


def test_the_size_estimate_is_not_below_real_outputs(tmp_path):
    """The disk check's estimate against files really written: a face clip at crf 18 and 0."""
    source = EXAMPLES / "face.mp4"
    info = probe(source)
    for crf in (18, 0):
        out = tmp_path / f"crf{crf}.mp4"
        ffmpeg("-i", str(source), "-t", "1", "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-c:a", "aac", "-b:a", "192k", str(out))
        estimate = video_io.estimated_mp4_bytes(info.width, info.height, info.fps, 1.0, crf)
        assert out.stat().st_size <= estimate <= 10 * out.stat().st_size + 1_000_000


def test_an_interrupted_cache_save_leaves_no_half_written_entry(tmp_path, monkeypatch):
    track = face.FaceTrack(np.zeros((3, face.NUM_LANDMARKS, 2), np.float32), np.ones(3, bool), 64, 64)
    prepared = avatar_lib.Avatar("k" * 32, track, np.zeros((3, 4), np.int32), np.ones(3, bool))
    cache = AvatarCache(tmp_path)

    def interrupted_savez(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(avatar_lib.np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        cache.save(prepared, None, "video.mp4")
    assert list(tmp_path.iterdir()) == [], "a half-written entry or staging folder was left"
    monkeypatch.undo()
    cache.save(prepared, None, "video.mp4")
    assert [entry.key for entry in cache.entries()] == [prepared.key]


def test_what_a_killed_process_left_in_the_cache_is_removed_later(tmp_path):
    cache = AvatarCache(tmp_path)
    staging = tmp_path / ".abc.1234"
    staging.mkdir()
    (staging / "faces.npz").write_bytes(b"half")
    fresh = tmp_path / ".def.5678"
    fresh.mkdir()
    old = time.time() - avatar_lib.STALE_SECONDS - 10
    os.utime(staging, (old, old))
    cache.prune()
    assert not staging.exists(), "a stale staging folder was kept"
    assert fresh.exists(), "a folder another process may be writing now was removed"


def test_what_a_killed_writer_left_is_removed_by_the_next_writer_of_that_output(tmp_path):
    """SIGKILL gives no chance to clean up (and ffmpeg finishes the hidden temporary file on its
    own); the next writer of the same output removes such files once they are stale."""
    stale = tmp_path / ".out.0123abcd.partial.mp4"
    stale_trim = tmp_path / ".out.89abcdef.partial.trim.mp4"
    fresh = tmp_path / ".out.fedcba98.partial.mp4"  # another writer may be at work on it
    other = tmp_path / ".other.0123abcd.partial.mp4"
    for path in (stale, stale_trim, fresh, other):
        path.write_bytes(b"left behind")
    old = time.time() - video_io.STALE_PARTIAL_SECONDS - 10
    for path in (stale, stale_trim, other):
        os.utime(path, (old, old))
    with video_io.FrameWriter(tmp_path / "out.mp4", 32, 32, 25) as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
    assert not stale.exists() and not stale_trim.exists()
    assert fresh.exists() and other.exists()


# --------------------------------------------------------------------------- time limits


@pytest.fixture()
def stuck_ffmpeg(tmp_path, monkeypatch):
    """An 'ffmpeg' that never answers, as a damaged file could make the real one do."""
    script = tmp_path / "stuck-ffmpeg"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    monkeypatch.setattr(video_io, "COMMAND_TIMEOUT_S", 1.0)
    monkeypatch.setattr(video_io, "STALL_TIMEOUT_S", 1.0)
    return script


def test_stuck_ffmpeg_is_stopped_by_the_time_limits(stuck_ffmpeg, clip, voice, monkeypatch):
    info = probe(clip)
    monkeypatch.setattr(video_io, "ffmpeg_exe", lambda: str(stuck_ffmpeg))
    started = time.monotonic()
    with pytest.raises(FFmpegError, match="did not finish within 1 s"):
        probe(clip)
    with pytest.raises(FFmpegError, match="did not finish within 1 s"):
        video_io.decode_audio(voice)
    with pytest.raises(FFmpegError, match="delivered no frame"):
        list(read_frames(clip, info=info))
    assert time.monotonic() - started < 20
    assert not [p for p in psutil.Process().children(recursive=True) if "sleep" in p.name()]


def test_a_slow_consumer_never_trips_the_stall_limit(clip, monkeypatch):
    """Only waiting for ffmpeg counts: a reader whose consumer takes far longer than the limit per frame
    still reads. The consumer's slowness is simulated on the watchdog's clock (an hour per frame), so
    the test does not depend on how fast ffmpeg starts on a busy machine (a 0.5 s limit once did)."""

    class Clock:
        offset = 0.0

        @classmethod
        def monotonic(cls):
            return time.monotonic() + cls.offset

    monkeypatch.setattr(video_io, "time", Clock)
    monkeypatch.setattr(video_io, "STALL_TIMEOUT_S", 60.0)
    frames = 0
    for _ in read_frames(clip, max_frames=3):
        Clock.offset += 3600.0  # an hour spent by the consumer on this frame
        time.sleep(1.2)  # the watchdog looks once a second: it sees the hour go by
        frames += 1
    assert frames == 3
