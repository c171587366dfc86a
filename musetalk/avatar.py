"""Per-video preparation (face track, crop boxes, engine latents) and its on-disk cache.

Dubbing the same video again with other audio, a comparison of several voices, or the app's
second click all reuse the prepared avatar: face analysis and VAE encoding are skipped.

An entry lives in ``<cache>/<key>/``: ``faces.npz`` (landmarks, face flags, boxes),
``meta.json``, and one ``states-<engine id>.safetensors`` per engine that prepared frames.
The key hashes the video's bytes and every option that changes the faces (version, margins,
face choice, smoothing, frame rate); the engine id covers the weights and dtype, so a stale
entry can never be used. Masks are not stored: they take well under a millisecond per frame
from the landmarks, and leaving them out lets mask options change without a miss.
Entries are written under a temporary name and renamed, and the least recently used ones
are removed when the cache grows past its limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musetalk.config import RunOptions
from musetalk.face import FaceTrack
from musetalk.weights import user_cache_root

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "MUSETALK_CACHE_DIR"
CACHE_LIMIT_ENV = "MUSETALK_CACHE_LIMIT_MB"
DEFAULT_LIMIT_MB = 2048
FORMAT_VERSION = 1  # bump when what an entry holds changes meaning
# A staging folder or temporary file this old belongs to a process that was killed mid-save.
STALE_SECONDS = 3600

# Options that change the face track or the crop boxes (and so the crops the engine encodes);
# max_pixels sets the size a large video is analysed at.
FACE_OPTIONS = ("version", "extra_margin", "bbox_shift", "face_index", "smoothing", "max_pixels")


@dataclass
class FaceFrame:
    """One source frame on its way to the engine, with its face (None where there is none to redraw)."""

    index: int  # source frame
    frame: np.ndarray  # RGB uint8 [H, W, 3]
    landmarks: np.ndarray | None  # [468, 2] float32 frame pixels, smoothed
    box: np.ndarray | None  # crop box (x1, y1, x2, y2)
    crop: np.ndarray | None = None  # the model's 256x256 input, cut ahead of time where the engine will need it


@dataclass
class Avatar:
    """What is known about each source frame of one video."""

    key: str
    track: FaceTrack
    boxes: np.ndarray  # [N, 4] int32 crop boxes, -1 rows where there is no face
    usable: np.ndarray  # [N] bool: the engine redraws these frames
    # Engine states (CPU tensors) of the source frames prepared so far, by source frame.
    states: dict = field(default_factory=dict)
    states_changed: bool = False  # new states were added since the avatar was loaded

    def __len__(self) -> int:
        return len(self.track)

    def face_frame(self, source: int, frame: np.ndarray) -> FaceFrame:
        if not self.usable[source]:
            return FaceFrame(source, frame, None, None)
        return FaceFrame(source, frame, self.track.landmarks[source], self.boxes[source])


def file_hash(path: str | os.PathLike) -> str:
    """blake2b of the file's bytes: a renamed or touched copy still hits, an edited one never does."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def avatar_key(video_hash: str, fps: float, options: RunOptions) -> str:
    described = {name: getattr(options, name) for name in FACE_OPTIONS}
    described.update(video=video_hash, fps=round(float(fps), 6), format=FORMAT_VERSION)
    return hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=16).hexdigest()


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else user_cache_root() / "avatars"


def default_limit_bytes() -> int:
    return int(float(os.environ.get(CACHE_LIMIT_ENV, DEFAULT_LIMIT_MB)) * 1024 * 1024)


@dataclass(frozen=True)
class CacheEntry:
    key: str
    size: int  # bytes on disk
    last_used: float  # seconds since the epoch
    video: str  # the path the video had when the entry was made
    frames: int


