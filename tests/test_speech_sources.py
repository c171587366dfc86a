"""The optional sources, coqui and edge, up to their library's boundary.

edge: its package is light and is installed with the test extra, so the offline error is
produced for real (the connection goes to a closed local port instead of the internet) and
the rest runs through edge-tts with only its network stream replaced.

coqui: the real coqui-tts needs torch 2.9 with its torchaudio and torchcodec (several GB beside
this project's torch), so it runs in a side environment of its own: ``scripts/coqui-env test``
(tests_coqui/, with a tiny random XTTS model). The tests here reach the call into
``TTS.api.TTS``: what is missing or mismatched, options, model folders, the licence question,
the offline message, and the arguments a loaded non-XTTS model receives, with the library's
model object stood in for by a small class that speaks with eSpeak.
"""

from __future__ import annotations

import ast
import re
import socket
import sys
import types
import wave
from pathlib import Path

import numpy as np
import pytest

from musetalk import audio, plugins, speech
from musetalk.errors import InputError, MuseTalkError

from conftest import ffmpeg


pytestmark = pytest.mark.usefixtures("fresh_plugins_and_speech_cache")


def speech_fraction(path: str) -> float:
    segments = audio.detect_speech(audio.load_audio(path))
    return segments.speech_seconds / segments.duration


def closed_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


# --------------------------------------------------------------------------- edge


def test_edge_without_its_package_says_how_to_install(monkeypatch):
    import musetalk_tts_edge

    monkeypatch.setattr(musetalk_tts_edge.importlib.util, "find_spec", lambda name: None)
    ok, reason = musetalk_tts_edge.EdgeSource().available()
    assert not ok and reason == "edge-tts is not installed: pip install musetalk-studio[edge]"


def test_edge_offline_is_a_clear_error(tmp_path):
    pytest.importorskip("edge_tts", reason="edge-tts not installed (pip install -e '.[test]' brings it)")
    dead_end = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(MuseTalkError, match="could not reach Microsoft's speech service .* It needs the internet; "
                                            "offline, use the espeak source"):
        speech.synthesize_text("Hello there.", source="edge", voice="en-US-AriaNeural",
                               options={"proxy": dead_end, "timeout": 5}, cache_dir=tmp_path)
    assert not list(Path(tmp_path).rglob("*.wav")), "nothing is cached from a failed attempt"


def test_edge_options_are_checked_before_any_network(tmp_path):
    with pytest.raises(InputError, match="edge option rate looks like '\\+10%', got 'fast'"):
        speech.synthesize_text("Hello.", source="edge", voice="en-US-AriaNeural", options={"rate": "fast"},
                               cache_dir=tmp_path)


