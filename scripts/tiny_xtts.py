"""A tiny random XTTS model in XTTS's own on-disk layout, for testing the Coqui plugin offline.

    scripts/coqui-env python scripts/tiny_xtts.py FOLDER [--seed N]

writes FOLDER/config.json, model.pth, vocab.json and speakers_xtts.pth, the files of Coqui's
XTTS-v2 release, so ``--tts-option model=FOLDER`` loads it through coqui-tts's normal path. The
model is built from ``XttsConfig`` at the smallest sizes its classes accept: a GPT of one layer,
four channels and one head (0.03 M parameters), speaking at most 24 audio tokens (1.1 s) per
sentence. XTTS builds its HiFi-GAN decoder (512 channels in, 14.2 M parameters) and its ResNet
speaker encoder (512-dimensional embeddings, 8.0 M) at fixed sizes that its config cannot change,
so those two are XTTS-v2's own: 22.2 M parameters in all, an 89 MB model.pth, made in about 6 s.
The weights are random (seeded): it speaks noise, at XTTS-v2's rate and format. Nothing here is
committed; the Coqui tests make it when they run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("tiny_xtts")

# The speakers the tiny model offers without a reference (XTTS-v2 ships 58; the plugin's default is the first).
SPEAKERS = ("Ana Florence", "Claribel Dervla")
# Characters the tokenizer knows, one token each (XTTS-v2's vocabulary has 6681 BPE tokens); others become [UNK].
LETTERS = "abcdefghijklmnopqrstuvwxyzäöüßàâçéèêëîïôùûñáíóúãõąćęłńśźżčďěňřšťůž0123456789.,!?'-:;"
SPECIAL = ["[STOP]", "[UNK]", "[SPACE]", "[START]"]
# The smallest GPT that XTTS's classes accept and run (two channels fail an assertion while speaking).
GPT_LAYERS, GPT_CHANNELS, GPT_HEADS = 1, 4, 1
# XTTS speaks at most this less 3 audio tokens per sentence (24 of 1024 samples at 22.05 kHz: 1.1 s);
# a random GPT seldom picks its stop token earlier.
GPT_MAX_AUDIO_TOKENS = 27


def make_tiny_xtts(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model into ``folder`` (created if needed) and return it."""
    import torch
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = XttsConfig()
    vocab = _write_vocab(folder / "vocab.json", config.languages)
    args = config.model_args
    args.gpt_layers, args.gpt_n_model_channels, args.gpt_n_heads = GPT_LAYERS, GPT_CHANNELS, GPT_HEADS
    args.decoder_input_dim = GPT_CHANNELS  # the HiFi-GAN reads the GPT's latents
    args.gpt_max_audio_tokens = GPT_MAX_AUDIO_TOKENS
    args.gpt_use_perceiver_resampler = True  # XTTS-v2's conditioning (v1 had none)
    # XTTS-v2's audio token layout: 1024 codes, then start and stop.
    args.gpt_num_audio_tokens, args.gpt_start_audio_token, args.gpt_stop_audio_token = 1026, 1024, 1025
    args.gpt_number_text_tokens = len(vocab)
    args.gpt_start_text_token, args.gpt_stop_text_token = vocab["[START]"], vocab["[STOP]"]
    # The keys of a model before its inference set-up, as XTTS-v2's model.pth holds them.
    torch.save({"model": Xtts(config).state_dict()}, folder / "model.pth")
    config.save_json(str(folder / "config.json"))
    _write_speakers(folder / "speakers_xtts.pth", folder, config, seed)
    return folder


def _write_vocab(path: Path, languages: list[str]) -> dict[str, int]:
    """A tokenizers BPE file like XTTS-v2's vocab.json: specials, language tags, characters, no merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = SPECIAL + [f"[{language}]" for language in languages] + list(dict.fromkeys(LETTERS))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL + [f"[{language}]" for language in languages])
    tokenizer.save(str(path))
    return vocab


def _write_speakers(path: Path, folder: Path, config, seed: int) -> None:
    """speakers_xtts.pth: each built-in speaker's GPT latents and embedding, from seeded noise through the model."""
    import torch
    from TTS.tts.models.xtts import Xtts

    model = Xtts(config)
    model.load_checkpoint(config, checkpoint_dir=str(folder), eval=True, speaker_file_path=str(folder / "none"))
    generator = torch.Generator().manual_seed(seed + 1)
    speakers = {}
    for name in SPEAKERS:
        noise = 0.1 * torch.randn(1, 22050 * 3, generator=generator)
        speakers[name] = {"gpt_cond_latent": model.get_gpt_cond_latents(noise, 22050),
                          "speaker_embedding": model.get_speaker_embedding(noise, 22050)}
    torch.save(speakers, path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    folder = make_tiny_xtts(arguments.folder, arguments.seed)
    files = ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in sorted(folder.iterdir()))
    logger.info("tiny XTTS model in %s: %s", folder, files)


if __name__ == "__main__":
    main()
