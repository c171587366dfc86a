"""Where the checkpoints are, how they are fetched, and what to say when they are not there.

Two places are accepted for every component:
- the official layout under one models directory (``musetalkV15/``, ``musetalk/``,
  ``sd-vae/``, ``whisper/``), which ``musetalk download`` writes and users of the official
  repo already have;
- the Hugging Face cache, for files fetched by other tools.

Nothing here downloads unless ``download()`` is called.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from musetalk.errors import WeightsMissingError

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "MUSETALK_MODELS_DIR"


@dataclass(frozen=True)
class WeightFile:
    """One file a component needs; any of ``candidates`` will do, the first is the one fetched."""

    repo_id: str
    local_dir: str  # folder under the models directory that mirrors the repo's root
    candidates: tuple[str, ...]  # paths inside the repo, in order of preference

    def local_paths(self, models_dir: Path) -> list[Path]:
        return [models_dir / self.local_dir / name for name in self.candidates]


@dataclass(frozen=True)
class Component:
    name: str
    files: tuple[WeightFile, ...]


_MUSETALK = "TMElyralab/MuseTalk"
_VAE = "stabilityai/sd-vae-ft-mse"
_WHISPER = "openai/whisper-tiny"
_LATENTSYNC = "ByteDance/LatentSync"
_TAESD = "madebyollin/taesd"

COMPONENTS: dict[str, Component] = {
    "unet-v15": Component(
        "unet-v15",
        (
            WeightFile(_MUSETALK, "", ("musetalkV15/musetalk.json",)),
            WeightFile(_MUSETALK, "", ("musetalkV15/unet.pth",)),
        ),
    ),
    "unet-v1": Component(
        "unet-v1",
        (
            WeightFile(_MUSETALK, "", ("musetalk/musetalk.json",)),
            WeightFile(_MUSETALK, "", ("musetalk/pytorch_model.bin",)),
        ),
    ),
    "vae": Component(
        "vae",
        (
            WeightFile(_VAE, "sd-vae", ("config.json",)),
            # safetensors first: it cannot carry code; the .bin the official script fetches also loads.
            WeightFile(_VAE, "sd-vae", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
        ),
    ),
    "whisper": Component(
        "whisper",
        (
            WeightFile(_WHISPER, "whisper", ("config.json",)),
            WeightFile(_WHISPER, "whisper", ("preprocessor_config.json",)),
            WeightFile(_WHISPER, "whisper", ("model.safetensors", "pytorch_model.bin")),
        ),
    ),
}

# Optional: LatentSync's SyncNet, only for the LSE-C / LSE-D scores (`musetalk download --scoring`),
# in the folder the official MuseTalk layout gives it (models/syncnet/latentsync_syncnet.pt).
SCORING_COMPONENTS = {
    "syncnet": Component("syncnet", (WeightFile(_LATENTSYNC, "syncnet", ("latentsync_syncnet.pt",)),)),
}

# Optional: TAESD, a distilled decoder for the same latents, for the draft engine
# (`musetalk download --draft`, `musetalk run --engine draft`).
DRAFT_COMPONENTS = {
    "taesd": Component(
        "taesd",
        (
            WeightFile(_TAESD, "taesd", ("config.json",)),
            WeightFile(_TAESD, "taesd", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
        ),
    ),
}

VERSION_COMPONENTS = {
    "v15": ("unet-v15", "vae", "whisper"),
    "v1": ("unet-v1", "vae", "whisper"),
    "all": ("unet-v15", "unet-v1", "vae", "whisper"),
}


@dataclass(frozen=True)
class UNetFiles:
    config: Path
    weights: Path


@dataclass(frozen=True)
class ModelFiles:
    """Resolved paths of everything one version needs."""

    unet: UNetFiles
    vae_dir: Path
    whisper_dir: Path


def user_cache_root() -> Path:
    """This project's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "musetalk-studio"


def default_models_dir() -> Path:
    """$MUSETALK_MODELS_DIR, else a per-user cache folder."""
    configured = os.environ.get(MODELS_DIR_ENV)
    return Path(configured).expanduser() if configured else user_cache_root() / "models"


def models_dir_or_default(models_dir: str | os.PathLike | None) -> Path:
    return Path(models_dir).expanduser() if models_dir else default_models_dir()


def download_command(version: str, models_dir: Path) -> str:
    return f"musetalk download --version {version} --models-dir {models_dir}"


