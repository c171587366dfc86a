"""Text to speech: splitting, eSpeak producing real speech, the cache, errors, reference clips, the CLI."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio, cli, plugins, speech
from musetalk.errors import InputError
from musetalk.plugins import AudioClip
from musetalk.video_io import probe

from conftest import EXAMPLES, ffmpeg

PANGRAMS = {  # language voice -> about nine words
    "en-us": "The quick brown fox jumps over the lazy dog today.",
    "de": "Der schnelle braune Fuchs springt heute über den faulen Hund.",
    "fr": "Le renard brun rapide saute aujourd'hui par dessus le chien paresseux.",
    "es": "El rápido zorro marrón salta hoy sobre el perro perezoso.",
    "ru": "Быстрая коричневая лиса сегодня прыгает через ленивую собаку.",
}


pytestmark = pytest.mark.usefixtures("fresh_plugins_and_speech_cache")


def samples_of(clip: AudioClip) -> np.ndarray:
    samples, rate = speech.read_wav(clip.path)
    assert rate == clip.sample_rate
    assert samples.size / rate == pytest.approx(clip.duration, abs=1e-3)
    return samples


def speech_fraction(path: str) -> float:
    """Share of the clip the voice-activity detector calls speech."""
    segments = audio.detect_speech(audio.load_audio(path))
    return segments.speech_seconds / segments.duration


# --------------------------------------------------------------------------- splitting text


def test_text_is_split_into_sentences_with_their_pauses():
    text = ("Hello Mr. Smith. How are you?  I'm fine! Dr. J. Watson paid 3.5 dollars...\n\n"
            "A new paragraph. 这是中文。还有一句！")
    pieces = speech.split_text(text)
    assert [p.text for p in pieces] == ["Hello Mr. Smith.", "How are you?", "I'm fine!",
                                        "Dr. J. Watson paid 3.5 dollars...", "A new paragraph.",
                                        "这是中文。", "还有一句！"]
    assert [p.ends for p in pieces] == ["sentence", "sentence", "sentence", "paragraph", "sentence", "sentence", "end"]
    for piece in pieces:
        assert text[piece.start:piece.start + len(piece.text)] == piece.text


def test_a_long_sentence_is_cut_at_commas_then_between_words():
    clause = "this clause has exactly eight short words in it"
    sentence = ", ".join([clause] * 12) + " and " + " ".join(["word"] * 80) + "."
    pieces = speech.split_text(sentence)
    assert all(len(p.text) <= speech.MAX_PIECE_CHARS for p in pieces)
    assert " ".join(p.text for p in pieces).split() == sentence.split(), "nothing lost, nothing reordered"
    assert pieces[0].ends == "clause" and pieces[0].text.endswith(",")
    assert "cut" in [p.ends for p in pieces] and pieces[-1].ends == "end"


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   \n\t ", "empty"), ("... !? --", "empty"),
    ("a" * (speech.MAX_TEXT_CHARS + 1), "at most 20,000"), (42, "must be a string"),
])
def test_empty_or_enormous_text_is_refused(text, message):
    with pytest.raises(InputError, match=message):
        speech.split_text(text)


# --------------------------------------------------------------------------- eSpeak speaks


@pytest.mark.parametrize("voice", sorted(PANGRAMS))
def test_espeak_makes_real_speech_in_several_languages(voice, tmp_path):
    text = PANGRAMS[voice]
    clip = speech.synthesize_text(text, "espeak", voice, cache_dir=tmp_path)
    assert (clip.source, clip.voice) == ("espeak", voice)
    samples = samples_of(clip)
    words = len(text.split())
    expected = words * 60 / plugins.get_source("espeak").options["rate"]  # about 3 s at 175 words per minute
    assert 0.6 * expected < clip.duration < 1.8 * expected + speech.LEAD_IN_S + speech.TAIL_S
    assert np.sqrt(np.mean(samples ** 2)) > 0.02, "not silent"
    assert speech_fraction(clip.path) > 0.7, "the voice-activity detector hears speech"


def test_espeak_rate_pitch_and_variant_change_the_voice(tmp_path):
    text = "Speaking slowly and then quickly."
    slow = speech.synthesize_text(text, options={"rate": 100}, cache_dir=tmp_path)
    fast = speech.synthesize_text(text, options={"rate": "300"}, cache_dir=tmp_path)
    assert fast.duration < 0.6 * slow.duration
    low = speech.synthesize_text(text, options={"pitch": 10}, cache_dir=tmp_path)
    high = speech.synthesize_text(text, options={"pitch": 90}, cache_dir=tmp_path)
    assert median_pitch(high) > 1.3 * median_pitch(low)
    female = speech.synthesize_text(text, options={"variant": "f3"}, cache_dir=tmp_path)
    assert not np.array_equal(samples_of(female), samples_of(speech.synthesize_text(text, cache_dir=tmp_path)))
    with pytest.raises(InputError, match="between 80 and 450"):
        speech.synthesize_text(text, options={"rate": 20}, cache_dir=tmp_path)
    with pytest.raises(InputError, match="no voice variant 'nosuch'"):
        speech.synthesize_text(text, options={"variant": "nosuch"}, cache_dir=tmp_path)


def median_pitch(clip: AudioClip) -> float:
    """Median fundamental frequency (Hz) of the loud 40 ms frames, from the autocorrelation peak (60..400 Hz)."""
    samples, rate = samples_of(clip), clip.sample_rate
    size = int(0.04 * rate)
    frames = [samples[i:i + size] for i in range(0, samples.size - size, size)]
    loud = [f - f.mean() for f in frames if np.sqrt(np.mean(f ** 2)) > 0.05]
    shortest, longest = rate // 400, rate // 60
    pitches = []
    for frame in loud:
        correlation = np.correlate(frame, frame, mode="full")[size - 1:]
        pitches.append(rate / (shortest + int(np.argmax(correlation[shortest:longest]))))
    return float(np.median(pitches))


def test_espeak_lists_its_languages_and_variants():
    source = plugins.get_source("espeak")
    voices = {voice.id: voice for voice in source.voices()}
    assert len(voices) > 100
    assert voices["en-us"].label == "English (America)" and voices["de"].language == "de"
    assert {"f3", "m2", "klatt"} <= set(plugins.plugin_manager().sources["espeak"]._source.variants())


def test_word_and_phoneme_timings_follow_the_joined_clip(tmp_path):
    text = "Hello brave world. Timings come along."
    clip = speech.synthesize_text(text, cache_dir=tmp_path)
    words = [event for event in clip.events if event.kind == "word"]
    assert [w.text for w in words] == ["Hello", "brave", "world", "Timings", "come", "along"]
    assert all(text[w.position:w.position + len(w.text)] == w.text for w in words)
    times = [w.time for w in words]
    assert times == sorted(times) and times[0] >= speech.LEAD_IN_S - 0.05 and times[-1] < clip.duration
    assert times[3] - times[2] > speech.PAUSE_AFTER["sentence"], "the second sentence starts after the pause"
    phonemes = [event for event in clip.events if event.kind == "phoneme"]
    assert len(phonemes) > 15 and all(event.text for event in phonemes)
    cached = speech.synthesize_text(text, cache_dir=tmp_path)
    assert cached.events == clip.events, "timings come back from the cache"


@pytest.mark.skipif(shutil.which("espeak-ng") is None and shutil.which("espeak") is None,
                    reason="system espeak-ng not installed")
def test_the_system_espeak_program_is_a_working_fallback(tmp_path):
    from musetalk_tts_espeak import EspeakSource

    source = EspeakSource(backend="command")
    ok, reason = source.available()
    assert ok and "program" in reason
    assert "en-us" in {voice.id for voice in source.voices()}
    clip = source.synthesize(PANGRAMS["de"], "de", {"rate": 160, "pitch": 40, "variant": "m2"})
    try:
        assert clip.duration > 1.5 and clip.events == ()
        assert speech_fraction(clip.path) > 0.7
    finally:
        Path(clip.path).unlink()


def test_without_library_or_program_espeak_says_what_to_install(monkeypatch):
    import musetalk_tts_espeak.command as command
    import musetalk_tts_espeak.library as library

    def no_library():
        raise OSError("libespeak-ng.so: cannot open shared object file")

    monkeypatch.setattr(library, "bundled_library", no_library)
    monkeypatch.setattr(command, "find_program", lambda: None)
    command.system_command.cache_clear()
    from musetalk_tts_espeak import EspeakSource

    ok, reason = EspeakSource().available()
    assert not ok
    assert "pip install espeakng-loader" in reason and "install the system package espeak-ng" in reason


# --------------------------------------------------------------------------- cache and progress


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The texts each source was asked to speak."""
    asked: list[str] = []
    original = plugins.AudioSource.synthesize

    def counting(self, text, *args, **kwargs):
        asked.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(plugins.AudioSource, "synthesize", counting)
    return asked


