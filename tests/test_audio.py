"""Tests of musetalk.audio: waveforms, speech detection and gating, Whisper features, per-frame windows.

Everything runs offline on the CPU: waveforms are synthesised here, the Whisper model is a
tiny one built from a config and saved in the official layout.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio
from musetalk.audio import (
    SAMPLE_RATE,
    SpeechSegments,
    StreamingSpeechGate,
    chunk_indices,
    detect_speech,
    fit_length,
    frame_features,
    gate_silence,
)
from musetalk.errors import InputError, WeightsMissingError

SR = SAMPLE_RATE
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- synthetic speech

# Formants (Hz, bandwidth Hz) of five vowels, after Peterson & Barney's averages.
VOWELS = (
    ((730, 90), (1090, 110), (2440, 160)),
    ((270, 60), (2290, 100), (3010, 160)),
    ((530, 70), (1840, 100), (2480, 160)),
    ((300, 60), (870, 90), (2240, 160)),
    ((570, 80), (840, 90), (2410, 160)),
)


def _resonator(signal: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """A two-pole resonance (one formant)."""
    radius = math.exp(-math.pi * bandwidth / SR)
    c1, c2 = 2 * radius * math.cos(2 * math.pi * freq / SR), -radius * radius
    out = np.zeros_like(signal)
    y1 = y2 = 0.0
    for i, value in enumerate(signal):
        y0 = (1 - radius) * value + c1 * y1 + c2 * y2
        out[i] = y0
        y2, y1 = y1, y0
    return out


def speech_like(seconds: float, seed: int, f0: float = 100.0, syllables_per_s: float = 4.0) -> np.ndarray:
    """Vowel-like sound silero-vad calls speech: a glottal pulse train with vibrato through
    formant filters, a new vowel per syllable, amplitude modulated at syllable rate."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)))
    pulses = np.diff(np.floor(np.cumsum(pitch / SR)), prepend=0.0)
    source = np.zeros(n)
    level = 0.0
    for i, pulse in enumerate(pulses):  # glottal tilt: leaky integration of the pulses
        level = 0.96 * level + pulse
        source[i] = level
    source = source - source.mean() + 0.03 * rng.standard_normal(n)
    syllable = int(SR / syllables_per_s)
    out = np.zeros(n)
    for start in range(0, n, syllable):
        piece = source[start : start + syllable]
        formants = VOWELS[rng.integers(len(VOWELS))]
        out[start : start + syllable] = sum(_resonator(piece, f, bw) for f, bw in formants)
    out *= np.maximum(np.sin(np.pi * syllables_per_s * t) ** 2, 0.3)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


@pytest.fixture(scope="module")
def speech_pause_speech() -> np.ndarray:
    """1.5 s speech, 1.0 s of faint room noise, 1.5 s speech (4 s)."""
    noise = 0.003 * np.random.default_rng(5).standard_normal(SR)
    return np.concatenate([speech_like(1.5, 0), noise.astype(np.float32), speech_like(1.5, 1)])


def _fraction_speech(segments: SpeechSegments, start: float, end: float) -> float:
    return float(segments.speech_mask(np.arange(start, end, 0.01)).mean())


# --------------------------------------------------------------------------- waveforms


