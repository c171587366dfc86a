"""What redraws the lower face, behind one small interface.

The pipeline owns files, faces, audio, masks, scheduling and blending. An engine only
turns 256x256 face crops plus per-frame audio features into new 256x256 face crops, in
two calls so the per-source-frame work can be cached and reused:

- ``prepare(crops, timer)``: per source frame state as a tensor ``[B, ...]`` (MuseTalk: the
  masked and reference latents); the pipeline keeps it on the CPU in the prepared avatar.
- ``generate(states, audio_features, timer)``: new crops, uint8 ``[B, 256, 256, 3]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from musetalk.timing import StageTimer

if TYPE_CHECKING:
    import torch

CROP_SIZE = 256


class Engine(Protocol):
    name: str
    # Identifies the weights and number format behind prepare(); None: its states are not cached.
    cache_id: str | None

    def prepare(self, crops: np.ndarray, timer: StageTimer) -> torch.Tensor: ...

    def generate(self, states: torch.Tensor, audio_features: np.ndarray, timer: StageTimer) -> np.ndarray: ...


class IdentityEngine:
    """Gives the crops back unchanged: measures what the pipeline itself (crop, resize, blend,
    encode) loses, with no model in the way."""

    name = "identity"
    cache_id = None

    def prepare(self, crops: np.ndarray, timer: StageTimer) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(crops))

    def generate(self, states: torch.Tensor, audio_features: np.ndarray, timer: StageTimer) -> np.ndarray:
        return states.numpy()
