"""The ICE servers (STUN and TURN) of live connections: one list, the same for the server and the page.

Without any, the server offers only its own host addresses, and a browser connects only when it can
reach one of them (this machine, a LAN, a host with a public address). Behind a proxy or a NAT (a
Hugging Face Space, most cloud hosts) the media needs a TURN server to relay it.

The setting comes from ``--ice-servers`` (``app.py``, ``musetalk live``) or, where there is no
command line (a Space, whose secrets become environment variables), from ``MUSETALK_ICE_SERVERS``.
Its value is one of:

- JSON in the browser's RTCIceServer form, a list of servers, each with ``urls`` (a URL or a list of
  them) and, for TURN, ``username`` and ``credential``:
  ``[{"urls": "turn:turn.example.com:3478", "username": "u", "credential": "c"}]``;
- or STUN URLs separated by commas: ``stun:stun.example.com:3478,stun:other.example.com``
  (TURN needs its credentials, so it needs the JSON form).

``--ice-relay-only`` / ``MUSETALK_ICE_RELAY_ONLY=1`` makes both ends use relayed (TURN) candidates
only: the way to test that the TURN server works, since on a LAN the direct path would win.

The page necessarily receives the TURN credentials: a browser logs in to the TURN server itself.
They are never logged here, nor put in an error message.

Nothing heavy is imported: this module is read when the app starts, long before aiortc loads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from musetalk.errors import InputError

SERVERS_OPTION = "--ice-servers"
SERVERS_VARIABLE = "MUSETALK_ICE_SERVERS"
RELAY_ONLY_OPTION = "--ice-relay-only"
RELAY_ONLY_VARIABLE = "MUSETALK_ICE_RELAY_ONLY"

# RFC 7064 and 7065, as far as both ends can use them: aiortc (the server) parses host names and IPv4
# addresses, not bracketed IPv6 ones; it has no stuns: and speaks turns: over TCP only.
URL_PATTERN = re.compile(
    r"(?P<scheme>stun|turn|turns):(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
    r"(?::(?P<port>[0-9]{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?")
URL_FORMS = "stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]"
JSON_EXAMPLE = '[{"urls": "turn:turn.example.com:3478", "username": "USER", "credential": "SECRET"}]'
SERVER_KEYS = ("urls", "username", "credential")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server, as the browser's RTCIceServer has it."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = field(default=None, repr=False)  # a repr is what ends up in logs

    @property
    def is_turn(self) -> bool:
        return any(url.startswith("turn") for url in self.urls)

    def for_browser(self) -> dict:
        """The RTCIceServer dictionary the page hands to ``new RTCPeerConnection``."""
        server: dict = {"urls": list(self.urls)}
        if self.username is not None:
            server["username"] = self.username
        if self.credential is not None:
            server["credential"] = self.credential
        return server


@dataclass(frozen=True)
class IceSettings:
    """The ICE servers of both ends, and whether they may use relayed candidates only."""

    servers: tuple[IceServer, ...] = ()
    relay_only: bool = False

    def __post_init__(self):
        if self.relay_only and not any(server.is_turn for server in self.servers):
            raise InputError(f"relay only ({RELAY_ONLY_OPTION} / {RELAY_ONLY_VARIABLE}) needs a TURN server: add a "
                             f"turn: or turns: URL to {SERVERS_OPTION} / {SERVERS_VARIABLE}, or leave relay only off")

    @property
    def urls(self) -> list[str]:
        return [url for server in self.servers for url in server.urls]

    def browser_configuration(self) -> dict:
        """The RTCConfiguration dictionary the page's client is made with (credentials included)."""
        return {"iceServers": [server.for_browser() for server in self.servers],
                "iceTransportPolicy": "relay" if self.relay_only else "all"}

    def describe(self) -> str:
        """For logs and messages: the URLs, never a credential."""
        if not self.servers:
            return "none (the server's own addresses only)"
        return ", ".join(self.urls) + (" (relay only)" if self.relay_only else "")


def parse_ice_servers(text: str, setting: str = SERVERS_VARIABLE) -> tuple[IceServer, ...]:
    """The servers in ``text`` (JSON or comma-separated STUN URLs); ``setting`` names it in errors.

    Empty text is no servers."""
    text = text.strip()
    if not text:
        return ()
    if text[0] in "[{":
        return _servers_from_json(text, setting)
    return tuple(IceServer((_checked_url(url.strip(), setting, has_login=False),))
                 for url in text.split(",") if url.strip())


def parse_switch(text: str, setting: str = RELAY_ONLY_VARIABLE) -> bool:
    """An on/off setting from the environment: 1/true/yes/on or 0/false/no/off."""
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise InputError(f"{setting}={text!r} is neither on nor off; write 1 (on) or 0 (off)")


