"""Microsoft Edge's online neural voices through the ``edge-tts`` package (``pip install musetalk-studio[edge]``).

Hundreds of natural voices in many languages, spoken by Microsoft's service: it needs the
internet, and without it synthesis stops with a message saying so. Whether the service can be
reached is not known until a call has worked, so ``available()`` answers None ("needs the
internet") until the voice list or a sentence has come back, True after. The voice list is
fetched once per process; offline, a short built-in list of well-known voices stands in.
Options follow edge-tts: ``rate`` ("+10%"), ``pitch`` ("-5Hz"), ``volume`` ("+0%"), an HTTP
``proxy`` and a connection ``timeout`` in seconds. Clips carry word timings (``events``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

from musetalk.errors import InputError, MuseTalkError
from musetalk.plugins import AudioClip, SpeechEvent, Voice, hookimpl

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000  # the service sends 24 kHz mono MP3
TICKS_PER_SECOND = 10_000_000  # word offsets come in units of 100 ns
OPTION_FORMATS = {"rate": (r"^[+-]\d+%$", "+10%"), "volume": (r"^[+-]\d+%$", "-20%"), "pitch": (r"^[+-]\d+Hz$", "+5Hz")}

# Shown when the service's list cannot be fetched (offline); all are long-standing voices.
KNOWN_VOICES = (
    ("en-US-EmmaMultilingualNeural", "Emma, multilingual (US)", "en-US"),
    ("en-US-AriaNeural", "Aria (US)", "en-US"),
    ("en-US-GuyNeural", "Guy (US)", "en-US"),
    ("en-GB-SoniaNeural", "Sonia (UK)", "en-GB"),
    ("en-GB-RyanNeural", "Ryan (UK)", "en-GB"),
    ("de-DE-KatjaNeural", "Katja (Germany)", "de-DE"),
    ("de-DE-ConradNeural", "Conrad (Germany)", "de-DE"),
    ("fr-FR-DeniseNeural", "Denise (France)", "fr-FR"),
    ("fr-FR-HenriNeural", "Henri (France)", "fr-FR"),
    ("es-ES-ElviraNeural", "Elvira (Spain)", "es-ES"),
    ("es-MX-JorgeNeural", "Jorge (Mexico)", "es-MX"),
    ("it-IT-ElsaNeural", "Elsa (Italy)", "it-IT"),
    ("pt-BR-FranciscaNeural", "Francisca (Brazil)", "pt-BR"),
    ("ja-JP-NanamiNeural", "Nanami (Japan)", "ja-JP"),
    ("zh-CN-XiaoxiaoNeural", "Xiaoxiao (China)", "zh-CN"),
    ("hi-IN-SwaraNeural", "Swara (India)", "hi-IN"),
)


class EdgeSource:
    id = "edge"
    label = "Microsoft Edge neural voices (online)"
    can_clone = False
    default_voice = "en-US-EmmaMultilingualNeural"
    options = {"rate": "+0%", "pitch": "+0Hz", "volume": "+0%", "proxy": "", "timeout": 10}

    def __init__(self):
        self._online_voices: list[Voice] | None = None
        self._lock = threading.Lock()
        self._reached = False  # a call to the service has worked in this process
        self._last_failure: str | None = None

    def available(self) -> tuple[bool | None, str]:
        if importlib.util.find_spec("edge_tts") is None:
            return False, "edge-tts is not installed: pip install musetalk-studio[edge]"
        if self._reached:
            return True, "installed; Microsoft's speech service answered from here"
        failed = f" (the last try: {self._last_failure})" if self._last_failure else ""
        return None, f"needs the internet: Microsoft's speech service has not answered from here yet{failed}"

    def _answered(self, error: BaseException | None = None) -> None:
        """Remember whether the service answered; a connection that fails later says so again."""
        self._reached = error is None
        self._last_failure = None if error is None else _reason(error)

    def voices(self) -> list[Voice]:
        with self._lock:
            if self._online_voices is None:
                try:
                    found = _run(_list_voices(None, self.options["timeout"]))
                    self._online_voices = sorted(
                        (Voice(v["ShortName"], _voice_label(v), v.get("Locale", "")) for v in found),
                        key=lambda voice: voice.id)
                    self._answered()
                except Exception as error:  # offline or blocked: the built-in list stands in
                    logger.info("edge voice list unavailable (%s); showing the built-in list", _reason(error))
                    self._answered(error)
                    return [Voice(*known) for known in KNOWN_VOICES]
            return list(self._online_voices)

    def synthesize(self, text: str, voice: str | None, options: dict, reference_audio: str | None = None) -> AudioClip:
        for name, (pattern, example) in OPTION_FORMATS.items():
            if not re.match(pattern, str(options[name])):
                raise InputError(f"edge option {name} looks like {example!r}, got {options[name]!r}")
        try:
            import edge_tts
        except ImportError:
            raise MuseTalkError("edge-tts is not installed: pip install musetalk-studio[edge]") from None
        voice = voice or self.default_voice
        communicate = edge_tts.Communicate(
            text, voice, rate=options["rate"], volume=options["volume"], pitch=options["pitch"],
            boundary="WordBoundary", proxy=options["proxy"] or None, connect_timeout=int(options["timeout"]))
        try:
            audio, words = _run(_collect(communicate))
        except edge_tts.exceptions.NoAudioReceived:
            self._answered()  # it answered, with nothing
            raise InputError(f"Microsoft's service sent no audio for voice {voice!r}: check the voice "
                             f"(musetalk voices --source edge) and the text") from None
        except Exception as error:
            self._answered(error)
            raise MuseTalkError(f"edge: could not reach Microsoft's speech service ({_reason(error)}). It needs the "
                                f"internet; offline, use the espeak source") from error
        self._answered()
        return _to_clip(audio, words, voice)


async def _list_voices(proxy: str | None, timeout: float):
    import edge_tts

    return await asyncio.wait_for(edge_tts.list_voices(proxy=proxy), timeout)


async def _collect(communicate) -> tuple[bytes, list[tuple[float, str]]]:
    audio, words = bytearray(), []
    async for chunk in communicate.stream():
        if chunk["type"] == "audio":
            audio += chunk["data"]
        elif chunk["type"] == "WordBoundary":
            words.append((chunk["offset"] / TICKS_PER_SECOND, chunk["text"]))
    return bytes(audio), words


def _run(coroutine):
    """Run a coroutine to the end on its own thread and loop (the caller may be inside a running loop)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _to_clip(audio: bytes, words: list[tuple[float, str]], voice: str) -> AudioClip:
    """The service's MP3 as a WAV file (the host's contract), with the word timings."""
    from musetalk.video_io import extract_audio, probe

    handle, mp3_path = tempfile.mkstemp(prefix="musetalk-edge-", suffix=".mp3")
    with os.fdopen(handle, "wb") as writer:
        writer.write(audio)
    handle, wav_path = tempfile.mkstemp(prefix="musetalk-edge-", suffix=".wav")
    os.close(handle)
    try:
        extract_audio(mp3_path, wav_path, sample_rate=SAMPLE_RATE)
        duration = probe(wav_path).duration
    except Exception:
        os.remove(wav_path)
        raise
    finally:
        os.remove(mp3_path)
    events = tuple(SpeechEvent("word", round(seconds, 4), word) for seconds, word in words)
    return AudioClip(wav_path, SAMPLE_RATE, duration, EdgeSource.id, voice, events)


def _voice_label(voice: dict) -> str:
    name = voice.get("FriendlyName") or voice.get("ShortName", "")
    return name.replace("Microsoft ", "").replace(" Online (Natural)", "")


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".rstrip(": ")


@hookimpl
def register_audio_sources(register):
    register(EdgeSource())
