"""The MuseTalk models, each built from its own config file and loaded with its weights.

- UNet: ``diffusers.UNet2DConditionModel`` from ``musetalk.json`` plus a plain state dict,
  loaded strictly and without unpickling objects (``weights_only=True``).
- VAE: ``diffusers.AutoencoderKL.from_pretrained`` (it renames the old attention keys itself).
- Draft decoder (optional): TAESD, ``diffusers.AutoencoderTiny.from_pretrained``.
- Whisper: see ``musetalk.audio.WhisperAudioEncoder``.

torch and diffusers are imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from musetalk.errors import InputError, WeightsMismatchError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable device is an InputError."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise InputError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), not {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but CUDA is not available here; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("device mps was asked for but MPS is not available here; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA by default (as the official real-time script), fp32 elsewhere."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise InputError(f"dtype must be one of auto, fp16, bf16, fp32, not {dtype!r}")
    return names[dtype]


def read_unet_config(config_path: Path) -> dict:
    try:
        return json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as error:
        raise WeightsMismatchError(f"cannot read the UNet config {config_path}: {error}") from error


def build_unet(config: dict):
    """A ``UNet2DConditionModel`` from a MuseTalk ``musetalk.json`` dict (random weights)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def load_state_dict(weights_path: Path) -> dict:
    """A plain tensor state dict; memory-mapped so the 3.4 GB file is not read twice."""
    import torch

    state = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # some re-saved checkpoints wrap the dict
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"{weights_path} does not hold a state dict (found {type(state).__name__})")
    return state


def check_state_dict(model, state: dict, source: Path) -> None:
    """Raise WeightsMismatchError naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        raise WeightsMismatchError(
            f"{source} does not fit the UNet built from its config: {'; '.join(parts)}. "
            "Check that the weights and musetalk.json come from the same MuseTalk version."
        )


def load_unet(config_path: Path, weights_path: Path, device, dtype):
    """The MuseTalk UNet, built from its JSON and loaded strictly from its state dict."""
    import torch

    # Built on the meta device: no memory and no random init for 850 M parameters that the
    # checkpoint replaces at once; assign=True adopts the (memory-mapped) checkpoint tensors.
    with torch.device("meta"):
        model = build_unet(read_unet_config(config_path))
    state = load_state_dict(weights_path)
    check_state_dict(model, state, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    return for_inference(model, device, dtype)


def load_vae(vae_dir: Path, device, dtype):
    """The sd-vae-ft-mse autoencoder from its folder (config.json + weights)."""
    from diffusers import AutoencoderKL

    return for_inference(_from_folder(AutoencoderKL, vae_dir), device, dtype)


def load_draft_decoder(taesd_dir: Path, device, dtype):
    """TAESD (``diffusers.AutoencoderTiny``): a distilled decoder of the same latents, for the draft quality."""
    from diffusers import AutoencoderTiny

    # diffusers saves AutoencoderTiny's config with a block_out_channels entry its loader then warns about.
    config_logger = logging.getLogger("diffusers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        tiny = _from_folder(AutoencoderTiny, taesd_dir)
    finally:
        config_logger.setLevel(level)
    return for_inference(tiny, device, dtype)


def _from_folder(model_class, folder: Path):
    """A diffusers model from its folder (config.json + weights), nothing fetched."""
    # Say which file to read: left to guess, diffusers logs an error for the format it did not find.
    use_safetensors = (Path(folder) / "diffusion_pytorch_model.safetensors").is_file()
    # low_cpu_mem_usage=False: said outright, diffusers does not warn that accelerate is missing (these
    # models, 320 MB at most, do not need it).
    return model_class.from_pretrained(str(folder), local_files_only=True, use_safetensors=use_safetensors,
                                       low_cpu_mem_usage=False)


def for_inference(model, device, dtype):
    """``model`` on ``device`` in ``dtype``, in eval mode, without gradients. torch's own ``Module.to``:
    diffusers' override warns on every cast about modules to keep in float32, even when it has none."""
    import torch

    return torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)


def vae_scaling_factor(vae) -> float:
    """0.18215 for sd-vae-ft-mse; its config does not say so, and diffusers' default is that value."""
    return float(getattr(vae.config, "scaling_factor", None) or 0.18215)


def positional_encoding(d_model: int, length: int):
    """The fixed sinusoidal encoding added to the audio tokens: [length, d_model] float32.

    sin on even channels, cos on odd ones, frequencies exp(-ln(10000) * 2k / d_model).
    """
    import torch

    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequencies = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    encoding = torch.zeros(length, d_model)
    encoding[:, 0::2] = torch.sin(position * frequencies)
    encoding[:, 1::2] = torch.cos(position * frequencies[: d_model // 2])
    return encoding
