"""What Coqui's XTTS needs beside coqui-tts, and whether the installed versions pair.

Read from the installed packages' metadata, never by importing them: importing torch and
coqui-tts takes seconds, and a torchaudio built for another torch fails with a traceback
from its native library. ``musetalk doctor``, ``musetalk voices`` and the studio show the
answer as the coqui source's reason.
"""

from __future__ import annotations

import re
from importlib import metadata

INSTALL = "pip install musetalk-studio[coqui]"
# The torch set that scripts/coqui-env installs and tests. The coqui extra leaves torch alone, as
# coqui-tts does: pinning it there would replace the torch (and CUDA build) a user already has.
TESTED_TORCH_SET = ("torch==2.9.1", "torchaudio==2.9.1", "torchcodec==0.9.1")
FIX = (f"pip install {' '.join(TESTED_TORCH_SET)} (the set tested here; with another torch, the torchaudio "
       f"and torchcodec built for it), then {INSTALL}")
PACKAGES = ("coqui-tts", "torch", "torchaudio", "torchcodec", "six", "transformers")
# torchcodec release -> the torch release it is built for (torchcodec's compatibility table).
TORCHCODEC_TORCH = {(0, 2): (2, 6), (0, 3): (2, 7), (0, 4): (2, 7), (0, 5): (2, 7), (0, 6): (2, 8), (0, 7): (2, 8),
                    (0, 8): (2, 9), (0, 9): (2, 9)}
# From torch 2.9 torchaudio reads audio through torchcodec, and coqui-tts refuses to import without it.
TORCH_NEEDING_TORCHCODEC = (2, 9)
# transformers 5.24 hands generate()'s cache to a model as `cache`; the XTTS of coqui-tts 0.28 and
# earlier reads `past_key_values` and fails on the second audio token.
TRANSFORMERS_TOO_NEW, LAST_COQUI_WITH_OLD_CACHE = (5, 24), (0, 28)


def installed_versions() -> dict[str, str | None]:
    """Each package's installed version, None when it is not installed."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def problems(versions: dict[str, str | None]) -> list[str]:
    """What is missing or does not pair, one phrase each; empty when the set can work."""
    found = []
    torch, torchaudio, torchcodec = versions["torch"], versions["torchaudio"], versions["torchcodec"]
    if torch is None:
        return ["torch is missing"]
    if torchaudio is None:
        found.append("torchaudio is missing (XTTS imports it)")
    elif _release(torchaudio) != _release(torch):
        found.append(f"torchaudio {torchaudio} does not pair with torch {torch} (torchaudio {_text(_release(torch))} "
                     f"does)")
    if torchcodec is None:
        if _release(torch) >= TORCH_NEEDING_TORCHCODEC:
            found.append(f"torchcodec is missing (coqui-tts needs it with torch {_text(TORCH_NEEDING_TORCHCODEC)} "
                         f"and later)")
    elif _release(torchcodec) in TORCHCODEC_TORCH and TORCHCODEC_TORCH[_release(torchcodec)] != _release(torch):
        found.append(f"torchcodec {torchcodec} is built for torch {_text(TORCHCODEC_TORCH[_release(torchcodec)])}, "
                     f"not torch {torch}")
    if versions["six"] is None:
        found.append("six is missing (coqui-tts imports it without declaring it)")
    coqui, transformers = versions["coqui-tts"], versions["transformers"]
    if (coqui and transformers and _release(coqui) <= LAST_COQUI_WITH_OLD_CACHE
            and _release(transformers) >= TRANSFORMERS_TOO_NEW):
        found.append(f"transformers {transformers} is too new for coqui-tts {coqui} (its XTTS fails from "
                     f"{_text(TRANSFORMERS_TOO_NEW)} on: transformers<{_text(TRANSFORMERS_TOO_NEW)})")
    return found


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version such as 2.9.1+cu128; (0, 0) when it does not start with numbers."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _text(release: tuple[int, int]) -> str:
    return f"{release[0]}.{release[1]}"
