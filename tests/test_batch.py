"""Batch files (`musetalk run --config jobs.yaml --out-dir X`): one rule for where outputs go, and the
whole batch checked (every field, every path, outputs that clash or are inputs) before the first job."""

from __future__ import annotations

from pathlib import Path

import pytest

from musetalk import cli
from musetalk.config import plan_batch
from musetalk.errors import InputError
from musetalk.video_io import probe

from conftest import EXAMPLES


@pytest.fixture
def folder(tmp_path, face_clip, speech_clip) -> Path:
    """A job file's folder holding its inputs (relative paths are relative to it)."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "face.mp4").symlink_to(face_clip)
    (jobs / "voice.wav").symlink_to(speech_clip)
    return jobs


def write_jobs(folder: Path, text: str) -> Path:
    path = folder / "jobs.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """A refusal must come before any model loads (and so before any job runs)."""
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("a model was loaded for a refused batch"))


def refused(capsys, config: Path, out_dir: Path, *extra: str) -> str:
    assert cli.main(["run", "--engine", "preview", "--config", str(config), "--out-dir", str(out_dir), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("musetalk: error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_relative_outputs_are_under_the_out_dir_and_nothing_escapes_it(folder, tmp_path, capsys, no_model):
    out_dir = tmp_path / "out"
    config = write_jobs(folder, "a:\n  video_path: face.mp4\n  audio_path: voice.wav\n"
                                "b:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: sub/named.mp4\n"
                                f"c:\n  video_path: face.mp4\n  audio_path: voice.wav\n"
                                f"  output_path: {tmp_path / 'abs.mp4'}\n")
    jobs = plan_batch(config, out_dir)
    assert [job.output for job in jobs] == [str(out_dir / "face_voice.mp4"), str(out_dir / "sub" / "named.mp4"),
                                            str(tmp_path / "abs.mp4")]
    assert not out_dir.exists(), "planning created folders"
    escaping = write_jobs(folder, "a:\n  video_path: face.mp4\n  audio_path: voice.wav\n"
                                  "  output_path: ../results/face_speech_mouth.mp4\n")
    error = refused(capsys, escaping, out_dir)
    assert "job 'a'" in error and "leaves the output folder" in error
    assert not (folder.parent / "results").exists() and not out_dir.exists()


def test_the_example_jobs_file_writes_under_the_out_dir(tmp_path):
    jobs = plan_batch(EXAMPLES / "jobs.yaml", tmp_path / "results")
    assert all(Path(job.output).parent == tmp_path / "results" for job in jobs)


def test_a_batch_runs_into_its_out_dir(folder, tmp_path, capsys):
    config = write_jobs(folder, "a:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: sub/named.mkv\n")
    assert cli.main(["run", "--engine", "preview", "--no-cache", "--config", str(config),
                     "--out-dir", str(tmp_path / "out")]) == 0
    assert probe(tmp_path / "out" / "sub" / "named.mkv").num_frames == 40


@pytest.mark.parametrize("jobs, expected", [
    # two jobs whose default outputs have the same name: the first result would be overwritten
    ("a:\n  video_path: face.mp4\n  audio_path: voice.wav\nb:\n  video_path: face.mp4\n  audio_path: voice.wav\n"
     "  parsing_mode: mouth\n", "jobs 'a' and 'b' in {config} both write {out}/face_voice.mp4"),
    ("a:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: x.mp4\n"
     "b:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: ./sub/../x.mp4\n", "both write"),
    # a job writing what a later job reads
    ("a:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: {folder}/made.mp4\n"
     "b:\n  video_path: made.mp4\n  audio_path: voice.wav\n", None),
    ("a:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: {folder}/face.mp4\n",
     "job 'a' in {config} writes {folder}/face.mp4, which job 'a' reads as its video"),
])
def test_outputs_that_clash_or_are_inputs_are_refused_before_the_first_job(folder, tmp_path, capsys, no_model,
                                                                          jobs, expected):
    out_dir = tmp_path / "out"
    if "made.mp4" in jobs:
        (folder / "made.mp4").write_bytes((folder / "face.mp4").read_bytes())  # an earlier result, read by b
        expected = f"job 'a' in {folder / 'jobs.yaml'} writes {folder}/made.mp4, which job 'b' reads as its video"
    config = write_jobs(folder, jobs.format(folder=folder))
    error = refused(capsys, config, out_dir)
    assert expected.format(config=config, out=out_dir, folder=folder) in error, error
    assert not out_dir.exists()


@pytest.mark.parametrize("field, message", [
    ("batch_size: 2.5", "batch_size must be a whole number (or left out), not 2.5"),
    ("silence_gate: 'no'", "silence_gate must be true or false, not 'no'"),
    ("face_index: 1.5", "face_index must be a whole number (or left out), not 1.5"),
    ("smoothing: yes", "smoothing must be a number, not True"),
    ("crf: 99", "crf must be a number from 0 to 51, not 99"),
    ("loop: sideways", "loop must be one of pingpong, loop, freeze, not 'sideways'"),
    ("colour: red", "unknown option(s) colour"),
    ("output_path: [a, b]", "output_path must be a file name, not ['a', 'b']"),
    ("output_path: out.webm", "must end in .mp4, .mov or .mkv"),
])
def test_every_field_is_checked_before_the_first_job(folder, tmp_path, capsys, no_model, field, message):
    """The bad field is in the last job: the first must not have run."""
    config = write_jobs(folder, "first:\n  video_path: face.mp4\n  audio_path: voice.wav\n"
                                f"last:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: other.mp4\n"
                                f"  {field}\n".replace("  output_path: other.mp4\n  output_path", "  output_path"))
    error = refused(capsys, config, tmp_path / "out")
    assert f"job 'last' in {config}: " in error and message in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry, message", [
    ("a:\n  video_path: missing.mp4\n  audio_path: voice.wav\n", "video_path {folder}/missing.mp4 does not exist"),
    ("a:\n  video_path: face.mp4\n", "audio_path must be the path of a file, not None"),
    ("a: just a string\n", "an entry needs video_path and audio_path"),
    ("- a list\n", "must map job names to entries"),
    ("a: [unclosed\n", "is not a valid YAML file"),
])
def test_a_malformed_job_file_is_one_line(folder, tmp_path, capsys, no_model, entry, message):
    error = refused(capsys, write_jobs(folder, entry), tmp_path / "out")
    assert message.format(folder=folder) in error, error


def test_an_out_dir_that_is_a_file_is_refused(folder, tmp_path, capsys, no_model):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the folder should be")
    config = write_jobs(folder, "a:\n  video_path: face.mp4\n  audio_path: voice.wav\n")
    assert "is a file" in refused(capsys, config, blocker)
    with pytest.raises(InputError, match="is a file, not a folder"):
        plan_batch(write_jobs(folder, "a:\n  video_path: face.mp4\n  audio_path: voice.wav\n  output_path: "
                                      f"{blocker}/x.mp4\n"), tmp_path / "elsewhere")
    assert blocker.read_text() == "a file where the folder should be"


def test_the_command_line_wins_over_the_file_and_is_checked_too(folder, tmp_path, capsys, no_model):
    config = write_jobs(folder, "a:\n  video_path: face.mp4\n  audio_path: voice.wav\n  crf: 30\n")
    assert plan_batch(config, tmp_path, {"crf": 20})[0].options.crf == 20
    assert "crf must be a number from 0 to 51, not 70" in refused(capsys, config, tmp_path / "out", "--crf", "70")