def test_clips_are_cached_by_source_voice_options_and_text(counted, tmp_path):
    steps = []
    text = "First sentence. Second sentence. Third sentence."
    first = speech.synthesize_text(text, cache_dir=tmp_path, progress=lambda d, n: steps.append((d, n)))
    assert counted == ["First sentence.", "Second sentence.", "Third sentence."]
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]
    again = speech.synthesize_text(text, cache_dir=tmp_path)
    assert len(counted) == 3 and again.path == first.path
    speech.synthesize_text("First sentence. Second sentence, edited. Third sentence.", cache_dir=tmp_path)
    assert counted[3:] == ["Second sentence, edited."], "only the edited sentence is spoken again"
    speech.synthesize_text(text, voice="en-gb", cache_dir=tmp_path)
    speech.synthesize_text(text, options={"rate": 150}, cache_dir=tmp_path)
    assert len(counted) == 3 + 1 + 3 + 3
    assert not list(Path(tmp_path).rglob("*partial*")), "no temporary file left in the cache"


def test_the_cache_is_pruned_oldest_first(tmp_path):
    cache = speech.SpeechCache(tmp_path)
    for index, text in enumerate(["One.", "Two.", "Three."]):
        clip = speech.synthesize_text(text, cache_dir=tmp_path / "other")
        stored = cache.put("clips", f"{index:02d}" + "0" * 62, clip, move=False)
        Path(stored.path).touch()
        import os
        os.utime(stored.path, (1000 + index, 1000 + index))
    size = Path(stored.path).stat().st_size
    assert cache.prune(max_bytes=int(2.5 * size)) == 1
    assert cache.get("clips", "00" + "0" * 62) is None and cache.get("clips", "02" + "0" * 62) is not None


