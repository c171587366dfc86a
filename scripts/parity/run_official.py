"""Run the official MuseTalk inference functions on the parity inputs and save what they output.

    python scripts/parity/run_official.py --official CHECKOUT --inputs DIR --out tests/data/parity

Run it in a venv of the official code's own requirements (``scripts/parity/regenerate`` makes
one), never in the project's: the official package is also called ``musetalk``. It imports the
official modules from CHECKOUT and calls them as ``scripts/inference.py`` does (same functions,
arguments and order), with these changes only, each one a deliberate difference of ours that
the README's table lists:

- the VAE's ``latent_dist.sample()`` returns the distribution's mode (we encode with ``.mode()``);
- ``get_whisper_chunk`` sees the real frame rate (the official code truncates it with ``int(fps)``),
  and from 50 fps up it is asked only for the frames its zero padding covers (it stops with an
  assertion after them; we treat every step past the end as zero);
- the face-parsing network is replaced by the parsing map in the inputs (no weights for it here);
  everything the official code does with the map is its own.

To see what the official code computes inside a function, some objects are wrapped so that they
record what passes through them (the Whisper encoder's input and output, the mask Pillow's paste
receives); nothing recorded is changed. torchvision, which does not install beside the CPU build
of torch these goldens are made with, is provided by a shim with torchvision's own arithmetic for
the two transforms the official code uses (Normalize on the VAE input; ToTensor feeds only the
replaced parsing network).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

TORCHVISION_SHIM = '''
import torch

class Compose:
    def __init__(self, transforms):
        self.transforms = transforms
    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x

class ToTensor:
    def __call__(self, picture):
        import numpy as np
        array = np.asarray(picture, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)

class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = mean, std
    def __call__(self, tensor):
        tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)
'''


def install_torchvision_shim() -> None:
    folder = Path(tempfile.mkdtemp(prefix="torchvision-shim-")) / "torchvision"
    folder.mkdir()
    (folder / "__init__.py").write_text("from . import transforms\n")
    (folder / "transforms.py").write_text(TORCHVISION_SHIM)
    sys.path.insert(0, str(folder.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of TMElyralab/MuseTalk")
    parser.add_argument("--inputs", type=Path, required=True, help="what make_inputs.py wrote")
    parser.add_argument("--out", type=Path, required=True, help="the folder the goldens go to")
    parser.add_argument("--commit", default="unknown", help="the official checkout's commit, recorded")
    args = parser.parse_args()
    inputs = args.inputs.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((inputs / "manifest.json").read_text())
    given = dict(np.load(inputs / "inputs.npz"))

    install_torchvision_shim()
    sys.path.insert(0, str(args.official.resolve()))
    os.chdir(inputs)  # the official load_all_model finds the VAE at models/<vae_type>
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()  # we encode with .mode()

    audio = run_audio(manifest, inputs)
    model = run_models(manifest, given, audio)
    blend = run_blending(manifest, given, model["unet/v15/decoded"][0])
    schedules = run_schedules(manifest)

    record = {"manifest": json.dumps(manifest), "official_commit": args.commit}
    keep = {key: given[key] for key in given}  # the inputs the tests need (photo, landmarks, boxes, maps)
    np.savez_compressed(out / "official.npz", **keep, **audio["keep"], **model, **blend, **schedules,
                        **{key: np.array(value) for key, value in record.items()})
    print(f"goldens written to {out / 'official.npz'}")


# --------------------------------------------------------------------------- audio


class RecordingWhisper:
    """The official Whisper model, recording each 30 s window's encoder input and hidden states."""

    def __init__(self, whisper):
        self.whisper = whisper
        self.mel, self.hidden = [], []

    def encoder(self, features, output_hidden_states=True):
        result = self.whisper.encoder(features, output_hidden_states=output_hidden_states)
        self.mel.append(features.detach().cpu().numpy())
        # [1500, layers, width], as the official code stacks them (on a new axis 2 of [1, 1500, width])
        self.hidden.append(np.stack([state[0].detach().cpu().numpy() for state in result.hidden_states], axis=1))
        return result


class CodedWhisper:
    """Stands in for the encoder to see which step and layer each token of a chunk comes from: every
    channel of hidden state ``l`` at step ``s`` holds ``(s + 1) * 8 + l + 1`` (0 is the zero padding)."""

    def __init__(self, layers: int, width: int):
        self.layers, self.width, self.windows = layers, width, 0

    def encoder(self, features, output_hidden_states=True):
        import torch

        first = self.windows * 1500
        self.windows += 1
        steps = torch.arange(first, first + 1500, dtype=torch.float32)
        states = tuple(((steps + 1) * 8 + layer + 1)[None, :, None].expand(1, 1500, self.width).clone()
                       for layer in range(self.layers))
        return types.SimpleNamespace(hidden_states=states)


