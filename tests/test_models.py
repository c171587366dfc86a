import json
import math
from pathlib import Path

import pytest
import torch

from musetalk import models, testing
from musetalk.errors import InputError, WeightsMismatchError

OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "musetalk_unet_keys.json"


def test_full_config_builds_the_official_state_dict_keys():
    """The UNet built from the official config has exactly the 686 keys and shapes of unet.pth."""
    expected = json.loads(OFFICIAL_KEYS.read_text())
    with torch.device("meta"):
        unet = models.build_unet(testing.full_unet_config())
    built = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert built == expected


def test_unet_loads_through_the_official_layout(models_dir):
    folder = models_dir / "musetalkV15"
    unet = models.load_unet(folder / "musetalk.json", folder / "unet.pth", torch.device("cpu"), torch.float32)
    out = unet(torch.zeros(1, 8, 32, 32), 0, encoder_hidden_states=torch.zeros(1, 50, 384)).sample
    assert out.shape == (1, 4, 32, 32)
    reference = torch.load(folder / "unet.pth", weights_only=True)
    key = "conv_in.weight"
    assert torch.equal(unet.state_dict()[key], reference[key])


def test_wrong_state_dict_names_the_keys(models_dir, tmp_path):
    folder = models_dir / "musetalkV15"
    state = torch.load(folder / "unet.pth", weights_only=True)
    state.pop("conv_in.bias")
    state["extra.weight"] = torch.zeros(1)
    state["conv_out.weight"] = torch.zeros(4, 4, 3, 3)
    bad = tmp_path / "unet.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsMismatchError) as caught:
        models.load_unet(folder / "musetalk.json", bad, torch.device("cpu"), torch.float32)
    message = str(caught.value)
    assert "1 missing key(s): conv_in.bias" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "conv_out.weight (4, 4, 3, 3)" in message


def test_pickled_objects_are_refused(models_dir, tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected."""

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "unet.pth"
    torch.save({"conv_in.weight": Payload()}, bad)
    with pytest.raises(Exception) as caught:
        models.load_state_dict(bad)
    assert "weights_only" in str(caught.value) or "Unsupported" in str(caught.value)


def test_vae_with_old_attention_names_loads(models_dir):
    state = torch.load(models_dir / "sd-vae" / "diffusion_pytorch_model.bin", weights_only=True)
    assert any(".query." in key for key in state), "the saved file should use the old key names"
    vae = models.load_vae(models_dir / "sd-vae", torch.device("cpu"), torch.float32)
    new_key = next(k for k in vae.state_dict() if "mid_block.attentions.0.to_q.weight" in k)
    assert torch.equal(vae.state_dict()[new_key], state[new_key.replace(".to_q.", ".query.")])
    assert models.vae_scaling_factor(vae) == pytest.approx(0.18215)


def test_positional_encoding_values():
    encoding = models.positional_encoding(384, 50)
    assert encoding.shape == (50, 384)
    assert encoding[0, 0] == 0.0 and encoding[0, 1] == 1.0
    # channel pair k=1 at position 3: frequency exp(-ln(10000) * 2 / 384)
    frequency = math.exp(-math.log(10000.0) * 2 / 384)
    assert encoding[3, 2].item() == pytest.approx(math.sin(3 * frequency), abs=1e-6)
    assert encoding[3, 3].item() == pytest.approx(math.cos(3 * frequency), abs=1e-6)


def test_devices_and_dtypes():
    assert models.resolve_device("cpu").type == "cpu"
    assert models.resolve_dtype(torch.device("cpu")) == torch.float32
    assert models.resolve_dtype(torch.device("cuda")) == torch.float16
    assert models.resolve_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(InputError):
        models.resolve_device("tpu")
    with pytest.raises(InputError):
        models.resolve_dtype(torch.device("cpu"), "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            models.resolve_device("cuda")
