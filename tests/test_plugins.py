"""The plugin contract: discovery through entry-point metadata, the guard around broken plugins, options.

The third-party example is the one in docs/plugins.md, built from the page and installed
with pip into a temporary folder; broken plugins are installed the way pip lays out any
package (a module plus a .dist-info folder with entry_points.txt).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from musetalk import cli, doctor, plugins, speech
from musetalk.errors import InputError, MuseTalkError
from musetalk.plugins import AudioClip, Voice

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


pytestmark = pytest.mark.usefixtures("fresh_plugins_and_speech_cache")


def example_files() -> dict[str, str]:
    """The files of the example plugin, from the code blocks of docs/plugins.md that start with '# <name>'."""
    blocks = re.findall(r"```(?:python|toml)\n# (\S+)\n(.*?)```", DOCS.read_text(), flags=re.S)
    return {name: body for name, body in blocks}


@pytest.fixture(scope="module")
def hum_site(tmp_path_factory) -> Path:
    """The docs example, installed by pip (offline, no build isolation) into its own folder."""
    files = example_files()
    assert set(files) == {"musetalk_tts_hum.py", "pyproject.toml"}
    project = tmp_path_factory.mktemp("musetalk-tts-hum")
    for name, body in files.items():
        (project / name).write_text(body)
    site = tmp_path_factory.mktemp("site")
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(site), str(project)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    return site


def install_dist(site: Path, name: str, module_source: str, entry_points: dict[str, str]) -> None:
    """A package as pip lays it out: the module and NAME-0.1.dist-info with METADATA and entry_points.txt."""
    module = entry_points[next(iter(entry_points))].split(":")[0]
    (site / f"{module}.py").write_text(textwrap.dedent(module_source))
    dist_info = site / f"{name.replace('-', '_')}-0.1.dist-info"  # escaped as in a wheel
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{key} = {value}" for key, value in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[musetalk.audio_sources]\n{lines}\n")


BROKEN_IMPORT = """
raise RuntimeError("this plugin cannot start")
"""

BROKEN_REGISTER = """
from musetalk.plugins import hookimpl

@hookimpl
def register_audio_sources(register):
    raise ZeroDivisionError("bad arithmetic in register")
"""

BROKEN_SOURCE = """
from musetalk.plugins import Voice, hookimpl

class Crashy:
    id = "crashy"
    label = "Crashes when used"
    can_clone = False
    options = {}

    def available(self):
        return True, "looks fine"

    def voices(self):
        return [Voice("v1", "Voice one", "en")]

    def synthesize(self, text, voice, options, reference_audio=None):
        raise KeyError("engine exploded")

class Moody:
    id = "moody"
    label = "Raises when asked if it is available"
    can_clone = False
    options = {}

    def available(self):
        raise OSError("cannot tell")

    def voices(self):
        raise OSError("no voices today")

    def synthesize(self, text, voice, options, reference_audio=None):
        raise OSError("never")

class Liar:
    id = "liar"
    label = "Returns no clip"
    can_clone = False
    options = {}

    def available(self):
        return True, ""

    def voices(self):
        return []

    def synthesize(self, text, voice, options, reference_audio=None):
        return "/no/such/file.wav"

@hookimpl
def register_audio_sources(register):
    register(object())                     # not a source: reported, the rest still registers
    register(type("Dup", (Crashy,), {"id": "espeak"})())  # takes a built-in id: reported
    register(Crashy())
    register(Moody())
    register(Liar())