def real_rate_chunker(processor, num_frames_fit: int | None):
    """``get_whisper_chunk`` with the real frame rate (its ``int(fps)`` leaves a float as it is) and, when
    ``num_frames_fit`` is given, its loop over frames stopped where the padding runs out."""
    function = type(processor).get_whisper_chunk
    source = inspect.getsource(function)
    # the two names shadowed must be used nowhere else in the function
    assert len(re.findall(r"\bint\(", source)) == 1 and "fps = int(fps)" in source, "get_whisper_chunk changed"
    assert len(re.findall(r"\brange\(", source)) == 1 and "in range(num_frames)" in source, "get_whisper_chunk changed"
    names = dict(function.__globals__)
    names["int"] = lambda value: value
    if num_frames_fit is not None:
        names["range"] = lambda count: range(min(count, num_frames_fit))
    return types.FunctionType(function.__code__, names, function.__name__, function.__defaults__)


def frames_covered(num_samples: int, fps: float) -> int:
    """How many frames the official padding covers (all of them below 50 fps)."""
    import math

    steps = math.floor((num_samples / 16000) * 50)
    multiplier = 50 / fps
    padded = steps + math.ceil(multiplier) * 2 + math.ceil(multiplier) * 3 * 2
    frames = math.floor((num_samples / 16000) * fps)
    return sum(1 for i in range(frames) if math.floor(i * multiplier) + 10 <= padded)


