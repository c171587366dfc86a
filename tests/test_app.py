"""The studio app launched in-process with the tiny models and driven through gradio_client,
as an API user would: generate from an upload and from text, preview, compare, bad input."""

from __future__ import annotations

import importlib.util
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from musetalk import compare
from musetalk.studio import Studio, StudioConfig
from musetalk.video_io import probe

from conftest import ffmpeg

ROOT = Path(__file__).resolve().parent.parent
PHOTO = Path(__file__).parent / "data" / "face.jpg"
# httpx's default of 5 s per request is too short for a server in this process whose jobs share two
# busy cores with the whole machine: an upload answered in 6 s failed the test.
CLIENT_HTTPX = {"timeout": 120}
SHORT_TEXT = "Hi there."  # the browser test speaks it too: the second time it comes from the speech cache


def load_app_module():
    """app.py lives at the repository root, outside the package: load it by path."""
    spec = importlib.util.spec_from_file_location("musetalk_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def launched_app(services: Studio):
    """The app on 127.0.0.1 at a free port, in this process; yields its URL."""
    app = load_app_module()
    demo = app.build_demo(services)
    _, url, _ = app.serve(demo, services, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    config = StudioConfig(models_dir=str(models_dir), device="cpu", work_dir=str(tmp_path_factory.mktemp("work")),
                          max_seconds=20, max_upload_mb=20)
    studio = Studio(config)
    assert studio.load_models(), "the tiny v1.5 weights are all there"
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def short_speech(speech_clip, tmp_path_factory) -> Path:
    """The first 0.8 s of the speech clip: 20 frames at 25 fps keep the app's tests quick."""
    path = tmp_path_factory.mktemp("speech") / "short.wav"
    ffmpeg("-i", str(speech_clip), "-t", "0.8", str(path))
    return path


@pytest.fixture(scope="module")
def client(services, tmp_path_factory, monkeypatch_module):
    from gradio_client import Client

    monkeypatch_module.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with launched_app(services) as url:
        yield Client(url, verbose=False, analytics_enabled=False, httpx_kwargs=CLIENT_HTTPX,
                     download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def check_dub(path, source: Path, frames: int) -> None:
    """A dub like the core tests check it: the input's size, the audio's length, with sound."""
    info, original = probe(path), probe(source)
    assert (info.width, info.height) == (original.width, original.height)
    assert info.num_frames == frames
    assert info.duration == pytest.approx(frames / 25, abs=0.05)
    assert info.has_audio


def check_side_by_side(path, source: Path, frames: int) -> None:
    info, original = probe(path), probe(source)
    assert info.width == 2 * original.width + compare.GAP
    assert info.height > original.height  # the label band above the pictures
    assert info.num_frames == frames and info.has_audio


# --------------------------------------------------------------------------- the tests


def test_importing_the_app_loads_nothing_heavy():
    code = "import app, sys; heavy = {'torch', 'gradio', 'mediapipe', 'diffusers'} & set(sys.modules); print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


def test_every_event_is_an_api_endpoint(services):
    app = load_app_module()
    demo = app.build_demo(services)
    names = [dependency.get("api_name") for dependency in demo.config["dependencies"]]
    assert names and all(names), names
    assert {"generate", "side_by_side", "preview", "compare", "download_weights", "status", "voices"} <= set(names)
    # One model job at a time: generate, compare and the weights download share one slot.
    slots = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values()}
    model_jobs = {name: slot for name, slot in slots.items() if name in ("generate", "compare", "download_weights")}
    assert set(model_jobs.values()) == {("gpu", 1)} and len(model_jobs) == 3
    # The side-by-side, made after the dub, keeps a line of its own: the next dub does not wait for it.
    assert slots["side_by_side"] == ("side_by_side", 1)


def test_every_endpoints_outputs_have_names_that_say_what_they_are(services):
    app = load_app_module()
    endpoints = app.build_demo(services).get_api_info()["named_endpoints"]
    assert {"/generate", "/side_by_side", "/status", "/preview"} <= set(endpoints)
    unnamed = {name: [out.get("label") for out in endpoint["returns"]] for name, endpoint in endpoints.items()
               if any(not out.get("label") or re.fullmatch(r"value_\d+", out["label"]) for out in endpoint["returns"])}
    assert not unnamed, unnamed
    assert [out["label"] for out in endpoints["/generate"]["returns"]] == [
        "The dub, playing while it is made", "Dubbed video", "Summary", "What the run took", "Scores of the result"]


def test_status_says_the_weights_are_ready_and_what_musetalk_costs_on_this_cpu(client, services):
    services.calibrate()  # what load_models started in the background, done now
    status = client.predict(api_name="/status")
    assert "MuseTalk 1.5: ready (loaded)" in status
    assert "No GPU here: the **preview engine**" in status and "for each 10 s of video on this CPU" in status
    assert services.default_engine() == "preview"


def test_generate_from_an_upload(client, face_clip, short_speech):
    from gradio_client import handle_file

    _stream, dub, summary, timings, scores = client.predict(
        video=handle_file(str(face_clip)), audio=handle_file(str(short_speech)), engine="musetalk", measure=False,
        api_name="/generate")
    check_dub(dub, face_clip, 20)
    assert "20 frames" in summary
    stages = [row[0] for row in timings["data"]]
    # (face analysis is there unless an earlier test left this clip's faces in the prepared-face cache)
    assert stages[-1] == "whole job" and {"UNet", "video encode"} <= set(stages)
    assert all(row[1] >= 0 for row in timings["data"])
    assert scores["data"] == []  # not measured when asked not to
    # The session's history has its own endpoint: this dub is its newest entry, with its file.
    history, files = client.predict(api_name="/history")
    assert history["data"][0][1] == "dub" and files
    # The side-by-side is an endpoint of its own, given the original and the dub the call above returned.
    side = client.predict(video=handle_file(str(face_clip)), dubbed=handle_file(dub), loop="pingpong",
                          api_name="/side_by_side")
    check_side_by_side(side, face_clip, 20)
    history, _ = client.predict(api_name="/history")
    assert [row[1] for row in history["data"][:2]] == ["side-by-side", "dub"]


def test_generate_from_text_with_the_default_source(client, face_clip):
    from gradio_client import handle_file

    _stream, dub, summary, timings, scores = client.predict(
        video=handle_file(str(face_clip)), audio=None, speech_from="text", text=SHORT_TEXT,
        source="espeak", voice="en-us", engine="musetalk", api_name="/generate")
    frames = probe(dub).num_frames
    assert 10 < frames < 75  # "Hi there." lasts about a second
    check_dub(dub, face_clip, frames)
    assert "espeak, en-us" in summary
    assert "speech synthesis" in [row[0] for row in timings["data"]]
    measured = {row[0]: row[1] for row in scores["data"]}
    assert "Lip-sync correlation" in measured and "Frames with a face" in measured
    # A score that could not be measured says why in the page's words: no command, no flag.
    assert measured["SyncNet confidence (LSE-C)"] == ("n/a: SyncNet weights not installed on this server "
                                                       "(its operator can fetch them)")


def test_preview_draws_the_box_and_mask_on_the_first_frame(client, face_clip):
    from gradio_client import handle_file
    from PIL import Image

    image_path, note = client.predict(video=handle_file(str(face_clip)), mask_mode="mouth", api_name="/preview")
    image = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    assert image.shape[:2] == (252, 216)
    greenish = (image[..., 1] - np.maximum(image[..., 0], image[..., 2])) > 60
    assert greenish.sum() > 50, "the blend mask is tinted green"
    assert note.startswith("Frame 0:") and "mouth mask" in note


def test_compare_two_variants(client, face_clip, short_speech):
    from gradio_client import handle_file

    grid, table, files = client.predict(
        video=handle_file(str(face_clip)), audio=handle_file(str(short_speech)), engine="musetalk", measure=False,
        variants={"headers": ["label", "speech source", "voice", "version", "mask", "extra margin", "engine"],
                  "data": [["Jaw", "", "", "", "jaw", "20", ""], ["Lips", "audio", "", "", "mouth", "20", "preview"]]},
        api_name="/compare")
    info, source = probe(grid), probe(face_clip)
    assert info.width == 3 * source.width + 2 * compare.GAP  # the original and two variants in a row
    assert info.num_frames == 20 and info.has_audio
    assert [row[0] for row in table["data"]] == ["Jaw", "Lips"]
    columns = {name: [row[index] for row in table["data"]] for index, name in enumerate(table["headers"])}
    assert columns["engine"] == ["musetalk", "preview"]  # MuseTalk beside the preview engine
    assert columns["mask"] == ["jaw", "mouth"] and columns["extra margin"] == [20, 20]
    assert columns["face data"][1] == "reused", "the second variant reuses the video's prepared faces"
    assert len(files) == 2
    for path in files:
        check_dub(path, face_clip, 20)
    history, _ = client.predict(api_name="/history")
    assert history["data"][0][1] == "comparison"


def test_the_preview_engine_needs_no_weights(client, face_clip, short_speech):
    from gradio_client import handle_file

    _stream, dub, summary, *_ = client.predict(
        video=handle_file(str(face_clip)), audio=handle_file(str(short_speech)), engine="preview", measure=False,
        api_name="/generate")
    check_dub(dub, face_clip, 20)
    assert "(preview v15" in summary


def test_bad_input_is_the_librarys_message(client, face_clip, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    not_media = tmp_path / "notes.mp4"
    not_media.write_text("this is not a video")
    cases = [
        (dict(video=handle_file(str(not_media)), audio=handle_file(str(face_clip))),
         "notes.mp4 is not a video, image or audio"),
        (dict(video=handle_file(str(face_clip)), audio=None), "give the new speech"),
        (dict(video=handle_file(str(face_clip)), audio=None, speech_from="text", text="hi", source="nonesuch"),
         "unknown audio source 'nonesuch'"),
        (dict(video=handle_file(str(face_clip)), audio=None, speech_from="text", text="hi", source="espeak",
              voice="xx-nonesuch"), "xx-nonesuch"),
        (dict(video=handle_file(str(face_clip)), audio=handle_file(str(face_clip))), "has no sound"),
    ]
    for arguments, expected in cases:
        with pytest.raises(AppError) as raised:
            client.predict(**arguments, api_name="/generate")
        assert expected in str(raised.value)
        assert "Traceback" not in str(raised.value)
        message = str(raised.value)
        assert not re.search(r"(^|[\s:'\"])/[\w.-]+/", message) and "--" not in message, "no server path, no flag"
    with pytest.raises(AppError, match="there is no dub to put beside the original yet; generate one first"):
        client.predict(video=handle_file(str(face_clip)), dubbed=None, api_name="/side_by_side")
    with pytest.raises(AppError, match="2 to 4 variants"):
        client.predict(video=handle_file(str(face_clip)), audio=handle_file(str(face_clip)),
                       variants={"headers": ["label"], "data": [["only one"]]}, api_name="/compare")


def test_a_photo_and_the_voice_menu(client):
    from gradio_client import handle_file

    image_path, note = client.predict(video=handle_file(str(PHOTO)), api_name="/preview")
    assert note.startswith("Frame 0:")
    voice_menu, clone = client.predict(source="espeak", api_name="/voices")  # menus come back as updates
    assert voice_menu["value"] == "en-us" and ["English (America) (en-us)", "en-us"] in voice_menu["choices"]
    assert clone["visible"] is False  # eSpeak cannot clone a voice


def test_messages_for_the_web_name_files_and_controls_not_paths_and_flags():
    app = load_app_module()
    words = app.for_the_web
    assert words("/tmp/gradio/3f2a9c/fake.mp4 is not a video") == "fake.mp4 is not a video"
    assert words("ffmpeg said: file:/srv/work/generate-x1/speech.wav: bad") == "ffmpeg said: file:speech.wav: bad"
    assert "--" not in words("No face was found ... or check --face-index.")
    assert "Face to dub" in words("or check --face-index.")
    assert "Download weights" in words("run `musetalk download` to fetch openai/whisper-tiny again")
    assert words("give an mp4/mov/mkv video") == "give an mp4/mov/mkv video"  # not a path
    assert "--" not in words("use --some-new-flag") and "option" in words("use --some-new-flag")
    assert words("SyncNet weights not found at /m/syncnet.pt; fetch them with: musetalk download --scoring") == (
        "SyncNet weights not found at syncnet.pt on this server (its operator can fetch them)")


def test_adding_the_current_settings_twice_is_refused_with_a_note(client):
    empty = {"headers": ["label", "speech source", "voice", "version", "mask", "extra margin", "engine"],
             "data": []}
    settings = dict(speech_from="text", source="espeak", voice="en-us", engine="preview", version="v15",
                    mask_mode="mouth", extra_margin=10, api_name="/add_variant")
    once = client.predict(variants=empty, **settings)
    assert once["data"] == [["preview, en-us, mouth mask", "espeak", "en-us", "v15", "mouth", "10", "preview"]]
    twice = client.predict(variants=once, **settings)
    assert twice["data"] == once["data"], "the same settings are not added again"


def readme_block(language: str, containing: str) -> str:
    """The README's fenced ``language`` block that contains ``containing``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"one {language} block in the README with {containing!r}"
    return found[0]


@pytest.fixture
def readme_inputs(tmp_path, face_clip, short_speech) -> Path:
    """A folder holding the files the README's API examples name."""
    (tmp_path / "talk.mp4").write_bytes(Path(face_clip).read_bytes())
    (tmp_path / "new_voice.wav").write_bytes(Path(short_speech).read_bytes())
    return tmp_path


def test_the_readmes_gradio_client_example_runs_as_written(client, readme_inputs):
    code = readme_block("python", "gradio_client").replace("http://127.0.0.1:7860/", client.src)
    code += "\nprint(dub)\nprint(side_by_side)\nprint(summary)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=readme_inputs, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dub, side, summary = out.stdout.strip().splitlines()[-3:]
    check_dub(dub, readme_inputs / "talk.mp4", 20)
    check_side_by_side(side, readme_inputs / "talk.mp4", 20)
    assert "20 frames" in summary


def test_the_readmes_rest_example_runs_as_written(client, readme_inputs):
    """The curl form: upload, call, the event stream with the progress and the result, the download."""
    script = readme_block("bash", "gradio_api/call/generate").replace("http://127.0.0.1:7860", client.src.rstrip("/"))
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=readme_inputs, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    events = re.findall(r"^event: (\w+)$", out.stdout, flags=re.M)
    assert events[-1] == "complete" and "generating" in events, events
    check_dub(readme_inputs / "dubbed.mp4", readme_inputs / "talk.mp4", 20)
