"""libespeak-ng through ctypes: the library and its data from the ``espeakng-loader`` wheel.

Synthesis runs in eSpeak's synchronous mode: ``espeak_Synth`` returns when the text is
spoken, after calling our callback with each block of 16-bit samples and the events
(sentence, word, phoneme) that fall in it. The library keeps global state (one voice, one
callback, one set of parameters), so every use goes through one lock.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

logger = logging.getLogger(__name__)

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS = 0x0001
INITIALIZE_DONT_EXIT = 0x8000  # report a missing data folder instead of exiting the process
CHARS_UTF8 = 1
POS_CHARACTER = 1
EVENT_LIST_TERMINATED, EVENT_WORD, EVENT_SENTENCE, EVENT_PHONEME = 0, 1, 2, 7
PARAM_RATE, PARAM_PITCH = 1, 3
EVENT_KINDS = {EVENT_SENTENCE: "sentence", EVENT_WORD: "word", EVENT_PHONEME: "phoneme"}


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


class _Voice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class VoiceEntry:
    name: str  # "English (America)"
    languages: tuple[str, ...]  # the voice's own first, then others it also speaks: ("en-us", "en")
    identifier: str  # file under espeak-ng-data/voices: "gmw/en-US", "!v/f3"
    priorities: tuple[int, ...] = ()  # one per language; smaller = eSpeak's better choice for that language


@dataclass
class Speech:
    samples: np.ndarray  # int16
    sample_rate: int
    events: list[tuple[str, float, int, int, str]] = field(default_factory=list)  # kind, seconds, pos, len, name


class EspeakLibrary:
    """One initialised libespeak-ng; use :func:`bundled_library` to get the process's instance."""

    def __init__(self, library_path: str, data_path: str):
        self.library_path, self.data_path = library_path, data_path
        self._lib = ctypes.CDLL(library_path)
        self._declare()
        parent = data_path.rsplit("/espeak-ng-data", 1)[0] if data_path.endswith("espeak-ng-data") else data_path
        rate = self._lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, parent.encode(),
                                           INITIALIZE_PHONEME_EVENTS | INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise OSError(f"libespeak-ng could not start with the data in {data_path} (code {rate})")
        self.sample_rate = rate
        self._lock = threading.Lock()
        self._blocks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = _SynthCallback(self._collect)  # kept alive as long as the library
        self._lib.espeak_SetSynthCallback(self._callback)
        self.version = f"{self._lib.espeak_Info(None).decode()} (bundled library)"

    def _declare(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._blocks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        index = 0
        while events[index].type != EVENT_LIST_TERMINATED:
            event = events[index]
            if event.type in EVENT_KINDS:
                name = event.id.string.decode("utf-8", "replace") if event.type == EVENT_PHONEME else ""
                self._events.append((event.type, event.audio_position, event.text_position, event.length, name))
            index += 1
        return 0  # 0: go on synthesizing

    def list_voices(self, variants: bool = False) -> list[VoiceEntry]:
        """Every language voice, or with ``variants`` every voice variant (f1, m3, klatt, ...)."""
        spec = _Voice(languages=ctypes.cast(ctypes.c_char_p(b"variant"), ctypes.c_void_p)) if variants else None
        with self._lock:
            found = self._lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
            entries = []
            index = 0
            while found[index]:
                voice = found[index].contents
                pairs = _languages(voice.languages)
                entries.append(VoiceEntry(voice.name.decode("utf-8", "replace"), tuple(n for _, n in pairs),
                                          voice.identifier.decode("utf-8", "replace"), tuple(p for p, _ in pairs)))
                index += 1
        return entries

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> Speech:
        """Synthesize UTF-8 text; raises ValueError when eSpeak does not know the voice."""
        data = text.encode("utf-8")
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode("utf-8")) != 0:
                raise ValueError(voice)
            self._lib.espeak_SetParameter(PARAM_RATE, rate, 0)
            self._lib.espeak_SetParameter(PARAM_PITCH, pitch, 0)
            self._blocks, self._events = [], []
            status = self._lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
            blocks, events = self._blocks, self._events
            self._blocks, self._events = [], []
        if status != 0:
            raise OSError(f"espeak_Synth failed with code {status}")
        samples = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int16)
        return Speech(samples, self.sample_rate, [
            (EVENT_KINDS[kind], position_ms / 1000.0, text_position, length, name)
            for kind, position_ms, text_position, length, name in events])


def _languages(pointer: int | None) -> list[tuple[int, str]]:
    """Decode eSpeak's language list: (priority byte, zero-terminated name) pairs ending with a zero byte."""
    if not pointer:
        return []
    languages, offset = [], 0
    while (priority := ctypes.string_at(pointer + offset, 1)[0]) != 0:
        name = ctypes.string_at(pointer + offset + 1)
        languages.append((priority, name.decode("utf-8", "replace")))
        offset += 2 + len(name)
    return languages


@lru_cache(maxsize=1)
def bundled_library() -> EspeakLibrary:
    """The library and data shipped in the espeakng-loader wheel (ImportError / OSError when unusable)."""
    import espeakng_loader

    return EspeakLibrary(espeakng_loader.get_library_path(), espeakng_loader.get_data_path())
