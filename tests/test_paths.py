"""Output paths that cannot be written: one `musetalk: error:` line that says what to change, before any
work, and nothing created (no file, no folder), for `musetalk run`, `musetalk tts` and the library."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from musetalk import cli, speech
from musetalk.config import RunOptions
from musetalk.errors import InputError
from musetalk.pipeline import LipSyncPipeline


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: a read-only one of its own, or (as root, who may write
    anywhere on a writable disk) the kernel's read-only sysfs."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    sysfs = Path("/sys/kernel")
    if not sysfs.is_dir():
        pytest.skip("running as root without sysfs: no folder here refuses root's writes")
    return sysfs


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("musetalk: error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("a model was loaded for a refused job"))


def test_run_refuses_outputs_it_cannot_write_before_any_work(tmp_path, face_clip, speech_clip, capsys, no_model):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    cases = [
        (blocker / "out.mp4", f"{blocker} is a file, not a folder"),  # was FileExistsError
        (blocker / "new" / "out.mp4", f"{blocker} is a file, not a folder"),
        (read_only_folder(tmp_path) / "out.mp4", "is not writable"),  # was OSError 30
        (read_only_folder(tmp_path) / "new" / "out.mp4", "is not writable"),
        (tmp_path, "is a folder"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for out, expected in cases:
        assert cli.main(["run", "--engine", "preview", "--video", str(face_clip), "--audio", str(speech_clip),
                         "--out", str(out)]) == 2
        assert expected in one_error_line(capsys)
        assert not out.exists() or out == tmp_path
    assert sorted(tmp_path.rglob("*")) == before, "something was created"
    assert blocker.read_text() == "a file, not a folder"


def test_tts_refuses_outputs_it_cannot_write_before_speaking(tmp_path, capsys, fresh_plugins_and_speech_cache):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        (folder, "is a folder; give a file name such as"),  # was IsADirectoryError
        (tmp_path / "new" / "speech.mp3", "give an output name ending in .wav"),
        (read_only_folder(tmp_path) / "speech.wav", "is not writable"),
    ]
    for out, expected in cases:
        assert cli.main(["tts", "--text", "Hello.", "--out", str(out)]) == 2
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "new").exists() and list(folder.iterdir()) == []
    assert not (tmp_path / "speech-cache").exists(), "the text was spoken before the output was checked"


def test_a_refused_or_failed_job_leaves_no_new_folders(tmp_path, face_clip, speech_clip, capsys, models_dir):
    """New output folders are made only when the encoder starts, and go again when the job fails."""
    silent = tmp_path / "silent.mp4"
    silent.symlink_to(face_clip)  # no audio stream: refused after the inputs are probed
    assert cli.main(["run", "--engine", "preview", "--video", str(face_clip), "--audio", str(silent),
                     "--out", str(tmp_path / "new" / "deeper" / "out.mp4")]) == 2
    assert "has no audio stream" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()

    pipeline = LipSyncPipeline.from_pretrained(engine="preview", cache_dir=False)

    def stop_midway(stage, done, total):
        if stage == "generate":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline(face_clip, speech_clip, tmp_path / "made" / "sub" / "out.mp4", RunOptions(), progress=stop_midway)
    assert not (tmp_path / "made").exists(), "the stopped job left its new folders"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("someone else's")
    with pytest.raises(KeyboardInterrupt):
        pipeline(face_clip, speech_clip, tmp_path / "kept" / "sub" / "out.mp4", RunOptions(), progress=stop_midway)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["other.txt"], "a folder it did not make went"
    result = pipeline(face_clip, speech_clip, tmp_path / "made" / "sub" / "out.mp4")
    assert Path(result.output_path).is_file()


def test_the_library_says_the_same_without_the_command(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        speech.synthesize_text("Hello.", out_path=blocker / "speech.wav", cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="is a folder"):
        speech.synthesize_text("Hello.", out_path=tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
