"""Which ffmpeg runs, what `musetalk doctor` says of it, and files that must never reach it.

The product runs the bundled ffmpeg (imageio-ffmpeg's, a known 9.x) unless MUSETALK_FFMPEG names
another; the oldest supported is 5.1 (Debian 12's). The tests make their media with the bundled one
whatever the product runs (conftest.media_ffmpeg), so `MUSETALK_FFMPEG=/usr/bin/ffmpeg pytest` checks
the product against a system ffmpeg with the same media.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from musetalk import cli, doctor, video_io
from musetalk.errors import FFmpegError, InputError

from conftest import media_ffmpeg


@pytest.fixture
def fresh_ffmpeg_choice():
    """ffmpeg_exe() is cached per process: each test here chooses again, and the next tests too."""
    video_io.ffmpeg_exe.cache_clear()
    yield
    video_io.ffmpeg_exe.cache_clear()


def fake_ffmpeg(folder: Path, version_line: str, encoders=("libx264", "aac"), has_fps_mode: bool = True) -> Path:
    """An 'ffmpeg' that answers doctor's questions as a given build would."""
    folder.mkdir(parents=True, exist_ok=True)
    listings = {
        "-version": version_line,
        "-encoders": "Encoders:\n ------\n" + "\n".join(f" V....D {name}  an encoder" for name in encoders),
        "-muxers": "File formats:\n --\n" + "\n".join(f"  E {name}  a muxer" for name in video_io.REQUIRED_MUXERS),
        "-filters": "Filters:\n" + "\n".join(f" ... {name}  V->V  a filter" for name in video_io.REQUIRED_FILTERS),
        "-h": "-fps_mode  set framerate mode" if has_fps_mode else "-vsync  video sync method",
    }
    for flag, text in listings.items():
        (folder / f"answer{flag}").write_text(text + "\n")
    script = folder / "ffmpeg"
    script.write_text(f'#!/bin/sh\nfor arg; do last="$arg"; done\ncat "{folder}/answer$last"\n')
    script.chmod(0o755)
    return script


def test_the_bundled_ffmpeg_runs_even_beside_a_system_one(tmp_path, monkeypatch, fresh_ffmpeg_choice):
    system = fake_ffmpeg(tmp_path / "bin", "ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2026")
    monkeypatch.setenv("PATH", f"{system.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MUSETALK_FFMPEG", raising=False)
    bundled = video_io.bundled_ffmpeg()
    assert bundled and "imageio_ffmpeg" in bundled
    assert video_io.ffmpeg_exe() == bundled, "a system ffmpeg on PATH took the place of the bundled one"
    video_io.ffmpeg_exe.cache_clear()
    monkeypatch.setenv("MUSETALK_FFMPEG", str(system))
    assert video_io.ffmpeg_exe() == str(system), "MUSETALK_FFMPEG names the one to run"
    assert media_ffmpeg() == bundled, "the tests' media are made by the bundled ffmpeg whatever the product runs"


def test_without_the_bundled_one_the_system_ffmpeg_runs(tmp_path, monkeypatch, fresh_ffmpeg_choice):
    system = fake_ffmpeg(tmp_path / "bin", "ffmpeg version 6.1.1 Copyright (c) 2000-2023")
    monkeypatch.setenv("PATH", str(system.parent))
    monkeypatch.delenv("MUSETALK_FFMPEG", raising=False)
    monkeypatch.setattr(video_io, "bundled_ffmpeg", lambda: None)
    assert video_io.ffmpeg_exe() == str(system)
    video_io.ffmpeg_exe.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(FFmpegError, match="ffmpeg was not found: `pip install imageio-ffmpeg`"):
        video_io.ffmpeg_exe()


@pytest.mark.parametrize("version_line, encoders, has_fps_mode, problem", [
    ("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021", ("libx264", "aac"), True,
     "version 4.4 is older than 5.1, the oldest supported"),
    ("ffmpeg version 6.0 Copyright (c) 2000-2023", ("aac",), True, "it lacks the encoder libx264"),
    ("ffmpeg version N-109000-g1234abcd Copyright (c) 2000-2022", ("libx264", "aac"), False,
     "it has no -fps_mode option"),
])
def test_doctor_says_when_ffmpeg_is_too_old_or_lacks_what_is_needed(tmp_path, monkeypatch, fresh_ffmpeg_choice,
                                                                     capsys, version_line, encoders, has_fps_mode,
                                                                     problem):
    monkeypatch.setenv("MUSETALK_FFMPEG", str(fake_ffmpeg(tmp_path / "bin", version_line, encoders, has_fps_mode)))
    row = doctor._ffmpeg()
    assert not row.ok and row.required
    assert problem in row.detail and "unset MUSETALK_FFMPEG" in row.detail, row.detail
    assert cli.main(["doctor", "--models-dir", str(tmp_path)]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if " ffmpeg " in line)
    assert line.startswith("FAIL") and problem in line


