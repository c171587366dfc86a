"""Where the app runs: the README's Space front matter and first command, requirements.txt
against pyproject.toml, a source checkout that pip never installed (as on a Space), and the
Dockerfile's parts (no Docker engine here: the image is not built by the tests)."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "the README must open with the Spaces front matter"
    return yaml.safe_load(text.split("---\n")[1])


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_readme_opens_with_the_spaces_front_matter():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert (ROOT / meta["app_file"]).is_file()
    major, minor, _ = (int(part) for part in meta["sdk_version"].split("."))
    assert (major, minor) >= (6, 31) and major < 7, "the Space's Gradio must satisfy the app extra"
    assert len(meta["short_description"]) <= 60
    for entry in meta["preload_from_hub"]:
        repo, files = entry.split(" ")
        assert "/" in repo and files


def test_the_readme_commands_start_the_app_then_run_the_tests():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)\n```", text, re.S)
    assert "app.py" in blocks[0] and '".[app,live]"' in blocks[0]
    assert "pytest" in blocks[1]
    assert (ROOT / "docs" / "images" / "studio.jpg").is_file(), "the README shows the studio"


def test_requirements_txt_is_the_projects_dependency_list():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["live"]  # a Space gets the Live tab too
    assert sorted(requirement_lines(ROOT / "requirements.txt")) == sorted(wanted)
    assert set(extras["live"]) <= set(extras["test"]), "the live tests run on what the live extra installs"
    assert any(spec.startswith("gradio") for spec in extras["app"])


def test_a_source_checkout_registers_its_plugins_like_an_install(tmp_path):
    """A project that pip never installed: its entry points become visible, its plugins importable."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fake_shout.py").write_text("NAME = 'shout'\n")
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [project]
        name = "fake-studio-checkout"
        version = "1.2.3"
        [project.entry-points."musetalk.audio_sources"]
        shout = "fake_shout"
    """))
    code = textwrap.dedent(f"""
        import sys
        from importlib import metadata
        from pathlib import Path
        import app
        folder = app.use_source_checkout(Path({str(tmp_path)!r}))
        found = [ep for ep in metadata.entry_points(group="musetalk.audio_sources") if ep.name == "shout"]
        print(found[0].dist.name, found[0].dist.version, found[0].load().NAME)
        print(app.use_source_checkout() is None)  # this project is installed: nothing to do
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["fake-studio-checkout 1.2.3 shout", "True"]


def test_on_a_zero_gpu_space_the_jobs_ask_for_the_gpu(monkeypatch):
    """With the ``spaces`` package, a job is wrapped by ``spaces.GPU(duration=...)``; without it, unchanged.
    (The package stands in here: its real decorator attaches a GPU only on ZeroGPU hardware.)"""
    import types

    from test_app import load_app_module

    app = load_app_module()

    def job():
        return "done"

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: import fails
    assert app.on_gpu(job) is job
    asked = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda function: asked.append(duration) or (lambda: "on the GPU: " + function()))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert app.on_gpu(job)() == "on the GPU: done" and asked == [app.GPU_SECONDS]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_cuda_runtime_non_root_port_volume_health_check():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    args = dict(value.split("=", 1) for kind, value in instructions if kind == "ARG" and "=" in value)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    users = [value for kind, value in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    assert ("EXPOSE", "7860") in instructions
    assert any(kind == "VOLUME" and "/data" in value for kind, value in instructions)
    assert "HEALTHCHECK" in kinds
    cmd = next(value for kind, value in instructions if kind == "CMD")
    assert "app.py" in cmd and "0.0.0.0" in cmd
    env = " ".join(value for kind, value in instructions if kind == "ENV")
    assert "MUSETALK_MODELS_DIR=/data/" in env


def test_the_docker_context_holds_what_the_image_copies():
    ignored = requirement_lines(ROOT / ".dockerignore")
    copied = [value.split()[-2] for kind, value in dockerfile_instructions() if kind == "COPY"]
    for source in copied:
        if source != ".":
            assert (ROOT / source).exists() and not any(fnmatch.fnmatch(source, pattern) for pattern in ignored)
    needed = ["app.py", "pyproject.toml", "README.md", "musetalk", "plugins", "requirements.txt"]
    assert not [name for name in needed if any(fnmatch.fnmatch(name, pattern) for pattern in ignored)]
    assert {"tests", ".git", ".venv"} <= set(ignored)


def test_stopping_the_app_removes_its_work_folder_even_when_told_twice(models_dir, tmp_path):
    """`docker stop` sends SIGTERM, and a supervisor may pass it on again: the app leaves with exit
    status 0, no traceback, and no temporary folder."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    temp = tmp_path / "tmp"
    temp.mkdir()
    app = subprocess.Popen([sys.executable, "app.py", "--models-dir", str(models_dir), "--device", "cpu",
                            "--port", str(port)], cwd=ROOT, env={**os.environ, "TMPDIR": str(temp)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert app.poll() is None and time.monotonic() < deadline, app.stderr.read()
                time.sleep(0.5)
        assert any(path.name.startswith("musetalk-studio-") for path in temp.iterdir())
        app.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        app.send_signal(signal.SIGTERM)
        _, stderr = app.communicate(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
            app.communicate()
    assert app.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert not any(path.name.startswith("musetalk-studio-") for path in temp.iterdir())
