"""What redraws the lower face, behind one small interface.

The pipeline owns files, faces, audio (decoding and the silence gate), masks, scheduling and
blending. An engine turns the speech into its own audio features, and 256x256 face crops
plus per-frame audio features into new 256x256 face crops:

- ``audio_features(wav, speech, events, timer, turn)``: features of the whole (silence-gated)
  16 kHz waveform, computed once beside the face analysis (MuseTalk: Whisper hidden states;
  the preview: mouth-shape curves). ``speech`` is what the silence gate kept (None when the
  gate is off); ``events`` are the word / phoneme timings of a speech source, when it gave any;
  ``turn()`` is a context each call into a model shared with other jobs runs inside (the
  pipeline's ``EngineTurns``: live sessions share the engine, and go first).
- ``frame_audio(features, positions, fps, options)``: the features of output frames
  ``positions`` as one batch (MuseTalk: each frame's window of Whisper steps).
- ``prepare(crops, landmarks, timer)``: per source frame state as a tensor ``[B, ...]``
  (MuseTalk: the masked and reference latents); ``landmarks`` are the 468 mesh points in crop
  pixels ``[B, 468, 2]``. The pipeline keeps the states on the CPU in the prepared avatar.
- ``generate(states, frame_audio, timer)``: new crops, uint8 ``[B, 256, 256, 3]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

import numpy as np

from musetalk.timing import StageTimer

if TYPE_CHECKING:
    import torch

    from musetalk.audio import SpeechSegments
    from musetalk.config import RunOptions

CROP_SIZE = 256
# What `--engine` accepts: the model; the model with TAESD's decoder (draft quality: decoding several
# times faster, less detail; it shares the prepared faces with the model's runs); the training-free
# preview that needs no weights.
ENGINES = ("musetalk", "draft", "preview")
MODEL_ENGINES = ("musetalk", "draft")  # the ones that run MuseTalk's weights


class Engine(Protocol):
    name: str
    # Identifies the weights and number format behind prepare(); None: its states are not cached.
    cache_id: str | None

    def audio_features(self, wav: np.ndarray, speech: SpeechSegments | None, events: Sequence,
                       timer: StageTimer, turn: Callable[[], ContextManager] = nullcontext) -> Any: ...

    def frame_audio(self, features: Any, positions: np.ndarray, fps: float, options: RunOptions) -> np.ndarray: ...

    def prepare(self, crops: np.ndarray, landmarks: np.ndarray, timer: StageTimer) -> torch.Tensor: ...

    def generate(self, states: torch.Tensor, frame_audio: np.ndarray, timer: StageTimer) -> np.ndarray: ...