def test_speech_goes_to_a_wav_file_and_nothing_half_written(tmp_path):
    out = tmp_path / "said.wav"
    clip = speech.synthesize_text("Written to a file.", out_path=out, cache_dir=tmp_path / "cache")
    assert clip.path == str(out) and probe(out).duration == pytest.approx(clip.duration, abs=0.01)
    with pytest.raises(InputError, match="ending in .wav"):
        speech.synthesize_text("Not an mp3.", out_path=tmp_path / "said.mp3", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "said.wav"]


# --------------------------------------------------------------------------- errors


def test_unknown_or_unusable_sources_and_voices_are_input_errors(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="unknown audio source 'nope'"):
        speech.synthesize_text("Hello.", source="nope", cache_dir=tmp_path)
    with pytest.raises(InputError, match="no voice 'en-xx'; close ones: en, en-029"):
        speech.synthesize_text("Hello.", voice="en-xx", cache_dir=tmp_path)
    from musetalk_tts_espeak import EspeakSource

    monkeypatch.setattr(EspeakSource, "available", lambda self: (False, "the data folder is gone"))
    with pytest.raises(InputError, match="'espeak' cannot be used here: the data folder is gone"):
        speech.synthesize_text("Hello.", cache_dir=tmp_path)


def test_a_reference_voice_needs_a_source_that_clones(tmp_path, speech_clip):
    with pytest.raises(InputError, match="'espeak' cannot clone a voice"):
        speech.synthesize_text("Hello.", reference_audio=speech_clip, cache_dir=tmp_path)


# --------------------------------------------------------------------------- reference clips


@pytest.fixture(scope="module")
def talking_video(tmp_path_factory, face_clip) -> Path:
    """The face clip with sound: 1.5 s of faint room noise, then the example speech (7.6 s)."""
    folder = tmp_path_factory.mktemp("talking")
    words, rate = speech.read_wav(str(EXAMPLES / "speech.wav"))
    noise = np.random.default_rng(0).normal(0, 0.002, int(1.5 * rate)).astype(np.float32)
    sound = speech.write_wav(folder / "sound.wav", np.concatenate([noise, 0.3 * words]), rate)
    video = folder / "talking.mp4"
    ffmpeg("-i", str(face_clip), "-i", sound, "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac",
           str(video))
    return video