def _existing(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _find_local(weight: WeightFile, models_dir: Path) -> Path | None:
    return next((p for p in weight.local_paths(models_dir) if _existing(p)), None)


def _find_in_hf_cache(weight: WeightFile) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in weight.candidates:
        found = try_to_load_from_cache(weight.repo_id, name)
        if isinstance(found, str) and _existing(Path(found)):
            return Path(found)
    return None


def _resolve_component(component: Component, models_dir: Path) -> list[Path] | None:
    """Paths of a component's files, all from the same place (models dir or HF cache), or None."""
    for finder in (lambda w: _find_local(w, models_dir), _find_in_hf_cache):
        found = [finder(weight) for weight in component.files]
        if all(found):
            return found
    return None


def missing_files(version: str, models_dir: str | os.PathLike | None = None, draft: bool = False) -> list[Path]:
    """The files (as the models directory would hold them) that ``version`` still needs (``draft``: and
    the draft decoder)."""
    root = models_dir_or_default(models_dir)
    missing: list[Path] = []
    for component in _components(version, draft=draft):
        if _resolve_component(component, root) is None:
            missing += [w.local_paths(root)[0] for w in component.files if _find_local(w, root) is None]
    return missing


def resolve(version: str = "v15", models_dir: str | os.PathLike | None = None, draft: bool = False) -> ModelFiles:
    """Paths of the checkpoint files of ``version``; WeightsMissingError names every missing file (``draft``:
    the draft decoder's too, and the one command that fetches them all)."""
    if version not in ("v15", "v1"):
        raise ValueError(f"version must be v15 or v1, not {version!r}")
    root = models_dir_or_default(models_dir)
    resolved = {name: _resolve_component(COMPONENTS[name], root) for name in VERSION_COMPONENTS[version]}
    if any(paths is None for paths in resolved.values()):
        missing = missing_files(version, root, draft)
        raise WeightsMissingError(
            f"MuseTalk {version} weights are missing from {root}: "
            + ", ".join(str(p.relative_to(root)) for p in missing)
            + f". Fetch them with: {download_command(version, root)}" + (" --draft" if draft else "")
        )
    unet_config, unet_weights = resolved[f"unet-{version}"]
    return ModelFiles(
        unet=UNetFiles(unet_config, unet_weights),
        vae_dir=resolved["vae"][0].parent,
        whisper_dir=resolved["whisper"][0].parent,
    )


def corrupt_weights_error(path: Path, version: str, models_dir: Path, cause: Exception) -> WeightsMissingError:
    """The error for a checkpoint file that exists but cannot be read."""
    return WeightsMissingError(
        f"{path} is corrupt or incomplete ({type(cause).__name__}: {cause}). "
        f"Delete it and fetch it again with: {download_command(version, models_dir)}"
    )


def syncnet_weights(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The SyncNet checkpoint used for scoring (models directory or HF cache), or None."""
    found = _resolve_component(SCORING_COMPONENTS["syncnet"], models_dir_or_default(models_dir))
    return found[0] if found else None


def _components(version: str, scoring: bool = False, draft: bool = False) -> list[Component]:
    """What ``version`` needs, with the optional scoring and draft components when asked for."""
    components = [COMPONENTS[name] for name in VERSION_COMPONENTS[version]]
    if scoring:
        components += list(SCORING_COMPONENTS.values())
    if draft:
        components += list(DRAFT_COMPONENTS.values())
    return components


def has_draft_decoder(models_dir: str | os.PathLike | None = None) -> bool:
    return _resolve_component(DRAFT_COMPONENTS["taesd"], models_dir_or_default(models_dir)) is not None


def draft_decoder_dir(models_dir: str | os.PathLike | None = None) -> Path:
    """The folder of TAESD's files (models directory or HF cache); WeightsMissingError says how to fetch them."""
    root = models_dir_or_default(models_dir)
    found = _resolve_component(DRAFT_COMPONENTS["taesd"], root)
    if not found:
        raise WeightsMissingError(
            f"the draft decoder (TAESD) is not in {root / 'taesd'} or the Hugging Face cache. Fetch it (10 MB) with: "
            f"musetalk download --draft --models-dir {root}"
        )
    return found[-1].parent


def download(version: str = "v15", models_dir: str | os.PathLike | None = None, scoring: bool = False,
             draft: bool = False) -> list[Path]:
    """Fetch what ``version`` ("v15", "v1" or "all") needs into the official layout, with progress;
    ``scoring`` adds the SyncNet weights (1.4 GB) that the LSE-C / LSE-D scores need, ``draft`` the draft
    decoder (TAESD, 10 MB).

    Files already present are skipped; an interrupted download resumes. Returns the paths.
    """
    if version not in VERSION_COMPONENTS:
        raise ValueError(f"version must be one of {', '.join(VERSION_COMPONENTS)}, not {version!r}")
    from huggingface_hub import hf_hub_download

    root = models_dir_or_default(models_dir)
    fetched: list[Path] = []
    for component in _components(version, scoring, draft):
        for weight in component.files:
            present = _find_local(weight, root)
            if present is not None:
                fetched.append(present)
                continue
            target_dir = root / weight.local_dir
            logger.info("fetching %s/%s into %s", weight.repo_id, weight.candidates[0], target_dir)
            try:
                path = hf_hub_download(weight.repo_id, weight.candidates[0], local_dir=target_dir)
            except Exception as error:  # network, auth or disk: all end the same way for the user
                raise WeightsMissingError(
                    f"could not fetch {weight.repo_id}/{weight.candidates[0]} ({type(error).__name__}: {error}). "
                    "Check the network connection (or HF_ENDPOINT / HF_TOKEN) and run the command again; "
                    "finished files are kept and a partial one resumes."
                ) from error
            fetched.append(Path(path))
    return fetched
