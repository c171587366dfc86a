"""``musetalk bench --variants``: the model's own time per frame, as is and in the variants the GPU
path could take (keep only what pays: each is timed here before it is made part of the pipeline).

The models are the MuseTalk architectures with random weights (``full``: real sizes, the real cost;
``tiny``: the test models). Timed per frame of a batch: VAE encode (the masked and the reference crop
of each frame), UNet, VAE decode. Variants that change the picture (partial decode, tiny decoder) are
timed only: with random weights their quality cannot be judged.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from musetalk.batching import CPU_BATCH
from musetalk.errors import InputError

VARIANTS = ("baseline", "bf16", "channels_last", "classic_attention", "cudnn_benchmark", "partial_decode",
            "tiny_decoder", "compile")
# Partial decode: the latent rows below the mask's top (half of the 32 rows) and this many above it,
# which the decoder's convolutions need to draw the mask's top edge.
PARTIAL_DECODE_CONTEXT_ROWS = 4
LATENT_SIZE = 32
AUDIO_TOKENS = 50  # a frame's Whisper window: 10 steps of 5 layers


@dataclass
class VariantTiming:
    name: str
    vae_encode_ms: float | None  # per frame; None: the variant does not change this stage
    unet_ms: float | None
    vae_decode_ms: float | None
    note: str = ""


@dataclass
class VariantReport:
    model: str
    device: str
    dtype: str
    batch_size: int
    variants: list[VariantTiming]

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def time_variants(model: str = "full", device: str = "auto", dtype=None, batch_size: int = CPU_BATCH, repeats: int = 3,
                  with_compile: bool = False, progress: Callable[[str], None] | None = None) -> VariantReport:
    """Time every variant in ``VARIANTS`` (``compile`` only when ``with_compile``: minutes per model)."""
    from musetalk import models

    if model not in ("tiny", "full"):
        raise InputError(f"the variants are timed on the tiny or the full model, not {model!r}")
    if not 1 <= batch_size <= 256:
        raise InputError(f"--batch-size must be from 1 to 256 for --variants, not {batch_size}")
    torch_device = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(torch_device, dtype)
    unet, vae = _build_models(model, torch_device, torch_dtype)
    inputs = _inputs(unet, batch_size, torch_device, torch_dtype)
    timings = []
    for name in VARIANTS:
        if name == "compile" and not with_compile:
            continue
        if progress is not None:
            progress(name)
        timings.append(_time_variant(name, unet, vae, inputs, torch_device, torch_dtype, repeats))
    return VariantReport(model, str(torch_device), str(torch_dtype), batch_size, timings)


def _build_models(model: str, device, dtype):
    import torch
    from diffusers import AutoencoderKL

    from musetalk import testing
    from musetalk.models import build_unet, for_inference

    torch.manual_seed(0)
    if model == "full":
        unet_config, vae_config = testing.full_unet_config(), testing.model_config("sd-vae.json")
    else:
        unet_config, vae_config = testing.tiny_unet_config(), testing.TINY_VAE
    with device:  # random weights drawn where they will run (the full UNet takes 20 s on a CPU)
        unet = for_inference(build_unet(unet_config), device, dtype)
        return unet, for_inference(AutoencoderKL.from_config(vae_config), device, dtype)


def _inputs(unet, batch_size: int, device, dtype) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    crops = torch.rand(2 * batch_size, 3, 8 * LATENT_SIZE, 8 * LATENT_SIZE, generator=generator) * 2 - 1
    states = torch.randn(batch_size, 8, LATENT_SIZE, LATENT_SIZE, generator=generator)
    audio = torch.randn(batch_size, AUDIO_TOKENS, unet.config.cross_attention_dim, generator=generator)
    return {name: value.to(device, dtype) for name, value in
            (("crops", crops), ("states", states), ("audio", audio), ("latents", states[:, :4]))}


def _time_variant(name: str, unet, vae, inputs: dict, device, dtype, repeats: int) -> VariantTiming:
    import torch

    if name == "bf16" and (dtype == torch.bfloat16 or device.type == "cpu"):
        # On a CPU bf16 is emulated: the tiny models ran 3 to 7 times slower, the full ones far more.
        why = "the baseline is bf16 already" if dtype == torch.bfloat16 else "not timed on a CPU (no bf16 matrix units)"
        return VariantTiming(name, None, None, None, why)
    if name == "cudnn_benchmark" and device.type != "cuda":
        return VariantTiming(name, None, None, None, "not timed on a CPU (cuDNN is the GPU's convolution library)")
    batch = inputs["states"].shape[0]
    if name in ("partial_decode", "tiny_decoder"):
        decode, note = _decoder_variant(name, vae, inputs["latents"], device)
        return VariantTiming(name, None, None, _per_frame(decode, batch, device, repeats), note)
    unet, vae, inputs, note = _model_variant(name, unet, vae, inputs)
    timestep = torch.zeros((), dtype=torch.long, device=device)
    stages = (lambda: vae.encode(inputs["crops"]).latent_dist.mode(),
              lambda: unet(inputs["states"], timestep, encoder_hidden_states=inputs["audio"]).sample,
              lambda: vae.decode(inputs["latents"]).sample)
    benchmarking = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = name == "cudnn_benchmark"  # the warm-up call lets cuDNN try its kernels
    try:
        return VariantTiming(name, *(_per_frame(stage, batch, device, repeats) for stage in stages), note)
    finally:
        torch.backends.cudnn.benchmark = benchmarking


def _model_variant(name: str, unet, vae, inputs: dict) -> tuple:
    """(unet, vae, inputs, note) of a variant of the whole model: copies, the baseline's left as they are."""
    import torch

    from musetalk.engines.musetalk import compiled
    from musetalk.models import for_inference

    if name == "baseline":
        return unet, vae, inputs, ""
    if name == "cudnn_benchmark":  # the same models; only the library's kernel choice changes
        return unet, vae, inputs, "cuDNN times its convolution kernels per shape and keeps the fastest"
    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    if name == "bf16":
        device = inputs["states"].device
        return (for_inference(unet, device, torch.bfloat16), for_inference(vae, device, torch.bfloat16),
                {k: v.to(torch.bfloat16) for k, v in inputs.items()}, "")
    if name == "channels_last":
        inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in inputs.items()}
        return unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last), inputs, ""
    if name == "classic_attention":
        from diffusers.models.attention_processor import AttnProcessor

        for model in (unet, vae):
            model.set_attn_processor(AttnProcessor())
        return unet, vae, inputs, "attention as explicit matrix products, against the default (PyTorch's SDPA)"
    if name == "compile":  # as the engine compiles them
        vae.encoder, vae.decoder = compiled(vae.encoder), compiled(vae.decoder)
        return compiled(unet), vae, inputs, "inductor; compile time not counted"
    raise ValueError(f"unknown variant {name!r}")


