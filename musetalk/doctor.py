"""``musetalk doctor``: what this machine has for dubbing, one row per thing checked."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib import metadata

from musetalk import weights


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # a failed optional check (weights of the other version, a GPU) is no failure


def check(models_dir=None) -> list[Check]:
    return [_ffmpeg(), _mediapipe(), _torch(), _device(), *_weights(models_dir), *_audio_sources(), *_versions()]


def _ffmpeg() -> Check:
    from musetalk.video_io import ffmpeg_exe

    try:
        exe = ffmpeg_exe()
        first_line = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True,
                                    timeout=30).stdout.splitlines()[0]
        return Check("ffmpeg", True, f"{first_line} ({exe})")
    except Exception as error:  # any failure here is the answer the row gives
        return Check("ffmpeg", False, str(error))


def _mediapipe() -> Check:
    try:
        import mediapipe as mp

        with mp.solutions.face_detection.FaceDetection(model_selection=1):
            pass
        return Check("mediapipe", True, f"{mp.__version__}, face models load offline")
    except Exception as error:
        return Check("mediapipe", False, f"{type(error).__name__}: {error}; install mediapipe==0.10.21")


def _torch() -> Check:
    try:
        import torch

        return Check("torch", True, torch.__version__)
    except Exception as error:
        return Check("torch", False, f"{type(error).__name__}: {error}")


def _device() -> Check:
    try:
        import torch

        if torch.cuda.is_available():
            return Check("device", True, f"cuda: {torch.cuda.get_device_name(0)}", required=False)
        if torch.backends.mps.is_available():
            return Check("device", True, "mps", required=False)
        return Check("device", False, "cpu only: MuseTalk takes seconds per frame without a GPU", required=False)
    except Exception as error:
        return Check("device", False, str(error), required=False)


def _weights(models_dir) -> list[Check]:
    root = weights.models_dir_or_default(models_dir)
    rows = []
    for version in ("v15", "v1"):
        missing = weights.missing_files(version, root)
        if missing:
            detail = (f"missing {', '.join(str(p.relative_to(root)) for p in missing)}; "
                      f"run: {weights.download_command(version, root)}")
        else:
            detail = f"ready in {root}"
        rows.append(Check(f"weights {version}", not missing, detail, required=False))
    draft = weights.has_draft_decoder(root)
    rows.append(Check("draft decoder", draft, "TAESD ready (--engine draft)" if draft else
                      "not fetched (only --engine draft needs it); run: musetalk download --draft", required=False))
    return rows


def _audio_sources() -> list[Check]:
    """One row per audio source (text to speech), then one per plugin that failed; none is required."""
    try:
        from musetalk import plugins

        sources = plugins.audio_sources()
        rows = []
        for source in sources.values():
            ok, reason = source.available()
            origin = f" [{source.distribution}]" if source.distribution not in (None, "musetalk-studio") else ""
            rows.append(Check(f"speech {source.id}", ok, f"{source.label}{origin}: {reason}", required=False))
        problems = plugins.plugin_problems()  # after available(): a source that raised there is listed too
    except Exception as error:  # the plugin machinery itself: reported like any other failed check
        return [Check("audio sources", False, f"{type(error).__name__}: {error}", required=False)]
    return rows + [Check("plugin problem", False, line, required=False) for line in problems]


def _versions() -> list[Check]:
    rows = []
    for package in ("diffusers", "transformers", "huggingface-hub", "silero-vad", "numpy", "musetalk-studio"):
        try:
            rows.append(Check(package, True, metadata.version(package), required=False))
        except metadata.PackageNotFoundError:
            rows.append(Check(package, False, "not installed", required=package != "musetalk-studio"))
    return rows