def test_reference_clip_keeps_clean_speech_at_a_steady_loudness(talking_video, tmp_path):
    out = speech.reference_clip(talking_video, tmp_path / "reference.wav", seconds=6)
    with wave.open(out, "rb") as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (24000, 1, 2)
    samples, rate = speech.read_wav(out)
    assert 5.5 <= samples.size / rate <= 6.5, "6 s of speech asked, a few short gaps between stretches"
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(samples ** 2)))
    assert -23 < rms_dbfs < -17 and np.max(np.abs(samples)) <= 10 ** (-1 / 20) + 1e-3
    assert speech_fraction(out) > 0.8, "the leading room noise was left out"
    assert np.sqrt(np.mean(samples[: rate // 5] ** 2)) > 0.01, "it starts with the voice, not the noise"
    assert not list(tmp_path.glob(".*partial*"))


def test_reference_clip_refuses_too_little_speech_or_no_sound(speech_clip, face_clip, tmp_path):
    with pytest.raises(InputError, match="needs at least 3 s"):
        speech.reference_clip(speech_clip, tmp_path / "r.wav")
    with pytest.raises(InputError, match="no audio"):
        speech.reference_clip(face_clip, tmp_path / "r.wav")
    with pytest.raises(InputError, match="6 to 15 s"):
        speech.reference_clip(speech_clip, tmp_path / "r.wav", seconds=30)
    assert not (tmp_path / "r.wav").exists()


def test_cloning_hands_the_source_a_reference_cut_from_the_video(talking_video, tmp_path):
    from musetalk_tts_espeak import EspeakSource

    references = []

    class Cloner(EspeakSource):
        id = "cloner"
        can_clone = True

        def synthesize(self, text, voice, options, reference_audio=None):
            references.append((reference_audio, speech_fraction(reference_audio)))
            return super().synthesize(text, voice, options)

    plugins.plugin_manager().add_source(Cloner(), "cloner-plugin", None)  # the fixture rebuilds the manager after
    clip = speech.speech_for_video("Say it in my voice.", "cloner", clone_from=talking_video, cache_dir=tmp_path)
    assert clip.source == "cloner" and len(references) == 1
    reference, fraction = references[0]
    assert fraction > 0.8 and not Path(reference).exists(), "the reference was speech, and is cleaned up"
    speech.speech_for_video("Say it in my voice.", "cloner", clone_from=talking_video, cache_dir=tmp_path)
    assert len(references) == 1, "the same video gives the same reference: a cache hit"


# --------------------------------------------------------------------------- command line


def test_tts_command_writes_speech_from_a_text_file(tmp_path, capsys):
    script = tmp_path / "script.txt"
    script.write_text("Bonjour tout le monde. Ceci est un essai.\n", encoding="utf-8")
    out = tmp_path / "speech.wav"
    assert cli.main(["tts", "--text-file", str(script), "--voice", "fr", "--tts-option", "rate=150",
                     "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert speech_fraction(str(out)) > 0.6


@pytest.mark.parametrize("args, message", [
    (["--text", "a", "--text-file", "b.txt"], "either --text or --text-file"),
    (["--text", "Hello.", "--tts-option", "rate"], "NAME=VALUE"),
    (["--text", "Hello.", "--tts-option", "speed=2"], "no option speed"),
    (["--text-file", "missing.txt"], "does not exist"),
    (["--text", "Hello.", "--clone-voice"], "needs FILE"),
])
def test_tts_command_mistakes_are_one_clear_line(args, message, tmp_path, capsys):
    assert cli.main(["tts", *args, "--out", str(tmp_path / "x.wav")]) == cli.EXIT_USER_ERROR
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()


def test_voices_command_lists_usable_sources_and_voices(capsys):
    assert cli.main(["voices"]) == 0
    out = capsys.readouterr().out
    assert "espeak: eSpeak NG (offline) (usable)" in out and "English (America) [en-us]" in out
    assert "coqui: Coqui TTS" in out, "sources that cannot work here are listed with their reason"
    assert cli.main(["voices", "--source", "nope"]) == cli.EXIT_USER_ERROR


def test_run_dubs_a_video_from_text_end_to_end(models_dir, face_clip, tmp_path, capsys):
    out = tmp_path / "dubbed.mp4"
    assert cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--video", str(face_clip),
                     "--text", "Hello there.", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "speech:" in said and "from espeak (voice en-us)" in said
    seconds = float(said.split("speech: ")[1].split(" s")[0])
    result = probe(out)
    assert result.has_audio and result.duration == pytest.approx(seconds, abs=0.1)
    fps = probe(face_clip).fps
    assert seconds - 0.005 <= result.num_frames / fps < seconds + 1 / fps + 0.005  # the whole speech, rounded up


def test_run_with_clone_voice_and_a_source_that_cannot_clone_is_refused(models_dir, face_clip, tmp_path, capsys):
    out = tmp_path / "dubbed.mp4"
    assert cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--video", str(face_clip),
                     "--text", "Hello.", "--clone-voice", "--out", str(out)]) == cli.EXIT_USER_ERROR
    assert "'espeak' cannot clone a voice" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["run", "--video", str(face_clip), "--audio", "x.wav", "--text", "Hello.",
                     "--out", str(out)]) == cli.EXIT_USER_ERROR
    assert "either --audio or --text" in capsys.readouterr().err
