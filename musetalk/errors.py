"""Typed errors. Each message says what went wrong and what the person can do about it.

The command line prints ``str(error)`` as one line; the app shows it as it is.
"""


class MuseTalkError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(MuseTalkError, ValueError):
    """A file or an option given by the user cannot be used (wrong kind, corrupt, out of range)."""


class NoFaceError(MuseTalkError):
    """No face was found in any frame of the video (or in the photo)."""


class WeightsMissingError(MuseTalkError, FileNotFoundError):
    """Checkpoint files are missing or corrupt; the message names each file and the command that fetches it."""


class WeightsMismatchError(MuseTalkError):
    """A checkpoint does not fit the model built from its config (wrong or missing keys)."""


class DiskSpaceError(MuseTalkError, OSError):
    """The output folder lacks the space a job needs; the message says how much and where."""


class FFmpegError(MuseTalkError):
    """ffmpeg is missing or failed on a file; the message carries the tail of its log."""


class GPUMemoryError(MuseTalkError, MemoryError):
    """The GPU cannot hold the model's work for even one frame; the message says what to do."""


class ClusterError(MuseTalkError):
    """A batch on a Ray cluster cannot run: Ray is missing, the cluster is unreachable or has no room for a worker."""


class LiveError(MuseTalkError):
    """A live session was used wrongly (audio after close, a full buffer) or its generation failed."""
