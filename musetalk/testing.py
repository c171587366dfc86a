"""Small models of the real classes, saved in the official on-disk layout.

Tests and ``musetalk bench --model tiny|full`` use them: the files go through the same
loading code as the downloaded weights, so the loader is what gets tested. The weights are
random; the outputs are meaningless pictures of the right size, which is all a test of the
plumbing needs.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

# The official UNet config (facts section 1), shipped so the full-size architecture can be built
# without downloading anything.
FULL_UNET_CONFIG = "musetalk.json"

# The tiny models are as cheap as their classes allow, so that `musetalk bench --model tiny`
# measures the pipeline around the model rather than the model (on 2 CPU cores, VAE encode of
# both crops + UNet + VAE decode: 24 ms a frame, against 54 ms for the previous, wider ones).
TINY_UNET = {
    # diffusers reads attention_head_dim as the number of heads (a legacy name): one head, and
    # 8 groups, as small as the blocks allow. Self-attention over the 32x32 latent (1024 tokens)
    # cost more than the rest of the UNet, so the outer level has plain blocks; the inner levels
    # keep the cross attention to the audio, so the real model's attention code still runs.
    "attention_head_dim": 1,
    "block_out_channels": [8, 8, 8, 16],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 32,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [1, 1, 1, 1],  # the 256x256 convolutions dominate: one channel
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 1,
    "sample_size": 256,
}
TINY_WHISPER = {
    "d_model": 384,  # the audio token width the UNet's cross attention expects
    "encoder_layers": 4,  # 5 hidden states, as whisper-tiny
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 64,
    "decoder_layers": 1,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 32,
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
}


def model_config(name: str) -> dict:
    """A config shipped in ``musetalk.model_configs`` (the official models' own, so full-size
    architectures can be built without downloading anything)."""
    return json.loads(resources.files("musetalk.model_configs").joinpath(name).read_text())


def full_unet_config() -> dict:
    return model_config(FULL_UNET_CONFIG)


def tiny_unet_config() -> dict:
    return {**full_unet_config(), **TINY_UNET}


def fill_seeded(module, seed: int) -> None:
    """Overwrite every floating-point weight of ``module`` with values drawn from numpy's generator, key
    by key: the same weights on every version of torch, diffusers and transformers (whose own
    initialisers change), so golden outputs made once stay valid. Matrices and kernels are normal
    with a 1/sqrt(fan-in) spread, norm scales near 1, biases and other vectors small."""
    import zlib

    import numpy as np
    import torch

    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key]
        if not tensor.is_floating_point():
            continue
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        shape = tuple(tensor.shape)
        if len(shape) >= 2:
            values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif key.endswith(".weight"):  # a vector of weights is a norm's scale in these models
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            values = 0.05 * rng.standard_normal(shape)
        state[key] = torch.from_numpy(values.astype(np.float32))
    module.load_state_dict(state)


def weights_digest(models_dir: Path) -> str:
    """sha256 over every weight file under ``models_dir`` (their keys and values, not their bytes, which
    carry the saving library's metadata): says whether two builds hold the same weights."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for path in sorted(Path(models_dir).rglob("*")):
        if path.suffix not in (".pth", ".bin", ".safetensors"):
            continue
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        digest.update(str(path.relative_to(models_dir)).encode())
        for key, tensor in sorted(state.items()):
            digest.update(key.encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_unet(models_dir: Path, config: dict, version: str = "v15", seed: int = 0, seeded: bool = False) -> Path:
    """A UNet with random weights as ``musetalkV15/{musetalk.json, unet.pth}`` (or v1's names);
    ``seeded``: the weights of ``fill_seeded`` instead of torch's initialisers."""
    import torch

    from musetalk.models import build_unet

    folder, weights_name = ("musetalkV15", "unet.pth") if version == "v15" else ("musetalk", "pytorch_model.bin")
    target = Path(models_dir) / folder
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = build_unet(config)
    if seeded:
        fill_seeded(unet, seed)
    (target / "musetalk.json").write_text(json.dumps(config, indent=2))
    torch.save(unet.state_dict(), target / weights_name)
    return target


def save_vae(models_dir: Path, config: dict | None = None, seed: int = 0, seeded: bool = False) -> Path:
    """An AutoencoderKL as ``sd-vae/{config.json, diffusion_pytorch_model.bin}``, its mid-block
    attention saved under the old key names (query/key/value/proj_attn) as sd-vae-ft-mse's file is."""
    import torch
    from diffusers import AutoencoderKL

    target = Path(models_dir) / "sd-vae"
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(config or TINY_VAE))
    if seeded:
        fill_seeded(vae, seed)
    vae.save_pretrained(target, safe_serialization=False)
    weights_path = target / "diffusion_pytorch_model.bin"
    state = torch.load(weights_path, weights_only=True)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old_style = {}
    for key, value in state.items():
        for new, old in renames.items():
            if "mid_block.attentions" in key and new in key:
                key = key.replace(new, old)
        old_style[key] = value
    torch.save(old_style, weights_path)
    return target


def save_whisper(models_dir: Path, config: dict | None = None, seed: int = 0, seeded: bool = False) -> Path:
    """A whisper model saved whole (encoder and decoder, keys prefixed ``model.``) as
    openai/whisper-tiny is, with its feature extractor, as ``whisper/``."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    target = Path(models_dir) / "whisper"
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**(config or TINY_WHISPER)))
    if seeded:
        fill_seeded(model, seed)
    model.save_pretrained(target)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(target)
    return target


TINY_TAESD = {
    "encoder_block_out_channels": [4, 4, 4, 4],
    "decoder_block_out_channels": [4, 4, 4, 4],
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
}


def save_taesd(models_dir: Path, config: dict | None = None, seed: int = 0) -> Path:
    """An AutoencoderTiny as ``taesd/{config.json, diffusion_pytorch_model.safetensors}``, as madebyollin/taesd is."""
    import torch
    from diffusers import AutoencoderTiny

    target = Path(models_dir) / "taesd"
    torch.manual_seed(seed)
    AutoencoderTiny(**(config or TINY_TAESD)).save_pretrained(target)
    return target


def save_tiny_models(models_dir: Path, versions: tuple[str, ...] = ("v15", "v1")) -> Path:
    """Every file the pipeline loads, at tiny sizes, in the official layout under ``models_dir``."""
    models_dir = Path(models_dir)
    for index, version in enumerate(versions):
        save_unet(models_dir, tiny_unet_config(), version, seed=index)
    save_vae(models_dir)
    save_whisper(models_dir)
    return models_dir


# ----------------------------------------------------------------------- parity with the official code
# The models the golden outputs of the official MuseTalk code were made with (tests/test_parity.py,
# scripts/parity/): the official architectures at small widths, every block type kept (the UNet's
# self-attention at 32x32 included, several channels per GroupNorm group in the VAE, so that a
# layout's precision shows), and whisper-tiny's own encoder. Weights from ``fill_seeded``.
PARITY_UNET = {
    "block_out_channels": [16, 16, 32, 32],
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 32,
}
PARITY_VAE = {
    "block_out_channels": [16, 16, 32, 32],
    "norm_num_groups": 8,
    "layers_per_block": 1,
}
# whisper-tiny's encoder; the decoder (never used) as small as its class allows.
PARITY_WHISPER_DECODER = {key: TINY_WHISPER[key] for key in (
    "decoder_layers", "decoder_attention_heads", "decoder_ffn_dim", "max_target_positions", "vocab_size",
    "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "suppress_tokens",
    "begin_suppress_tokens")}
PARITY_SEEDS = {"v15": 15, "v1": 10, "vae": 1, "whisper": 2}


def parity_configs() -> dict:
    """The configs of the parity models: {"unet", "vae", "whisper"}."""
    return {
        "unet": {**full_unet_config(), **PARITY_UNET},
        "vae": {**model_config("sd-vae.json"), **PARITY_VAE},
        "whisper": {**model_config("whisper-tiny.json"), **PARITY_WHISPER_DECODER},
    }


def save_parity_models(models_dir: Path) -> Path:
    """The parity models in the official layout (both UNet versions, VAE, whisper) under ``models_dir``."""
    models_dir = Path(models_dir)
    configs = parity_configs()
    for version in ("v15", "v1"):
        save_unet(models_dir, configs["unet"], version, seed=PARITY_SEEDS[version], seeded=True)
    vae_config = {key: value for key, value in configs["vae"].items() if not key.startswith("_")}
    save_vae(models_dir, vae_config, seed=PARITY_SEEDS["vae"], seeded=True)
    save_whisper(models_dir, configs["whisper"], seed=PARITY_SEEDS["whisper"], seeded=True)
    return models_dir
