"""Text to speech for dubbing: split text, speak each piece with an audio source, cache, join.

The path of one text::

    split_text -> for each piece: cache hit, or AudioSource.synthesize -> cache
               -> join the pieces with short pauses -> one WAV (cached as a whole too)

Pieces are sentences; a sentence longer than ``MAX_PIECE_CHARS`` is cut at commas, then
between words, because neural engines lose their way in long inputs (XTTS-v2 warns past
250 characters). Each piece's clip is cached under a key of (source, voice, options, text
and the reference voice's content), so editing one sentence of a script re-speaks only
that sentence. The edges of each clip are trimmed of silence and the pieces are joined
with pauses that follow the text: longer after a paragraph than after a sentence, shorter
after a comma.

Limits: at most ``MAX_TEXT_CHARS`` characters per text (about twenty minutes of speech);
the cache keeps at most ``MAX_CACHE_BYTES``, oldest files out first. The cache lives in
``$MUSETALK_SPEECH_CACHE``, else ``$XDG_CACHE_HOME/musetalk-studio/speech`` (``~/.cache``).

``reference_clip`` cuts a clean sample of a video's own speaker for the sources that clone
voices: speech only (the voice-activity detector of ``musetalk.audio``), loudness normalised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import wave
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from musetalk import stopping
from musetalk.errors import InputError, MuseTalkError
from musetalk.plugins import AudioClip, AudioSource, SpeechEvent, get_source, resolve_options
from musetalk.weights import user_cache_root

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 20_000  # about 3,000 words: twenty minutes of speech
MAX_PIECE_CHARS = 250  # longest piece given to a source at once
MAX_CACHE_BYTES = 1 << 30  # the speech cache is pruned to 1 GiB, oldest files first
CACHE_FORMAT = 1  # bump when what a cached clip holds changes, so old entries are not reused

# Pauses (seconds) after a piece, by how the piece ended.
PAUSE_AFTER = {"paragraph": 0.7, "sentence": 0.35, "clause": 0.15, "cut": 0.05, "end": 0.0}
LEAD_IN_S = 0.15  # silence before the first word: the mouth starts closed
TAIL_S = 0.25  # and after the last one
EDGE_SILENCE = 0.005  # |sample| below this (about -46 dBFS) at a clip's edges is trimmed ...
EDGE_MARGIN_S = 0.02  # ... keeping this much before the first and after the last sound

# Reference clips for voice cloning.
REFERENCE_SECONDS = (6.0, 15.0)  # allowed lengths of the clip asked for
MIN_REFERENCE_SPEECH_S = 3.0  # below this a clone sounds like anyone
REFERENCE_RATE = 24000
REFERENCE_RMS_DBFS = -20.0
REFERENCE_PEAK_DBFS = -1.0
REFERENCE_GAP_S = 0.12  # silence put between two stretches of speech

ProgressCallback = Callable[[int, int], None]  # (pieces done, pieces in all)

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "cf", "no", "fig",
                  "approx", "dept", "est", "inc", "ltd", "co", "mt", "ft", "p.s"}
_SENTENCE_END = re.compile(r"([.!?\u2026]+[\"'\u201d\u2019)\]]*)(\s+)|([\u3002\uff01\uff1f]+)")
_CLAUSE_END = re.compile(r"[,;:\u2014\u2013\uff0c\u3001\uff1b]\s*")


# --------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextPiece:
    text: str
    start: int  # character offset in the whole (normalised) text
    ends: str  # "paragraph", "sentence", "clause", "cut" or "end": decides the pause after it


def normalise_text(text: Any) -> str:
    """Text with consistent line ends and no surrounding whitespace; InputError when empty or enormous."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not any(char.isalnum() for char in text):
        raise InputError("the text is empty: give words to speak (--text \"...\" or --text-file script.txt)")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"the text has {len(text):,} characters; at most {MAX_TEXT_CHARS:,} (about twenty "
                         f"minutes of speech) fit in one job: split it into several")
    return text


