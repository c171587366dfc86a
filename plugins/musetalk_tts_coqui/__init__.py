"""Coqui TTS through the maintained ``coqui-tts`` package (``pip install musetalk-studio[coqui]``).

Any Coqui model works (option ``model``): a Coqui model name, a model folder on disk (XTTS's
layout: ``config.json``, ``model.pth``, ``vocab.json``, ``speakers_xtts.pth``), or a checkpoint
file beside its ``config.json``. The default, XTTS-v2, speaks 17 languages and clones a voice
from a few seconds of reference audio: when dubbing, the reference is cut from the input
video's own speaker (``musetalk.speech.reference_clip``). Without a reference, XTTS-v2 speaks
as one of its built-in speakers (option ``speaker``).

The voice id is the language of the text (``en``, ``de``, ``zh-cn`` ...); a single-language
model ignores it. The first use of a named model downloads it (XTTS-v2: about 1.8 GB, with a
progress bar on the terminal) into Coqui's own folder (``$TTS_HOME``); offline, that stops
with a message saying so. XTTS-v2 is released under the Coqui Public Model License
(non-commercial use): Coqui asks you to accept it once, by setting ``COQUI_TOS_AGREED=1``.

XTTS needs torchaudio built for your torch and, from torch 2.9, torchcodec built for it; the
extra leaves torch alone (``libraries.py``: the set tested here, and what is missing or
mismatched). XTTS models speak through ``xtts.py``, which decodes the reference voice itself,
so cloning needs no system FFmpeg.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import wave
from pathlib import Path

from musetalk.errors import InputError, MuseTalkError
from musetalk.plugins import AudioClip, Voice, hookimpl
from musetalk_tts_coqui import libraries, xtts

logger = logging.getLogger(__name__)

XTTS_V2 = "tts_models/multilingual/multi-dataset/xtts_v2"
XTTS_LANGUAGES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fr": "French",
    "hi": "Hindi", "hu": "Hungarian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ru": "Russian", "tr": "Turkish", "zh-cn": "Chinese (Mandarin)",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
# Coqui's model names start with the kind of model ("tts_models/multilingual/multi-dataset/xtts_v2");
# any other value of the model option is a folder or a checkpoint file on disk.
MODEL_KINDS = ("tts_models/", "voice_conversion_models/", "vocoder_models/")
# Exceptions whose name says the network was not there (requests, httpx, urllib3, huggingface_hub).
OFFLINE_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "NewConnectionError", "MaxRetryError",
                  "LocalEntryNotFoundError", "OfflineModeIsEnabled", "URLError", "Timeout", "ReadTimeout"}


class CoquiSource:
    id = "coqui"
    label = "Coqui TTS (XTTS-v2, clones the video's voice)"
    can_clone = True
    default_voice = "en"
    options = {"model": XTTS_V2, "speaker": "Ana Florence", "device": "auto"}

    def __init__(self):
        self._models: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()  # one model load at a time, and one synthesis per model

    def available(self) -> tuple[bool, str]:
        versions = libraries.installed_versions()
        if versions["coqui-tts"] is None:
            return False, f"coqui-tts is not installed: {libraries.INSTALL}"
        problems = libraries.problems(versions)
        if problems:
            return False, f"{'; '.join(problems)}. What works: {libraries.FIX}"
        return True, "offline once its model is downloaded"

    def voices(self) -> list[Voice]:
        return [Voice(code, f"{name} (XTTS-v2)", code) for code, name in sorted(XTTS_LANGUAGES.items())]

    def synthesize(self, text: str, voice: str | None, options: dict, reference_audio: str | None = None) -> AudioClip:
        device = str(options["device"]).strip().lower()
        if device.split(":")[0] not in DEVICES:
            raise InputError(f"coqui option device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
        model_name = str(options["model"]).strip()
        if not model_name:
            raise InputError("coqui option model must name a Coqui model, e.g. " + XTTS_V2)
        language = voice or self.default_voice
        with self._lock:
            model = self._model(model_name, device)
            loaded_xtts = xtts.loaded_xtts(model)
            if loaded_xtts is not None:
                return _speak_xtts(loaded_xtts, model_name, text, language, str(options["speaker"]), reference_audio)
            arguments = _arguments(model, model_name, language, str(options["speaker"]), reference_audio)
            return _speak(model, text, arguments, language)

    def _model(self, model_name: str, device: str):
        device = _resolve_device(device)
        key = (model_name, device)
        if key not in self._models:
            self._models[key] = load_model(model_name, device)
        return self._models[key]


def load_model(model_name: str, device: str):
    """The ``TTS.api.TTS`` of a model name (downloaded on first use) or a model on disk, on ``device``."""
    local = model_on_disk(model_name)
    try:
        from TTS.api import TTS
    except ImportError as error:
        raise MuseTalkError(f"coqui-tts is not usable ({error}): {libraries.FIX}") from error
    if local is not None:
        checkpoint, config = local
        logger.info("loading the Coqui model in %s on %s", checkpoint, device)
        try:
            return TTS(model_path=str(checkpoint), config_path=str(config), progress_bar=False).to(device)
        except Exception as error:
            raise MuseTalkError(f"coqui could not load the model {model_name}: {type(error).__name__}: "
                                f"{error}") from error
    _check_license(model_name)
    logger.info("loading Coqui model %s on %s (downloaded on first use)", model_name, device)
    try:
        return TTS(model_name, progress_bar=True).to(device)
    except Exception as error:
        if _offline(error):
            raise MuseTalkError(f"coqui: the model {model_name} is not downloaded yet and this machine cannot reach "
                                f"the internet ({type(error).__name__}). Connect once to fetch it (XTTS-v2 is about "
                                f"1.8 GB), or use the espeak source offline") from error
        raise MuseTalkError(f"coqui could not load the model {model_name}: {type(error).__name__}: {error}") from error


def model_on_disk(model: str) -> tuple[Path, Path] | None:
    """(checkpoint, config.json) of a model on disk; None for a Coqui model name; InputError when missing.

    A folder is handed to Coqui whole (XTTS loads its model.pth, vocab.json and speakers file from
    it); a checkpoint file needs its config.json beside it.
    """
    if model.startswith(MODEL_KINDS) and not os.path.exists(model):
        return None
    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise InputError(f"coqui option model: there is no model folder or file {path}. Give a folder holding a "
                         f"Coqui model (config.json, and for XTTS model.pth and vocab.json), or a Coqui model "
                         f"name such as {XTTS_V2}")
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        raise InputError(f"coqui option model: {path} has no config.json beside the model; a Coqui model on disk "
                         f"needs its config.json (and, for XTTS, model.pth and vocab.json)")
    return path, config


def _check_license(model_name: str) -> None:
    """XTTS asks on the terminal to accept its licence; answer here instead, with the way to accept it."""
    if "xtts" not in model_name.lower() or os.environ.get("COQUI_TOS_AGREED") == "1":
        return
    try:
        from TTS.utils.manage import ModelManager

        folder = ModelManager(progress_bar=False).output_prefix / model_name.replace("/", "--")
        if (folder / "tos_agreed.txt").is_file():
            return
    except Exception as error:  # an older or newer coqui-tts layout: fall back to the environment variable
        logger.debug("cannot look for Coqui's licence file: %s", error)
    raise InputError(f"{model_name} is released under the Coqui Public Model License (non-commercial use). "
                     f"If you accept it, set COQUI_TOS_AGREED=1 and run again")


def _arguments(model, model_name: str, language: str, speaker: str, reference_audio: str | None) -> dict:
    """Keyword arguments of tts_to_file that fit this model: language, and a reference voice or a speaker."""
    arguments: dict = {}
    if getattr(model, "is_multi_lingual", False):
        languages = list(getattr(model, "languages", None) or XTTS_LANGUAGES)
        if language not in languages:
            raise InputError(f"{model_name} does not speak {language!r}; its languages: {', '.join(languages)}")
        arguments["language"] = language
    if reference_audio is not None:
        arguments["speaker_wav"] = reference_audio
    elif getattr(model, "is_multi_speaker", False):
        speakers = list(getattr(model, "speakers", None) or [])
        if speakers and speaker not in speakers:
            raise InputError(f"{model_name} has no speaker {speaker!r}; some of its speakers: "
                             f"{', '.join(speakers[:10])}")
        arguments["speaker"] = speaker
    return arguments


def _speak(model, text: str, arguments: dict, voice: str) -> AudioClip:
    handle, path = tempfile.mkstemp(prefix="musetalk-coqui-", suffix=".wav")
    os.close(handle)
    try:
        model.tts_to_file(text=text, file_path=path, split_sentences=False, **arguments)
        with wave.open(path, "rb") as reader:
            sample_rate, frames = reader.getframerate(), reader.getnframes()
    except InputError:
        os.remove(path)
        raise
    except Exception as error:
        os.remove(path)
        raise MuseTalkError(f"coqui could not speak {text[:60]!r}: {type(error).__name__}: {error}") from error
    return AudioClip(path, sample_rate, frames / sample_rate, CoquiSource.id, voice)


def _speak_xtts(model, model_name: str, text: str, language: str, speaker: str,
                reference_audio: str | None) -> AudioClip:
    from musetalk.speech import write_wav

    handle, path = tempfile.mkstemp(prefix="musetalk-coqui-", suffix=".wav")
    os.close(handle)
    try:
        samples, sample_rate = xtts.speak(model, model_name, text, language, speaker, reference_audio)
        write_wav(path, samples, sample_rate)
    except InputError:
        os.remove(path)
        raise
    except Exception as error:
        os.remove(path)
        raise MuseTalkError(f"coqui could not speak {text[:60]!r}: {type(error).__name__}: {error}") from error
    return AudioClip(path, sample_rate, samples.size / sample_rate, CoquiSource.id, language)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _offline(error: BaseException | None) -> bool:
    """Whether the error, or one it came from, means the network could not be reached."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if type(error).__name__ in OFFLINE_ERRORS:
            return True
        error = error.__cause__ or error.__context__
    return False


@hookimpl
def register_audio_sources(register):
    register(CoquiSource())