def test_edge_offline_lists_well_known_voices(monkeypatch):
    import musetalk_tts_edge

    async def unreachable(proxy, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(musetalk_tts_edge, "_list_voices", unreachable)
    voices = musetalk_tts_edge.EdgeSource().voices()
    assert "en-US-EmmaMultilingualNeural" in {v.id for v in voices} and all(v.language for v in voices)


def test_edge_turns_the_services_mp3_into_timed_speech(monkeypatch, tmp_path):
    """edge-tts runs for real; only its network stream is replaced by MP3 made here (eSpeak, encoded to MP3)."""
    edge_tts = pytest.importorskip("edge_tts", reason="edge-tts not installed (pip install -e '.[test]' brings it)")
    spoken = speech.synthesize_text("Welcome to the show.", cache_dir=tmp_path / "espeak")
    mp3 = tmp_path / "service.mp3"
    ffmpeg("-i", spoken.path, "-ar", "24000", "-ac", "1", "-c:a", "libmp3lame", "-b:a", "48k", str(mp3))
    data = mp3.read_bytes()
    asked = []

    async def stream(self):
        asked.append(self.tts_config)
        yield {"type": "WordBoundary", "offset": 2_000_000, "duration": 3_000_000, "text": "Welcome"}
        for start in range(0, len(data), 4096):
            yield {"type": "audio", "data": data[start:start + 4096]}
        yield {"type": "WordBoundary", "offset": 9_000_000, "duration": 2_000_000, "text": "show"}

    monkeypatch.setattr(edge_tts.Communicate, "stream", stream)
    clip = speech.synthesize_text("Welcome to the show.", source="edge", voice="en-GB-SoniaNeural",
                                  options={"rate": "+10%", "pitch": "-5Hz"}, cache_dir=tmp_path / "edge")
    assert (clip.source, clip.voice, clip.sample_rate) == ("edge", "en-GB-SoniaNeural", 24000)
    assert asked[0].rate == "+10%" and asked[0].pitch == "-5Hz" and "SoniaNeural" in asked[0].voice
    assert clip.duration == pytest.approx(spoken.duration, abs=0.15)
    assert speech_fraction(clip.path) > 0.6
    words = [(e.text, e.time) for e in clip.events if e.kind == "word"]
    assert [w for w, _ in words] == ["Welcome", "show"] and words[0][1] < words[1][1] < clip.duration


# --------------------------------------------------------------------------- coqui


@pytest.fixture
def coqui(monkeypatch):
    """The coqui plugin module, with a fresh source."""
    import musetalk_tts_coqui

    return musetalk_tts_coqui


GOOD_SET = {"coqui-tts": "0.28.0", "torch": "2.9.1", "torchaudio": "2.9.1", "torchcodec": "0.9.1", "six": "1.17.0",
            "transformers": "5.23.0"}


def with_versions(coqui, monkeypatch, **changes):
    """The coqui source's answer when the installed versions are GOOD_SET with ``changes`` (None: missing)."""
    versions = {**GOOD_SET, **{name.replace("_", "-"): value for name, value in changes.items()}}
    monkeypatch.setattr(coqui.libraries, "installed_versions", lambda: dict(versions))
    return coqui.CoquiSource().available()


def test_coqui_not_installed_says_which_extra(coqui, monkeypatch):
    ok, reason = with_versions(coqui, monkeypatch, coqui_tts=None)
    assert not ok and reason == "coqui-tts is not installed: pip install musetalk-studio[coqui]"
    assert with_versions(coqui, monkeypatch) == (True, "offline once its model is downloaded")


@pytest.mark.parametrize("changes, says", [
    ({"torchaudio": None}, "torchaudio is missing (XTTS imports it)"),
    ({"torchaudio": "2.11.1"}, "torchaudio 2.11.1 does not pair with torch 2.9.1 (torchaudio 2.9 does)"),
    ({"torch": "2.13.0+cpu", "torchaudio": "2.9.1"}, "torchaudio 2.9.1 does not pair with torch 2.13.0+cpu"),
    ({"torchcodec": None}, "torchcodec is missing (coqui-tts needs it with torch 2.9 and later)"),
    ({"torchcodec": "0.7.0"}, "torchcodec 0.7.0 is built for torch 2.8, not torch 2.9.1"),
    ({"six": None}, "six is missing (coqui-tts imports it without declaring it)"),
    ({"transformers": "5.24.0"}, "transformers 5.24.0 is too new for coqui-tts 0.28.0 (its XTTS fails from 5.24 on: "
                                 "transformers<5.24)"),
])
def test_coqui_says_which_library_is_missing_or_mismatched(coqui, monkeypatch, changes, says):
    ok, reason = with_versions(coqui, monkeypatch, **changes)
    assert not ok and says in reason
    assert reason.endswith("What works: pip install torch==2.9.1 torchaudio==2.9.1 torchcodec==0.9.1 (the set tested "
                           "here; with another torch, the torchaudio and torchcodec built for it), then pip install "
                           "musetalk-studio[coqui]")


def test_the_coqui_extra_leaves_torch_alone_and_the_readme_names_the_tested_set(coqui):
    """The extra would otherwise replace a user's torch (and its CUDA build); the README says what to install."""
    root = Path(__file__).resolve().parent.parent
    extra = re.search(r"^coqui = (\[.*?\])", (root / "pyproject.toml").read_text(), re.M | re.S)[1]
    assert sorted(ast.literal_eval(extra)) == ["coqui-tts==0.28.*", "six", "transformers<5.24"]
    readme = (root / "README.md").read_text()
    assert f"pip install {' '.join(coqui.libraries.TESTED_TORCH_SET)}" in readme


def test_coqui_accepts_a_set_that_pairs_beyond_the_tested_one(coqui, monkeypatch):
    """torch 2.8 needs no torchcodec; a torchcodec newer than the table is not judged."""
    assert with_versions(coqui, monkeypatch, torch="2.8.0", torchaudio="2.8.0", torchcodec=None)[0]
    assert with_versions(coqui, monkeypatch, torch="2.11.0", torchaudio="2.11.1", torchcodec="0.11.0")[0]
    assert with_versions(coqui, monkeypatch, coqui_tts="0.29.0", transformers="5.25.0")[0]


def test_doctor_says_what_is_mismatched_for_coqui(coqui, monkeypatch):
    """musetalk doctor's coqui row gives the reason, one line, instead of a traceback."""
    from musetalk import doctor

    monkeypatch.setattr(coqui.libraries, "installed_versions",
                        lambda: {**GOOD_SET, "torchaudio": "2.11.1", "six": None})
    [row] = [row for row in doctor.check() if row.name == "speech coqui"]
    assert not row.ok and not row.required
    assert "torchaudio 2.11.1 does not pair with torch 2.9.1" in row.detail and "six is missing" in row.detail


def test_coqui_unusable_here_is_an_input_error_with_the_reason(coqui, monkeypatch, tmp_path):
    with_versions(coqui, monkeypatch, coqui_tts=None)
    with pytest.raises(InputError, match="'coqui' cannot be used here: coqui-tts is not installed"):
        speech.synthesize_text("Hello.", source="coqui", cache_dir=tmp_path)


def test_coqui_offers_the_xtts_languages_and_clones():
    source = plugins.get_source("coqui")
    assert source.can_clone and source.default_voice == "en"
    languages = {voice.id for voice in source.voices()}
    assert {"en", "de", "fr", "es", "zh-cn", "ja", "hi"} <= languages and len(languages) == 17
    assert source.options["model"] == "tts_models/multilingual/multi-dataset/xtts_v2"


@pytest.mark.parametrize("options, message", [
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda, mps"),
    ({"model": "  "}, "must name a Coqui model"),
])
def test_coqui_option_mistakes_are_input_errors(coqui, options, message):
    source = coqui.CoquiSource()
    with pytest.raises(InputError, match=message):
        source.synthesize("Hello.", "en", {**source.options, **options})


def test_coqui_model_folder_mistakes_are_input_errors_before_any_import(coqui, tmp_path):
    with pytest.raises(InputError, match="there is no model folder .*nowhere. Give a folder holding a Coqui model"):
        coqui.load_model(str(tmp_path / "nowhere"), "cpu")
    (tmp_path / "model.pth").write_bytes(b"weights")
    with pytest.raises(InputError, match="has no config.json beside the model"):
        coqui.load_model(str(tmp_path / "model.pth"), "cpu")
    (tmp_path / "config.json").write_text("{}")
    assert coqui.model_on_disk(str(tmp_path)) == (tmp_path.resolve(), tmp_path.resolve() / "config.json")
    assert coqui.model_on_disk(str(tmp_path / "model.pth"))[0] == (tmp_path / "model.pth").resolve()
    assert coqui.model_on_disk(coqui.XTTS_V2) is None, "a Coqui model name"


class FakeTTSPackage:
    """Stands in for ``TTS.api`` at the call the plugin makes: ``TTS(model_name, progress_bar=True).to(device)``."""

    def __init__(self, monkeypatch, construct):
        package = types.ModuleType("TTS")
        api = types.ModuleType("TTS.api")
        api.TTS = construct
        package.api = api
        manage = types.ModuleType("TTS.utils.manage")
        manage.ModelManager = lambda progress_bar=False: types.SimpleNamespace(output_prefix=Path("/nonexistent"))
        for name, module in {"TTS": package, "TTS.api": api, "TTS.utils": types.ModuleType("TTS.utils"),
                             "TTS.utils.manage": manage}.items():
            monkeypatch.setitem(sys.modules, name, module)


def test_coqui_asks_to_accept_the_xtts_licence_instead_of_prompting(coqui, monkeypatch):
    FakeTTSPackage(monkeypatch, lambda *a, **k: pytest.fail("the model must not load before the licence"))
    monkeypatch.delenv("COQUI_TOS_AGREED", raising=False)
    with pytest.raises(InputError, match="Coqui Public Model License .* set COQUI_TOS_AGREED=1"):
        coqui.load_model(coqui.XTTS_V2, "cpu")


def test_coqui_offline_first_use_says_the_model_needs_downloading(coqui, monkeypatch):
    def download_fails(model_name, progress_bar=True):
        try:
            socket.getaddrinfo("models.invalid", 443)  # a real lookup that cannot succeed
        except socket.gaierror as error:
            raise RuntimeError("download failed") from error
        raise AssertionError("the .invalid domain resolved")

    FakeTTSPackage(monkeypatch, download_fails)
    monkeypatch.setenv("COQUI_TOS_AGREED", "1")
    with pytest.raises(MuseTalkError, match="not downloaded yet and this machine cannot reach the internet"):
        coqui.load_model(coqui.XTTS_V2, "cpu")

    def broken(model_name, progress_bar=True):
        raise KeyError("tts_models/xx/nothing")

    FakeTTSPackage(monkeypatch, broken)
    with pytest.raises(MuseTalkError, match="could not load the model tts_models/xx/nothing: KeyError"):
        coqui.load_model("tts_models/xx/nothing", "cpu")


class SpeakingModel:
    """What ``TTS.api.TTS(...)`` returns, reduced to what the plugin uses; it speaks with eSpeak."""

    is_multi_lingual = True
    is_multi_speaker = True
    languages = ["en", "de"]
    speakers = ["Ana Florence", "Claribel Dervla"]

    def __init__(self):
        self.calls = []
        self.reference_speech = []  # share of speech in each reference clip, measured while it exists

    def tts_to_file(self, text, file_path, split_sentences=True, **arguments):
        self.calls.append(dict(arguments, split_sentences=split_sentences))
        if "speaker_wav" in arguments:
            self.reference_speech.append(speech_fraction(arguments["speaker_wav"]))
        from musetalk_tts_espeak import EspeakSource

        source = EspeakSource()
        clip = source.synthesize(text, arguments.get("language", "en"), source.options)
        Path(clip.path).replace(file_path)
        return file_path


def test_coqui_passes_language_speaker_and_reference_to_the_model(coqui, monkeypatch, tmp_path, speech_clip):
    model = SpeakingModel()
    monkeypatch.setattr(coqui, "load_model", lambda name, device: model)
    monkeypatch.setattr(coqui.libraries, "installed_versions", lambda: dict(GOOD_SET))
    plain = speech.synthesize_text("Guten Tag. Wie geht es?", source="coqui", voice="de",
                                   options={"device": "cpu"}, cache_dir=tmp_path)
    assert model.calls[0] == {"language": "de", "speaker": "Ana Florence", "split_sentences": False}
    assert len(model.calls) == 2, "one call per sentence: the host splits the text"
    assert plain.source == "coqui" and speech_fraction(plain.path) > 0.6

    reference = tmp_path / "reference.wav"
    long_speech = np.tile(speech.read_wav(str(speech_clip), 16000)[0], 3)
    speech.write_wav(reference, long_speech, 16000)
    speech.synthesize_text("Hello there.", source="coqui", voice="en", options={"device": "cpu"},
                           reference_audio=reference, cache_dir=tmp_path)
    assert model.calls[-1] == {"language": "en", "speaker_wav": str(reference), "split_sentences": False}

    with pytest.raises(InputError, match="does not speak 'fr'"):
        speech.synthesize_text("Bonjour.", source="coqui", voice="fr", options={"device": "cpu"}, cache_dir=tmp_path)
    with pytest.raises(InputError, match="has no speaker 'Nobody'"):
        speech.synthesize_text("Hello.", source="coqui", options={"device": "cpu", "speaker": "Nobody"},
                               cache_dir=tmp_path)


def test_coqui_model_failure_mid_speech_is_a_clear_error_and_leaves_no_file(coqui, monkeypatch, tmp_path):
    class Exploding(SpeakingModel):
        def tts_to_file(self, text, file_path, split_sentences=True, **arguments):
            Path(file_path).write_bytes(b"half")
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(coqui, "load_model", lambda name, device: Exploding())
    before = set(Path(coqui.tempfile.gettempdir()).glob("musetalk-coqui-*"))
    with pytest.raises(MuseTalkError, match="coqui could not speak 'Hello.': RuntimeError: CUDA out of memory"):
        coqui.CoquiSource().synthesize("Hello.", "en", {**coqui.CoquiSource.options, "device": "cpu"})
    assert set(Path(coqui.tempfile.gettempdir()).glob("musetalk-coqui-*")) == before


def test_tts_clones_the_voice_of_a_video_with_coqui(coqui, monkeypatch, tmp_path, face_clip):
    """The command line cuts the reference from the video and hands it to coqui's model."""
    from musetalk import cli

    model = SpeakingModel()
    monkeypatch.setattr(coqui, "load_model", lambda name, device: model)
    monkeypatch.setattr(coqui.libraries, "installed_versions", lambda: dict(GOOD_SET))
    words, rate = speech.read_wav(str(Path(__file__).resolve().parent.parent / "examples" / "speech.wav"))
    sound = speech.write_wav(tmp_path / "sound.wav", words, rate)
    video = tmp_path / "talking.mp4"
    ffmpeg("-i", str(face_clip), "-i", sound, "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", str(video))
    out = tmp_path / "speech.wav"
    assert cli.main(["tts", "--source", "coqui", "--tts-option", "device=cpu", "--text", "Hello in my voice.",
                     "--clone-voice", str(video), "--out", str(out)]) == 0
    reference = model.calls[0]["speaker_wav"]
    assert model.reference_speech[0] > 0.8, "the model was given the video's speech"
    assert not Path(reference).exists(), "the reference clip lived in a temporary folder"
    with wave.open(str(out), "rb") as reader:
        assert reader.getnframes() > 0
