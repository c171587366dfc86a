"""End to end through ``musetalk run`` with the tiny models loaded by the real loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk import blending, cli, face, schedule
from musetalk.config import RunOptions
from musetalk.errors import InputError
from musetalk.pipeline import LipSyncPipeline
from musetalk.video_io import FrameWriter, probe, read_frames

from conftest import ffmpeg

MARK = 24  # side of the top-left square whose grey level encodes the source frame index


def mark_value(index: int) -> int:
    return 12 + 20 * index


def read_mark(frame: np.ndarray) -> int:
    return int(round((frame[4:MARK - 4, 4:MARK - 4].mean() - 12) / 20))


@pytest.fixture(scope="module")
def pipeline(models_dir) -> LipSyncPipeline:
    return LipSyncPipeline.from_pretrained(models_dir, "v15", device="cpu")


@pytest.fixture(scope="module")
def indexed_clip(face_clip, tmp_path_factory) -> Path:
    """The first 12 frames of the face clip, each carrying its index in a grey square (top left)."""
    path = tmp_path_factory.mktemp("indexed") / "indexed.mp4"
    frames = list(read_frames(face_clip, max_frames=12))
    with FrameWriter(path, frames[0].shape[1], frames[0].shape[0], 25, crf=4) as writer:
        for index, frame in enumerate(frames):
            frame = frame.copy()
            frame[:MARK, :MARK] = mark_value(index)
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def gap_clip(face_clip, tmp_path_factory) -> Path:
    """The face clip with frames 10..19 painted flat grey: no face there."""
    path = tmp_path_factory.mktemp("gap") / "gap.mp4"
    frames = list(read_frames(face_clip))
    with FrameWriter(path, frames[0].shape[1], frames[0].shape[0], 25, crf=4) as writer:
        for index, frame in enumerate(frames):
            writer.write(np.full_like(frame, 128) if 10 <= index < 20 else frame)
    return path


def run_cli(models_dir: Path, *args: str) -> int:
    return cli.main(["run", "--models-dir", str(models_dir), "--device", "cpu", *args])


def test_run_matches_input_size_rate_and_audio_length(models_dir, face_clip, speech_clip, tmp_path):
    out = tmp_path / "dubbed.mp4"
    assert run_cli(models_dir, "--video", str(face_clip), "--audio", str(speech_clip), "--out", str(out)) == 0
    source, result, speech = probe(face_clip), probe(out), probe(speech_clip)
    assert (result.width, result.height) == (source.width, source.height)
    assert result.fps == pytest.approx(source.fps)
    assert result.num_frames == int(speech.duration * source.fps)  # 40: longer than the 30-frame video
    assert result.duration == pytest.approx(speech.duration, abs=0.05)
    assert result.has_audio
    assert not list(tmp_path.glob(".*partial*")), "no temp file is left beside the output"


def test_only_the_lower_face_changes(pipeline, face_clip, speech_clip, tmp_path):
    out = tmp_path / "dubbed.mp4"
    result = pipeline(face_clip, speech_clip, out, RunOptions(length="video", crf=0))
    assert result.frames_with_face == result.num_frames == 30
    with face.FaceAnalyzer() as analyzer:
        for index, (before, after) in enumerate(zip(read_frames(face_clip), read_frames(out))):
            landmarks = analyzer.landmarks(before)
            track = face.FaceTrack(landmarks[None], np.array([True]), before.shape[1], before.shape[0])
            box = face.crop_boxes(track)[0]
            x1, y1, x2, y2 = blending.face_square(box, before.shape[1], before.shape[0])
            outside = np.ones(before.shape[:2], bool)
            outside[(y1 + y2) // 2 + 2 : y2, x1:x2] = False  # only the lower half of the face square may change
            difference = np.abs(before.astype(int) - after.astype(int))
            assert difference[outside].mean() < 1.5, f"frame {index} changed outside the lower face"
            assert difference[~outside].mean() > 2.0, f"frame {index}: the lower face was not redrawn"


def test_frames_without_a_face_pass_through(pipeline, gap_clip, speech_clip, tmp_path):
    out = tmp_path / "gap.mp4"
    result = pipeline(gap_clip, speech_clip, out, RunOptions(length="video"))
    assert result.num_frames == 30
    assert result.frames_with_face == 20
    for index, (before, after) in enumerate(zip(read_frames(gap_clip), read_frames(out))):
        if 10 <= index < 20:
            assert np.abs(before.astype(int) - after.astype(int)).mean() < 1.0


@pytest.mark.parametrize("mode", ["pingpong", "loop", "freeze"])
def test_audio_longer_than_the_video_follows_the_loop_mode(pipeline, indexed_clip, speech_clip, tmp_path, mode):
    out = tmp_path / f"{mode}.mp4"
    result = pipeline(indexed_clip, speech_clip, out, RunOptions(loop=mode))
    assert result.num_frames == 40
    shown = [read_mark(frame) for frame in read_frames(out)]
    assert shown == schedule.frame_schedule(40, 12, mode).tolist()


def test_length_video_keeps_the_video_length(pipeline, indexed_clip, speech_clip, tmp_path):
    out = tmp_path / "video-length.mp4"
    pipeline(indexed_clip, speech_clip, out, RunOptions(length="video"))
    info = probe(out)
    assert info.num_frames == 12
    assert info.duration == pytest.approx(12 / 25, abs=0.05)
    assert info.has_audio


def test_a_photo_is_a_valid_video(models_dir, speech_clip, tmp_path):
    photo = Path(__file__).parent / "data" / "face.jpg"
    out = tmp_path / "photo.mp4"
    assert run_cli(models_dir, "--video", str(photo), "--audio", str(speech_clip), "--out", str(out)) == 0
    info = probe(out)
    assert (info.width, info.height) == (probe(photo).width, probe(photo).height)
    assert info.fps == pytest.approx(25)
    assert info.num_frames == 40


def test_fps_conversion(pipeline, face_clip, speech_clip, tmp_path):
    out = tmp_path / "30fps.mp4"
    result = pipeline(face_clip, speech_clip, out, RunOptions(fps=30))
    info = probe(out)
    assert info.fps == pytest.approx(30)
    assert info.num_frames == result.num_frames == 48  # 1.6 s at 30 fps


def test_same_input_same_output(pipeline, face_clip, speech_clip, tmp_path):
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"
    options = RunOptions(length="video", crf=0)
    pipeline(face_clip, speech_clip, first, options)
    pipeline(face_clip, speech_clip, second, options)
    for a, b in zip(read_frames(first), read_frames(second)):
        assert np.array_equal(a, b)


def test_version_1_runs_with_its_own_weights(models_dir, face_clip, speech_clip, tmp_path):
    out = tmp_path / "v1.mp4"
    assert run_cli(models_dir, "--version", "v1", "--bbox-shift", "5", "--video", str(face_clip),
                   "--audio", str(speech_clip), "--out", str(out)) == 0
    assert probe(out).num_frames == 40


def test_jobs_file_runs_every_job(models_dir, face_clip, speech_clip, tmp_path):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"task_0:\n  video_path: {face_clip}\n  audio_path: {speech_clip}\n"
        f"task_1:\n  video_path: {face_clip}\n  audio_path: {speech_clip}\n"
        f"  output_path: named.mp4\n  parsing_mode: mouth\n  loop: freeze\n"
    )
    assert run_cli(models_dir, "--config", str(jobs), "--out-dir", str(tmp_path / "results")) == 0
    assert probe(tmp_path / "results" / f"{face_clip.stem}_{speech_clip.stem}.mp4").num_frames == 40
    assert probe(tmp_path / "results" / "named.mp4").num_frames == 40  # relative outputs are under --out-dir


def test_no_face_anywhere_is_one_clear_line(models_dir, speech_clip, tmp_path, capsys):
    blank = tmp_path / "blank.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=160x120:d=1:r=25", "-pix_fmt", "yuv420p", str(blank))
    out = tmp_path / "never.mp4"
    assert run_cli(models_dir, "--video", str(blank), "--audio", str(speech_clip), "--out", str(out)) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().split("\n")[-1].split("\r")[-1]  # the line after the progress bars
    assert error.startswith("musetalk: error: No face was found in any of the 25 frames")
    assert "Traceback" not in stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [blank]


def test_user_mistakes_are_one_line_with_no_output(models_dir, face_clip, speech_clip, tmp_path, capsys):
    out = tmp_path / "never.mp4"
    cases = [
        (["--video", str(tmp_path / "missing.mp4"), "--audio", str(speech_clip), "--out", str(out)], "does not exist"),
        (["--video", str(face_clip), "--audio", str(face_clip), "--out", str(out)], "no audio stream"),
        (["--video", str(face_clip), "--audio", str(speech_clip), "--out", str(tmp_path / "x.gif")], "must end in"),
        (["--video", str(face_clip), "--audio", str(speech_clip), "--out", str(face_clip)], "is also an input"),
        (["--video", str(face_clip), "--audio", str(speech_clip), "--out", str(out), "--batch-size", "0"], "batch_size"),
        (["--video", str(face_clip)], "needs --audio, --out"),
    ]
    for args, expected in cases:
        assert run_cli(models_dir, *args) == 2, args
        error = capsys.readouterr().err
        assert expected in error and error.count("\n") == 1, error
    assert not out.exists()


def test_missing_weights_say_how_to_fetch_them(face_clip, speech_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    code = run_cli(tmp_path / "no-models", "--video", str(face_clip), "--audio", str(speech_clip),
                   "--out", str(tmp_path / "out.mp4"))
    assert code == 2
    assert "musetalk download --version v15" in capsys.readouterr().err


def test_pipeline_refuses_options_for_another_version(pipeline, face_clip, speech_clip, tmp_path):
    with pytest.raises(InputError, match="loaded with the v15 weights"):
        pipeline(face_clip, speech_clip, tmp_path / "x.mp4", RunOptions(version="v1"))


def test_doctor_reports_each_check(models_dir, capsys):
    assert cli.main(["doctor", "--models-dir", str(models_dir)]) == 0
    report = capsys.readouterr().out
    for name in ("ffmpeg", "mediapipe", "torch", "weights v15", "weights v1", "diffusers"):
        assert any(line.startswith("ok") and f" {name} " in line for line in report.splitlines()), (name, report)
    assert "musetalk download --draft" in report  # optional: the tiny models have no TAESD


def test_download_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["download", "--models-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("musetalk: error: could not fetch TMElyralab/MuseTalk/musetalkV15/musetalk.json")
    assert error.count("\n") == 1


def test_batch_size_is_a_number_or_auto_and_the_command_line_wins():
    parser = cli.build_parser()
    base = ["run", "--video", "v.mp4", "--audio", "a.wav", "--out", "o.mp4"]
    assert cli.job_options(parser.parse_args(base)).batch_size is None  # auto by default
    assert cli.job_options(parser.parse_args(base + ["--batch-size", "16"])).batch_size == 16
    from_file = {"batch_size": 16}
    assert cli.job_options(parser.parse_args(base), from_file).batch_size == 16
    assert cli.job_options(parser.parse_args(base + ["--batch-size", "auto"]), from_file).batch_size is None
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--batch-size", "many"])
