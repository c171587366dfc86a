"""The system's ``espeak-ng`` (or ``espeak``) program: the fallback when the bundled library cannot load.

It speaks the same voices with the same rate and pitch, but reports no word or phoneme
timings (those come only through the library's callback).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import wave
from functools import lru_cache

import numpy as np

from musetalk_tts_espeak.library import Speech, VoiceEntry

logger = logging.getLogger(__name__)

PROGRAMS = ("espeak-ng", "espeak")
TIMEOUT_S = 600


def find_program() -> str | None:
    for name in PROGRAMS:
        path = shutil.which(name)
        if path:
            return path
    return None


class EspeakCommand:
    def __init__(self, program: str):
        self.program = program
        lines = self._run(["--version"]).stdout.decode("utf-8", "replace").splitlines()
        # "eSpeak NG text-to-speech: 1.51  Data at: ..." -> "1.51"
        number = lines[0].split(":", 1)[-1].split("Data at")[0].strip() if lines else "?"
        self.version = f"{number} (the {os.path.basename(program)} program)"

    def _run(self, args: list[str], text: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.program, *args], input=text.encode("utf-8") if text is not None else None,
                              capture_output=True, timeout=TIMEOUT_S, check=False)

    def list_voices(self, variants: bool = False) -> list[VoiceEntry]:
        listing = self._run(["--voices=variant" if variants else "--voices"]).stdout.decode("utf-8", "replace")
        entries = []
        for line in listing.splitlines()[1:]:  # columns: Pty Language Age/Gender VoiceName File Other Languages
            columns = line.split(maxsplit=5)
            if len(columns) >= 5 and columns[0].isdigit():
                others = re.findall(r"\((\S+) (\d+)\)", columns[5] if len(columns) > 5 else "")
                entries.append(VoiceEntry(columns[3].replace("_", " "), (columns[1], *(n for n, _ in others)),
                                          columns[4], (int(columns[0]), *(int(p) for _, p in others))))
        return entries

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> Speech:
        """Synthesize through a temporary WAV; raises ValueError when the program does not know the voice."""
        handle, wav_path = tempfile.mkstemp(prefix="musetalk-espeak-", suffix=".wav")
        os.close(handle)
        try:
            result = self._run(["-v", voice, "-s", str(rate), "-p", str(pitch), "-w", wav_path, "--stdin"], text)
            message = result.stderr.decode("utf-8", "replace").strip()
            if result.returncode != 0:
                if "voice" in message.lower():
                    raise ValueError(voice)
                raise OSError(f"{self.program} failed ({result.returncode}): {message}")
            with wave.open(wav_path, "rb") as reader:
                samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").copy()
                return Speech(samples, reader.getframerate())
        finally:
            os.remove(wav_path)


@lru_cache(maxsize=1)
def system_command() -> EspeakCommand:
    program = find_program()
    if program is None:
        raise FileNotFoundError("no espeak-ng or espeak program on PATH")
    return EspeakCommand(program)