def test_doctor_accepts_the_bundled_ffmpeg_and_debians(tmp_path, monkeypatch, fresh_ffmpeg_choice):
    monkeypatch.delenv("MUSETALK_FFMPEG", raising=False)
    row = doctor._ffmpeg()
    assert row.ok and "(bundled: " in row.detail, row.detail
    debian = fake_ffmpeg(tmp_path / "bin", "ffmpeg version 5.1.9-0+deb12u1 Copyright (c)")
    monkeypatch.setenv("MUSETALK_FFMPEG", str(debian))
    video_io.ffmpeg_exe.cache_clear()
    row = doctor._ffmpeg()
    assert row.ok and row.detail.startswith("ffmpeg version 5.1.9-0+deb12u1 (MUSETALK_FFMPEG: "), row.detail
    assert doctor.ffmpeg_version("ffmpeg version n9.0.2-17-g2a571b6068-20260930 Copyright") == (9, 0)


# --------------------------------------------------------------------------- files that never reach ffmpeg


def blur_bomb_svg() -> str:
    """4 KB of SVG: dozens of stacked Gaussian blurs on an 8000x8000 canvas (minutes of librsvg time)."""
    blurs = "".join(f'<feGaussianBlur in="b{k}" stdDeviation="{200 + k}" result="b{k + 1}"/>' for k in range(40))
    return (f'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8000" height="8000">'
            f'<filter id="f"><feFlood flood-color="red" result="b0"/>{blurs}</filter>'
            f'<rect width="8000" height="8000" filter="url(#f)"/></svg>\n')


@pytest.mark.parametrize("name, text, kind", [
    ("face.svg", None, "an SVG drawing"),
    ("face.png", None, "markup (SVG, XML or HTML)"),  # the same drawing under a photo's name
    ("face.jpg", "\ufeff  <svg xmlns='http://www.w3.org/2000/svg'/>", "markup (SVG, XML or HTML)"),
    ("talk.mp4", "%PDF-1.7\n", "a PDF document"),
    ("voice.wav", "%!PS-Adobe-3.0\n", "a PostScript document"),
    ("script.avs", "Version()\n", "an AviSynth script"),
])
def test_drawings_documents_and_scripts_are_refused_before_ffmpeg_sees_them(tmp_path, monkeypatch, name, text, kind):
    path = tmp_path / name
    path.write_text(text if text is not None else blur_bomb_svg(), encoding="utf-8")
    assert path.stat().st_size < 5000

    def no_ffmpeg(*args, **kwargs):
        raise AssertionError(f"ffmpeg was started for a refused file: {args[0]}")

    monkeypatch.setattr(video_io.subprocess, "Popen", no_ffmpeg)
    monkeypatch.setattr(video_io.subprocess, "run", no_ffmpeg)
    for read in (video_io.probe, video_io.decode_audio, lambda p: list(video_io.read_frames(p))):
        started = time.monotonic()
        with pytest.raises(InputError) as refused:
            read(path)
        assert time.monotonic() - started < 1
        message = str(refused.value)
        assert f"is {kind}, not a video, photo or audio file" in message and "\n" not in message


def test_a_probe_is_bounded_in_proportion_to_the_file(tmp_path, monkeypatch):
    """A file that keeps ffmpeg busy (here an 'ffmpeg' that spins) is stopped after a few seconds of
    wall-clock or CPU time for a small file, not after the 600 s limit of long commands."""
    assert video_io.probe_time_limit(__file__) < 15
    big = tmp_path / "big.mp4"
    with open(big, "wb") as handle:
        handle.truncate(2 * 10**9)  # sparse: 2 GB on paper
    assert 60 < video_io.probe_time_limit(str(big)) < 600
    spinning = tmp_path / "spinning-ffmpeg"
    spinning.write_text("#!/bin/sh\nwhile :; do :; done\n")
    spinning.chmod(0o755)
    small = tmp_path / "small.mp4"
    small.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(video_io, "ffmpeg_exe", lambda: str(spinning))
    monkeypatch.setattr(video_io, "PROBE_BASE_S", 1.5)
    started = time.monotonic()
    with pytest.raises(FFmpegError, match=r"(did not finish within 1.5 s|more than 1.5 s of processor time)"):
        video_io.probe(small)
    assert time.monotonic() - started < 10


def test_a_fake_or_giant_picture_is_one_clear_line(tmp_path, capsys):
    """A text file named .png and a PNG declaring 60000x60000: one line each (ffmpeg's log only with -v)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    text = tmp_path / "text.png"
    text.write_text("hello, this is not a picture\n")
    giant = tmp_path / "giant.png"
    giant.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    voice = tmp_path / "voice.wav"
    subprocess.run([media_ffmpeg(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.5", str(voice)], check=True)
    for path, expected in ((text, "cannot be decoded (Invalid PNG signature"), (giant, "60000x60000, 3600 megapixels")):
        code = cli.main(["run", "--engine", "preview", "--video", str(path), "--audio", str(voice),
                         "--out", str(tmp_path / "out.mp4")])
        error = capsys.readouterr().err
        assert code == 2 and error.count("\n") == 1 and expected in error, error
        assert error.startswith("musetalk: error: ")
    assert not (tmp_path / "out.mp4").exists()
