"""Video I/O: probe, frame reader, frame writer, audio extraction.

Every file is made on the fly with ffmpeg's lavfi sources at tiny sizes. Frames whose grey level
encodes their index (``geq=lum=N*4+16``, encoded losslessly) let the tests tell frames apart exactly.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from musetalk.errors import FFmpegError, InputError
from musetalk.video_io import (
    FrameReader,
    FrameWriter,
    decode_audio,
    extract_audio,
    probe,
    read_frames,
)

from conftest import media_ffmpeg

W, H = 64, 48
# RGB grey level per index step: luma step 4 in limited range, expanded by 255/219 to full range.
GREY_STEP = 4 * 255 / 219


def make(out: Path, *args: str) -> Path:
    """Run ffmpeg to create a test file."""
    cmd = [media_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args, str(out)]
    subprocess.run(cmd, check=True)
    return out


def indexed_source(seconds: float, fps: int | str = 25, extra: str = "") -> list[str]:
    chain = f"color=c=black:s={W}x{H}:r={fps}:d={seconds},geq=lum='N*4+16':cb=128:cr=128{extra}"
    return ["-f", "lavfi", "-i", chain]


def frame_index(frame: np.ndarray) -> int:
    return int(round(float(frame.mean()) / GREY_STEP))


def no_leftover_temp(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if "partial" in p.name or "trim" in p.name]


def assert_reaped(proc: subprocess.Popen) -> None:
    assert proc.returncode is not None, "ffmpeg is still running"
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)  # already reaped: no zombie left behind


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    files = {}
    files["av"] = make(
        d / "av.mp4", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=25:duration=1",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=1",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
    )
    # 50 frames, key frame every 10, B-frames: seeking must land on exact frames anyway.
    files["indexed"] = make(
        d / "indexed.mp4", *indexed_source(2.0), "-c:v", "libx264", "-qp", "0", "-g", "10", "-bf", "2",
        "-pix_fmt", "yuv420p",
    )
    # AVI counts time in frames (time base 1001/30000): seeks must not round onto the frame before.
    files["indexed_avi"] = make(
        d / "indexed.avi", *indexed_source(1.0, fps="30000/1001"), "-c:v", "ffv1", "-g", "8", "-pix_fmt", "yuv420p",
    )
    # MPEG-TS starts at 1.4 s, the video a little after the audio, and has no key-frame index.
    files["indexed_ts"] = make(
        d / "indexed.ts", *indexed_source(1.0), "-f", "lavfi", "-i", "sine=duration=1",
        "-c:v", "libx264", "-qp", "0", "-g", "8", "-pix_fmt", "yuv420p", "-c:a", "aac",
    )
    # 25 frames in the first second, then 10 frames 0.2 s apart: 35 frames, the last at 2.8 s.
    files["vfr"] = make(
        d / "vfr.mp4", *indexed_source(1.4, extra=",setpts='(if(lt(N,25),N*0.04,1+(N-25)*0.2))/TB'"),
        "-fps_mode", "passthrough", "-c:v", "libx264", "-qp", "0", "-g", "10", "-pix_fmt", "yuv420p",
    )
    # Left half white: after the rotation the white half must be at the bottom.
    half = make(
        d / "half.mp4", "-f", "lavfi", "-i",
        f"color=c=black:s={W}x{H}:r=25:d=0.4,drawbox=x=0:y=0:w={W // 2}:h={H}:color=white:t=fill",
        "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p",
    )
    files["rotated"] = make(d / "rotated.mp4", "-display_rotation", "90", "-i", str(half), "-c", "copy")
    files["png"] = make(d / "still.png", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}", "-frames:v", "1")
    files["jpg"] = make(d / "still.jpg", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}", "-frames:v", "1")
    files["webp"] = make(d / "still.webp", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}", "-frames:v", "1")
    files["wav"] = make(d / "tone.wav", "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=22050:duration=1.5")
    files["long_wav"] = make(d / "long.wav", "-f", "lavfi", "-i", "sine=sample_rate=44100:duration=3")
    files["short_wav"] = make(d / "short.wav", "-f", "lavfi", "-i", "sine=sample_rate=44100:duration=0.5")
    return files


# --------------------------------------------------------------------------- probe


def test_probe_video_with_audio(media):
    info = probe(media["av"])
    assert (info.has_video, info.has_audio, info.is_image, info.is_vfr) == (True, True, False, False)
    assert (info.width, info.height, info.rotation) == (W, H, 0)
    assert info.fps == pytest.approx(25.0)
    assert info.num_frames == 25
    assert info.duration == pytest.approx(1.0, abs=1e-3)
    assert (info.audio_sample_rate, info.audio_channels) == (44100, 1)


def test_probe_video_without_audio(media):
    info = probe(media["indexed"])
    assert info.has_video and not info.has_audio
    assert info.num_frames == 50 and info.duration == pytest.approx(2.0, abs=1e-3)
    assert info.audio_sample_rate is None and info.audio_channels is None


def test_probe_audio_only(media):
    info = probe(media["wav"])
    assert info.has_audio and not info.has_video and not info.is_image
    assert (info.width, info.height, info.num_frames) == (0, 0, 0)
    assert info.audio_sample_rate == 22050
    assert info.duration == pytest.approx(1.5, abs=0.01)


def test_rotated_video_reports_and_reads_display_size(media):
    info = probe(media["rotated"])
    assert (info.width, info.height) == (H, W)
    assert info.rotation in (90, 270)
    frames = list(read_frames(media["rotated"], info=info))
    assert len(frames) == info.num_frames == 10
    assert frames[0].shape == (W, H, 3)
    # display_rotation 90 turns the picture counter-clockwise: the white left half ends at the bottom.
    top, bottom = frames[0][: W // 2].mean(), frames[0][W // 2 :].mean()
    assert bottom > 200 and top < 50


def test_vfr_is_detected_and_read_at_constant_rate(media):
    info = probe(media["vfr"])
    assert info.is_vfr
    assert info.num_frames == 35
    # The last frame starts at 2.8 s and its packet says it lasts one 25 fps tick.
    assert info.duration == pytest.approx(2.84, abs=1e-3)
    assert info.fps == pytest.approx(35 / 2.84, rel=1e-3)
    with FrameReader(media["vfr"], info=info) as reader:
        assert reader.output_fps == pytest.approx(info.fps)
        indices = [frame_index(f) for f in reader]
    assert abs(len(indices) - 35) <= 1
    # The fps filter shows in each slot the latest frame that starts before the slot's middle.
    assert indices[0] in (0, 1) and indices[-1] in (33, 34)
    assert all(b >= a for a, b in zip(indices, indices[1:]))
    # First second: 25 source frames squeezed into about 12 slots, so some are skipped...
    assert len(set(indices[:11])) == 11 and indices[10] > 10
    # ...then 5 fps source frames are repeated to fill the constant rate.
    assert any(a == b for a, b in zip(indices[12:], indices[13:]))
    # Frame 30 of the source shows at 2.0 s.
    assert abs(indices[round(2.0 * info.fps)] - 30) <= 1


def test_vfr_read_at_explicit_rate(media):
    frames = list(read_frames(media["vfr"], fps=25))
    assert len(frames) == 71  # 2.84 s at 25 fps
    assert frame_index(frames[50]) == 30  # 2.0 s


@pytest.mark.parametrize("kind", ["png", "jpg", "webp"])
def test_image_probes_as_image_and_reads_one_frame(media, kind):
    info = probe(media[kind])
    assert info.is_image and info.has_video and not info.has_audio
    assert (info.width, info.height, info.num_frames, info.fps) == (W, H, 1, 25.0)
    with FrameReader(media[kind], info=info, start_frame=7) as reader:
        frames = list(reader)
        assert reader.output_fps == 25.0
    assert len(frames) == 1 and frames[0].shape == (H, W, 3) and frames[0].dtype == np.uint8


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF block (APP1) holding just the Orientation tag, as phones write it."""
    entry = (0x0112).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")
    entry += orientation.to_bytes(2, "little") + b"\x00\x00"
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little") + entry + (0).to_bytes(4, "little")
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def test_photo_exif_orientation_gives_the_size_the_reader_delivers(tmp_path):
    upright = make(
        tmp_path / "upright.jpg", "-f", "lavfi", "-i",
        f"color=c=black:s={W}x{H},drawbox=x=0:y=0:w={W // 2}:h={H}:color=white:t=fill", "-frames:v", "1",
    )
    portrait = tmp_path / "portrait.jpg"
    portrait.write_bytes(with_exif_orientation(upright.read_bytes(), 6))  # 6: turn 90 degrees clockwise
    info = probe(portrait)
    assert info.is_image and (info.width, info.height, info.rotation) == (H, W, 90)
    frame = next(read_frames(portrait, info=info))
    assert frame.shape == (W, H, 3)
    # Turned clockwise, the white left half ends at the top.
    assert frame[: W // 2].mean() > 200 and frame[W // 2 :].mean() < 50


def test_text_file_raises_input_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(InputError, match="notes.txt"):
        probe(text)


def test_missing_and_empty_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        probe(tmp_path / "nowhere.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        probe(tmp_path / "empty.mp4")
    with pytest.raises(InputError, match="folder"):
        probe(tmp_path)


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_mp4_raises_input_error(tmp_path, faststart):
    flags = ["-movflags", "+faststart"] if faststart else []
    whole = make(
        tmp_path / "whole.mp4", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=25:duration=2",
        "-f", "lavfi", "-i", "sine=duration=2", "-c:v", "libx264", "-c:a", "aac", "-pix_fmt", "yuv420p", *flags,
    )
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match="cut.mp4"):
        probe(cut)


# --------------------------------------------------------------------------- reader


def test_reader_yields_every_frame_in_order(media):
    with FrameReader(media["indexed"]) as reader:
        frames = list(reader)
        assert reader.frames_read == 50
    assert [frame_index(f) for f in frames] == list(range(50))
    assert frames[0].flags.writeable


@pytest.mark.parametrize("start", [1, 9, 10, 11, 23, 47])
def test_start_frame_seeks_to_the_exact_frame(media, start):
    frames = list(read_frames(media["indexed"], start_frame=start, max_frames=3))
    assert [frame_index(f) for f in frames] == [start, start + 1, start + 2]


@pytest.mark.parametrize("source", ["indexed_avi", "indexed_ts"])
def test_start_frame_seeks_exactly_in_other_containers(media, source):
    info = probe(media[source])
    assert info.num_frames in (25, 30) and not info.is_vfr
    for start in range(1, info.num_frames):
        frames = list(read_frames(media[source], info=info, start_frame=start, max_frames=2))
        assert [frame_index(f) for f in frames] == [start, start + 1][: info.num_frames - start], start


def test_seek_past_the_end_yields_nothing(media):
    assert list(read_frames(media["indexed"], start_frame=49)) != []
    assert list(read_frames(media["indexed"], start_frame=50)) == []


@pytest.mark.parametrize("source,fps", [("indexed", 10.0), ("indexed", 30.0), ("vfr", None)])
def test_resampled_seek_matches_a_read_from_the_start(media, source, fps):
    full = [frame_index(f) for f in read_frames(media[source], fps=fps)]
    expected_len = {10.0: 20, 30.0: 60, None: 35}[fps]
    assert abs(len(full) - expected_len) <= 1
    for start in (1, 7, 13, len(full) - 2):
        part = [frame_index(f) for f in read_frames(media[source], fps=fps, start_frame=start, max_frames=2)]
        assert part == full[start : start + 2], f"start_frame={start}"


@pytest.mark.parametrize("source,fps", [("indexed", None), ("indexed", 30.0), ("vfr", None), ("indexed_ts", None)])
def test_every_nth_frame_is_what_a_full_read_has_there(media, source, fps):
    full = [frame_index(f) for f in read_frames(media[source], fps=fps)]
    assert [frame_index(f) for f in read_frames(media[source], fps=fps, every=4)] == full[::4]
    assert [frame_index(f) for f in read_frames(media[source], fps=fps, every=3, start_frame=5)] == full[5::3]
    with pytest.raises(InputError, match="every must be 1 or more"):
        FrameReader(media[source], every=0)


def test_reader_closed_early_leaves_no_process(media):
    reader = FrameReader(media["indexed"])
    iterator = iter(reader)
    next(iterator)
    proc = reader.process
    assert proc is not None and proc.poll() is None
    reader.close()
    assert reader.process is None
    assert_reaped(proc)


def test_read_frames_generator_dropped_early_leaves_no_process(media):
    generator = read_frames(media["indexed"])
    next(generator)
    # The suspended generator holds its reader; reach the process through the generator's locals.
    proc = generator.gi_frame.f_locals["reader"].process
    assert proc.poll() is None
    generator.close()
    assert_reaped(proc)


def test_consumer_exception_stops_the_reader(media):
    reader = FrameReader(media["indexed"])
    with pytest.raises(RuntimeError):
        with reader:
            for _ in reader:
                proc = reader.process
                raise RuntimeError("consumer failed")
    assert_reaped(proc)


def test_reader_of_audio_file_raises_input_error(media):
    with pytest.raises(InputError, match="no picture"):
        FrameReader(media["wav"])


# --------------------------------------------------------------------------- writer


def indexed_frames(count: int, width: int = W, height: int = H) -> list[np.ndarray]:
    return [np.full((height, width, 3), 10 + 4 * i, np.uint8) for i in range(count)]


@pytest.mark.parametrize("audio,total", [("long_wav", None), ("long_wav", 30), ("short_wav", None), ("short_wav", 30)])
def test_writer_round_trip_with_audio(media, tmp_path, audio, total):
    out = tmp_path / "out.mp4"
    with FrameWriter(out, W, H, 25, audio_path=media[audio], preset="ultrafast", total_frames=total) as writer:
        for frame in indexed_frames(30):
            writer.write(frame)
    assert writer.frames_written == 30
    info = probe(out)
    assert (info.width, info.height, info.num_frames, info.has_audio) == (W, H, 30, True)
    assert info.fps == pytest.approx(25.0) and not info.is_vfr
    assert info.duration == pytest.approx(1.2, abs=1e-3)
    # Longer audio is cut, shorter audio padded with silence: both end with the video.
    assert len(decode_audio(out)) / 16000 == pytest.approx(1.2, abs=0.03)
    back = [f.mean() for f in read_frames(out)]
    assert back == pytest.approx([10 + 4 * i for i in range(30)], abs=3)
    assert no_leftover_temp(tmp_path)


@pytest.mark.parametrize("total", [None, 8])  # without total_frames the audio is trimmed afterwards, in place
def test_the_container_follows_the_name(media, tmp_path, total):
    """--out dub.mkv wrote an MP4 named .mkv: each name now gets its own container."""
    signatures = {".mp4": (b"ftyp", b"isom"), ".mov": (b"ftyp", b"qt  "), ".mkv": (b"\x1aE\xdf\xa3", None)}
    for suffix, (magic, brand) in signatures.items():
        out = tmp_path / f"dub{suffix}"
        with FrameWriter(out, W, H, 25, audio_path=media["long_wav"], total_frames=total) as writer:
            for frame in indexed_frames(8):
                writer.write(frame)
        head = out.read_bytes()[:12]
        assert magic in head[:8] and (brand is None or head[8:12] == brand), (suffix, head)
        info = probe(out)
        assert info.num_frames == 8 and info.has_audio and ("matroska" in info.format_name) == (suffix == ".mkv")
        assert no_leftover_temp(tmp_path)
    for refused in ("dub.webm", "dub.avi", "dub.MP4.gif", "dub"):
        with pytest.raises(InputError, match=r"must end in \.mp4, \.mov or \.mkv"):
            FrameWriter(tmp_path / refused, W, H, 25)
        assert not (tmp_path / refused).exists()


def test_writer_without_audio_keeps_rate(tmp_path):
    out = tmp_path / "ntsc.mp4"
    with FrameWriter(out, W, H, 30000 / 1001, crf=0, preset="ultrafast") as writer:
        for frame in indexed_frames(12):
            writer.write(frame)
    info = probe(out)
    assert not info.has_audio and info.num_frames == 12
    assert info.fps == pytest.approx(30000 / 1001, rel=1e-6)


@pytest.mark.parametrize("threads", [None, 1])
def test_writer_encoder_threads_reach_x264(tmp_path, threads):
    # x264 writes the options it encoded with into the stream (an SEI message): what it used, not what
    # was asked. Without a limit it picks 1.5 threads a core, fewer for a picture of few macroblock rows.
    out, frame = tmp_path / "threads.mp4", np.zeros((240, 320, 3), dtype=np.uint8)
    with FrameWriter(out, 320, 240, 25, preset="ultrafast", encoder_threads=threads) as writer:
        for value in range(6):
            writer.write(frame + 40 * value)
    options = out.read_bytes().split(b"options: ", 1)[1].split(b"\x00", 1)[0].decode("ascii", "replace").split()
    used = int(next(option for option in options if option.startswith("threads=")).split("=")[1])
    assert used == 1 if threads == 1 else (used >= 2 or len(os.sched_getaffinity(0)) == 1)
    assert probe(out).num_frames == 6


def test_writer_audio_offset_delays_the_sound(media, tmp_path):
    out = tmp_path / "delayed.mp4"
    with FrameWriter(out, W, H, 25, audio_path=media["long_wav"], audio_offset_s=0.4, total_frames=25,
                     preset="ultrafast") as writer:
        for frame in indexed_frames(25):
            writer.write(frame)
    samples = decode_audio(out)
    loud = np.flatnonzero(np.abs(samples) > 0.05)
    assert loud[0] / 16000 == pytest.approx(0.4, abs=0.03)
    assert len(samples) / 16000 == pytest.approx(1.0, abs=0.03)


def test_writer_pads_odd_size_with_the_edge(tmp_path):
    out = tmp_path / "odd.mp4"
    frame = np.zeros((47, 63, 3), np.uint8)
    frame[:, 40:] = 200  # the right edge is bright: the added column must be bright too, not black
    frame[40:, :] = 120
    with FrameWriter(out, 63, 47, 25, crf=0, preset="ultrafast") as writer:
        assert writer.encoded_size == (64, 48)
        for _ in range(5):
            writer.write(frame)
    info = probe(out)
    assert (info.width, info.height, info.num_frames) == (64, 48, 5)
    back = next(iter(read_frames(out)))
    assert abs(int(back[10, 63].mean()) - 200) < 12  # copied right edge column
    assert abs(int(back[47, 10].mean()) - 120) < 12  # copied bottom edge row
    assert np.abs(back[:47, :63].astype(int) - frame).mean() < 4


def test_writer_abort_on_exception_leaves_nothing(tmp_path):
    out = tmp_path / "aborted.mp4"
    with pytest.raises(RuntimeError):
        with FrameWriter(out, W, H, 25) as writer:
            writer.write(indexed_frames(1)[0])
            proc = writer._proc
            deadline = time.monotonic() + 60  # a busy machine may take seconds to start ffmpeg
            while not os.path.exists(writer.temp_path) and time.monotonic() < deadline:
                time.sleep(0.01)  # ffmpeg creates the file once it has started
            assert os.path.exists(writer.temp_path)
            raise RuntimeError("model failed")
    assert not out.exists()
    assert no_leftover_temp(tmp_path)
    assert_reaped(proc)


def test_writer_abort_keeps_an_existing_output(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"previous result")
    writer = FrameWriter(out, W, H, 25)
    writer.write(indexed_frames(1)[0])
    writer.abort()
    assert out.read_bytes() == b"previous result"
    assert no_leftover_temp(tmp_path) and len(list(tmp_path.iterdir())) == 1


def test_writer_refuses_to_overwrite_an_input(media, tmp_path):
    with pytest.raises(InputError, match="one of the inputs"):
        FrameWriter(media["indexed"], W, H, 25, protect=[media["indexed"]])
    with pytest.raises(InputError, match="one of the inputs"):
        FrameWriter(media["wav"], W, H, 25, audio_path=media["wav"])


def test_writer_checks_frames(tmp_path):
    with FrameWriter(tmp_path / "x.mp4", W, H, 25) as writer:
        with pytest.raises(InputError, match="uint8"):
            writer.write(np.zeros((H, W, 3), np.float32))
        with pytest.raises(InputError, match=r"\(48, 64, 3\)"):
            writer.write(np.zeros((W, H, 3), np.uint8))
        writer.write(np.zeros((H, W, 3), np.uint8))
    assert probe(tmp_path / "x.mp4").num_frames == 1


def test_writer_with_no_frames_raises_and_leaves_nothing(tmp_path):
    writer = FrameWriter(tmp_path / "none.mp4", W, H, 25)
    with pytest.raises(InputError, match="no frames"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_dying_mid_stream_raises_ffmpeg_error(tmp_path):
    out = tmp_path / "dead.mp4"
    writer = FrameWriter(out, W, H, 25)
    writer.write(indexed_frames(1)[0])
    writer._proc.kill()
    writer._proc.wait()
    with pytest.raises(FFmpegError, match="after 1 frames"):
        for frame in indexed_frames(50):
            writer.write(frame)
    assert not out.exists() and no_leftover_temp(tmp_path)


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(InputError, match="crf"):
        FrameWriter(tmp_path / "a.mp4", W, H, 25, crf=60)
    with pytest.raises(InputError, match="fps"):
        FrameWriter(tmp_path / "a.mp4", W, H, 0)
    with pytest.raises(InputError, match="encoder_threads"):
        FrameWriter(tmp_path / "a.mp4", W, H, 25, encoder_threads=0)
    with pytest.raises(InputError, match="does not exist"):
        FrameWriter(tmp_path / "no" / "a.mp4", W, H, 25)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- audio


def test_extract_audio_from_video(media, tmp_path):
    wav = extract_audio(media["av"], tmp_path / "speech.wav")
    info = probe(wav)
    assert (info.audio_sample_rate, info.audio_channels, info.has_video) == (16000, 1, False)
    assert info.duration == pytest.approx(1.0, abs=0.03)
    assert no_leftover_temp(tmp_path)


def test_extract_audio_keeps_requested_rate_and_channels(media, tmp_path):
    wav = extract_audio(media["wav"], tmp_path / "stereo.wav", sample_rate=48000, channels=2)
    info = probe(wav)
    assert (info.audio_sample_rate, info.audio_channels) == (48000, 2)


def test_decode_audio(media):
    samples = decode_audio(media["wav"])
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == pytest.approx(1.5 * 16000, abs=32)
    assert 0.05 < np.abs(samples).max() <= 1.0
    assert len(decode_audio(media["wav"], sample_rate=8000)) == pytest.approx(1.5 * 8000, abs=16)


def test_audio_functions_refuse_a_silent_video(media, tmp_path):
    with pytest.raises(InputError, match="no audio"):
        decode_audio(media["indexed"])
    with pytest.raises(InputError, match="no audio"):
        extract_audio(media["indexed"], tmp_path / "x.wav")
    assert list(tmp_path.iterdir()) == []
