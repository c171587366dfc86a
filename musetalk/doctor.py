"""``musetalk doctor``: what this machine has for dubbing, one row per thing checked."""

from __future__ import annotations

import os
import re
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
    from musetalk import video_io

    try:
        exe = video_io.ffmpeg_exe()
        first_line, problems = ffmpeg_problems(exe)
    except Exception as error:  # any failure here is the answer the row gives
        return Check("ffmpeg", False, str(error))
    which = "bundled" if exe == video_io.bundled_ffmpeg() else "MUSETALK_FFMPEG" if os.environ.get(
        "MUSETALK_FFMPEG") else "system"
    detail = f"{first_line.split(' Copyright')[0]} ({which}: {exe})"
    if problems:
        fix = ("unset MUSETALK_FFMPEG to use the bundled one" if which == "MUSETALK_FFMPEG"
               else "pip install imageio-ffmpeg (it ships a recent ffmpeg) or set MUSETALK_FFMPEG to ffmpeg 5.1 "
                    "or newer")
        return Check("ffmpeg", False, f"{detail}: {'; '.join(problems)}; {fix}")
    return Check("ffmpeg", True, detail)


def ffmpeg_problems(exe: str) -> tuple[str, list[str]]:
    """(ffmpeg's version line, what it lacks of what this project runs: empty when it will do)."""
    from musetalk import video_io

    def listing(flag: str) -> str:
        return subprocess.run([exe, "-hide_banner", flag], capture_output=True, text=True, timeout=30).stdout

    first_line = (listing("-version").splitlines() or ["(ffmpeg printed no version)"])[0]
    problems = []
    version = ffmpeg_version(first_line)
    oldest = ".".join(map(str, video_io.MIN_FFMPEG_VERSION))
    if version is not None and version < video_io.MIN_FFMPEG_VERSION:
        problems.append(f"version {'.'.join(map(str, version))} is older than {oldest}, the oldest supported")
    elif version is None and "-fps_mode" not in listing("-h"):  # a build from git: judge by what it offers
        problems.append("it has no -fps_mode option (added in ffmpeg 5.1, the oldest supported)")
    for flag, kind, names in (("-encoders", "encoder", video_io.REQUIRED_ENCODERS),
                              ("-muxers", "muxer", video_io.REQUIRED_MUXERS),
                              ("-filters", "filter", video_io.REQUIRED_FILTERS)):
        offered = {line.split()[1] for line in listing(flag).splitlines() if len(line.split()) > 1}
        missing = [name for name in names if name not in offered]
        if missing:
            problems.append(f"it lacks the {kind}{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return first_line, problems


def ffmpeg_version(first_line: str) -> tuple[int, int] | None:
    """(major, minor) from 'ffmpeg version 5.1.9-0+deb12u1 ...' or '... version n9.0.2-17-g...'; None
    for builds from git ('version N-112233-g...'), which carry no release number."""
    match = re.match(r"ffmpeg version n?(\d+)\.(\d+)", first_line)
    return (int(match.group(1)), int(match.group(2))) if match else None


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
            ok, reason = source.available()  # None (not known until tried) is no ok: it shows as "--"
            ok = ok is True
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
