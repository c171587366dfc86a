"""Nothing gets in: crafted inputs cannot make ffmpeg fetch URLs or read other local files, every
ffmpeg command on an input carries its restrictions, and the code base has no shell and no
unsafe checkpoint loading.

A local TCP server stands in for "the network": a playlist pointing at it must be refused
without a single connection reaching it.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from musetalk import video_io
from musetalk.errors import FFmpegError, InputError
from musetalk.video_io import FrameWriter, decode_audio, extract_audio, probe, read_frames

from conftest import ffmpeg

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FILES = sorted([*ROOT.joinpath("musetalk").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py"),
                       *ROOT.glob("app.py")])


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A local video that a crafted file must not be able to pull in."""
    path = tmp_path_factory.mktemp("private") / "secret.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x48:d=0.4:r=25", "-f", "lavfi", "-i", "sine=d=0.4",
           "-pix_fmt", "yuv420p", "-shortest", str(path))
    return path


class Listener:
    """A TCP server on localhost that counts who connected."""

    def __init__(self) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(8)
        self._server.settimeout(0.3)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def connections(self) -> int:
        count = 0
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:  # includes the timeout: nobody else is waiting
                return count
            connection.close()
            count += 1

    def close(self) -> None:
        self._server.close()


@pytest.fixture()
def listener():
    server = Listener()
    yield server
    server.close()


