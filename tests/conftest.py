"""Shared fixtures: tiny models in the official layout, and small media made on the fly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from musetalk.testing import save_tiny_models
from musetalk.video_io import bundled_ffmpeg, ffmpeg_exe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session", autouse=True)
def avatar_cache_in_temp(tmp_path_factory):
    """Prepared avatars go to a temp folder, never to the user's cache."""
    import os

    from musetalk.avatar import CACHE_DIR_ENV

    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("avatar-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture(scope="session", autouse=True)
def gradio_cache_in_temp(tmp_path_factory):
    """The apps the tests launch keep uploads in a folder of this run: Gradio's shared default
    (/tmp/gradio, one folder per file content) lets another process's app remove a file in use."""
    import os

    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-cache"))
    yield
    if previous is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def system_temp_in_run_folder(tmp_path_factory):
    """The system temp folder is one of this run's: gradio_client leaves an empty folder in it for
    every file it downloads (the tests' clients download every result)."""
    import tempfile

    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("system-temp"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Tiny UNets (v1.5 and v1.0), VAE and whisper, saved as the official download lays them out."""
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def media_ffmpeg() -> str:
    """The ffmpeg that makes the tests' media: the bundled one (a known 9.x: -display_rotation, every
    encoder used here), whatever ffmpeg the code under test runs (MUSETALK_FFMPEG may name an older one)."""
    return bundled_ffmpeg() or ffmpeg_exe()


def ffmpeg(*args: str) -> None:
    """Make test media with ffmpeg quietly; a failure fails the test with ffmpeg's message."""
    completed = subprocess.run([media_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def example_face(path: Path, seconds: float) -> Path:
    """The first ``seconds`` of the example face at 216x252 (25 fps), with no audio, written to ``path``."""
    ffmpeg("-i", str(EXAMPLES / "face.mp4"), "-t", str(seconds), "-vf", "scale=216:252", "-an",
           "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p", str(path))
    return path


@pytest.fixture(scope="session")
def face_clip(tmp_path_factory) -> Path:
    """1.2 s (30 frames, 25 fps) of the example face at 216x252, with no audio."""
    return example_face(tmp_path_factory.mktemp("media") / "face.mp4", 1.2)


def example_speech(path: Path, seconds: float) -> Path:
    """The first ``seconds`` of the example speech, written to ``path``."""
    ffmpeg("-i", str(EXAMPLES / "speech.wav"), "-t", str(seconds), str(path))
    return path


@pytest.fixture(scope="session")
def speech_clip(tmp_path_factory) -> Path:
    """The first 1.6 s of the example speech (40 frames at 25 fps)."""
    return example_speech(tmp_path_factory.mktemp("media") / "speech.wav", 1.6)


@pytest.fixture
def fresh_plugins_and_speech_cache(monkeypatch, tmp_path):
    """The plugin manager is built from what is on sys.path in this test; the speech cache is private."""
    from musetalk import plugins

    monkeypatch.setenv("MUSETALK_SPEECH_CACHE", str(tmp_path / "speech-cache"))
    plugins.plugin_manager.cache_clear()
    yield
    plugins.plugin_manager.cache_clear()