def _decoder_variant(name: str, vae, latents, device) -> tuple[Callable[[], object], str]:
    """(the decode call, note) of a variant that changes only the decoder."""
    if name == "partial_decode":
        top = LATENT_SIZE // 2 - PARTIAL_DECODE_CONTEXT_ROWS
        rows = latents[:, :, top:].contiguous()
        return (lambda: vae.decode(rows).sample,
                f"latent rows {top}..{LATENT_SIZE - 1} only; inexact (the decoder's attention sees every row)")
    from diffusers import AutoencoderTiny

    from musetalk.models import for_inference

    tiny = for_inference(AutoencoderTiny(), device, latents.dtype)
    return (lambda: tiny.decode(latents).sample,
            "TAESD's decoder (its own weights, a separate download) in place of the VAE's")


def _per_frame(call: Callable[[], object], frames: int, device, repeats: int) -> float:
    """Milliseconds per frame of ``call`` on a batch of ``frames``: one warm-up call, then the mean of ``repeats``."""
    import torch

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        call()
        synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        synchronize()
    return round((time.perf_counter() - started) / repeats / frames * 1000, 3)


def format_variants(report: VariantReport) -> list[str]:
    lines = [f"model: {report.model} (random weights) on {report.device} ({report.dtype}), "
             f"batch size {report.batch_size}; milliseconds per frame",
             f"  {'variant':<19}{'VAE encode':>11}{'UNet':>9}{'VAE decode':>11}{'total':>9}  note"]
    base = report.variants[0]
    for variant in report.variants:
        stages = [variant.vae_encode_ms, variant.unet_ms, variant.vae_decode_ms]
        total = sum(value if value is not None else baseline
                    for value, baseline in zip(stages, (base.vae_encode_ms, base.unet_ms, base.vae_decode_ms)))
        shown = [f"{value:.2f}" if value is not None else "-" for value in stages]
        lines.append(f"  {variant.name:<19}{shown[0]:>11}{shown[1]:>9}{shown[2]:>11}{total:>9.2f}  {variant.note}")
    return lines