def split_text(text: str) -> list[TextPiece]:
    """Sentences (and parts of long sentences) in order, each with how it ends."""
    text = normalise_text(text)
    pieces: list[TextPiece] = []
    for para_start, paragraph in _spans(text, re.compile(r"\n\s*\n")):
        sentences = list(_sentences(paragraph))
        for index, (start, sentence) in enumerate(sentences):
            ends = "sentence" if index < len(sentences) - 1 else "paragraph"
            for offset, part, part_ends in _fit(sentence):
                pieces.append(TextPiece(part, para_start + start + offset, part_ends or ends))
    pieces = [piece for piece in pieces if any(char.isalnum() for char in piece.text)]
    if pieces:
        pieces[-1] = TextPiece(pieces[-1].text, pieces[-1].start, "end")
    return pieces


def _spans(text: str, separator: re.Pattern) -> list[tuple[int, str]]:
    """Non-empty stripped parts of text between separator matches, with their offsets."""
    spans, start = [], 0
    for match in [*separator.finditer(text), None]:
        end = match.start() if match else len(text)
        part = text[start:end]
        stripped = part.strip()
        if stripped:
            spans.append((start + part.index(stripped[0]), stripped))
        if match:
            start = match.end()
    return spans


def _sentences(paragraph: str):
    """(offset, sentence) pairs; a full stop after a known abbreviation or an initial ends nothing."""
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        end = match.end(1) if match.group(1) else match.end(3)
        before = paragraph[start:match.start()].split()
        last_word = before[-1].lower().rstrip(".") if before else ""
        if match.group(1) and match.group(1).startswith(".") and len(match.group(1)) == 1 and (
                last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha())):
            continue
        sentence = paragraph[start:end].strip()
        if sentence:
            yield start + paragraph[start:end].index(sentence[0]), sentence
        start = match.end()
    rest = paragraph[start:].strip()
    if rest:
        yield start + paragraph[start:].index(rest[0]), rest


def _fit(sentence: str):
    """(offset, part, ends) with every part at most MAX_PIECE_CHARS: cut at clauses, then words, then anywhere."""
    if len(sentence) <= MAX_PIECE_CHARS:
        yield 0, sentence, None
        return
    stops = sorted({m.end() for m in _CLAUSE_END.finditer(sentence)} | {len(sentence)})
    start = end = 0  # the part being gathered: sentence[start:end], whole clauses
    for stop in stops:
        if stop - start > MAX_PIECE_CHARS and end > start:
            yield from _part(sentence, start, end, "clause")
            start = end
        while stop - start > MAX_PIECE_CHARS:  # one clause too long on its own: cut between words
            cut = _word_cut(sentence, start)
            yield from _part(sentence, start, cut, "cut")
            start = cut
        end = stop
    yield from _part(sentence, start, end, None)


def _word_cut(sentence: str, start: int) -> int:
    """Where to cut a stretch too long for one piece: the last space that keeps it short enough."""
    limit = start + MAX_PIECE_CHARS
    space = sentence.rfind(" ", start + 1, limit + 1)
    return space if space > start else limit


def _part(sentence: str, start: int, end: int, ends: str | None):
    part = sentence[start:end]
    stripped = part.strip()
    if stripped:
        yield start + part.index(stripped[0]), stripped, ends


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, or InputError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the text file {path} does not exist")
    if path.stat().st_size > 4 * MAX_TEXT_CHARS + 1024:
        raise InputError(f"{path} is larger than a script of {MAX_TEXT_CHARS:,} characters; split it")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None


# --------------------------------------------------------------------------- WAV files


