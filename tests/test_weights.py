import shutil

import pytest

from musetalk import weights
from musetalk.errors import WeightsMissingError
from musetalk.pipeline import LipSyncPipeline
from musetalk.testing import save_taesd


def test_resolves_the_official_layout(models_dir):
    files = weights.resolve("v15", models_dir)
    assert files.unet.config == models_dir / "musetalkV15" / "musetalk.json"
    assert files.unet.weights == models_dir / "musetalkV15" / "unet.pth"
    assert files.vae_dir == models_dir / "sd-vae"
    assert files.whisper_dir == models_dir / "whisper"
    assert weights.resolve("v1", models_dir).unet.weights == models_dir / "musetalk" / "pytorch_model.bin"


def test_missing_files_are_named_with_the_command_that_fetches_them(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    partial = tmp_path / "models"
    shutil.copytree(models_dir, partial)
    (partial / "musetalkV15" / "unet.pth").unlink()
    (partial / "whisper" / "preprocessor_config.json").write_bytes(b"")  # an empty file counts as missing
    with pytest.raises(WeightsMissingError) as caught:
        weights.resolve("v15", partial)
    message = str(caught.value)
    assert "musetalkV15/unet.pth" in message
    assert "whisper/preprocessor_config.json" in message
    assert "sd-vae" not in message
    assert f"musetalk download --version v15 --models-dir {partial}" in message


def test_models_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.MODELS_DIR_ENV, str(tmp_path / "here"))
    assert weights.default_models_dir() == tmp_path / "here"
    monkeypatch.delenv(weights.MODELS_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert weights.default_models_dir() == tmp_path / "cache" / "musetalk-studio" / "models"


def test_corrupt_checkpoint_says_what_to_do(models_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    weights_file = broken / "musetalkV15" / "unet.pth"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(WeightsMissingError) as caught:
        LipSyncPipeline.from_pretrained(broken, "v15", device="cpu")
    assert "corrupt or incomplete" in str(caught.value)
    assert "musetalk download" in str(caught.value)


def test_download_without_network_fails_clearly_and_keeps_present_files(models_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as a machine with no network answers, at once
    target = tmp_path / "models"
    shutil.copytree(models_dir, target)
    (target / "musetalkV15" / "unet.pth").unlink()
    before = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
    with pytest.raises(WeightsMissingError, match="could not fetch TMElyralab/MuseTalk/musetalkV15/unet.pth"):
        weights.download("v15", target)
    after = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert after == before


def test_the_draft_decoder_is_fetched_only_when_asked_for(models_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    target = tmp_path / "models"
    shutil.copytree(models_dir, target)
    assert all(path.exists() for path in weights.download("v15", target))  # everything there: nothing fetched
    with pytest.raises(WeightsMissingError, match="could not fetch madebyollin/taesd/config.json"):
        weights.download("v15", target, draft=True)


def test_a_damaged_draft_decoder_says_what_to_do(models_dir, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(models_dir, target)
    weights_file = save_taesd(target) / "diffusion_pytorch_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(WeightsMissingError, match="draft decoder .* is damaged.*musetalk download --draft"):
        LipSyncPipeline.from_pretrained(target, "v15", device="cpu", cache_dir=False, engine="draft")


def test_with_nothing_downloaded_the_draft_engine_names_one_command_for_all(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(WeightsMissingError, match=r"taesd/config.json.*musetalk download --version v15 .* --draft$"):
        LipSyncPipeline.from_pretrained(tmp_path / "none", "v15", device="cpu", cache_dir=False, engine="draft")
