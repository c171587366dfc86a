"""What redraws the lower face, behind one small interface.

The pipeline owns files, faces, audio, masks, scheduling and blending. An engine only
turns 256x256 face crops plus per-frame audio features into new 256x256 face crops, in
two calls so the per-source-frame work can be cached and reused:

- ``prepare(crops)``: per source frame state (MuseTalk: the masked and reference latents),
  returned as a sequence with one item per crop.
- ``generate(states, audio_features, timer)``: new crops, uint8 ``[B, 256, 256, 3]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from musetalk.timing import StageTimer

CROP_SIZE = 256


class Engine(Protocol):
    name: str

    def prepare(self, crops: np.ndarray, timer: StageTimer) -> Sequence[Any]: ...

    def generate(self, states: Sequence[Any], audio_features: np.ndarray, timer: StageTimer) -> np.ndarray: ...


class IdentityEngine:
    """Gives the crops back unchanged: measures what the pipeline itself (crop, resize, blend,
    encode) loses, with no model in the way."""

    name = "identity"

    def prepare(self, crops: np.ndarray, timer: StageTimer) -> list[np.ndarray]:
        return list(crops)

    def generate(self, states: Sequence[np.ndarray], audio_features: np.ndarray, timer: StageTimer) -> np.ndarray:
        return np.stack(states)