def sample_steps(total: int) -> list[int]:
    """The Whisper steps whose hidden states are kept: the ends, a few inside, the window boundary."""
    picked = {0, 1, 2, total // 3, total // 2, total - 2, total - 1}
    if total > 1500:
        picked |= {1498, 1499, 1500, 1501}
    return sorted(step for step in picked if 0 <= step < total)


MEL_KEPT = ("2.37s", "31s")


def run_audio(manifest: dict, inputs: Path) -> dict:
    import torch
    from transformers import WhisperModel

    from musetalk.utils.audio_processor import AudioProcessor

    whisper_dir = str(inputs / "models" / "whisper")
    processor = AudioProcessor(feature_extractor_path=whisper_dir)
    whisper = WhisperModel.from_pretrained(whisper_dir).to(dtype=torch.float32).eval()
    whisper.requires_grad_(False)
    layers, width = whisper.config.encoder_layers + 1, whisper.config.d_model
    keep, unet_chunks = {}, None
    for name, samples, rates in manifest["audio_cases"]:
        wav = str(inputs / "audio" / f"{name}.wav")
        features, length = processor.get_audio_feature(wav)
        assert length == samples
        for fps in rates:
            fit = frames_covered(samples, fps) if fps >= 50 else None
            chunker = real_rate_chunker(processor, fit)
            with torch.no_grad():
                coded = chunker(processor, features, "cpu", torch.float32, CodedWhisper(layers, width), length,
                                fps=fps)
            tokens = coded[:, :, 0].numpy()
            assert (coded == coded[:, :, :1]).all()
            keep[f"audio/{name}/{key(fps)}/tokens"] = tokens.astype(np.int16)
            if name == manifest["unet_audio"] and fps == 25.0:
                with torch.no_grad():
                    unet_chunks = chunker(processor, features, "cpu", torch.float32, whisper, length, fps=fps)
        recorder = RecordingWhisper(whisper)  # the hidden states do not depend on the frame rate
        with torch.no_grad():
            real_rate_chunker(processor, None)(processor, features, "cpu", torch.float32, recorder, length, fps=25.0)
        hidden = np.concatenate(recorder.hidden)  # [windows * 1500, layers, width]
        total = int(np.floor((samples / 16000) * 50))
        steps = sample_steps(total)
        keep[f"audio/{name}/hidden_steps"] = np.array(steps, dtype=np.int64)
        keep[f"audio/{name}/hidden"] = hidden[steps]
        if name in MEL_KEPT:  # 3 s of each window: the speech and the start of the padding
            keep[f"audio/{name}/mel"] = np.concatenate(recorder.mel)[:, :, :300]
    return {"keep": keep, "unet_chunks": unet_chunks}


def key(fps: float) -> str:
    return f"{fps:.2f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------- VAE and UNet


DECODED_KEPT = {"v15": 3, "v1": 1}


def run_models(manifest: dict, given: dict, audio: dict) -> dict:
    import cv2
    import torch

    from musetalk.utils.utils import datagen, load_all_model

    frame = given["photo"][:, :, ::-1].copy()  # the official code reads frames with cv2: BGR
    crops = []
    for x1, y1, x2, y2 in given["crop_boxes"]:
        crops.append(cv2.resize(frame[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4))
    results = {"vae/crops": np.stack(crops)[..., ::-1].copy()}
    chunks = audio["unet_chunks"]
    count = manifest["unet_frames"]
    for version, folder, weights in (("v15", "musetalkV15", "unet.pth"), ("v1", "musetalk", "pytorch_model.bin")):
        vae, unet, pe = load_all_model(unet_model_path=f"models/{folder}/{weights}", vae_type="sd-vae",
                                       unet_config=f"models/{folder}/musetalk.json", device=torch.device("cpu"))
        timesteps = torch.tensor([0])
        with torch.no_grad():
            latents = [vae.get_latents_for_unet(crop) for crop in crops]
            cycle = latents + latents[::-1]
            whisper_batch, latent_batch = next(iter(datagen(whisper_chunks=chunks, vae_encode_latents=cycle,
                                                            batch_size=count, delay_frame=0, device="cpu")))
            predicted = unet.model(latent_batch.to(dtype=unet.model.dtype), timesteps,
                                   encoder_hidden_states=pe(whisper_batch)).sample
            decoded = vae.decode_latents(predicted)
        if version == "v15":  # one VAE for both versions
            results["vae/latents"] = torch.cat(latents).numpy()
        results[f"unet/{version}/predicted"] = predicted.numpy()
        # decoded crops are big and random: the first frame of each source crop (v15), one for v1
        results[f"unet/{version}/decoded"] = decoded[: DECODED_KEPT[version], ..., ::-1].copy()  # BGR -> RGB
    return results


def run_schedules(manifest: dict) -> dict:
    """Which source frame each output frame takes, from the official datagen over the ping-pong cycle."""
    import torch

    from musetalk.utils.utils import datagen

    results = {}
    for sources, frames in manifest["schedules"]:
        latents = [torch.full((1, 8, 32, 32), float(index)) for index in range(sources)]
        cycle = latents + latents[::-1]
        chunks = torch.zeros((frames, 50, 384))
        order = [batch[1][:, 0, 0, 0] for batch in datagen(chunks, cycle, batch_size=8, delay_frame=0, device="cpu")]
        results[f"schedule/{sources}-{frames}"] = torch.cat(order).numpy().astype(np.int64)
    return results


# --------------------------------------------------------------------------- blending


def square_mask(mask: np.ndarray, shape, box) -> np.ndarray:
    """The square's mask placed in a frame of ``shape`` (the official square may reach past its edges)."""
    from musetalk.utils.blending import get_crop_box

    (left, top, right, bottom), _ = get_crop_box(box, 1.5)
    placed = np.zeros(shape, dtype=np.uint8)
    rows, cols = slice(max(0, top), min(shape[0], bottom)), slice(max(0, left), min(shape[1], right))
    placed[rows, cols] = mask[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left]
    return placed


def run_blending(manifest: dict, given: dict, generated_rgb: np.ndarray) -> dict:
    import cv2
    import torch
    from PIL import Image

    from musetalk.utils.blending import get_image
    from musetalk.utils.face_parsing import FaceParsing

    class GivenParsing(FaceParsing):
        """The official FaceParsing with its network's answer given: the parsing map of the inputs."""

        def __init__(self, parsing, **widths):
            self.given = parsing
            super().__init__(**widths)

        def model_init(self, *args, **kwargs):
            labels = torch.from_numpy(self.given.astype(np.int64))
            return lambda image: [torch.nn.functional.one_hot(labels, 19).permute(2, 0, 1)[None].float()]

    masks = []
    original_paste = Image.Image.paste

    def recording_paste(self, im, box=None, mask=None):
        if mask is not None:
            masks.append(np.array(mask))
        return original_paste(self, im, box, mask)

    Image.Image.paste = recording_paste
    results = {}
    photo_bgr = given["photo"][:, :, ::-1].copy()
    generated_bgr = generated_rgb[:, :, ::-1].copy()
    for name, frame_name, version, mode, left, right, _shift in manifest["blend_cases"]:
        frame = photo_bgr if frame_name == "photo" else np.ascontiguousarray(photo_bgr[70:, 60:])
        x1, y1, x2, y2 = (int(v) for v in given[f"blend/{name}/box"])
        parsing = given[f"blend/{name}/parsing"]
        # as scripts/inference.py: resize the generated face to the box, then get_image
        face = cv2.resize(generated_bgr.astype(np.uint8), (x2 - x1, y2 - y1))
        masks.clear()
        if version == "v15":
            fp = GivenParsing(parsing, left_cheek_width=left, right_cheek_width=right)
            combined = get_image(frame.copy(), face, [x1, y1, x2, y2], mode=mode, fp=fp)
        else:
            fp = GivenParsing(parsing)
            combined = get_image(frame.copy(), face, [x1, y1, x2, y2], fp=fp)
        assert len(masks) == 1
        results[f"blend/{name}/mask"] = masks[0]
        # Only what the mask changed is kept (the rest is the input frame, checked here): zeros compress.
        combined = np.ascontiguousarray(combined[:, :, ::-1])
        changed = square_mask(masks[0], frame.shape[:2], [x1, y1, x2, y2]) > 0
        assert np.array_equal(combined[~changed], frame[:, :, ::-1][~changed])
        results[f"blend/{name}/frame"] = np.where(changed[..., None], combined, 0).astype(np.uint8)
    Image.Image.paste = original_paste
    return results


if __name__ == "__main__":
    main()
