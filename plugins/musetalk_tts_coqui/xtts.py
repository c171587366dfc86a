"""Speech from a loaded XTTS model, with the reference voice decoded here.

XTTS reads a reference file with ``torchaudio.load``, which since torchaudio 2.9 goes
through torchcodec and needs the system's FFmpeg libraries (4 to 8): cloning would then fail
on a machine with only pip's packages. So the plugin decodes the reference clip itself and
gives XTTS the samples, computing the voice as XTTS's ``get_conditioning_latents`` does with
the settings of the model's config. A built-in speaker's voice comes from the model's
speakers file (XTTS-v2: ``speakers_xtts.pth``).
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from musetalk.errors import InputError

logger = logging.getLogger(__name__)

# The settings of XttsConfig that XTTS's own synthesize() hands to inference().
INFERENCE_SETTINGS = ("temperature", "length_penalty", "repetition_penalty", "top_k", "top_p")
# Languages whose text XTTS romanises with a package that only an extra of coqui-tts brings:
# language -> (the module XTTS imports, the extra, the language's name).
LANGUAGE_EXTRAS = {"ja": ("cutlet", "ja", "Japanese"), "zh-cn": ("pypinyin", "zh", "Chinese")}


def loaded_xtts(model):
    """The XTTS model inside a loaded ``TTS.api.TTS``, or None for any other kind of model."""
    tts_model = getattr(getattr(model, "synthesizer", None), "tts_model", None)
    config = getattr(tts_model, "config", None)
    return tts_model if getattr(config, "model", None) == "xtts" else None


def check_language(xtts, model_name: str, language: str) -> None:
    if language not in xtts.config.languages:
        raise InputError(f"{model_name} does not speak {language!r}; its languages: {', '.join(xtts.config.languages)}")
    if language in LANGUAGE_EXTRAS:
        module, extra, name = LANGUAGE_EXTRAS[language]
        if importlib.util.find_spec(module) is None:
            from importlib import metadata

            raise InputError(f"XTTS reads {name} text with {module}, which coqui-tts leaves to an extra: "
                             f'pip install "coqui-tts[{extra}]=={metadata.version("coqui-tts")}"')


def speakers(xtts) -> list[str]:
    manager = getattr(xtts, "speaker_manager", None)
    return list(manager.speakers) if manager is not None else []


def speak(xtts, model_name: str, text: str, language: str, speaker: str,
          reference_audio: str | None) -> tuple[np.ndarray, int]:
    """Float samples and their rate: ``text`` in ``language``, in the reference's voice or the speaker's."""
    check_language(xtts, model_name, language)
    if reference_audio is not None:
        gpt_latent, embedding = _voice_of(xtts, reference_audio)
    else:
        known = speakers(xtts)
        if speaker not in known:
            if not known:
                raise InputError(f"{model_name} has no built-in speakers: clone a voice (--clone-voice) instead")
            raise InputError(f"{model_name} has no speaker {speaker!r}; some of its speakers: {', '.join(known[:10])}")
        voice = xtts.speaker_manager.speakers[speaker]
        gpt_latent, embedding = voice["gpt_cond_latent"], voice["speaker_embedding"]
    settings = {name: xtts.config[name] for name in INFERENCE_SETTINGS}
    output = xtts.inference(text, language, gpt_latent, embedding, **settings)
    return np.asarray(output["wav"], dtype=np.float32).reshape(-1), int(xtts.config.audio.output_sample_rate)


def _voice_of(xtts, reference_audio: str):
    """XTTS's GPT conditioning latents and speaker embedding of the reference clip."""
    import torch

    from musetalk.speech import read_wav

    config = xtts.config
    samples, rate = read_wav(reference_audio)
    audio = torch.from_numpy(np.clip(samples[: int(rate * config.max_ref_len)], -1.0, 1.0).copy())[None]
    audio = audio.to(xtts.device)
    if config.sound_norm_refs:
        audio = audio / audio.abs().max() * 0.75
    logger.debug("XTTS voice from %s: %.1f s at %d Hz", reference_audio, audio.shape[-1] / rate, rate)
    with torch.inference_mode():
        gpt_latent = xtts.get_gpt_cond_latents(audio, rate, length=config.gpt_cond_len,
                                               chunk_length=config.gpt_cond_chunk_len)
        embedding = xtts.get_speaker_embedding(audio, rate)
    return gpt_latent, embedding