def hls(target: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{target}\n#EXT-X-ENDLIST\n"


def crafted_files(folder: Path, secret: Path, url: str) -> dict[str, Path]:
    contents = {
        "local.m3u8": hls(str(secret)),
        "remote.m3u8": hls(url + "/segment.ts"),
        "relative.m3u8": hls("../" * 12 + str(secret).lstrip("/")),
        "list.ffconcat": f"ffconcat version 1.0\nfile {secret}\n",
        "relative.ffconcat": f"ffconcat version 1.0\nfile {secret.name}\n",
        "remote.ffconcat": f"ffconcat version 1.0\nfile {url}/x.mp4\n",
        # the same lists behind an innocent extension: content sniffing must not open them either
        "concat_as.mp4": f"ffconcat version 1.0\nfile {secret.name}\n",
        "playlist_as.mp4": hls(str(secret)),
        "playlist_as.wav": hls(url + "/a.wav"),
        "dash.mpd": (f'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static">'
                     f'<Period><AdaptationSet><Representation id="1" bandwidth="1"><BaseURL>{url}/v.mp4</BaseURL>'
                     f'</Representation></AdaptationSet></Period></MPD>'),
        "sdp.sdp": f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video {url.rsplit(':', 1)[1]} RTP/AVP 96\n",
    }
    files = {}
    for name, text in contents.items():
        files[name] = folder / name
        files[name].write_text(text)
    shutil.copy(secret, folder / secret.name)  # for the relative entries
    return files


def test_playlists_and_lists_are_refused_without_touching_the_network(secret, listener, tmp_path):
    for name, path in crafted_files(tmp_path, secret, listener.url).items():
        with pytest.raises(InputError) as error:
            probe(path)
        assert str(path) in str(error.value) or path.name in str(error.value), name
        with pytest.raises(InputError):
            decode_audio(path)
    assert listener.connections() == 0, "ffmpeg reached out to the network"
    # the listener does see ffmpeg when it is asked for the URL outright (so the zero above means something)
    subprocess.run([video_io.ffmpeg_exe(), "-nostdin", "-rw_timeout", "300000", "-i", listener.url + "/x.mp4",
                    "-f", "null", "-"], capture_output=True, timeout=30)
    assert listener.connections() >= 1


def test_the_reader_and_writer_refuse_them_even_without_a_probe(secret, listener, tmp_path):
    """The restrictions are on every command, not only on probe: a reader handed the info of a
    real file, or a writer handed a playlist as its audio, still cannot open the list."""
    files = crafted_files(tmp_path, secret, listener.url)
    info = probe(secret)
    for name in ("local.m3u8", "remote.m3u8", "relative.ffconcat"):
        with pytest.raises(FFmpegError):
            list(read_frames(files[name], info=info))
    # the writer probes nothing: its ffmpeg must refuse the playlist given as audio
    with pytest.raises(FFmpegError):
        with FrameWriter(tmp_path / "out.mp4", 64, 48, 25, audio_path=files["local.m3u8"], total_frames=2) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            writer.write(np.zeros((48, 64, 3), np.uint8))
    assert not (tmp_path / "out.mp4").exists()
    assert listener.connections() == 0


def test_pattern_characters_in_a_name_never_open_other_files(tmp_path):
    """ffmpeg's image-sequence reader would expand 'img%d.png' to img1.png, img2.png...; a path
    with '%' never gets that reader: it is either refused with a clear message or read as the
    one file it is (by content). Glob characters are never expanded."""
    for index in (1, 2):
        ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=64x64", "-frames:v", "1", str(tmp_path / f"img{index}.png"))
        ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=64x64", "-frames:v", "1", str(tmp_path / f"img{index}.jpg"))
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=32x32", "-frames:v", "1", str(tmp_path / "upload.png"))
    refused = []
    for name in ("img%d.png", "img%d.jpg", "img%02d.png", "img%%.png", "img*.png", "img?.png", "img[12].png"):
        shutil.copy(tmp_path / "upload.png", tmp_path / name)
        try:
            info = probe(tmp_path / name)
        except InputError as error:
            assert "rename the file" in str(error)
            refused.append(name)
            continue
        frames = list(read_frames(tmp_path / name, info=info))
        assert len(frames) == 1 and frames[0].shape == (32, 32, 3) and frames[0][..., 0].mean() > 200, name
    assert {"img%d.png", "img%d.jpg", "img%02d.png"} <= set(refused)
    assert not {"img*.png", "img?.png", "img[12].png"} & set(refused)


@pytest.mark.parametrize("name", ["http:evil.mp4", "-i.mp4", "concat:a|b.mp4", "name with spaces;rm -rf.mp4",
                                  "subfile,,start,0,end,10,,:x.mp4"])
def test_odd_file_names_are_read_as_the_local_file_they_are(secret, tmp_path, name):
    """A ':' never selects a protocol, a leading '-' never reads as an option, and no shell sees the name."""
    odd = tmp_path / name
    shutil.copy(secret, odd)
    info = probe(odd)
    assert info.has_video and info.num_frames == 10
    assert len(list(read_frames(odd, info=info))) == 10
    assert decode_audio(odd).size > 0


def test_legit_formats_still_open(tmp_path):
    """The demuxer list keeps every kind of file people upload."""
    video = "testsrc2=s=32x24:d=0.2:r=25"
    cases = {
        "a.mp4": ["-f", "lavfi", "-i", video, "-pix_fmt", "yuv420p"],
        "a.mov": ["-f", "lavfi", "-i", video, "-pix_fmt", "yuv420p"],
        "a.mkv": ["-f", "lavfi", "-i", video, "-pix_fmt", "yuv420p"],
        "a.webm": ["-f", "lavfi", "-i", video, "-c:v", "libvpx", "-deadline", "realtime"],
        "a.avi": ["-f", "lavfi", "-i", video, "-c:v", "mjpeg", "-pix_fmt", "yuvj420p"],
        "a.gif": ["-f", "lavfi", "-i", video],
        "a.ts": ["-f", "lavfi", "-i", video, "-pix_fmt", "yuv420p"],
        "a.flv": ["-f", "lavfi", "-i", video, "-c:v", "flv1"],
        "a.png": ["-f", "lavfi", "-i", video, "-frames:v", "1"],
        "a.jpg": ["-f", "lavfi", "-i", video, "-frames:v", "1"],
        "a.webp": ["-f", "lavfi", "-i", video, "-frames:v", "1"],
        "a.bmp": ["-f", "lavfi", "-i", video, "-frames:v", "1"],
        "a.tiff": ["-f", "lavfi", "-i", video, "-frames:v", "1"],
        "a.mp3": ["-f", "lavfi", "-i", "sine=d=0.3"],
        "a.m4a": ["-f", "lavfi", "-i", "sine=d=0.3"],
        "a.ogg": ["-f", "lavfi", "-i", "sine=d=0.3", "-c:a", "libvorbis"],
        "a.opus": ["-f", "lavfi", "-i", "sine=d=0.3", "-c:a", "libopus"],
        "a.flac": ["-f", "lavfi", "-i", "sine=d=0.3"],
        "a.wav": ["-f", "lavfi", "-i", "sine=d=0.3"],
        "a.aac": ["-f", "lavfi", "-i", "sine=d=0.3"],
        "a.aiff": ["-f", "lavfi", "-i", "sine=d=0.3"],
    }
    for name, args in cases.items():
        ffmpeg(*args, str(tmp_path / name))
        info = probe(tmp_path / name)
        assert info.has_video or info.has_audio, name
        if info.has_video:
            assert next(read_frames(tmp_path / name, info=info)).shape[2] == 3, name
        else:
            assert decode_audio(tmp_path / name).size > 0, name


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with one row of data: a pixel bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width)))
            + chunk(b"IEND", b""))


