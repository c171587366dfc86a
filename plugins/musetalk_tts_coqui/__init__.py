"""Coqui TTS through the maintained ``coqui-tts`` package (``pip install musetalk-studio[coqui]``).

Any Coqui model name works (option ``model``); the default, XTTS-v2, speaks 17 languages
and clones a voice from a few seconds of reference audio: when dubbing, the reference is
cut from the input video's own speaker (``musetalk.speech.reference_clip``). Without a
reference, XTTS-v2 speaks as one of its built-in speakers (option ``speaker``).

The voice id is the language of the text (``en``, ``de``, ``zh-cn`` ...); a single-language
model ignores it. The first use of a
model downloads it (XTTS-v2: about 1.8 GB, with a progress bar on the terminal) into
Coqui's own folder (``$TTS_HOME``); offline, that stops with a message saying so. XTTS-v2
is released under the Coqui Public Model License (non-commercial use): Coqui asks you to
accept it once, by setting ``COQUI_TOS_AGREED=1``.

XTTS also needs ``torchaudio`` built for your torch: install the pair together.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import tempfile
import threading
import wave

from musetalk.errors import InputError, MuseTalkError
from musetalk.plugins import AudioClip, Voice, hookimpl

logger = logging.getLogger(__name__)

XTTS_V2 = "tts_models/multilingual/multi-dataset/xtts_v2"
XTTS_LANGUAGES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fr": "French",
    "hi": "Hindi", "hu": "Hungarian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ru": "Russian", "tr": "Turkish", "zh-cn": "Chinese (Mandarin)",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
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
        missing = [package for package, module in (("coqui-tts", "TTS"), ("torchaudio", "torchaudio"))
                   if not _installed(module)]
        if "coqui-tts" in missing:
            return False, "coqui-tts is not installed: pip install musetalk-studio[coqui]"
        if missing:
            return False, "torchaudio is not installed: install the torchaudio build that matches your torch"
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
        with self._lock:
            model = self._model(model_name, device)
            arguments = _arguments(model, model_name, voice or self.default_voice, str(options["speaker"]),
                                   reference_audio)
            return _speak(model, text, arguments, voice or self.default_voice)

    def _model(self, model_name: str, device: str):
        device = _resolve_device(device)
        key = (model_name, device)
        if key not in self._models:
            self._models[key] = load_model(model_name, device)
        return self._models[key]


def load_model(model_name: str, device: str):
    """``TTS.api.TTS(model_name)`` on ``device``, downloading it on first use; errors say what to do."""
    try:
        from TTS.api import TTS
    except ImportError as error:
        raise MuseTalkError(f"coqui-tts is not usable ({error}): pip install musetalk-studio[coqui], and "
                            f"torchaudio matching your torch") from error
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


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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
