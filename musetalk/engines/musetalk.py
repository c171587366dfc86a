"""The MuseTalk engine: Whisper features per frame, VAE encode, one UNet step at t=0, VAE decode
(facts sections 2 and 3)."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np

from musetalk import audio as audio_lib
from musetalk.engines import CROP_SIZE
from musetalk.models import positional_encoding, vae_scaling_factor
from musetalk.timing import StageTimer

logger = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile's code generator (the tests use a quicker one)


def compiled(module):
    """``torch.compile`` of a model (the UNet, a half of the VAE, TAESD's decoder). Each compiles at its
    first call (a minute or more per batch shape), so it pays for long videos and for a server that keeps
    the pipeline. Shapes are fixed (no dynamic-shape kernels): batches are padded to a power of two
    (``MuseTalkEngine._padded``)."""
    import torch

    return torch.compile(module, dynamic=False, backend=COMPILE_BACKEND)


class MuseTalkEngine:
    name = "musetalk"

    def __init__(self, unet, vae, audio_encoder: audio_lib.WhisperAudioEncoder, device, dtype,
                 cache_id: str | None = None, compile: bool = False, draft_decoder=None):
        import torch

        self.unet = unet
        self.vae = vae
        self.audio_encoder = audio_encoder
        self.device = device
        self.dtype = dtype
        self.scaling_factor = vae_scaling_factor(vae)
        self.cache_id = cache_id  # the draft decoder changes no prepared state: the cache is shared
        # What decodes the UNet's latents: the VAE, or TAESD for the draft quality (``with_draft_decoder``).
        # TAESD takes the scaled latents as they are (its config's scaling factor is 1).
        self.draft_decoder = draft_decoder
        self.name = "musetalk" if draft_decoder is None else "draft"
        self.decoder = draft_decoder or vae
        self.decode_scale = vae_scaling_factor(self.decoder)
        self._torch = torch
        self._encodings: dict[int, object] = {}
        self.compiled = compile
        if compile:
            self.unet = compiled(unet)
            vae.encoder, vae.decoder = compiled(vae.encoder), compiled(vae.decoder)

    def with_draft_decoder(self, draft_decoder) -> MuseTalkEngine:
        """An engine on these same models that decodes with TAESD (the draft quality): the UNet, VAE and
        Whisper are shared, not loaded (or compiled) again."""
        engine = MuseTalkEngine(self.unet, self.vae, self.audio_encoder, self.device, self.dtype, self.cache_id,
                                draft_decoder=draft_decoder)
        if self.compiled:
            engine.compiled = True
            draft_decoder.decoder = compiled(draft_decoder.decoder)
        return engine

    def _padded(self, tensor):
        """Compiled models only: the batch repeated at its end up to a power of two, so that the few
        batch sizes a job uses (its size, halves of it, a shorter last batch) compile once each."""
        count = tensor.shape[0]
        if not self.compiled or count & (count - 1) == 0:
            return tensor
        extra = (1 << count.bit_length()) - count
        return self._torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])])

    def audio_features(self, wav: np.ndarray, speech, events=(), timer: StageTimer | None = None,
                       turn=nullcontext) -> np.ndarray:
        """Whisper hidden states [T, L, D] of the (silence-gated) waveform; timings are not used. Each encoder
        batch runs in a ``turn()`` (a long audio is many batches: a live session's go between them)."""
        with (timer or StageTimer()).stage("whisper", device=True):
            return self.audio_encoder.encode(wav, turn)

    def frame_audio(self, features: np.ndarray, positions: np.ndarray, fps: float, options) -> np.ndarray:
        """Each output frame's window of Whisper steps: [B, W * L, D] (facts section 3)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return np.zeros((0, 0, features.shape[-1]), np.float32)
        windows = audio_lib.chunk_indices(int(positions.max()) + 1, fps, options.version, options.audio_padding_left,
                                          options.audio_padding_right, num_steps=len(features))
        return audio_lib.frame_features(features, windows[positions])

    def _positional_encoding(self, length: int):
        if length not in self._encodings:
            d_model = self.unet.config.cross_attention_dim
            self._encodings[length] = positional_encoding(d_model, length).to(self.device, self.dtype)
        return self._encodings[length]

    def _to_tensor(self, crops: np.ndarray):
        """uint8 [B, 256, 256, 3] -> float [B, 3, 256, 256] in [-1, 1] on the device, contiguous NCHW.

        ``.contiguous()`` matters: the permuted view is channels-last in memory, and torch's CPU
        GroupNorm kernel for that layout loses precision (latents off by up to 6e-4 instead of 6e-7
        against a float64 reference; up to 11 uint8 levels after the decoder)."""
        pixels = self._torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        scaled = (pixels.permute(0, 3, 1, 2).contiguous().float() / 255.0 - 0.5) / 0.5  # as the official, in fp32
        return scaled.to(self.dtype)

    def prepare(self, crops: np.ndarray, landmarks: np.ndarray, timer: StageTimer):
        """Per crop: cat(masked latent, reference latent) -> [B, 8, 32, 32] (the landmarks are not used)."""
        count = len(crops)
        with timer.stage("vae_encode", device=True), self._torch.inference_mode():
            reference = self._padded(self._to_tensor(crops))
            masked = reference.clone()
            masked[:, :, CROP_SIZE // 2 :, :] = -1.0  # the lower half black, as in training
            # One batch for both halves: half the kernel launches of two calls.
            posterior = self.vae.encode(self._torch.cat([masked, reference])).latent_dist
            latents = posterior.mode() * self.scaling_factor
            masked_latents, reference_latents = latents.chunk(2)
            return self._torch.cat([masked_latents, reference_latents], dim=1)[:count]

    def generate(self, states, frame_audio: np.ndarray, timer: StageTimer) -> np.ndarray:
        """New face crops, uint8 [B, 256, 256, 3], for prepared states and their frames' audio windows."""
        with self._torch.inference_mode():
            with timer.stage("unet", device=True):
                predicted = self.predict_latents(states, frame_audio)
            with timer.stage("vae_decode", device=True):
                return self.decode(predicted)[: len(states)]

    def predict_latents(self, states, frame_audio: np.ndarray):
        """One UNet step at t=0: [B, 8, 32, 32] states and [B, W * L, D] audio -> [B', 4, 32, 32] latents
        (B' >= B: compiled models see a padded batch)."""
        torch = self._torch
        latents = self._padded(states.to(self.device, self.dtype))
        audio = self._padded(torch.from_numpy(frame_audio).to(self.device, self.dtype))
        audio = audio + self._positional_encoding(audio.shape[1])
        timestep = torch.zeros((), device=self.device, dtype=torch.long)
        return self.unet(latents, timestep, encoder_hidden_states=audio).sample

    def decode(self, latents) -> np.ndarray:
        """UNet latents -> uint8 RGB crops [B, 256, 256, 3], with the official arithmetic step for step
        (so that rounding ties fall the same way)."""
        faces = self.decoder.decode((1 / self.decode_scale) * latents).sample
        faces = (faces / 2 + 0.5).clamp(0, 1).float() * 255
        return faces.round().to(self._torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
