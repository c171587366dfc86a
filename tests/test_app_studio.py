"""The studio's service layer without a server: settings, limits, request folders, variants,
history, weights fetched on first use with progress through the real stages."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from musetalk import studio as studio_lib
from musetalk.config import RunOptions
from musetalk.errors import InputError
from musetalk.studio import Speech, Studio, StudioConfig
from musetalk.testing import save_taesd
from musetalk.video_io import probe

from conftest import ffmpeg


def test_settings_come_from_the_environment_and_flags_win():
    environ = {"MUSETALK_MAX_SECONDS": "30", "MUSETALK_MAX_UPLOAD_MB": "50", "MUSETALK_QUEUE_SIZE": "3"}
    config = StudioConfig.from_env(environ, max_upload_mb=80, queue_size=None)
    assert (config.max_seconds, config.max_upload_mb, config.queue_size) == (30.0, 80, 3)
    with pytest.raises(InputError, match="MUSETALK_MAX_SECONDS='long' is not a valid float"):
        StudioConfig.from_env({"MUSETALK_MAX_SECONDS": "long"})
    with pytest.raises(InputError, match="queue_size must be positive"):
        StudioConfig.from_env({}, queue_size=0)


def test_request_folders_are_pruned_by_age(tmp_path):
    folders = studio_lib.JobFolders(tmp_path / "work", keep_seconds=60)
    old, fresh = folders.new("generate"), folders.new("compare")
    (old / "result.mp4").write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert folders.prune() == 1
    assert not old.exists() and fresh.is_dir()
    assert fresh.name.startswith("compare-")


def test_a_studio_removes_the_work_folder_it_made(tmp_path):
    made = Studio(StudioConfig(models_dir=str(tmp_path)))
    folder = made.jobs.new("generate")
    made.close()
    assert not folder.exists() and not made.work_dir.exists()
    given = tmp_path / "kept"
    Studio(StudioConfig(models_dir=str(tmp_path), work_dir=str(given))).close()
    assert given.is_dir(), "a work folder named by the user is left in place"


def test_variants_from_table_rows():
    text = Speech(text="Hello", source="espeak", voice="en-us")
    base = RunOptions(extra_margin=12)
    rows = [["", "", "de", "", "mouth", ""], ["", "", "", "", "", ""], ["Older model", "", "", "v1", "", "5"]]
    first, second = studio_lib.variants_from_rows(rows, text, base)
    assert first.speech.voice == "de" and first.speech.text == "Hello"
    assert first.options.parsing_mode == "mouth" and first.options.extra_margin == 12
    assert first.label == "mouth"
    assert second.label == "Older model" and second.options.version == "v1" and second.options.extra_margin == 5

    both = Speech(audio="speech.wav")
    audio_variant, = studio_lib.variants_from_rows([["", "audio", "", "", "", ""]], both, base)
    assert audio_variant.speech == Speech(audio="speech.wav")
    with pytest.raises(InputError, match="variant row 1 speaks with 'espeak', but there is no text"):
        studio_lib.variants_from_rows([["", "espeak", "", "", "", ""]], both, base)
    with pytest.raises(InputError, match="variant row 1 uses the audio, but no audio was given"):
        studio_lib.variants_from_rows([["", "audio", "", "", "", ""]], text, base)
    with pytest.raises(InputError, match="variant row 2: version must be one of v15, v1"):
        studio_lib.variants_from_rows([["a"], ["b", "", "", "v3"]], text, base)
    with pytest.raises(InputError, match="extra margin must be a whole number"):
        studio_lib.variants_from_rows([["a", "", "", "", "", "wide"]], text, base)
    with pytest.raises(InputError, match="variant row 1: engine must be one of musetalk, draft, preview, not 'dall'"):
        studio_lib.variants_from_rows([["a", "", "", "", "", "", "dall"]], text, base)
    # "official" written out: the version's own mask, whatever the job's mask is set to.
    official, = studio_lib.variants_from_rows([["", "", "", "", "official"]], text, base.replace(parsing_mode="mouth"))
    assert official.options.parsing_mode is None and official.options.mask_mode() == "jaw"
    engines = studio_lib.variants_from_rows([["", "", "", "", "", "", "preview"], ["b"]], text, base, "musetalk")
    assert [variant.engine for variant in engines] == ["preview", "musetalk"] and engines[0].label == "preview"


def test_history_keeps_the_latest_and_lists_files_still_there(tmp_path):
    kept = tmp_path / "kept.mp4"
    kept.write_bytes(b"x")
    history = None
    for index in range(studio_lib.HISTORY_LIMIT + 3):
        history = studio_lib.history_add(history, "dub", f"job {index}", [kept, tmp_path / "pruned.mp4"], "ok")
    assert len(history) == studio_lib.HISTORY_LIMIT
    assert studio_lib.history_rows(history)[0][2] == f"job {studio_lib.HISTORY_LIMIT + 2}"
    assert studio_lib.history_files(history[:2]) == [str(kept), str(kept)]


def test_limits_on_what_a_request_brings(tmp_path, face_clip, speech_clip):
    strict = Studio(StudioConfig(models_dir=str(tmp_path), work_dir=str(tmp_path / "work"), max_seconds=1.0,
                                 max_text_chars=10))
    with pytest.raises(InputError, match=r"the video lasts 1.2 s; this studio takes videos up to 1 s"):
        strict.check_video(face_clip)
    with pytest.raises(InputError, match=r"the audio lasts 1.6 s"):
        strict.check_audio(speech_clip)
    with pytest.raises(InputError, match="upload a video or a photo"):
        strict.check_video(None)
    with pytest.raises(InputError, match="either as audio or as text, not both"):
        strict.speech_audio(Speech(audio=str(speech_clip), text="hi"), str(face_clip))
    with pytest.raises(InputError, match="the text has 26 characters; this studio speaks up to 10"):
        strict.speech_audio(Speech(text="a sentence far too long..."), str(face_clip))
    tiny = Studio(StudioConfig(models_dir=str(tmp_path), work_dir=str(tmp_path / "work"), max_upload_mb=1))
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * 1_100_000)
    with pytest.raises(InputError, match="the audio is 1 MB; this studio takes files up to 1 MB"):
        tiny.check_audio(big)
    with pytest.raises(InputError, match="a comparison needs 2 to 4 variants, not 1"):
        tiny.compare(face_clip, [studio_lib.Variant("one", Speech(audio=str(speech_clip)), RunOptions())])


def test_without_weights_the_studio_says_so_and_fetches_them_on_the_first_run(tmp_path, models_dir, face_clip):
    models = tmp_path / "models"
    fetched = []

    def fake_download(version, target, draft=False):
        """Stands in for the network only: it copies the tiny models' files, which then go
        through the real loader."""
        assert not draft
        fetched.append(version)
        for name in ("musetalkV15", "sd-vae", "whisper"):
            shutil.copytree(models_dir / name, Path(target) / name)

    made = Studio(StudioConfig(models_dir=str(models), device="cpu", work_dir=str(tmp_path / "work")),
                  download_weights=fake_download)
    assert not made.load_models()
    assert made.default_engine() == "preview", "without weights the preview engine is the default"
    assert "MuseTalk 1.5: missing musetalkV15/musetalk.json" in made.weights_status()
    assert "fetched on the first run" in made.weights_status()

    reports = []
    short = tmp_path / "short.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:duration=0.6", str(short))
    job = made.generate(face_clip, Speech(audio=str(short)), RunOptions(),
                        progress=lambda fraction, text: reports.append((fraction, text)), score=False)
    assert fetched == ["v15"]
    assert "MuseTalk 1.5: ready (loaded)" in made.weights_status()
    # with the weights: MuseTalk by default on a GPU, the preview engine on a CPU
    assert made.default_engine() == ("musetalk" if made.has_gpu() else "preview")
    assert probe(job.output).num_frames == 15

    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    steps = ["downloading", "loading", "face analysis", "generating", "encoding", "done"]
    texts = [text for _, text in reports]
    positions = [next(i for i, text in enumerate(texts) if step in text) for step in steps]
    assert positions == sorted(positions), texts
    made.close()


def test_the_draft_engine_fetches_its_decoder_on_first_use(tmp_path, models_dir, face_clip):
    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    asked = []

    def fake_download(version, target, draft=False):
        """Stands in for the network only: it saves a small TAESD in its published layout."""
        asked.append((version, draft))
        save_taesd(Path(target))

    made = Studio(StudioConfig(models_dir=str(models), device="cpu", work_dir=str(tmp_path / "work")),
                  download_weights=fake_download)
    assert "Draft decoder (TAESD): fetched (10 MB) on the first run of the draft engine" in made.weights_status()
    short = tmp_path / "short.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:duration=0.6", str(short))
    job = made.generate(face_clip, Speech(audio=str(short)), RunOptions(), score=False, engine="draft")
    assert asked == [("v15", True)]
    assert job.result.engine == "draft" and probe(job.output).num_frames == 15
    # One copy of the models serves both qualities: the draft engine is MuseTalk's with TAESD decoding.
    full, draft = made.pipeline("v15"), made.pipeline("v15", engine="draft")
    assert draft.engine.unet is full.engine.unet and draft.engine.vae is full.engine.vae
    assert full.engine.name == "musetalk" and draft.engine.name == "draft"
    assert "Draft decoder (TAESD): ready" in made.weights_status()
    made.close()


def test_a_failed_request_leaves_no_folder(tmp_path, face_clip):
    made = Studio(StudioConfig(models_dir=str(tmp_path), work_dir=str(tmp_path / "work")),
                  load_pipeline=lambda *args: object())
    with pytest.raises(InputError, match="give the new speech"):
        made.generate(face_clip, Speech())
    assert list(made.work_dir.iterdir()) == []


def test_a_dub_brings_its_scores_made_in_its_own_pass_then_its_side_by_side(tmp_path, face_clip, speech_clip):
    made = Studio(StudioConfig(work_dir=str(tmp_path / "work")))
    reports = []
    job = made.generate(face_clip, Speech(audio=str(speech_clip)), RunOptions(), engine="preview",
                        progress=lambda fraction, text: reports.append(text))
    assert job.scores.face_coverage == 1.0 and job.scores.identity_psnr > 30
    assert "scores" in job.timings and "Dubbed: finishing the scores" in reports
    folders = set(made.work_dir.iterdir())

    reports.clear()
    beside = made.side_by_side(face_clip, job.output, "pingpong",
                               progress=lambda fraction, text: reports.append((fraction, text)))
    info, dub = probe(beside.path), probe(job.output)
    assert info.num_frames == beside.num_frames == job.result.num_frames == 40 and info.has_audio
    assert info.width == 2 * 216 + 4  # the original and the dub, as compare.side_by_side lays them out
    assert info.duration == pytest.approx(dub.duration, abs=0.05)
    # In a request folder of its own; the dub's is untouched.
    assert Path(beside.path).parent not in folders and Path(job.output).is_file()
    # Its progress counts the frames as they are written.
    assert reports[0] == (0.0, "side-by-side video") and reports[-1] == (1.0, "side-by-side video: frame 40 of 40")
    assert [fraction for fraction, _ in reports] == sorted(fraction for fraction, _ in reports)
    made.close()


def test_a_side_by_side_of_nothing_or_of_a_missing_file_says_what_to_do(tmp_path, face_clip):
    made = Studio(StudioConfig(work_dir=str(tmp_path / "work")))
    with pytest.raises(InputError, match="there is no dub to put beside the original yet; generate one first"):
        made.side_by_side(face_clip, None)
    with pytest.raises(InputError, match="the video file gone.mp4 does not exist; upload it again"):
        made.side_by_side(face_clip, tmp_path / "gone.mp4")
    with pytest.raises(InputError, match="loop must be one of pingpong, loop, freeze, not 'backwards'"):
        made.side_by_side(face_clip, face_clip, "backwards")
    assert list(made.work_dir.iterdir()) == [], "no request folder is left by a refused side-by-side"
    made.close()


def test_a_dub_whose_scoring_fails_leaves_no_folder(tmp_path, face_clip, speech_clip, monkeypatch):
    from musetalk import metrics

    def broken(self, item):
        raise InputError("the scorer broke")

    monkeypatch.setattr(metrics.FrameScorer, "_measure", broken)
    made = Studio(StudioConfig(work_dir=str(tmp_path / "work")))
    with pytest.raises(InputError, match="the scorer broke"):
        made.generate(face_clip, Speech(audio=str(speech_clip)), RunOptions(), engine="preview")
    assert list(made.work_dir.iterdir()) == []
    made.close()


def test_the_scores_progress_moves_forward_through_their_stages():
    seen = []
    report = studio_lib._scoring_progress(studio_lib._Span(lambda f, text: seen.append((f, text)), 0.9, 1.0), "Dubbed")
    for stage, total in (("faces", 4), ("identity", 3), ("syncnet", 2)):
        for done in range(total + 1):
            report(stage, done, total)
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.9 and fractions[-1] == 1.0
    assert seen[-1][1] == "Dubbed: scores (syncnet, 2 of 2)"


def test_pipeline_progress_shows_both_running_stages_and_the_time_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(studio_lib.time, "monotonic", lambda: now[0])
    reports = []
    report = studio_lib.pipeline_progress(studio_lib._Span(lambda f, t: reports.append((f, t))))
    report("faces", 10, 100)
    report("generate", 0, 100)
    now[0] += 2.0
    report("faces", 50, 100)
    now[0] += 2.0
    report("generate", 20, 100)  # 20 frames in 4 s since its first report: 80 left take about 16 s
    fraction, text = reports[-1]
    assert "face analysis, frame 50 of 100" in text and "generating, frame 20 of 100" in text
    assert "about 16 s left" in text
    report("faces", 100, 100)
    report("generate", 100, 100)
    assert reports[-1][1] == "encoding the video"
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] <= 0.93


def test_watch_relays_progress_from_the_jobs_thread_and_its_errors(tmp_path):
    import threading

    def job(progress):
        assert threading.current_thread().name == "studio-job"
        for step in range(3):
            progress(step / 3, f"step {step}")
            time.sleep(0.05)
        (tmp_path / "stream.m3u8").write_text("#EXTM3U\nsegment00000.ts\n")
        time.sleep(0.3)
        return "made"

    events = list(studio_lib.watch(job, tmp_path, poll_seconds=0.02))
    assert ("result", "made") == events[-1]
    assert [value for kind, value in events if kind == "segment"] == [str(tmp_path / "segment00000.ts")]
    assert [kind for kind, _ in events].count("progress") >= 2

    def failing(progress):
        raise InputError("that video has no face")

    with pytest.raises(InputError, match="no face"):
        list(studio_lib.watch(failing))


def test_a_comparison_refuses_two_variants_that_make_the_same_dub(tmp_path, face_clip):
    made = Studio(StudioConfig(work_dir=str(tmp_path / "work")))
    speech = Speech(text="Hello there.", source="espeak", voice="en-us")
    rows = [["", "", "", "", "jaw", "", "preview"], ["", "", "", "", "mouth", "", "preview"],
            ["", "", "", "", "jaw", "", "preview"]]
    variants = studio_lib.variants_from_rows(rows, speech, RunOptions(), "preview")
    assert [v.label for v in variants] == ["preview, jaw", "preview, mouth", "preview, jaw (2)"]  # unique
    with pytest.raises(InputError, match=r"variants 1 \(preview, jaw\) and 3 \(preview, jaw \(2\)\) would make "
                                         "the same dub"):
        made.compare(face_clip, variants)
    assert not any((tmp_path / "work").iterdir()), "refused before anything was made"
    made.close()


def test_the_side_by_sides_progress_counts_frames_and_says_the_time_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(studio_lib.time, "monotonic", lambda: now[0])
    reports = []
    frames = studio_lib._frames_progress(lambda fraction, text: reports.append((fraction, text)), "side-by-side video")
    frames(10, 200)
    now[0] += 3.0
    frames(70, 200)  # 60 frames in 3 s: the 130 left take about 6.5 s
    assert reports == [(0.05, "side-by-side video: frame 10 of 200"),
                       (0.35, "side-by-side video: frame 70 of 200, about 6 s left")]
    frames(200, 200)
    assert reports[-1] == (1.0, "side-by-side video: frame 200 of 200")
