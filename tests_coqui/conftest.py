"""The Coqui plugin against the real coqui-tts, in its side environment (scripts/coqui-env test).

These tests are not part of the default run (pytest collects tests/ only): coqui-tts needs torch
2.9 with its torchaudio and torchcodec, several GB beside the project's own torch. The model is
a tiny random XTTS that scripts/tiny_xtts.py writes in XTTS's own layout for each run, so every
call goes through coqui-tts's loading code and XTTS's own GPT, HiFi-GAN and speaker encoder.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

if importlib.util.find_spec("TTS") is None:
    raise pytest.UsageError("tests_coqui needs the real coqui-tts, in its side environment: scripts/coqui-env test")


def _tiny_xtts_module():
    spec = importlib.util.spec_from_file_location("tiny_xtts", ROOT / "scripts" / "tiny_xtts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def caches_and_temp_in_this_run(tmp_path_factory):
    """Speech clips, prepared avatars and temporary files of this run stay in its own folders."""
    from musetalk.avatar import CACHE_DIR_ENV

    saved = {name: os.environ.get(name) for name in (CACHE_DIR_ENV, "MUSETALK_SPEECH_CACHE")}
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("avatar-cache"))
    os.environ["MUSETALK_SPEECH_CACHE"] = str(tmp_path_factory.mktemp("speech-cache"))
    previous_temp, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("system-temp"))
    yield
    tempfile.tempdir = previous_temp
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_xtts(tmp_path_factory) -> Path:
    """A tiny random XTTS model folder: config.json, model.pth, vocab.json, speakers_xtts.pth."""
    return _tiny_xtts_module().make_tiny_xtts(tmp_path_factory.mktemp("tiny-xtts"), seed=0)


@pytest.fixture(scope="session")
def speakers(tiny_xtts):
    """The built-in speakers' names, as the tiny model's speakers file holds them."""
    return _tiny_xtts_module().SPEAKERS


def ffmpeg(*args: str) -> None:
    from musetalk.video_io import ffmpeg_exe

    completed = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


@pytest.fixture(scope="session")
def talking_video(tmp_path_factory) -> Path:
    """The example face speaking the example speech twice (15 s): more speech than a reference takes."""
    path = tmp_path_factory.mktemp("media") / "talking.mp4"
    ffmpeg("-stream_loop", "2", "-i", str(EXAMPLES / "face.mp4"),
           "-stream_loop", "1", "-i", str(EXAMPLES / "speech.wav"), "-map", "0:v", "-map", "1:a", "-shortest",
           "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))
    return path


class XttsCalls:
    """What the real XTTS model is asked, recorded on the way through (every call goes on to the library)."""

    def __init__(self, monkeypatch):
        from TTS.tts.models.xtts import Xtts

        self.inference: list[dict] = []
        self.references: list[tuple[np.ndarray, int]] = []  # the audio each speaker embedding was computed from
        self.embeddings: list = []  # what XTTS's speaker encoder made of each reference
        self.latents: list = []  # what XTTS's conditioning encoder made of each reference
        self.outputs: list[np.ndarray] = []
        real_inference = Xtts.inference
        real_embedding, real_latents = Xtts.get_speaker_embedding, Xtts.get_gpt_cond_latents

        def inference(model, text, language, gpt_cond_latent, speaker_embedding, **settings):
            self.inference.append({"text": text, "language": language, "gpt_cond_latent": gpt_cond_latent,
                                   "speaker_embedding": speaker_embedding, "settings": settings})
            output = real_inference(model, text, language, gpt_cond_latent, speaker_embedding, **settings)
            self.outputs.append(np.asarray(output["wav"]))
            return output

        def get_speaker_embedding(model, audio, sr):
            self.references.append((audio.detach().cpu().numpy().reshape(-1), sr))
            self.embeddings.append(real_embedding(model, audio, sr))
            return self.embeddings[-1]

        def get_gpt_cond_latents(model, audio, sr, *args, **kwargs):
            self.latents.append(real_latents(model, audio, sr, *args, **kwargs))
            return self.latents[-1]

        monkeypatch.setattr(Xtts, "inference", inference)
        monkeypatch.setattr(Xtts, "get_speaker_embedding", get_speaker_embedding)
        monkeypatch.setattr(Xtts, "get_gpt_cond_latents", get_gpt_cond_latents)


@pytest.fixture
def xtts_calls(monkeypatch) -> XttsCalls:
    return XttsCalls(monkeypatch)


@pytest.fixture
def no_torchaudio_file_reading(monkeypatch):
    """torchaudio.load needs torchcodec and the system's FFmpeg libraries: the plugin must not use it."""
    import torchaudio

    calls = []
    real_load = torchaudio.load

    def load(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torchaudio, "load", load)
    return calls
