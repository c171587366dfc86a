"""SyncNet: the official architecture's shape, strict loading, the audio and face inputs, LSE-C / LSE-D."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk import cli, face, metrics, syncnet, weights
from musetalk.errors import WeightsMismatchError, WeightsMissingError

from test_metrics import FACE, base_face, mouth_frames, open_pattern, tone, write_clip, write_wav

# The official block layout (widths shrunk, groups to match): same names, same downsampling.
TINY_CONFIG = {
    "audio_encoder": {"in_channels": 1, "block_out_channels": [8, 8, 8, 8, 8, 8, 16],
                      "downsample_factors": [[2, 1], 2, 2, 1, 2, 2, [2, 3]]},
    "visual_encoder": {"in_channels": 48, "block_out_channels": [8, 8, 8, 8, 8, 8, 16, 16],
                       "downsample_factors": [[1, 2], 2, 2, 2, 2, 2, 2, 2]},
    "norm_num_groups": 4,
}


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A models folder holding only a tiny SyncNet, where `musetalk download --scoring` puts the real one."""
    root = tmp_path_factory.mktemp("scoring-models")
    torch.manual_seed(0)
    syncnet.save_syncnet(syncnet.SyncNet(TINY_CONFIG), root / "syncnet")
    return root


def test_the_official_architecture_has_the_checkpoints_size_and_names():
    with torch.device("meta"):
        model = syncnet.SyncNet(syncnet.official_config())
        visual = model.visual_encoder(torch.empty(1, 48, 128, 256))
        audio = model.audio_encoder(torch.empty(1, 1, 80, 52))
    assert tuple(visual.shape) == tuple(audio.shape) == (1, 2048, 1, 1)
    # 371.8 M fp32 parameters = 1.385 GiB, the size latentsync_syncnet.pt is reported to have.
    assert sum(p.numel() for p in model.parameters()) == 371_766_496
    keys = set(model.state_dict())
    assert "audio_encoder.down_blocks.3.conv1.weight" in keys
    assert "audio_encoder.down_blocks.3.downsample_conv.weight" not in keys  # factor 1: no downsampling
    assert "visual_encoder.down_blocks.0.conv_shortcut.weight" not in keys  # 64 -> 64
    assert "visual_encoder.down_blocks.1.conv_shortcut.weight" in keys  # 64 -> 128
    assert "visual_encoder.norm_out.weight" in keys and "audio_encoder.conv_in.bias" in keys
    assert not any("attn" in key for key in keys)