def read_wav(path: str, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Samples as float32 mono in [-1, 1] and their rate; PCM WAV is read directly, anything else via ffmpeg."""
    try:
        with wave.open(path, "rb") as reader:
            width, channels, rate = reader.getsampwidth(), reader.getnchannels(), reader.getframerate()
            raw = reader.readframes(reader.getnframes())
        if width in (2, 4) and (sample_rate is None or rate == sample_rate):
            samples = np.frombuffer(raw, dtype="<i2" if width == 2 else "<i4").astype(np.float32)
            samples /= 32768.0 if width == 2 else 2147483648.0
            return samples.reshape(-1, channels).mean(axis=1), rate
    except (wave.Error, EOFError):
        rate = None  # not PCM (float WAV, or another format): let ffmpeg decode it
    from musetalk.video_io import decode_audio, probe

    rate = sample_rate or rate or probe(path).audio_sample_rate or 24000
    return decode_audio(path, sample_rate=rate), rate


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> str:
    """16-bit mono WAV written under a temporary name and renamed when complete."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=".speech.", suffix=".partial.wav", dir=directory)
    os.close(handle)
    try:
        pcm = np.clip(np.round(np.asarray(samples, dtype=np.float32) * 32767.0), -32768, 32767).astype("<i2")
        with wave.open(temp_path, "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(int(sample_rate))
            writer.writeframes(pcm.tobytes())
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return path


# --------------------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    """$MUSETALK_SPEECH_CACHE, else a per-user cache folder."""
    configured = os.environ.get("MUSETALK_SPEECH_CACHE")
    return Path(configured).expanduser() if configured else user_cache_root() / "speech"


def cache_key(**parts: Any) -> str:
    data = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SpeechCache:
    """Clips on disk by key: ``<key>.wav`` with a ``<key>.json`` beside it holding the rest of the AudioClip."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        folder = self.root / kind / key[:2]
        return folder / f"{key}.wav", folder / f"{key}.json"

    def get(self, kind: str, key: str) -> AudioClip | None:
        wav_path, meta_path = self._paths(kind, key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not wav_path.is_file():
                return None
            os.utime(wav_path)  # recently used: pruned last
        except (OSError, ValueError):
            return None
        events = tuple(SpeechEvent(**event) for event in meta.pop("events", []))
        return AudioClip(path=str(wav_path), events=events, **meta)

    def put(self, kind: str, key: str, clip: AudioClip, move: bool) -> AudioClip:
        """Keep a clip's file (moved, or copied when ``move`` is False) and its description."""
        wav_path, meta_path = self._paths(kind, key)
        wav_path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_path = tempfile.mkstemp(prefix=".clip.", suffix=".partial.wav", dir=wav_path.parent)
        os.close(handle)
        try:
            (shutil.move if move else shutil.copyfile)(clip.path, temp_path)
            os.replace(temp_path, wav_path)
        finally:
            if os.path.exists(temp_path):
                os.remove(temp_path)
        stored = AudioClip(str(wav_path), clip.sample_rate, clip.duration, clip.source, clip.voice, clip.events)
        meta = asdict(stored)
        del meta["path"]
        _write_text_atomic(meta_path, json.dumps(meta, ensure_ascii=False))
        return stored

    def prune(self, max_bytes: int = MAX_CACHE_BYTES) -> int:
        """Remove the least recently used clips until the cache fits; returns how many were removed."""
        clips = [(path.stat().st_mtime, path.stat().st_size, path) for path in self.root.glob("*/*/*.wav")]
        total = sum(size for _, size, _ in clips)
        removed = 0
        for _, size, path in sorted(clips):
            if total <= max_bytes:
                break
            for stale in (path, path.with_suffix(".json")):
                stale.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


def _write_text_atomic(path: Path, text: str) -> None:
    handle, temp_path = tempfile.mkstemp(prefix=".meta.", suffix=".partial", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as writer:
        writer.write(text)
    os.replace(temp_path, path)


# --------------------------------------------------------------------------- text to speech


def synthesize_text(
    text: str,
    source: str = "espeak",
    voice: str | None = None,
    options: dict[str, Any] | None = None,
    reference_audio: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    cache_dir: str | os.PathLike | None = None,
    out_path: str | os.PathLike | None = None,
) -> AudioClip:
    """Speak ``text`` with an audio source; one WAV with every sentence in order.

    ``options`` may hold some of the source's options (strings are converted, so command-line
    values work); ``reference_audio`` is a clean clip of the voice to imitate, for sources
    that clone (see :func:`reference_clip`). ``progress(done, total)`` is called per piece.
    The result lives in the cache unless ``out_path`` names a WAV file to write.
    """
    # 1. Check inputs, before anything is spoken
    pieces = split_text(text)
    if out_path is not None:
        check_wav_output(out_path)
    audio_source = usable_source(source)
    voice = resolve_voice(audio_source, voice)
    options = resolve_options(audio_source, options)
    reference, reference_digest = _check_reference(audio_source, reference_audio)
    cache = SpeechCache(cache_dir)
    key_parts = {"source": audio_source.id, "voice": voice, "options": options, "reference": reference_digest}

    # 2. The whole text may be cached already
    whole_key = cache_key(kind="text", pieces=[(p.text, p.ends) for p in pieces], pauses=PAUSE_AFTER, **key_parts)
    result = cache.get("texts", whole_key)
    if result is None:
        # 3. Speak each piece (cached by its own text)
        clips = _speak_pieces(audio_source, pieces, voice, options, reference, key_parts, cache, progress)
        # 4. Join them with pauses into one clip
        result = _join(clips, pieces, cache, whole_key)
        cache.prune()
    elif progress is not None:
        progress(len(pieces), len(pieces))
    if out_path is not None:
        result = _copy_to(result, out_path)
    return result


def speak_sentences(text: str, source: str = "espeak", voice: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Iterator[np.ndarray]:
    """``text`` spoken piece by piece (sentences, parts of long ones), each yielded as 16 kHz mono samples
    with its pause after it as soon as it is synthesized: a live face says the first sentence while the
    next one is made. Pieces are cached as ``synthesize_text``'s are."""
    from musetalk.audio import load_audio

    pieces = split_text(text)
    audio_source = usable_source(source)
    voice = resolve_voice(audio_source, voice)
    options = resolve_options(audio_source, None)
    cache = SpeechCache(cache_dir)
    key_parts = {"source": audio_source.id, "voice": voice, "options": options, "reference": None}
    for piece in pieces:
        clip = _speak_pieces(audio_source, [piece], voice, options, None, key_parts, cache, None)[0]
        pause = PAUSE_AFTER[piece.ends] if piece.ends != "end" else TAIL_S
        yield np.concatenate([load_audio(clip.path), np.zeros(int(pause * 16000), np.float32)])


def usable_source(source_id: str) -> AudioSource:
    """The source by id, or InputError when it is unknown or cannot work here (with its reason)."""
    audio_source = get_source(source_id)
    ok, reason = audio_source.available()
    if ok is False:  # None: not known until tried (an online service): it is tried
        raise InputError(f"the audio source {source_id!r} cannot be used here: {reason}")
    return audio_source


def resolve_voice(audio_source: AudioSource, voice: str | None) -> str | None:
    """The voice to use: the one asked for (checked against the source's list), else the source's default."""
    voices = audio_source.voices()
    ids = [v.id for v in voices]
    if voice is None or voice == "":
        if audio_source.default_voice:
            return audio_source.default_voice
        return ids[0] if ids else None
    if ids and voice not in ids:
        close = [v for v in ids if v.lower().startswith(voice.lower()[:2])][:12]
        hint = f"; close ones: {', '.join(close)}" if close else ""
        raise InputError(f"the audio source {audio_source.id!r} has no voice {voice!r}{hint} "
                         f"(musetalk voices --source {audio_source.id} lists all {len(ids)})")
    return voice


def _check_reference(audio_source: AudioSource, reference_audio) -> tuple[str | None, str | None]:
    if reference_audio is None:
        return None, None
    if not audio_source.can_clone:
        raise InputError(f"the audio source {audio_source.id!r} cannot clone a voice; leave out the reference "
                         f"voice (--clone-voice), or use a source that clones (musetalk voices shows which)")
    path = os.fspath(reference_audio)
    if not os.path.isfile(path):
        raise InputError(f"the reference voice {path} does not exist")
    return path, file_digest(path)


def _speak_pieces(audio_source, pieces, voice, options, reference, key_parts, cache, progress) -> list[AudioClip]:
    clips = []
    if progress is not None:
        progress(0, len(pieces))
    for done, piece in enumerate(pieces, start=1):
        stopping.check()  # a stopped job ends between sentences
        key = cache_key(kind="piece", text=piece.text, **key_parts)
        clip = cache.get("clips", key)
        if clip is None:
            made = audio_source.synthesize(piece.text, voice, dict(options), reference_audio=reference)
            clip = cache.put("clips", key, made, move=True)
        else:
            logger.debug("speech cache hit: %r", piece.text[:40])
        clips.append(clip)
        if progress is not None:
            progress(done, len(pieces))
    return clips


def _join(clips: list[AudioClip], pieces: list[TextPiece], cache: SpeechCache, key: str) -> AudioClip:
    """One clip: a lead-in, each piece trimmed of edge silence, the pauses the text asks for, a tail."""
    sample_rate = clips[0].sample_rate
    parts = [np.zeros(int(LEAD_IN_S * sample_rate), dtype=np.float32)]
    events: list[SpeechEvent] = []
    position = parts[0].size
    for clip, piece in zip(clips, pieces, strict=True):
        samples, _ = read_wav(clip.path, sample_rate)
        start, end = _sound_bounds(samples, sample_rate)
        # an event in the trimmed silence (a sentence's first word at 0 s) moves to the edge of the sound
        first, last = start / sample_rate, end / sample_rate
        events += [SpeechEvent(e.kind, round(position / sample_rate + min(max(e.time, first), last) - first, 4),
                               e.text, e.position + piece.start if e.position >= 0 else -1)
                   for e in clip.events]
        pause = np.zeros(int((PAUSE_AFTER[piece.ends] if piece.ends != "end" else TAIL_S) * sample_rate),
                         dtype=np.float32)
        parts += [samples[start:end], pause]
        position += end - start + pause.size
    joined = np.concatenate(parts)
    handle, temp_path = tempfile.mkstemp(prefix="musetalk-speech-", suffix=".wav")
    os.close(handle)
    try:
        write_wav(temp_path, joined, sample_rate)
        made = AudioClip(temp_path, sample_rate, joined.size / sample_rate, clips[0].source, clips[0].voice,
                         tuple(events))
        return cache.put("texts", key, made, move=True)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def _sound_bounds(samples: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """First and last sample of sound, widened by a small margin; the whole clip when it is all quiet."""
    loud = np.flatnonzero(np.abs(samples) > EDGE_SILENCE)
    if loud.size == 0:
        return 0, samples.size
    margin = int(EDGE_MARGIN_S * sample_rate)
    return max(0, int(loud[0]) - margin), min(samples.size, int(loud[-1]) + 1 + margin)


def check_wav_output(out_path) -> None:
    """InputError, creating nothing, unless speech can be written to ``out_path``: a .wav name in a folder
    that is (or can be made) writable."""
    from musetalk.video_io import check_output_path

    path = os.path.abspath(os.fspath(out_path))
    if os.path.isdir(path):
        raise InputError(f"the output {path} is a folder; give a file name such as {os.path.join(path, 'speech.wav')}")
    if not path.lower().endswith(".wav"):
        raise InputError(f"the speech is written as WAV: give an output name ending in .wav, not {path}")
    check_output_path(path)


def _copy_to(clip: AudioClip, out_path) -> AudioClip:
    from musetalk.video_io import folders_for

    check_wav_output(out_path)
    out_path = os.path.abspath(os.fspath(out_path))
    with folders_for(out_path):
        return _copy_into_place(clip, out_path)


def _copy_into_place(clip: AudioClip, out_path: str) -> AudioClip:
    directory = os.path.dirname(out_path)
    handle, temp_path = tempfile.mkstemp(prefix=".speech.", suffix=".partial.wav", dir=directory)
    os.close(handle)
    try:
        shutil.copyfile(clip.path, temp_path)
        os.replace(temp_path, out_path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return AudioClip(out_path, clip.sample_rate, clip.duration, clip.source, clip.voice, clip.events)


# --------------------------------------------------------------------------- reference voice


def reference_clip(video_or_audio_path: str | os.PathLike, out_path: str | os.PathLike,
                   seconds: float = 12.0) -> str:
    """A clean sample of the speaker in a video (or audio file), for voice cloning; returns ``out_path``.

    Keeps only what the voice-activity detector calls speech, in order, until ``seconds``
    (6 to 15) are gathered, removes any DC offset, brings the loudness to -20 dBFS RMS with
    peaks below -1 dBFS, and writes 16-bit mono WAV at 24 kHz. With less speech than asked
    for, all of it is used; with less than 3 s, InputError: a clone needs more.
    """
    from musetalk import audio as audio_lib
    from musetalk.video_io import decode_audio

    low, high = REFERENCE_SECONDS
    if not low <= seconds <= high:
        raise InputError(f"a reference voice clip lasts {low:g} to {high:g} s, got {seconds:g}")
    path = os.fspath(video_or_audio_path)
    segments = audio_lib.detect_speech(audio_lib.load_audio(path))
    if segments.speech_seconds < MIN_REFERENCE_SPEECH_S:
        raise InputError(f"{path} holds {segments.speech_seconds:.1f} s of speech; cloning a voice needs at least "
                         f"{MIN_REFERENCE_SPEECH_S:g} s of one person speaking. Give a longer clip of the voice, "
                         f"or pick a voice instead of cloning")
    samples = np.asarray(decode_audio(path, sample_rate=REFERENCE_RATE), dtype=np.float32)
    speech = _gather_speech(samples, segments.spans, seconds)
    return write_wav(out_path, _normalise_loudness(speech), REFERENCE_RATE)


def _gather_speech(samples: np.ndarray, spans: list[tuple[float, float]], seconds: float) -> np.ndarray:
    fade = int(0.01 * REFERENCE_RATE)
    gap = np.zeros(int(REFERENCE_GAP_S * REFERENCE_RATE), dtype=np.float32)
    parts, gathered = [], 0
    wanted = int(seconds * REFERENCE_RATE)
    for start_s, end_s in spans:
        start = int(start_s * REFERENCE_RATE)
        end = min(samples.size, int(end_s * REFERENCE_RATE), start + wanted - gathered)
        if end - start <= 2 * fade:
            continue
        part = samples[start:end] - float(np.mean(samples[start:end]))
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        part[:fade] *= ramp
        part[-fade:] *= ramp[::-1]
        parts += [part, gap]
        gathered += part.size
        if gathered >= wanted:
            break
    return np.concatenate(parts[:-1]) if parts else np.zeros(0, dtype=np.float32)


def _normalise_loudness(speech: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(speech)))) if speech.size else 0.0
    if rms <= 0:
        raise MuseTalkError("the speech found for the reference voice is silent; give a clip with a clear voice")
    gain = 10 ** (REFERENCE_RMS_DBFS / 20) / rms
    peak = float(np.max(np.abs(speech))) * gain
    ceiling = 10 ** (REFERENCE_PEAK_DBFS / 20)
    if peak > ceiling:
        gain *= ceiling / peak  # keep the peaks unclipped, even if the result is a little quieter
    return (speech * gain).astype(np.float32)


# --------------------------------------------------------------------------- for a video


def speech_for_video(
    text: str,
    source: str = "espeak",
    voice: str | None = None,
    options: dict[str, Any] | None = None,
    clone_from: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    cache_dir: str | os.PathLike | None = None,
    out_path: str | os.PathLike | None = None,
) -> AudioClip:
    """Speech for dubbing: ``clone_from`` (usually the video being dubbed) gives the voice to imitate.

    The reference clip is cut into a temporary folder and removed afterwards; its content
    is part of the cache key, so dubbing the same video again reuses the speech.
    """
    if clone_from is None:
        return synthesize_text(text, source, voice, options, progress=progress, cache_dir=cache_dir,
                               out_path=out_path)
    audio_source = usable_source(source)
    if not audio_source.can_clone:
        raise InputError(f"the audio source {source!r} cannot clone a voice; drop --clone-voice, or use a source "
                         f"that clones (musetalk voices shows which: coqui does)")
    with tempfile.TemporaryDirectory(prefix="musetalk-reference-") as folder:
        reference = reference_clip(clone_from, os.path.join(folder, "reference.wav"))
        return synthesize_text(text, source, voice, options, reference_audio=reference, progress=progress,
                               cache_dir=cache_dir, out_path=out_path)
