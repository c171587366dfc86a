"""The STUN/TURN setting of live connections: its two spellings, its refusals, and where it goes (the
studio's settings, the command lines, the page's RTCConfiguration, aiortc's). The browser end to end
is in tests/test_live_browser.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk import cli, live_ice
from musetalk.errors import InputError
from musetalk.live_ice import IceServer, IceSettings, parse_ice_servers
from musetalk.studio import StudioConfig

ROOT = Path(__file__).resolve().parent.parent
TURN_JSON = '[{"urls": "turn:turn.example.com:3478", "username": "live", "credential": "s3cret-Word"}]'


def test_the_json_form_is_the_browsers_rtc_ice_server_list():
    servers = parse_ice_servers('[{"urls": "stun:stun.example.com:3478"}, '
                                '{"urls": ["turn:10.0.0.5?transport=tcp", "turns:turn.example.com:443"], '
                                '"username": "live", "credential": "s3cret-Word"}]')
    assert servers == (IceServer(("stun:stun.example.com:3478",)),
                       IceServer(("turn:10.0.0.5?transport=tcp", "turns:turn.example.com:443"), "live",
                                 "s3cret-Word"))
    assert IceSettings(servers).browser_configuration() == {
        "iceServers": [{"urls": ["stun:stun.example.com:3478"]},
                       {"urls": ["turn:10.0.0.5?transport=tcp", "turns:turn.example.com:443"], "username": "live",
                        "credential": "s3cret-Word"}],
        "iceTransportPolicy": "all"}


def test_the_short_form_is_stun_urls_separated_by_commas():
    assert parse_ice_servers(" stun:stun.example.com:19302 , stun:192.0.2.1,") == (
        IceServer(("stun:stun.example.com:19302",)), IceServer(("stun:192.0.2.1",)))
    assert parse_ice_servers("") == () and parse_ice_servers("  ") == () and parse_ice_servers("[]") == ()


@pytest.mark.parametrize("text, message", [
    ("turn:turn.example.com", "the TURN URL 'turn:turn.example.com' needs a username and a credential; "
                              "write it in the JSON form"),
    ('[{"urls": "turn:turn.example.com", "username": "live"}]', "server 1: the TURN URL .* needs a username and a "
                                                               "credential"),
    ("http://turn.example.com", "'http://turn.example.com' is not a STUN or TURN URL .*write stun:HOST"),
    ("stun:", "is not a STUN or TURN URL"),
    ("stun:[2001:db8::1]:3478", "a host name or an IPv4 address"),
    ("stuns:stun.example.com", "cannot use stuns:; write stun:, or turns:"),
    ("stun:stun.example.com:70000", "has port 70000; a port is 1 to 65535"),
    ("stun:stun.example.com?transport=tcp", "a stun: URL has no transport"),
    ('[{"urls": "turns:t.example.com?transport=udp", "username": "u", "credential": "c"}]', "turns: is TLS over TCP"),
    ('[{"urls": "turn:t.example.com", "username": "u", "credential": "c"', "is not valid JSON .* at character"),
    ('{"urls": "stun:stun.example.com"}', "must be a JSON list of servers: put the server in \\[ \\]"),
    ('["stun:stun.example.com"]', "server 1 must be a JSON object with urls"),
    ('[{"url": "stun:stun.example.com"}]', "server 1 has 'url', which is not a server's setting; a server has urls"),
    ('[{"urls": []}]', "server 1 needs urls"),
    ('[{"urls": "stun:a.example.com"}, {"urls": 5}]', "server 2 needs urls"),
    ('[{"urls": "turn:t.example.com", "username": "u", "credential": 7}]', "its credential must be a string"),
])
def test_a_bad_value_says_which_setting_and_what_to_write(text, message):
    with pytest.raises(InputError, match=message) as caught:
        parse_ice_servers(text, "MUSETALK_ICE_SERVERS")
    assert str(caught.value).startswith("MUSETALK_ICE_SERVERS")


def test_a_credential_is_never_in_a_message_or_a_repr():
    with pytest.raises(InputError) as caught:
        parse_ice_servers("turn:live:s3cret-Word@turn.example.com")
    assert "s3cret-Word" not in str(caught.value) and "username and credential" in str(caught.value)
    with pytest.raises(InputError) as caught:
        parse_ice_servers('[{"urls": "turn:t.example.com", "username": "u", "credential": "s3cret-Word"')
    assert "s3cret-Word" not in str(caught.value)
    settings = IceSettings(parse_ice_servers(TURN_JSON))
    assert "s3cret-Word" not in repr(settings) and "s3cret-Word" not in settings.describe()
    assert "s3cret-Word" not in repr(StudioConfig.from_env({"MUSETALK_ICE_SERVERS": TURN_JSON}))


def test_relay_only_needs_a_turn_server():
    settings = IceSettings(parse_ice_servers(TURN_JSON), relay_only=True)
    assert settings.browser_configuration()["iceTransportPolicy"] == "relay"
    assert settings.describe() == "turn:turn.example.com:3478 (relay only)"
    with pytest.raises(InputError, match="relay only .* needs a TURN server: add a turn: or turns: URL"):
        IceSettings(parse_ice_servers("stun:stun.example.com"), relay_only=True)


def test_the_studio_reads_the_environment_and_the_flags_win():
    environ = {"MUSETALK_ICE_SERVERS": TURN_JSON, "MUSETALK_ICE_RELAY_ONLY": "yes"}
    config = StudioConfig.from_env(environ)
    assert config.ice_settings() == IceSettings(parse_ice_servers(TURN_JSON), relay_only=True)
    flags = live_ice.from_arguments(cli.build_parser().parse_args(
        ["live", "--video", "face.mp4", "--ice-servers", "stun:stun.example.com"]))
    assert flags == {"ice_servers": (IceServer(("stun:stun.example.com",)),), "ice_relay_only": None}
    config = StudioConfig.from_env({"MUSETALK_ICE_SERVERS": TURN_JSON}, **flags)
    assert config.ice_settings() == IceSettings((IceServer(("stun:stun.example.com",)),))
    assert StudioConfig.from_env({}).ice_settings() == IceSettings(), "no setting: no servers (host candidates only)"
    assert StudioConfig.from_env({"MUSETALK_ICE_RELAY_ONLY": "0"}).ice_relay_only is False
    with pytest.raises(InputError, match="MUSETALK_ICE_RELAY_ONLY='maybe' is neither on nor off; write 1"):
        StudioConfig.from_env({"MUSETALK_ICE_RELAY_ONLY": "maybe"})
    with pytest.raises(InputError, match="^MUSETALK_ICE_SERVERS: 'ftp:x' is not a STUN or TURN URL"):
        StudioConfig.from_env({"MUSETALK_ICE_SERVERS": "ftp:x"})


def test_the_command_lines_refuse_a_bad_setting_at_start(capsys):
    face = str(ROOT / "examples" / "face.mp4")
    assert cli.main(["live", "--video", face, "--ice-servers", "turn:turn.example.com"]) == cli.EXIT_USER_ERROR
    assert "musetalk: error: --ice-servers: the TURN URL 'turn:turn.example.com' needs a username" in \
        capsys.readouterr().err
    app = subprocess.run([sys.executable, "app.py", "--ice-servers", "stun:stun.example.com", "--ice-relay-only"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert app.returncode == 2 and "app.py: error: relay only" in app.stderr, app.stderr


def test_the_command_lines_help_says_how_to_set_it(capsys):
    from test_app import load_app_module

    with pytest.raises(SystemExit):
        cli.main(["live", "--help"])
    with pytest.raises(SystemExit):
        load_app_module().parse_args(["--help"])
    helps = capsys.readouterr().out.split("usage:")[1:]
    assert len(helps) == 2, "musetalk live's and app.py's"
    for text in helps:
        flat = " ".join(text.split())
        assert "--ice-servers SERVERS" in flat and "--ice-relay-only" in flat
        assert "$MUSETALK_ICE_SERVERS" in flat and "The page receives the credentials" in flat


def test_aiortc_gets_the_same_servers_and_policy():
    # In a child process: aiortc stays out of this one (tests/test_live_browser.py checks the app never
    # loads it before a connection).
    script = f"""