def test_a_pixel_bomb_is_refused_before_decoding(tmp_path):
    """115 bytes that declare 12000x9000 pixels (324 MB once decoded): refused with the limit in the
    message, and ffmpeg never allocates the picture (its peak memory stays small)."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(12000, 9000))
    with pytest.raises(InputError, match="12000x9000, 108 megapixels; at most 100"):
        probe(bomb)
    measure = ("import resource, sys\nfrom musetalk.video_io import probe\ntry:\n    probe(sys.argv[1])\n"
               "except Exception:\n    pass\nprint(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peak_kb = int(subprocess.run([sys.executable, "-c", measure, str(bomb)], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert peak_kb < 150_000, f"ffmpeg used {peak_kb // 1024} MB on a refused picture"


def test_decoders_refuse_frames_above_the_limit_whatever_the_probe_said(tmp_path, monkeypatch):
    """-max_pixels is on every decoding command, so a frame larger than the header promised is refused too."""
    picture = tmp_path / "big.png"
    ffmpeg("-f", "lavfi", "-i", "color=c=white:s=400x300", "-frames:v", "1", str(picture))
    info = probe(picture)
    monkeypatch.setattr(video_io, "MAX_INPUT_PIXELS", 100_000)
    with pytest.raises(FFmpegError):
        list(read_frames(picture, info=info))


def _record_commands(monkeypatch) -> list[list[str]]:
    commands: list[list[str]] = []
    real_popen = subprocess.Popen

    class RecordingPopen(real_popen):
        def __init__(self, args, *rest, **kwargs):
            assert not kwargs.get("shell"), "a shell was used"
            assert isinstance(args, list), f"not an argument list: {args!r}"
            commands.append([str(a) for a in args])
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    return commands


def test_every_ffmpeg_command_on_an_input_carries_the_restrictions(secret, tmp_path, monkeypatch):
    commands = _record_commands(monkeypatch)
    info = probe(secret)
    list(read_frames(secret, info=info, start_frame=3))
    list(read_frames(secret, info=info.resized(32, 24), fps=30))
    frames = list(read_frames(secret, info=info, max_frames=4))
    with FrameWriter(tmp_path / "out.mp4", info.width, info.height, 25, audio_path=secret) as writer:  # trims
        for frame in frames:
            writer.write(frame)
    extract_audio(secret, tmp_path / "a.wav")
    decode_audio(secret)
    ffmpeg_runs = [cmd for cmd in commands if cmd[0] == video_io.ffmpeg_exe()]
    assert len(ffmpeg_runs) >= 8
    for cmd in ffmpeg_runs:
        for position, arg in enumerate(cmd):
            if arg != "-i" or cmd[position + 1] == "pipe:0":
                continue
            source = cmd[position + 1]
            assert source.startswith("file:/"), cmd
            before = cmd[:position]
            assert before[before.index("-protocol_whitelist") + 1] == "file", cmd
            allowed = before[before.index("-format_whitelist") + 1].split(",")
            assert "hls" not in allowed and "concat" not in allowed
            assert "image2" not in allowed or "%" not in source
        if "rawvideo" in cmd and "pipe:1" in cmd:  # a frame reader decodes: the pixel limit is set
            assert "-max_pixels" in cmd, cmd


def test_no_shell_anywhere_and_checkpoints_load_weights_only():
    shell = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput|pty\.spawn")
    for path in SOURCE_FILES:
        text = path.read_text()
        assert not shell.search(text), f"{path.relative_to(ROOT)} runs a shell"
        for call in re.finditer(r"torch\.load\(", text):
            arguments = _call_text(text, call.end() - 1)
            assert "weights_only=True" in arguments, f"{path.relative_to(ROOT)}: torch.load{arguments}"
        assert "pickle.load" not in text and "allow_pickle=True" not in text, path


def _call_text(text: str, open_paren: int) -> str:
    """The argument text of the call whose '(' is at open_paren."""
    depth = 0
    for index in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[open_paren: index + 1]
    return text[open_paren:]