def test_mel_filters_match_an_independent_slaney_filter_bank():
    from transformers.audio_utils import mel_filter_bank

    reference = mel_filter_bank(num_frequency_bins=401, num_mel_filters=80, min_frequency=55.0,
                                max_frequency=7600.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(syncnet.mel_filters(), reference.T, atol=1e-12)


def test_melspectrogram_shape_range_and_pitch():
    t = np.arange(16000) / 16000
    mel = syncnet.melspectrogram((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    assert mel.shape == (80, 1 + 16000 // 200)
    assert mel.min() >= -4 and mel.max() <= 4
    band = int(np.argmax(mel[:, 40]))
    centres = syncnet._mel_to_hz(np.linspace(syncnet._hz_to_mel(55), syncnet._hz_to_mel(7600), 82))[1:-1]
    assert abs(centres[band] - 1000) < 100
    assert np.all(syncnet.melspectrogram(np.zeros(8000, dtype=np.float32)) == -4)
    # One 52-step window per 25 fps frame that fits: 1 s of audio = 81 steps -> starts 0, 3, 6, .. 28.
    assert len(syncnet.mel_windows(mel)) == 10


def test_faces_are_aligned_on_latentsyncs_template():
    import cv2

    image = cv2.cvtColor(cv2.imread(str(FACE)), cv2.COLOR_BGR2RGB)
    with face.FaceAnalyzer() as analyzer:
        points = analyzer.landmarks(image)
    matrix = syncnet.face_alignment(points)
    mapped = np.hstack([points, np.ones((len(points), 1))]) @ matrix.T
    brows = [mapped[list(syncnet.BROW_IMAGE_LEFT)].mean(0), mapped[list(syncnet.BROW_IMAGE_RIGHT)].mean(0)]
    template = syncnet.TEMPLATE * np.array([256 / 210, 256 / 280])
    np.testing.assert_allclose(brows, template[:2], atol=4)
    mouth, chin = mapped[13], mapped[152]
    assert abs(mouth[0] - 128) < 8 and 128 < mouth[1] < chin[1] < 256  # in the lower half, centred
    crop = syncnet.lower_face(image, points)
    assert crop.shape == (128, 256, 3) and crop.dtype == np.uint8


def test_lse_known_answers():
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(60, 16))
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    # Visual window t matches the audio 3 windows later: the picture shows the sound 120 ms early.
    visual = np.zeros((45, 16))
    visual[:] = audio[3:48]
    scores = syncnet.lse_scores(visual, np.ones(45, dtype=bool), audio)
    assert scores.lse_d == pytest.approx(0.0, abs=1e-9)
    assert scores.offset_ms == pytest.approx(-120.0)
    assert scores.lse_c == pytest.approx(np.sqrt(2), abs=0.1)  # random unit vectors lie about sqrt(2) apart
    assert scores.windows == 45
    # Windows without a face are left out; none at all gives no score.
    assert syncnet.lse_scores(visual, np.zeros(45, dtype=bool), audio) is None


def test_the_tiny_model_loads_strictly_from_the_official_place(tiny_models_dir):
    path = weights.syncnet_weights(tiny_models_dir)
    assert path == tiny_models_dir / "syncnet" / "latentsync_syncnet.pt"
    model = syncnet.load_syncnet(path)
    assert syncnet.load_syncnet(path) is model  # once per process
    saved = torch.load(path, weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])


def test_checkpoints_that_do_not_fit_are_refused(tiny_models_dir, tmp_path):
    folder = tmp_path / "syncnet"
    folder.mkdir()
    (folder / "syncnet.json").write_text(json.dumps(TINY_CONFIG))
    state = torch.load(tiny_models_dir / "syncnet" / "latentsync_syncnet.pt", weights_only=True)["state_dict"]
    target = folder / "latentsync_syncnet.pt"

    torch.save({"state_dict": {k: v for k, v in state.items() if "norm_out" not in k}}, target)
    with pytest.raises(WeightsMismatchError, match="missing"):
        syncnet.load_syncnet(target)
    torch.save(state, target)  # a bare state dict is fine
    syncnet.load_syncnet(target)
    target.write_bytes(target.read_bytes()[:500])  # an interrupted download
    with pytest.raises(WeightsMissingError, match="musetalk download --scoring"):
        syncnet.load_syncnet(target)
    target.write_bytes(pickle.dumps(Exploding(), protocol=2))  # a pickle that would run code is never unpickled
    with pytest.raises(WeightsMissingError):
        syncnet.load_syncnet(target)
    (folder / "syncnet.json").unlink()  # the official config: the tiny weights do not fit it
    torch.save({"state_dict": state}, target)
    with pytest.raises(WeightsMismatchError, match="wrong shape"):
        syncnet.load_syncnet(target)


class Exploding:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled')",))


def test_windows_need_a_face_in_all_16_frames_and_follow_the_stride(tiny_models_dir):
    import cv2

    image = cv2.cvtColor(cv2.imread(str(FACE)), cv2.COLOR_BGR2RGB)
    with face.FaceAnalyzer() as analyzer:
        points = analyzer.landmarks(image)
    scorer = syncnet.SyncNetScorer(syncnet.load_syncnet(tiny_models_dir / "syncnet" / "latentsync_syncnet.pt"))
    rows = [points] * 20
    embeddings, valid = scorer.visual_embeddings([image] * 20, rows)
    assert embeddings.shape == (5, 16) and valid.all()  # window starts 0..4
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert scorer.visual_embeddings([image] * 20, rows, stride=2)[1].tolist() == [True, False, True, False, True]
    rows[2] = None  # no face in frame 2: the windows starting at 0, 1 and 2 hold it
    assert scorer.visual_embeddings([image] * 20, rows)[1].tolist() == [False, False, False, True, True]


@pytest.fixture(scope="module")
def talking_clip(tmp_path_factory) -> Path:
    media = tmp_path_factory.mktemp("syncnet-media")
    flags = open_pattern(30, seed=5)
    return write_clip(media / "talking.mp4", mouth_frames(flags), write_wav(media / "tone.wav", tone(flags)))


def test_score_video_runs_syncnet_end_to_end(tiny_models_dir, talking_clip, capsys):
    scores = metrics.score_video(talking_clip, models_dir=tiny_models_dir, device="cpu")
    assert 0.0 <= scores.lse_d <= 2.0  # distances of unit vectors
    assert scores.lse_c >= 0.0
    assert abs(scores.syncnet_offset_ms) <= 600 and scores.syncnet_offset_ms % 40 == 0
    rows = {label: value for label, value, _ in scores.table_rows()}
    assert not rows["SyncNet distance (LSE-D)"].startswith("n/a")

    # Every other window only: the same kind of numbers from half the work.
    assert cli.main(["score", "--video", str(talking_clip), "--models-dir", str(tiny_models_dir),
                     "--device", "cpu", "--syncnet-stride", "2", "--json"]) == 0
    strided = json.loads(capsys.readouterr().out)["scores"]
    assert 0.0 <= strided["lse_d"] <= 2.0 and strided["lse_c"] >= 0.0
    assert strided["sync_correlation"] == pytest.approx(scores.sync_correlation)


def test_too_short_for_a_syncnet_window(tiny_models_dir, tmp_path):
    flags = open_pattern(12, seed=1)
    clip = write_clip(tmp_path / "short.mp4", mouth_frames(flags), write_wav(tmp_path / "t.wav", tone(flags)))
    scores = metrics.score_video(clip, models_dir=tiny_models_dir, device="cpu")
    assert scores.lse_c is None and "16 frames" in scores.reasons["lse_c"]


def test_without_weights_the_reason_says_how_to_get_them(tmp_path):
    assert weights.syncnet_weights(tmp_path) is None
    clip = write_clip(tmp_path / "still.mp4", [base_face()] * 20)
    scores = metrics.score_video(clip, models_dir=tmp_path)
    assert scores.lse_c is None and scores.reasons["lse_d"] == metrics.SYNCNET_MISSING


def test_download_scoring_fetches_latentsyncs_syncnet_into_the_models_folder(tmp_path, monkeypatch):
    import huggingface_hub

    target = tmp_path / "models"
    asked = []

    def fake_download(repo_id, filename, local_dir):
        asked.append((repo_id, filename, Path(local_dir)))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert cli.main(["download", "--models-dir", str(target), "--scoring"]) == 0
    # The version's files first, then the SyncNet, into the folder the official layout gives it.
    assert asked[-1] == ("ByteDance/LatentSync", "latentsync_syncnet.pt", target / "syncnet")
    assert [a for a in asked if a[0] == "ByteDance/LatentSync"] == asked[-1:]
    assert weights.syncnet_weights(target) == target / "syncnet" / "latentsync_syncnet.pt"
    asked.clear()
    assert cli.main(["download", "--models-dir", str(target)]) == 0  # without --scoring: nothing more
    assert asked == []