def test_fit_length_pads_and_cuts():
    wav = np.ones(5, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(wav, 7), [1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(fit_length(wav, 3), [1, 1, 1])
    assert fit_length(wav, 0).size == 0
    with pytest.raises(InputError):
        fit_length(wav, -1)


def test_waveform_checks():
    with pytest.raises(InputError, match="mono"):
        fit_length(np.zeros((2, 10), dtype=np.float32), 3)
    with pytest.raises(InputError, match="NaN"):
        detect_speech(np.array([0.1, np.nan] * 2000, dtype=np.float32))
    with pytest.raises(InputError, match="16000"):
        detect_speech(np.zeros(100, dtype=np.float32), sr=44100)
    with pytest.raises(InputError, match="float"):
        detect_speech(np.zeros(100, dtype=np.int16))


def test_num_steps_and_frames_are_floors():
    assert audio.num_whisper_steps(int(1.3 * SR)) == 65
    assert audio.num_whisper_steps(319) == 0
    assert audio.num_whisper_steps(320) == 1
    # the official floating-point floor: 9280 / 16000 * 50 = 28.999999999999996
    assert audio.num_whisper_steps(9280) == 28
    assert audio.num_video_frames(SR * 2, 25) == 50
    assert audio.num_video_frames(SR * 2 - 1, 25) == 49
    assert audio.num_video_frames(SR, 29.97) == 29


def test_load_audio_goes_through_video_io(tmp_path, monkeypatch):
    import musetalk.video_io as video_io

    calls = []

    def fake_decode(path, sample_rate=16000):
        calls.append((path, sample_rate))
        return np.full(160, 0.5, dtype=np.float64)

    monkeypatch.setattr(video_io, "decode_audio", fake_decode, raising=False)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"placeholder bytes, decoded by the fake")
    wav = audio.load_audio(clip)
    assert calls == [(str(clip), SR)]
    assert wav.dtype == np.float32 and wav.shape == (160,)
    with pytest.raises(InputError, match="not found"):
        audio.load_audio(tmp_path / "missing.wav")


# --------------------------------------------------------------------------- speech segments


def test_speech_mask_and_frame_mask():
    segments = SpeechSegments(spans=[(0.5, 1.0), (2.0, 2.2)], duration=3.0)
    np.testing.assert_array_equal(
        segments.speech_mask(np.array([0.0, 0.5, 0.99, 1.0, 2.1, 2.2])), [False, True, True, False, True, False]
    )
    # 10 fps: frame centres 0.05, 0.15, ...; frames 5..9 (0.55..0.95) and 20, 21 (2.05, 2.15)
    mask = segments.frame_mask(30, 10)
    assert np.flatnonzero(mask).tolist() == [5, 6, 7, 8, 9, 20, 21]
    assert segments.speech_seconds == pytest.approx(0.7)


def test_detect_speech_finds_speech_not_the_pause(speech_pause_speech):
    segments = detect_speech(speech_pause_speech)
    assert segments.duration == pytest.approx(4.0)
    starts_ends = [value for span in segments.spans for value in span]
    assert starts_ends == sorted(starts_ends), "spans must be sorted and disjoint"
    assert _fraction_speech(segments, 0.1, 1.45) >= 0.9
    assert _fraction_speech(segments, 2.55, 3.95) >= 0.9
    # The detector ends speech a little late (its own hangover); the heart of the pause is silence.
    assert _fraction_speech(segments, 2.0, 2.35) == 0.0


def _read_pcm16_wav(path: Path) -> np.ndarray:
    import wave

    with wave.open(str(path)) as handle:
        assert (handle.getnchannels(), handle.getsampwidth(), handle.getframerate()) == (1, 2, SR)
        frames = handle.readframes(handle.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def test_detect_speech_on_real_speech_example():
    """examples/speech.wav (eSpeak NG, 7.6 s): speech, a pause from about 2.6 s to 3.5 s, speech."""
    wav = _read_pcm16_wav(REPO_ROOT / "examples" / "speech.wav")
    segments = detect_speech(wav)
    assert _fraction_speech(segments, 2.75, 3.4) == 0.0
    assert _fraction_speech(segments, 1.0, 2.5) == 1.0
    assert _fraction_speech(segments, 3.55, 7.0) == 1.0
    assert segments.speech_seconds >= 5.0


def test_gate_silence_zeroes_the_pause_and_keeps_speech(speech_pause_speech):
    wav = speech_pause_speech
    segments = detect_speech(wav)
    gated = gate_silence(wav, segments, fade_s=0.03)
    assert gated.dtype == np.float32 and gated.shape == wav.shape
    assert gated is not wav and np.shares_memory(gated, wav) is False
    times = np.arange(wav.size) / SR
    outside = ~segments.speech_mask(times)
    assert outside.any()
    assert np.all(gated[outside] == 0.0)
    far_inside = np.zeros(wav.size, dtype=bool)
    for start, end in segments.spans:
        far_inside |= (times >= start + 0.031) & (times < end - 0.031)
    np.testing.assert_array_equal(gated[far_inside], wav[far_inside])
    assert wav[outside].any(), "the input pause held noise, so zeroing it was real work"


def test_gate_silence_fades_linearly_without_clicks():
    wav = np.ones(SR, dtype=np.float32)
    segments = SpeechSegments(spans=[(0.25, 0.5)], duration=1.0)
    gated = gate_silence(wav, segments, fade_s=0.01)  # 160-sample ramps
    start, end = int(0.25 * SR), int(0.5 * SR)
    assert np.all(gated[:start] == 0) and np.all(gated[end:] == 0)
    assert np.all(gated[start + 160 : end - 160] == 1)
    ramp = gated[start : start + 160]
    assert np.all(np.diff(ramp) > 0) and 0 < ramp[0] < 0.01 and ramp[-1] < 1
    assert np.abs(np.diff(gated)).max() <= 1 / 161 + 1e-6
    np.testing.assert_array_equal(gated[end - 160 : end], ramp[::-1])


def test_gate_silence_with_no_spans_is_all_zero():
    wav = np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    assert not gate_silence(wav, SpeechSegments(spans=[], duration=1.0)).any()


def test_all_silence_gives_no_spans():
    assert detect_speech(np.zeros(3 * SR, dtype=np.float32)).spans == []
    faint = (1e-5 * np.random.default_rng(1).standard_normal(3 * SR)).astype(np.float32)
    assert detect_speech(faint).spans == []
    assert detect_speech(np.zeros(0, dtype=np.float32)).spans == []


def test_noise_only_is_almost_no_speech():
    rng = np.random.default_rng(2)
    white = (0.05 * rng.standard_normal(4 * SR)).astype(np.float32)
    t = np.arange(4 * SR) / SR
    hum = (0.1 * np.sin(2 * np.pi * 50 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    for noise in (white, hum):
        assert detect_speech(noise).speech_seconds <= 0.2


def test_very_short_audio_is_kept_whole():
    short = speech_like(0.05, 3)
    segments = detect_speech(short)
    assert segments.spans == [(0.0, pytest.approx(0.05))]
    np.testing.assert_array_equal(gate_silence(short, segments, fade_s=0.0), short)


def test_detect_speech_rejects_bad_options():
    with pytest.raises(InputError, match="threshold"):
        detect_speech(np.zeros(SR, dtype=np.float32), threshold=1.5)


def test_vad_model_loads_once():
    assert audio.load_vad_model() is audio.load_vad_model()


def test_vad_loads_offline_and_keeps_torch_threads():
    """In a fresh process (nothing cached): no network, no hub, and silero's import does not
    leave torch on one thread."""
    script = textwrap.dedent(
        """
        import socket, torch, torch.hub
        def refuse(*args, **kwargs):
            raise RuntimeError("network or hub access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        torch.hub.load = refuse
        torch.hub.download_url_to_file = refuse
        torch.set_num_threads(3)
        from musetalk.audio import load_vad_model, detect_speech
        import numpy as np
        load_vad_model()
        detect_speech(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
        assert torch.get_num_threads() == 3, torch.get_num_threads()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_streaming_gates_warmed_up_model_judges_as_a_fresh_one():
    """The stream's VAD model is warmed up (TorchScript optimises on its first calls) and reset: what it
    then says of real speech is what a model that never heard the warm-up says."""
    import torch

    wav = _read_pcm16_wav(REPO_ROOT / "examples" / "speech.wav")
    windows = torch.from_numpy(wav[: 60 * audio.VAD_WINDOW].reshape(60, audio.VAD_WINDOW).copy())
    fresh, warmed = audio._new_vad_model(), audio._new_vad_model()
    audio._warm_up(warmed)
    with torch.inference_mode():
        expected = [float(fresh(window, SR)) for window in windows]
        judged = [float(warmed(window, SR)) for window in windows]
    assert max(expected) > 0.9 and min(expected) < 0.1, "speech and a pause in the windows"
    np.testing.assert_allclose(judged, expected, atol=1e-5)


def test_the_streaming_gate_says_how_much_audio_makes_a_sample_final():
    """A live session waits for exactly that much (the pre-roll and fade after the sample, to the end of its
    VAD window), not for the worst case."""
    noise = np.random.default_rng(1).standard_normal(SR).astype(np.float32) * 0.1
    for final in (1, 3000, 4000):
        needed = StreamingSpeechGate().samples_needed(final)
        short, enough = StreamingSpeechGate(), StreamingSpeechGate()
        short.feed(noise[: needed - 1])
        enough.feed(noise[:needed])
        assert short.final_end < final <= enough.final_end, final
        assert needed - final <= short.lookahead_samples


# --------------------------------------------------------------------------- per-frame windows


def test_chunk_indices_25fps_hand_computed():
    # m = 2, p = 2: frame i takes unpadded steps 2i-4 .. 2i+5; T = 100 for 2 s of audio.
    idx = chunk_indices(50, 25, num_steps=100)
    assert idx.shape == (50, 10)
    assert idx[0].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]
    assert idx[1].tolist() == [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7]
    assert idx[2].tolist() == list(range(0, 10))
    assert idx[10].tolist() == list(range(16, 26))
    assert idx[47].tolist() == list(range(90, 100))
    assert idx[48].tolist() == [92, 93, 94, 95, 96, 97, 98, 99, -1, -1]
    assert idx[49].tolist() == [94, 95, 96, 97, 98, 99, -1, -1, -1, -1]


def test_chunk_indices_30fps_hand_computed():
    # m = 5/3, p = ceil(m) = 2: start = floor(5i/3) - 4; T = 100 for 2 s.
    idx = chunk_indices(60, 30, num_steps=100)
    assert idx.shape == (60, 10)
    assert idx[0].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]
    assert idx[1].tolist() == [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6]  # floor(1.67) = 1
    assert idx[2].tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8]  # floor(3.33) = 3
    assert idx[3].tolist() == list(range(1, 11))  # floor(5) = 5
    assert idx[4].tolist() == list(range(2, 12))  # floor(6.67) = 6
    assert idx[59].tolist() == [94, 95, 96, 97, 98, 99, -1, -1, -1, -1]  # floor(98.33) = 98


def test_chunk_indices_other_contexts_and_defaults():
    idx = chunk_indices(3, 25, pad_left=1, pad_right=0, num_steps=6)
    assert idx.tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5]]
    # num_steps left out: audio exactly num_frames / fps long -> T = 100
    np.testing.assert_array_equal(chunk_indices(50, 25), chunk_indices(50, 25, num_steps=100))
    assert chunk_indices(0, 25).shape == (0, 10)
    assert (chunk_indices(2, 25, num_steps=0) == -1).all()


def test_chunk_indices_round_as_the_official_code_at_29_and_31_fps():
    # floor(i * (50 / fps)) with m computed first: at 29 fps frame 145's window starts at 249
    # (145 * m is 249.99999999999997 in floating point), where exact arithmetic says 250.
    assert math.floor(145 * (50 / 29)) == 249 and 145 * 50 // 29 == 250
    assert chunk_indices(150, 29, num_steps=300)[145, 0] == 249 - 2 * 2
    starts = chunk_indices(400, 31, num_steps=1000)[10:, 0] + 2 * 2
    assert starts.tolist() == [math.floor(i * (50 / 31)) for i in range(10, 400)]


def test_chunk_indices_v1_takes_the_same_windows_as_v15():
    np.testing.assert_array_equal(chunk_indices(50, 25, "v1", num_steps=100), chunk_indices(50, 25, num_steps=100))


def test_chunk_indices_rejects_bad_input():
    with pytest.raises(InputError, match="version"):
        chunk_indices(5, 25, version="v2")
    with pytest.raises(InputError, match="fps"):
        chunk_indices(5, 0)
    with pytest.raises(InputError):
        chunk_indices(5, 25, pad_left=-1)


def _reference_v15(features: np.ndarray, num_frames: int, fps: float, left: int = 2, right: int = 2) -> np.ndarray:
    """Facts section 3 done literally: zero-pad, then slice the padded array per frame.

    The official right padding (``p * 3 * right`` steps) is too short from 50 fps up (the
    official code stops with an assertion there); zeros past the end are what it means, so
    the reference pads one window more.
    """
    m = 50 / fps
    p = math.ceil(m)
    steps, layers, width = features.shape
    window = 2 * (left + right + 1)
    padded = np.concatenate(
        [np.zeros((p * left, layers, width)), features, np.zeros((p * 3 * right + window, layers, width))]
    )
    clips = [padded[math.floor(i * m) : math.floor(i * m) + window] for i in range(num_frames)]
    assert all(clip.shape[0] == window for clip in clips)
    return np.stack(clips).reshape(num_frames, window * layers, width)


@pytest.mark.parametrize("fps", [25, 30, 24, 50, 60])
@pytest.mark.parametrize("seconds", [0.52, 3.0, 7.37])
def test_frame_features_match_literal_padding(fps, seconds):
    rng = np.random.default_rng(int(fps * 100 + seconds * 10))
    steps = math.floor(seconds * 50)
    frames = math.floor(seconds * fps)
    features = rng.standard_normal((steps, 3, 4)).astype(np.float32)
    got = frame_features(features, chunk_indices(frames, fps, num_steps=steps))
    np.testing.assert_array_equal(got, _reference_v15(features, frames, fps))


def test_frame_features_shape_zeros_and_time_major_order():
    steps, layers, width = 6, 5, 3
    # value encodes (step, layer): 10 * step + layer, so the order is visible
    features = (10 * np.arange(steps)[:, None, None] + np.arange(layers)[None, :, None]) * np.ones(width)
    features = features.astype(np.float32)
    indices = np.array([[-1, 0, 1, 2], [3, 4, 5, -1]])
    out = frame_features(features, indices)
    assert out.shape == (2, 4 * layers, width) and out.dtype == np.float32
    assert np.all(out[0, :layers] == 0) and np.all(out[1, 3 * layers :] == 0)
    assert out[0, layers:, 0].tolist() == [10 * s + l for s in (0, 1, 2) for l in range(layers)]
    assert out[1, : 3 * layers, 0].tolist() == [10 * s + l for s in (3, 4, 5) for l in range(layers)]
    with pytest.raises(InputError, match="num_steps"):
        frame_features(features, np.array([[0, 6]]))
    empty = frame_features(np.zeros((0, layers, width), np.float32), np.full((2, 4), -1))
    assert empty.shape == (2, 4 * layers, width) and not empty.any()


# --------------------------------------------------------------------------- Whisper encoder

D_MODEL = 32
ENCODER_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    """A tiny Whisper saved as the full seq2seq model (keys under ``model.``), like openai/whisper-tiny."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64, d_model=D_MODEL, encoder_layers=ENCODER_LAYERS, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=16, num_mel_bins=80,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("whisper")
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def test_tiny_checkpoint_has_the_official_key_prefix(tiny_whisper_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_whisper_dir / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert "model.encoder.conv1.weight" in keys and not any(k.startswith("encoder.") for k in keys)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_whisper_dir):
    return audio.WhisperAudioEncoder.from_pretrained(tiny_whisper_dir)


def test_from_pretrained_loads_the_saved_encoder_weights(tiny_whisper_dir, tiny_encoder):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_whisper_dir / "model.safetensors"))
    state = tiny_encoder.encoder.state_dict()
    conv = "conv1.weight"
    assert np.array_equal(state[conv].numpy(), saved["model.encoder." + conv].numpy())
    assert not any("decoder" in key for key in state)
    assert tiny_encoder.num_hidden_states == ENCODER_LAYERS + 1 and tiny_encoder.d_model == D_MODEL


def _reference_window(encoder, wav: np.ndarray) -> np.ndarray:
    """One 30 s window the plain way: extractor -> encoder hidden states stacked on axis 2."""
    import torch

    mel = encoder.feature_extractor(wav, sampling_rate=SR, return_tensors="pt").input_features
    with torch.no_grad():
        hidden = encoder.encoder(mel, output_hidden_states=True).hidden_states
    return torch.stack(hidden, dim=2)[0].numpy()


def test_encode_short_audio(tiny_encoder):
    wav = (0.1 * np.random.default_rng(3).standard_normal(int(1.3 * SR))).astype(np.float32)
    features = tiny_encoder.encode(wav)
    assert features.shape == (65, ENCODER_LAYERS + 1, D_MODEL) and features.dtype == np.float32
    np.testing.assert_allclose(features, _reference_window(tiny_encoder, wav)[:65], rtol=1e-5, atol=1e-5)


def test_encode_spans_30_second_windows(tiny_encoder):
    wav = (0.1 * np.random.default_rng(4).standard_normal(31 * SR)).astype(np.float32)
    features = tiny_encoder.encode(wav)
    assert features.shape == (1550, ENCODER_LAYERS + 1, D_MODEL)
    window = 30 * SR
    np.testing.assert_allclose(features[1500:], _reference_window(tiny_encoder, wav[window:])[:50], atol=1e-5)
    np.testing.assert_allclose(features[1490:1500], _reference_window(tiny_encoder, wav[:window])[1490:], atol=1e-5)
    assert tiny_encoder.encode(np.zeros(100, dtype=np.float32)).shape == (0, ENCODER_LAYERS + 1, D_MODEL)


def test_from_pretrained_without_files_says_what_to_do(tmp_path):
    with pytest.raises(WeightsMissingError, match="musetalk download"):
        audio.WhisperAudioEncoder.from_pretrained(tmp_path)


def test_from_pretrained_without_weights_file(tiny_whisper_dir, tmp_path):
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((tiny_whisper_dir / name).read_bytes())
    with pytest.raises(WeightsMissingError):
        audio.WhisperAudioEncoder.from_pretrained(tmp_path)