"""


@pytest.fixture
def broken_site(tmp_path, monkeypatch, hum_site) -> Path:
    """The hum example plus three broken plugins, all on sys.path."""
    site = tmp_path / "broken-site"
    site.mkdir()
    install_dist(site, "broken-import", BROKEN_IMPORT, {"broken_import": "musetalk_broken_import"})
    install_dist(site, "broken-register", BROKEN_REGISTER, {"broken_register": "musetalk_broken_register"})
    install_dist(site, "broken-source", BROKEN_SOURCE, {"broken_source": "musetalk_broken_source"})
    monkeypatch.syspath_prepend(str(hum_site))
    monkeypatch.syspath_prepend(str(site))
    for module in ("musetalk_broken_import", "musetalk_broken_register", "musetalk_broken_source", "musetalk_tts_hum"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return site


# --------------------------------------------------------------------------- discovery


def test_built_in_sources_come_through_the_entry_point_group():
    sources = plugins.audio_sources()
    assert list(sources)[0] == "espeak", "the default source is listed first"
    assert {"espeak", "coqui", "edge"} <= set(sources)
    for source_id in ("espeak", "coqui", "edge"):
        source = sources[source_id]
        assert source.plugin == source_id and source.distribution == "musetalk-studio"
    assert plugins.plugin_problems() == []


def test_a_pip_installed_plugin_is_discovered_listed_and_used(hum_site, monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(hum_site))
    monkeypatch.delitem(sys.modules, "musetalk_tts_hum", raising=False)
    hum = plugins.get_source("hum")
    assert hum.distribution == "musetalk-tts-hum"
    assert hum.available() == (True, "needs nothing")
    assert [v.id for v in hum.voices()] == ["low", "high"]
    assert "espeak" in plugins.audio_sources(), "the built-ins are still there"

    assert cli.main(["voices", "--source", "hum"]) == 0
    listing = capsys.readouterr().out
    assert "hum: Hum (one note per word) (usable)" in listing and "high" in listing

    out = tmp_path / "hum.wav"
    assert cli.main(["tts", "--source", "hum", "--voice", "high", "--tts-option", "note_hz=180",
                     "--text", "One two three. Four five.", "--out", str(out)]) == 0
    samples, rate = speech.read_wav(str(out))
    assert rate == 22050
    # five words at 160 words per minute, plus the host's lead-in, pause and tail
    assert 5 * 60 / 160 * 0.8 < samples.size / rate < 5 * 60 / 160 + 1.2
    spectrum = abs(__import__("numpy").fft.rfft(samples))
    assert abs(spectrum.argmax() * rate / samples.size - 360.0) < 5, "high voice: twice note_hz"


# --------------------------------------------------------------------------- broken plugins


def test_broken_plugins_are_reported_and_the_rest_work(broken_site, tmp_path):
    sources = plugins.audio_sources()
    assert {"espeak", "hum", "crashy", "moody", "liar"} <= set(sources)
    assert sources["espeak"].plugin == "espeak", "the duplicate did not replace the built-in"
    problems = "\n".join(plugins.plugin_problems())
    assert "'broken_import'" in problems and "RuntimeError: this plugin cannot start" in problems
    assert "'broken_register'" in problems and "ZeroDivisionError: bad arithmetic in register" in problems
    assert "is not an audio source" in problems
    assert "'espeak' is already taken" in problems

    # a source that raises from available()/voices() is reported, answers "not usable", raises nothing
    ok, reason = sources["moody"].available()
    assert not ok and "OSError: cannot tell" in reason
    assert sources["moody"].voices() == []
    # one that raises in synthesize: a MuseTalkError naming it, and a line in the problems
    with pytest.raises(MuseTalkError, match="'crashy'.*KeyError"):
        speech.synthesize_text("Hello.", source="crashy", cache_dir=tmp_path)
    with pytest.raises(MuseTalkError, match="not a non-empty file|must return"):
        speech.synthesize_text("Hello.", source="liar", cache_dir=tmp_path)
    problems = "\n".join(plugins.plugin_problems())
    assert "source 'crashy'" in problems and "engine exploded" in problems
    assert "source 'liar'" in problems

    # and the others still speak
    assert speech.synthesize_text("Still here.", source="espeak", cache_dir=tmp_path).duration > 0.3
    assert speech.synthesize_text("Still here.", source="hum", cache_dir=tmp_path).duration > 0.3


def test_doctor_and_voices_report_plugin_problems(broken_site, capsys):
    rows = doctor.check()
    problem_rows = [row.detail for row in rows if row.name == "plugin problem"]
    assert any("broken_import" in detail for detail in problem_rows)
    assert any("broken_register" in detail for detail in problem_rows)
    assert any(row.name == "speech moody" and not row.ok for row in rows)
    assert all(not row.required for row in rows if row.name.startswith(("speech", "plugin"))), \
        "a broken plugin does not make the machine unfit for dubbing"
    assert {"speech espeak", "speech hum"} <= {row.name for row in rows if row.ok}

    assert cli.main(["voices"]) == 0
    captured = capsys.readouterr()
    assert "plugin problem: plugin 'broken_import'" in captured.err
    assert "espeak: eSpeak NG (offline) (usable)" in captured.out


# --------------------------------------------------------------------------- the hook and the guard


class _Plain:
    id = "plain"
    label = "Plain"
    can_clone = False
    options = {"speed": 1.0, "loud": False, "count": 2, "name": "x"}

    def available(self):
        return True, ""

    def voices(self):
        return [Voice("a", "A", "en")]

    def synthesize(self, text, voice, options, reference_audio=None):
        raise AssertionError("not called here")


def test_register_audio_sources_hook_called_once_per_plugin_with_register():
    class Plugin:
        calls = []

        @plugins.hookimpl
        def register_audio_sources(self, register):
            self.calls.append(register)
            register(_Plain())

    manager = plugins.PluginManager()
    manager.register(Plugin(), name="plain-plugin")
    manager.collect_sources()
    assert len(Plugin.calls) == 1 and callable(Plugin.calls[0])
    assert list(manager.sources) == ["plain"] and manager.sources["plain"].plugin == "plain-plugin"
    assert manager.problems == []


@pytest.mark.parametrize("bad, message", [
    ({"id": ""}, "non-empty string"),
    ({"options": {"speed": [1, 2]}}, "options must map names"),
    ({"options": "fast"}, "options must map names"),
])
def test_register_refuses_sources_that_break_the_contract(bad, message):
    manager = plugins.PluginManager()
    manager.add_source(type("Bad", (_Plain,), bad)(), "bad-plugin", None)
    assert manager.sources == {}
    assert message in manager.problems[0] and "'bad-plugin'" in manager.problems[0]


def test_options_are_checked_and_converted_to_the_defaults_types():
    manager = plugins.PluginManager()
    manager.add_source(_Plain(), "p", None)
    source = manager.sources["plain"]
    resolved = plugins.resolve_options(source, {"speed": "1.5", "loud": "yes", "count": "3", "name": 7})
    assert resolved == {"speed": 1.5, "loud": True, "count": 3, "name": "7"}
    assert plugins.resolve_options(source, None) == _Plain.options
    with pytest.raises(InputError, match="no option volume; its options: speed=1.0"):
        plugins.resolve_options(source, {"volume": 3})
    with pytest.raises(InputError, match="count of source 'plain' must be a whole number"):
        plugins.resolve_options(source, {"count": "2.5"})
    with pytest.raises(InputError, match="loud .* must be true or false"):
        plugins.resolve_options(source, {"loud": "maybe"})
    with pytest.raises(InputError, match="speed .* must be a number"):
        plugins.resolve_options(source, {"speed": "fast"})


def test_unknown_source_names_the_installed_ones():
    with pytest.raises(InputError, match="unknown audio source 'nope'; installed sources: .*espeak"):
        plugins.get_source("nope")


def test_clip_is_what_the_contract_says(tmp_path):
    clip = AudioClip(str(tmp_path / "a.wav"), 16000, 1.0, "x", None)
    assert clip.events == () and clip.voice is None
    with pytest.raises(AttributeError):
        clip.path = "other"  # frozen: a clip is a value
