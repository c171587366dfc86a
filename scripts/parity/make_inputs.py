"""Write what the official MuseTalk code is run on for the parity goldens (run in the project's venv).

    python scripts/parity/make_inputs.py DIR

DIR gets ``models/`` (the parity models in the official layout), ``audio/*.wav``, ``inputs.npz``
(the test photo, its landmarks, boxes and parsing maps) and ``manifest.json`` (cases, configs,
seeds and the weights' digest). ``scripts/parity/run_official.py`` then runs the official code on
them; ``scripts/parity/regenerate`` does both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import parity_cases as cases  # noqa: E402

from musetalk import blending, face, testing  # noqa: E402


def photo_rgb() -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(str(cases.FACE_PHOTO)), cv2.COLOR_BGR2RGB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    (folder / "audio").mkdir(parents=True, exist_ok=True)

    models = testing.save_parity_models(folder / "models")
    for name, samples, _ in cases.AUDIO_CASES:
        cases.write_wav(folder / "audio" / f"{name}.wav", cases.audio_samples(samples))

    photo = photo_rgb()
    with face.FaceAnalyzer() as analyzer:
        landmarks = analyzer.landmarks(photo)
    if landmarks is None:
        raise SystemExit("no face found in the test photo")
    frames = {"photo": (photo, landmarks), "edge": (cases.edge_frame(photo), landmarks - cases.EDGE_OFFSET)}

    arrays = {"photo": photo, "landmarks": landmarks}
    v15_box = _box(photo, landmarks, "v15", 0)
    arrays["crop_boxes"] = np.array([v15_box + np.array([dx, dy, dx, dy]) for dx, dy in cases.CROP_SHIFTS])
    for name, frame_name, version, mode, left, right, shift in cases.BLEND_CASES:
        frame, points = frames[frame_name]
        box = _box(frame, points, version, shift)
        arrays[f"blend/{name}/box"] = box
        arrays[f"blend/{name}/parsing"] = blending.parsing_from_landmarks(points, box)
    np.savez_compressed(folder / "inputs.npz", **arrays)

    manifest = {
        "configs": testing.parity_configs(),
        "seeds": testing.PARITY_SEEDS,
        "weights_digest": testing.weights_digest(models),
        "audio_cases": [[name, samples, list(rates)] for name, samples, rates in cases.AUDIO_CASES],
        "unet_audio": cases.UNET_AUDIO,
        "unet_frames": cases.UNET_FRAMES,
        "schedules": [list(pair) for pair in cases.SCHEDULES],
        "blend_cases": [list(case) for case in cases.BLEND_CASES],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"inputs written to {folder}")


def _box(frame: np.ndarray, landmarks: np.ndarray, version: str, bbox_shift: int) -> np.ndarray:
    track = face.FaceTrack.from_rows([landmarks], frame.shape[1], frame.shape[0])
    return face.crop_boxes(track, version, extra_margin=10, bbox_shift=bbox_shift)[0].astype(np.int64)


if __name__ == "__main__":
    main()
