"""edge (Microsoft's online voices) is not called usable until the service has answered from here:
offline, `musetalk voices`, `musetalk doctor` and the studio say it needs the internet."""

from __future__ import annotations

import pytest

from musetalk import cli, speech

edge_tts = pytest.importorskip("edge_tts", reason="edge-tts not installed (pip install -e '.[test]' brings it)")


@pytest.fixture
def offline(monkeypatch, fresh_plugins_and_speech_cache):
    """The service cannot be reached (as on this machine, and on any machine offline)."""
    import musetalk_tts_edge

    async def unreachable(proxy, timeout):
        raise OSError("network is unreachable")

    async def no_stream(self):
        raise OSError("network is unreachable")
        yield  # an async generator, as edge-tts's own

    monkeypatch.setattr(musetalk_tts_edge, "_list_voices", unreachable)
    monkeypatch.setattr(edge_tts.Communicate, "stream", no_stream)
    return musetalk_tts_edge


def test_offline_edge_is_not_called_usable(offline, capsys, tmp_path):
    ok, reason = offline.EdgeSource().available()
    assert ok is None and reason.startswith("needs the internet"), (ok, reason)
    assert cli.main(["voices", "--source", "edge"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "usable" not in line.replace("not known", "") and "needs the internet" in line, line
    assert "network is unreachable" in line  # the voice list was tried, and said why it failed
    assert cli.main(["doctor", "--models-dir", str(tmp_path)]) in (0, 1)
    row = next(line for line in capsys.readouterr().out.splitlines() if " speech edge " in line)
    assert row.startswith("--") and "needs the internet" in row


def test_the_studio_offers_it_with_what_it_needs(offline):
    from test_app import load_app_module

    usable, notes = load_app_module().speech_sources()
    assert "edge" in usable, "it may still be tried"
    assert any(note.startswith("Microsoft Edge") and "needs the internet" in note for note in notes), notes


def test_edge_is_usable_once_the_service_answered(monkeypatch, fresh_plugins_and_speech_cache, capsys):
    import musetalk_tts_edge

    async def listed(proxy, timeout):
        return [{"ShortName": "en-GB-SoniaNeural", "FriendlyName": "Microsoft Sonia Online (Natural)",
                 "Locale": "en-GB"}]

    monkeypatch.setattr(musetalk_tts_edge, "_list_voices", listed)
    assert cli.main(["voices", "--source", "edge"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("edge: Microsoft Edge neural voices (online) (usable): ") and "en-GB-SoniaNeural" in out


def test_a_sentence_is_still_tried_and_fails_clearly_offline(offline, tmp_path):
    from musetalk.errors import MuseTalkError

    with pytest.raises(MuseTalkError, match="could not reach Microsoft's speech service"):
        speech.synthesize_text("Hello.", source="edge", voice="en-GB-SoniaNeural", cache_dir=tmp_path)
    source = speech.usable_source("edge")
    ok, reason = source.available()
    assert ok is None and "the last try: OSError: network is unreachable" in reason
