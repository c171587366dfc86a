"""How many frames go through the model in one call.

Asked for ("batch_size": N), it is N. Left to the job (None), it is ``CPU_BATCH`` on a CPU, where
larger batches run no faster; on a GPU the first batch is run at ``CPU_BATCH`` frames while the
memory it takes is measured, and the rest at as many frames as a share of the GPU's free memory
holds, up to ``MAX_AUTO_BATCH``. Either way, a batch that runs the GPU out of memory is run again
in halves and the job goes on at the smaller size (another program may have taken memory since).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CPU_BATCH = 8  # also the first, measured, batch on a GPU
MAX_AUTO_BATCH = 64  # more gains a GPU little, and the first frames wait longer to be written
# Of the GPU memory free beside the models, what batches may take (the rest: other programs, fragmentation).
MEMORY_SHARE = 0.7


def fitting_batch_size(free_bytes: int, bytes_per_frame: float) -> int:
    """The most frames whose model work fits ``MEMORY_SHARE`` of ``free_bytes``, rounded down to a power of
    two (1 .. MAX_AUTO_BATCH): GPU kernels are tuned for such sizes, and a compiled model then needs no
    padding but in the last batch."""
    frames = int(free_bytes * MEMORY_SHARE // max(bytes_per_frame, 1.0))
    frames = max(1, min(MAX_AUTO_BATCH, frames))
    return 1 << (frames.bit_length() - 1)


class BatchSize:
    """The batch size of one job: ``size`` now; ``measure`` the first batch's memory (automatic size on a
    GPU only); ``halve`` after the GPU ran out of memory."""

    def __init__(self, requested: int | None, device=None):
        self.size = requested or CPU_BATCH
        self._measure = requested is None and getattr(device, "type", None) == "cuda"
        self._device = device
        self._memory_before = 0

    def before_batch(self) -> None:
        """Start measuring the memory of the next batch (the first one, when the size is automatic)."""
        if self._measure:
            import torch

            torch.cuda.reset_peak_memory_stats(self._device)
            self._memory_before = torch.cuda.memory_allocated(self._device)

    def after_batch(self, frames_redrawn: int) -> None:
        """Size the rest of the job from what the batch took (once, and only for a batch that ran the model)."""
        if not self._measure or frames_redrawn == 0:
            return
        import torch

        self._measure = False
        per_frame = (torch.cuda.max_memory_allocated(self._device) - self._memory_before) / frames_redrawn
        free, _ = torch.cuda.mem_get_info(self._device)
        # Memory torch holds but does not use is free for the next batches too.
        free += torch.cuda.memory_reserved(self._device) - torch.cuda.memory_allocated(self._device)
        self.size = fitting_batch_size(free, per_frame)
        logger.info("batch size %d: %.0f MB of GPU memory a frame, %.0f MB free", self.size, per_frame / 2**20,
                    free / 2**20)

    def halve(self, failed: int) -> None:
        """A batch of ``failed`` frames ran out of memory: the next ones take at most half as many."""
        self._measure = False
        self.size = max(1, min(self.size, failed // 2))
        logger.warning("the GPU ran out of memory with %d frames per model call; going on with %d", failed, self.size)