import json
from musetalk import live_ice, live_peer
settings = live_ice.IceSettings(live_ice.parse_ice_servers({json.dumps(TURN_JSON)} ), relay_only=True)
configuration = live_peer.rtc_configuration(settings)
print(json.dumps({{"servers": [[s.urls, s.username, s.credential] for s in configuration.iceServers],
                  "policy": configuration.iceTransportPolicy.value}}))
print(json.dumps(live_peer.rtc_configuration(live_ice.IceSettings()).iceServers))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    used, empty = done.stdout.splitlines()
    assert json.loads(used) == {"servers": [[["turn:turn.example.com:3478"], "live", "s3cret-Word"]],
                                "policy": "relay"}
    assert json.loads(empty) == [], "no servers is an empty list: None would make aiortc ask Google's STUN server"


def test_the_readmes_examples_are_accepted():
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text[text.index("### STUN and TURN"):text.index("## Text to dubbing")]
    command = shlex.split(block[block.index("musetalk live --video"):].split("\n```")[0].replace("\\\n", " "))
    servers = parse_ice_servers(command[command.index("--ice-servers") + 1], "--ice-servers")
    assert servers[0].is_turn and servers[0].username == "USER"
    variable = block[block.index("MUSETALK_ICE_SERVERS="):].split()[0].split("=", 1)[1]
    assert parse_ice_servers(variable) == (IceServer(("stun:stun.example.com:3478",)),)