def _servers_from_json(text: str, setting: str) -> tuple[IceServer, ...]:
    try:
        listed = json.loads(text)
    except json.JSONDecodeError as error:  # its message has a position, not the text: no credential leaks
        raise InputError(f"{setting} is not valid JSON ({error.msg} at character {error.pos}); write it as "
                         f"{JSON_EXAMPLE}") from None
    if not isinstance(listed, list):
        raise InputError(f"{setting} must be a JSON list of servers: put the server in [ ], as in {JSON_EXAMPLE}")
    return tuple(_server_from_json(entry, number, setting) for number, entry in enumerate(listed, 1))


def _server_from_json(entry, number: int, setting: str) -> IceServer:
    where = f"{setting}, server {number}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} must be a JSON object with urls (and, for TURN, username and credential), "
                         f"as in {JSON_EXAMPLE}")
    unknown = sorted(set(entry) - set(SERVER_KEYS))
    if unknown:
        raise InputError(f"{where} has {', '.join(map(repr, unknown))}, which is not a server's setting; "
                         f"a server has {', '.join(SERVER_KEYS)}")
    urls = entry.get("urls")
    urls = [urls] if isinstance(urls, str) else urls
    if not urls or not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise InputError(f"{where} needs urls: a URL ({URL_FORMS}) or a list of them")
    for key in ("username", "credential"):
        if key in entry and not isinstance(entry[key], str):
            raise InputError(f"{where}: its {key} must be a string (in quotes)")
    has_login = bool(entry.get("username")) and bool(entry.get("credential"))
    checked = tuple(_checked_url(url, where, has_login) for url in urls)
    return IceServer(checked, entry.get("username"), entry.get("credential"))


def _checked_url(url: str, where: str, has_login: bool) -> str:
    """``url`` when both ends can use it (a TURN URL only ``has_login``); else InputError saying what to write."""
    if "@" in url:  # not echoed: it may hold a password
        raise InputError(f"{where}: a URL carries no login; write the TURN server's username and credential "
                         f"beside its urls, as in {JSON_EXAMPLE}")
    if url.startswith("stuns:"):
        raise InputError(f"{where}: {url!r}: the server's WebRTC (aiortc) cannot use stuns:; write stun:, or "
                         "turns: for a relay over TLS")
    match = URL_PATTERN.fullmatch(url)
    if match is None:
        raise InputError(f"{where}: {url!r} is not a STUN or TURN URL the server and browsers can use; write "
                         f"{URL_FORMS} (a host name or an IPv4 address)")
    if match["port"] is not None and not 1 <= int(match["port"]) <= 65535:
        raise InputError(f"{where}: {url!r} has port {match['port']}; a port is 1 to 65535")
    if match["scheme"] == "stun" and match["transport"] is not None:
        raise InputError(f"{where}: {url!r}: a stun: URL has no transport (STUN is UDP here); drop ?transport=")
    if match["scheme"] == "turns" and match["transport"] == "udp":
        raise InputError(f"{where}: {url!r}: turns: is TLS over TCP; drop ?transport=udp")
    if match["scheme"] != "stun" and not has_login:
        raise InputError(f"{where}: the TURN URL {url!r} needs a username and a credential; write it in the "
                         f"JSON form, {JSON_EXAMPLE}")
    return url


# --------------------------------------------------------------------------- the command lines' options


def add_arguments(parser) -> None:
    """``--ice-servers`` and ``--ice-relay-only``, the same in ``app.py`` and ``musetalk live``."""
    group = parser.add_argument_group("live connections through STUN/TURN (both ends, the server and the page)")
    group.add_argument(SERVERS_OPTION, metavar="SERVERS",
                       help=f"STUN/TURN servers: JSON in the browser's form, {JSON_EXAMPLE}, or stun: URLs "
                            f"separated by commas (default: ${SERVERS_VARIABLE}, else none: only direct "
                            "connections, which a Space or a host behind a proxy or NAT cannot take; there, "
                            "give a TURN server). The page receives the credentials: a browser logs in itself")
    group.add_argument(RELAY_ONLY_OPTION, action="store_const", const=True, default=None,
                       help=f"use relayed (TURN) candidates only, to test the TURN server (default: "
                            f"${RELAY_ONLY_VARIABLE}, else off)")


def from_arguments(args) -> dict:
    """The StudioConfig overrides the options give (None: not given, the environment's value stands)."""
    servers = getattr(args, "ice_servers", None)
    return {"ice_servers": None if servers is None else parse_ice_servers(servers, SERVERS_OPTION),
            "ice_relay_only": getattr(args, "ice_relay_only", None)}
