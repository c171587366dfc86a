"""eSpeak NG: offline text to speech in over a hundred languages, the default audio source.

The library and its data come inside the ``espeakng-loader`` wheel, so a plain pip install
speaks with no system package and no download. When that library cannot load, the system's
``espeak-ng`` program is used instead. Options: ``rate`` (words per minute, 80..450),
``pitch`` (0..99) and ``variant`` (a voice variant such as ``f3``, ``m2`` or ``klatt``; empty
for the language's own). Clips made through the library carry sentence, word and phoneme
timings (``AudioClip.events``; phoneme names are eSpeak's own mnemonics).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import wave

from musetalk.errors import InputError, MuseTalkError
from musetalk.plugins import AudioClip, SpeechEvent, Voice, hookimpl
from musetalk_tts_espeak.library import VoiceEntry

logger = logging.getLogger(__name__)

RATE_RANGE = (80, 450)  # words per minute that eSpeak NG accepts
PITCH_RANGE = (0, 99)
BACKENDS = ("auto", "library", "command")


class EspeakSource:
    id = "espeak"
    label = "eSpeak NG (offline)"
    can_clone = False
    default_voice = "en-us"
    options = {"rate": 175, "pitch": 50, "variant": ""}

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._engine = None
        self._voices: dict[str, tuple[Voice, str]] | None = None
        self._engine_lock = threading.Lock()

    # ------------------------------------------------------------------ engine

    def engine(self):
        """The bundled library, else the system program; OSError with both reasons when neither works."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = self._open_engine()
            return self._engine

    def _open_engine(self):
        reasons = []
        if self.backend in ("auto", "library"):
            try:
                from musetalk_tts_espeak.library import bundled_library

                return bundled_library()
            except (ImportError, OSError) as error:
                reasons.append(f"the bundled library did not load ({type(error).__name__}: {error}); "
                               f"pip install espeakng-loader")
                logger.info("eSpeak NG library unusable, trying the espeak-ng program: %s", error)
        if self.backend in ("auto", "command"):
            try:
                from musetalk_tts_espeak.command import system_command

                return system_command()
            except (OSError, ValueError) as error:
                reasons.append(f"no usable espeak-ng program ({error}); install the system package espeak-ng")
        raise OSError("; ".join(reasons))

    # ------------------------------------------------------------------ the source contract

    def available(self) -> tuple[bool, str]:
        try:
            engine = self.engine()
        except OSError as error:
            return False, str(error)
        return True, f"eSpeak NG {engine.version}"

    def voices(self) -> list[Voice]:
        """Each voice under its own language code; a language spoken by two voices (Cantonese) under the
        voice file's name; and the short codes people type ("en", "fr") for eSpeak's preferred voice."""
        return sorted((voice for voice, _ in self._voice_files().values()), key=lambda voice: voice.id)

    def _voice_files(self) -> dict[str, tuple[Voice, str]]:
        """Voice id -> (Voice, the voice file eSpeak loads: "gmw/en"); eSpeak finds every voice by its file."""
        with self._engine_lock:
            if self._voices is not None:
                return self._voices
        entries = [entry for entry in self.engine().list_voices() if entry.languages]
        first_languages = [entry.languages[0] for entry in entries]
        voices: dict[str, tuple[Voice, str]] = {}
        for entry, language in zip(entries, first_languages, strict=True):
            voice_id = language if first_languages.count(language) == 1 else entry.identifier
            voices[voice_id] = (Voice(voice_id, entry.name, language), entry.identifier)
        preferred: dict[str, tuple[int, VoiceEntry]] = {}
        for entry in entries:
            for language, priority in zip(entry.languages[1:], entry.priorities[1:], strict=True):
                if language not in voices and priority < preferred.get(language, (256, None))[0]:
                    preferred[language] = (priority, entry)
        for language, (_, entry) in preferred.items():
            voices[language] = (Voice(language, entry.name, language), entry.identifier)
        with self._engine_lock:
            self._voices = voices
        return voices

    def variants(self) -> list[str]:
        """Names accepted by the ``variant`` option."""
        return sorted({entry.identifier.rsplit("/", 1)[-1] for entry in self.engine().list_voices(variants=True)})

    def synthesize(self, text: str, voice: str | None, options: dict, reference_audio: str | None = None) -> AudioClip:
        rate, pitch, variant = int(options["rate"]), int(options["pitch"]), str(options["variant"]).strip()
        _check_range("rate", rate, RATE_RANGE, "words per minute")
        _check_range("pitch", pitch, PITCH_RANGE, "")
        try:
            engine = self.engine()
        except OSError as error:
            raise MuseTalkError(f"eSpeak NG is not usable: {error}") from error
        if variant and variant not in self.variants():
            raise InputError(f"eSpeak has no voice variant {variant!r}; try one of "
                             f"{', '.join(self.variants()[:20])}, ...")
        voice = voice or self.default_voice
        known = self._voice_files().get(voice)
        name = known[1] if known else voice  # a voice id, or any name eSpeak itself understands
        name = f"{name}+{variant}" if variant else name
        try:
            speech = engine.speak(text, name, rate, pitch)
        except ValueError:
            raise InputError(f"eSpeak has no voice {voice!r}; musetalk voices --source espeak lists them") from None
        if speech.samples.size == 0:
            raise InputError(f"eSpeak made no sound from {text!r}; give words to speak")
        path = _write_wav(speech.samples, speech.sample_rate)
        events = tuple(SpeechEvent(kind, seconds, _event_text(text, kind, position, length, phoneme),
                                   position - 1 if kind == "word" else -1)
                       for kind, seconds, position, length, phoneme in speech.events)
        return AudioClip(path, speech.sample_rate, speech.samples.size / speech.sample_rate, self.id, voice, events)


def _check_range(name: str, value: int, bounds: tuple[int, int], unit: str) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise InputError(f"eSpeak {name} must be between {low} and {high} {unit}, got {value}".replace("  ", " "))


def _event_text(text: str, kind: str, position: int, length: int, phoneme: str) -> str:
    if kind == "phoneme":
        return phoneme
    if kind == "word" and position > 0:
        return text[position - 1:position - 1 + length]
    return ""


def _write_wav(samples, sample_rate: int) -> str:
    """16-bit mono WAV in a new temporary file (the host moves it into its cache)."""
    handle, path = tempfile.mkstemp(prefix="musetalk-espeak-", suffix=".wav")
    os.close(handle)
    with wave.open(path, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(samples.astype("<i2").tobytes())
    return path


@hookimpl
def register_audio_sources(register):
    register(EspeakSource())
