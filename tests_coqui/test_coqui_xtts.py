"""The coqui source speaking and cloning through the real coqui-tts and a tiny XTTS model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk import audio, cli, plugins, speech
from musetalk.errors import InputError
from musetalk.video_io import probe

SAMPLE_RATE = 24000  # XTTS's output rate
TINY_MAX_SECONDS = 24 * 1024 / 22050  # the tiny GPT's audio tokens per sentence, 1024 samples at 22.05 kHz each


def options(model: Path, **more) -> dict:
    return {"model": str(model), "device": "cpu", **more}


def samples_of(path) -> np.ndarray:
    samples, rate = speech.read_wav(str(path))
    assert rate == SAMPLE_RATE
    return samples


def speakers_file(model: Path) -> dict:
    return torch.load(model / "speakers_xtts.pth", weights_only=True)


def dbfs(samples: np.ndarray) -> float:
    return 20 * np.log10(float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))))


def test_the_source_is_usable_with_the_extras_set():
    ok, reason = plugins.get_source("coqui").available()
    assert ok, reason


def test_a_sentence_is_spoken_by_xtts_as_the_default_speaker(tiny_xtts, xtts_calls, tmp_path):
    clip = speech.synthesize_text("Hello there, and welcome.", source="coqui", voice="en", options=options(tiny_xtts),
                                  cache_dir=tmp_path)
    [call] = xtts_calls.inference
    assert (call["text"], call["language"]) == ("Hello there, and welcome.", "en")
    default = speakers_file(tiny_xtts)["Ana Florence"]["speaker_embedding"]
    assert torch.equal(call["speaker_embedding"], default), "no reference: the default built-in speaker"
    from TTS.config import load_config

    config = load_config(str(tiny_xtts / "config.json"))
    assert call["settings"] == {name: config[name] for name in
                                ("temperature", "length_penalty", "repetition_penalty", "top_k", "top_p")}
    spoken = xtts_calls.outputs[0]
    assert 0.2 < spoken.size / SAMPLE_RATE <= TINY_MAX_SECONDS + 0.05 and np.isfinite(spoken).all()
    assert (clip.source, clip.voice, clip.sample_rate) == ("coqui", "en", SAMPLE_RATE)
    samples = samples_of(clip.path)
    assert samples.size / SAMPLE_RATE == pytest.approx(clip.duration, abs=1e-3)
    assert np.abs(samples).max() > 0.01, "the clip holds XTTS's sound, not silence"


def test_several_sentences_one_call_each_joined_in_order(tiny_xtts, xtts_calls, tmp_path):
    text = "The first sentence. A second one! And is this the third?"
    clip = speech.synthesize_text(text, source="coqui", voice="en", options=options(tiny_xtts), cache_dir=tmp_path)
    assert [c["text"] for c in xtts_calls.inference] == ["The first sentence.", "A second one!",
                                                         "And is this the third?"]
    spoken = sum(output.size for output in xtts_calls.outputs) / SAMPLE_RATE
    assert spoken * 0.9 < clip.duration < spoken + 3.0, "the three clips, with pauses between"
    again = speech.synthesize_text(text, source="coqui", voice="en", options=options(tiny_xtts), cache_dir=tmp_path)
    assert len(xtts_calls.inference) == 3 and again.path == clip.path, "the second time comes from the cache"


def test_language_and_speaker_options_reach_xtts(tiny_xtts, xtts_calls, tmp_path):
    speech.synthesize_text("Guten Tag. Wie geht es Ihnen?", source="coqui", voice="de",
                           options=options(tiny_xtts, speaker="Claribel Dervla"), cache_dir=tmp_path)
    assert [c["language"] for c in xtts_calls.inference] == ["de", "de"]
    claribel = speakers_file(tiny_xtts)["Claribel Dervla"]["speaker_embedding"]
    assert all(torch.equal(c["speaker_embedding"], claribel) for c in xtts_calls.inference)
    with pytest.raises(InputError, match="has no speaker 'Nobody'; some of its speakers: Ana Florence, Claribel"):
        speech.synthesize_text("Hello.", source="coqui", voice="en", options=options(tiny_xtts, speaker="Nobody"),
                               cache_dir=tmp_path)


def test_an_unknown_language_is_an_input_error(tiny_xtts, tmp_path):
    with pytest.raises(InputError, match="has no voice 'xx'.*musetalk voices --source coqui"):
        speech.synthesize_text("Hello.", source="coqui", voice="xx", options=options(tiny_xtts), cache_dir=tmp_path)
    if importlib.util.find_spec("cutlet") is not None:
        pytest.skip("coqui-tts's ja extra is installed here, so Japanese works")
    with pytest.raises(InputError, match=r'Japanese text with cutlet.*pip install "coqui-tts\[ja\]==0\.28'):
        speech.synthesize_text("こんにちは。", source="coqui", voice="ja", options=options(tiny_xtts),
                               cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.wav")), "nothing is cached from a refused call"


def test_a_missing_model_folder_is_an_input_error(tiny_xtts, tmp_path):
    with pytest.raises(InputError, match="there is no model folder .*nowhere. Give a folder holding a Coqui model"):
        speech.synthesize_text("Hello.", source="coqui", options=options(tmp_path / "nowhere"), cache_dir=tmp_path)
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.pth").write_bytes((tiny_xtts / "model.pth").read_bytes()[:1000])
    with pytest.raises(InputError, match="half has no config.json beside the model"):
        speech.synthesize_text("Hello.", source="coqui", options=options(half), cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.wav"))


def test_clone_voice_hands_xtts_the_videos_speech(tiny_xtts, talking_video, xtts_calls, no_torchaudio_file_reading,
                                                 tmp_path):
    """musetalk tts --clone-voice: the 6-15 s cut of the video's speech, loudness normalised, is XTTS's reference."""
    out = tmp_path / "cloned.wav"
    assert cli.main(["tts", "--source", "coqui", "--tts-option", f"model={tiny_xtts}", "--tts-option", "device=cpu",
                     "--text", "Hello in my own voice.", "--clone-voice", str(talking_video), "--out", str(out)]) == 0
    [(reference, rate)] = xtts_calls.references
    assert rate == speech.REFERENCE_RATE and 6.0 <= reference.size / rate <= 15.0
    assert dbfs(reference) == pytest.approx(speech.REFERENCE_RMS_DBFS, abs=1.0)
    assert 20 * np.log10(np.abs(reference).max()) <= speech.REFERENCE_PEAK_DBFS + 0.01
    at_16k = audio.load_audio(_wav(tmp_path / "reference-seen.wav", reference, rate))
    segments = audio.detect_speech(at_16k)
    assert segments.speech_seconds / segments.duration > 0.8, "the reference is the video's speech"
    [call] = xtts_calls.inference
    assert call["speaker_embedding"] is xtts_calls.embeddings[0], "XTTS spoke with the reference's embedding"
    assert call["gpt_cond_latent"] is xtts_calls.latents[0], "and with its conditioning latents"
    assert not no_torchaudio_file_reading, "the reference reached XTTS without torchaudio.load"
    assert "torchcodec" not in sys.modules, "nor torchcodec, which needs the system's FFmpeg libraries"
    assert samples_of(out).size > 0


def test_text_to_dubbing_end_to_end_with_the_preview_engine(tiny_xtts, talking_video, xtts_calls, tmp_path):
    out = tmp_path / "dubbed.mp4"
    assert cli.main(["run", "--engine", "preview", "--video", str(talking_video), "--text",
                     "Hello, and welcome. This is my voice.", "--source", "coqui", "--clone-voice",
                     "--tts-option", f"model={tiny_xtts}", "--tts-option", "device=cpu", "--out", str(out)]) == 0
    assert [c["text"] for c in xtts_calls.inference] == ["Hello, and welcome.", "This is my voice."]
    assert xtts_calls.references and all(any(c["speaker_embedding"] is e for e in xtts_calls.embeddings)
                                         for c in xtts_calls.inference), "each sentence in the video's voice"
    info = probe(str(out))
    spoken = sum(output.size for output in xtts_calls.outputs) / SAMPLE_RATE
    assert info.has_video and info.has_audio and (info.width, info.height) == (432, 504)
    assert spoken * 0.9 < info.duration < spoken + 3.0, "the video lasts as long as the speech"


def test_doctor_reports_the_source_usable():
    from musetalk import doctor

    [row] = [row for row in doctor.check() if row.name == "speech coqui"]
    assert row.ok, row.detail


def test_the_tiny_model_is_in_xttss_own_layout(tiny_xtts):
    from TTS.config import load_config

    assert sorted(p.name for p in tiny_xtts.iterdir()) == ["config.json", "model.pth", "speakers_xtts.pth",
                                                          "vocab.json"]
    config = load_config(str(tiny_xtts / "config.json"))
    assert type(config).__name__ == "XttsConfig" and config.model_args.gpt_use_perceiver_resampler
    checkpoint = torch.load(tiny_xtts / "model.pth", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model"} and "gpt.mel_head.weight" in checkpoint["model"]


def _wav(path: Path, samples: np.ndarray, rate: int) -> str:
    return speech.write_wav(path, samples, rate)