class AvatarCache:
    def __init__(self, root: str | os.PathLike | None = None, limit_bytes: int | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.limit_bytes = default_limit_bytes() if limit_bytes is None else int(limit_bytes)

    # ------------------------------------------------------------------ reading

    def load(self, key: str, engine_id: str | None) -> Avatar | None:
        """The cached avatar (with the engine's states when it has them), or None."""
        folder = self.root / key
        try:
            with np.load(folder / "faces.npz", allow_pickle=False) as faces:
                width, height = (int(v) for v in faces["size"])
                track = FaceTrack(faces["landmarks"], faces["has_face"], width, height)
                avatar = Avatar(key, track, faces["boxes"], faces["usable"])
        except (OSError, KeyError, ValueError) as error:
            if folder.exists():
                logger.warning("removing a damaged avatar cache entry %s: %s", folder, error)
                shutil.rmtree(folder, ignore_errors=True)  # so this run's analysis can take its place
            return None
        if engine_id is not None:
            self._load_states(avatar, folder / _states_name(engine_id))
        _touch(folder / "meta.json")
        return avatar

    def _load_states(self, avatar: Avatar, path: Path) -> None:
        if not path.is_file():
            return
        from safetensors.torch import load_file

        try:
            stored = load_file(str(path))
            states, prepared = stored["states"], stored["prepared"].numpy().astype(bool)
        except Exception as error:  # a damaged file is a miss, never a failure
            logger.warning("ignoring damaged engine states %s: %s", path, error)
            return
        if len(prepared) == len(avatar) == len(states):
            avatar.states = {int(source): states[source] for source in np.flatnonzero(prepared)}

    # ------------------------------------------------------------------ writing

    def save(self, avatar: Avatar, engine_id: str | None, video: str) -> None:
        """Write the avatar (faces once, states whenever new ones were added), then keep to the limit."""
        folder = self.root / avatar.key
        try:
            if not (folder / "faces.npz").is_file():
                self._write_faces(avatar, folder, video)
            if engine_id is not None and avatar.states and avatar.states_changed:
                self._write_states(avatar, folder / _states_name(engine_id))
        except OSError as error:  # a full or read-only disk costs the next run time, not this result
            logger.warning("could not save the prepared faces to %s: %s", folder, error)
            return
        self.prune()

    def _write_faces(self, avatar: Avatar, folder: Path, video: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{avatar.key}.", dir=self.root))
        try:
            np.savez(staging / "faces.npz", landmarks=avatar.track.landmarks, has_face=avatar.track.has_face,
                     boxes=avatar.boxes, usable=avatar.usable,
                     size=np.array([avatar.track.width, avatar.track.height]))
            meta = {"video": str(video), "frames": len(avatar), "created": time.time(), "format": FORMAT_VERSION}
            (staging / "meta.json").write_text(json.dumps(meta))
            os.replace(staging, folder)
        except BaseException as error:  # an interrupt too: never leave a half-written staging folder
            shutil.rmtree(staging, ignore_errors=True)
            if not isinstance(error, OSError) or not (folder / "faces.npz").is_file():
                raise  # someone else finishing the same entry first is fine; anything else is not

    def _write_states(self, avatar: Avatar, path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        first = next(iter(avatar.states.values()))
        states = torch.zeros((len(avatar),) + tuple(first.shape), dtype=first.dtype)
        prepared = np.zeros(len(avatar), np.uint8)
        for source, state in avatar.states.items():  # row by row: no second copy of them all
            states[source] = state
            prepared[source] = 1
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({"states": states, "prepared": torch.from_numpy(prepared)}, str(temporary))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    # ------------------------------------------------------------------ housekeeping

    def entries(self) -> list[CacheEntry]:
        """Every entry, most recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            meta_path = folder / "meta.json"
            if folder.name.startswith(".") or not meta_path.is_file():
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            found.append(CacheEntry(folder.name, size, meta_path.stat().st_mtime, meta.get("video", "?"),
                                    int(meta.get("frames", 0))))
        return sorted(found, key=lambda entry: entry.last_used, reverse=True)

    def size(self) -> int:
        return sum(entry.size for entry in self.entries())

    def prune(self) -> list[str]:
        """Remove the least recently used entries until the cache fits its limit, and what a killed
        process left half-written (staging folders and temporary files older than STALE_SECONDS)."""
        self._remove_stale_leftovers()
        removed, total = [], 0
        for entry in self.entries():
            total += entry.size
            if total > self.limit_bytes:
                shutil.rmtree(self.root / entry.key, ignore_errors=True)
                removed.append(entry.key)
        return removed

    def _remove_stale_leftovers(self) -> None:
        if not self.root.is_dir():
            return
        cutoff = time.time() - STALE_SECONDS
        leftovers = [p for p in self.root.iterdir() if p.name.startswith(".")]
        leftovers += [p for p in self.root.glob("*/.*.tmp")]
        for path in leftovers:
            try:
                if path.stat().st_mtime > cutoff:
                    continue  # another process may be writing it right now
            except FileNotFoundError:
                continue
            logger.info("removing %s, left half-written by an interrupted run", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def clear(self) -> int:
        """Remove every entry; returns the bytes freed."""
        freed = self.size()
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
        return freed


def _states_name(engine_id: str) -> str:
    return f"states-{hashlib.blake2b(engine_id.encode(), digest_size=8).hexdigest()}.safetensors"


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
