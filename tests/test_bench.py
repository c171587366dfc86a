import json

import pytest
import torch

from musetalk import cli
from musetalk.model_bench import VARIANTS, VariantReport, VariantTiming, format_variants


def test_bench_reports_every_stage_and_the_cached_rerun(capsys):
    assert cli.main(["bench", "--model", "tiny", "--size", "192x144", "--seconds", "1", "--device", "cpu",
                     "--cpu-workers", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["width"], report["height"], report["model"]) == (192, 144, "tiny")
    assert report["cpu_workers"] == 2
    assert report["torch_threads"] == torch.get_num_threads()
    assert report["floor_fps"] > 0
    first, again = report["runs"]
    assert first["frames"] == again["frames"] == 25
    for stage in ("face", "whisper", "vae_encode", "unet", "vae_decode", "blend", "encode"):
        assert first["stages"][stage] > 0, stage
    assert "face" not in again["stages"] and "vae_encode" not in again["stages"]
    assert first["peak_ram_mb"] > 100 and first["realtime_factor"] > 0
    model = first["stages"]["vae_encode"] + first["stages"]["unet"] + first["stages"]["vae_decode"]
    assert first["model_seconds"] == round(model, 3)
    # The report computes it from the unrounded times; both times here are rounded to 1 ms, so the
    # percentage recomputed from them can be off by that rounding (more, the shorter the model's time).
    low = 100 * ((first["seconds"] - 5e-4) / (first["model_seconds"] + 5e-4) - 1)
    high = 100 * ((first["seconds"] + 5e-4) / (first["model_seconds"] - 5e-4) - 1)
    assert low - 0.05 <= first["outside_model_percent"] <= high + 0.05  # 0.05: its own rounding to 0.1
    assert report["batch_size"] is None and first["batch_size"] == again["batch_size"] == 8  # auto on a CPU


def test_the_variants_time_the_model_alone(capsys):
    assert cli.main(["bench", "--variants", "--model", "tiny", "--device", "cpu", "--batch-size", "2", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "timing channels_last" in captured.err
    assert report["batch_size"] == 2
    variants = {variant["name"]: variant for variant in report["variants"]}
    assert list(variants) == [name for name in VARIANTS if name != "compile"]  # compile only with --compile
    for name in ("baseline", "channels_last", "classic_attention"):
        assert all(variants[name][stage] > 0 for stage in ("vae_encode_ms", "unet_ms", "vae_decode_ms")), name
    for name in ("bf16", "cudnn_benchmark"):
        assert variants[name]["unet_ms"] is None and "not timed on a CPU" in variants[name]["note"]
    for name in ("partial_decode", "tiny_decoder"):  # they change the decoder only
        assert variants[name]["vae_encode_ms"] is None and variants[name]["vae_decode_ms"] > 0
    table = format_variants(VariantReport(**{**report, "variants": [VariantTiming(**v) for v in report["variants"]]}))
    assert table[0].startswith("model: tiny (random weights) on cpu") and len(table) == 2 + len(variants)


def test_cache_command_lists_and_clears(models_dir, face_clip, speech_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUSETALK_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--video", str(face_clip),
                     "--audio", str(speech_clip), "--out", str(tmp_path / "out.mp4")]) == 0
    capsys.readouterr()
    assert cli.main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert "1 entries" in listing and str(face_clip) in listing
    assert cli.main(["cache", "clear"]) == 0
    assert cli.main(["cache"]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_no_cache_leaves_nothing(models_dir, face_clip, speech_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSETALK_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", "--no-cache", "--video",
                     str(face_clip), "--audio", str(speech_clip), "--out", str(tmp_path / "out.mp4")]) == 0
    assert not (tmp_path / "cache").exists()
