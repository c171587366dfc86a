"""The plugin contract: hooks a package implements to add audio sources to musetalk-studio.

A plugin is a module (or any object) with functions marked ``@hookimpl``, named in its
distribution's entry points under the group ``musetalk.audio_sources``::

    [project.entry-points."musetalk.audio_sources"]
    shout = "musetalk_tts_shout"

The project's own sources (``plugins/musetalk_tts_espeak`` and the others) are registered the
same way by the project's ``pyproject.toml``; nothing is special about them. The docstrings
below are the documentation of each hook; ``docs/plugins.md`` walks through a complete example.

What an audio source is
-----------------------
Any object with these attributes (duck typing; no base class to inherit)::

    id: str                  short, unique, lower case: "espeak", "coqui", "shout"
    label: str               what a person reads in a menu: "eSpeak NG (offline)"
    can_clone: bool          True when synthesize() uses reference_audio to imitate a voice
    options: dict            option name -> default value (int, float, str or bool);
                             the host checks names and converts given values to the default's type
    default_voice: str       optional: the voice id used when the caller names none
                             (else the first of voices(), else None)

    available() -> (bool | None, str)
        Cheap (no model load, no network): whether synthesize() can work on this machine,
        and when not, the reason with what to do ("pip install musetalk-studio[coqui]").
        None when that cannot be known before a call has worked (an online service offline
        looks the same as online): the reason says what it needs ("needs the internet"); the
        host lets it be tried and does not call it usable. Answer True once a call worked.
    voices() -> list[Voice]
        The voices this source offers (``musetalk.plugins.Voice``: id, label, language).
    synthesize(text, voice, options, reference_audio=None) -> AudioClip
        Speak one piece of text (a sentence or a short paragraph: the host splits long text,
        caches each piece and joins them with pauses). ``voice`` is a voice id or None for the
        source's default; ``options`` holds every option name, with defaults filled in;
        ``reference_audio`` is the path of a clean WAV of the voice to imitate (only given
        when ``can_clone``). Write a new WAV file (``tempfile.mkstemp(suffix=".wav")``): the
        host takes the file over and moves it into its cache. Return
        ``musetalk.plugins.AudioClip(path, sample_rate, duration, source=self.id, voice=...)``.
        Raise ``musetalk.errors.InputError`` for a bad voice or option value and
        ``musetalk.errors.MuseTalkError`` for anything else a person can fix (no network,
        model missing), with a message that says what to do. Any other exception is
        reported as a bug of the plugin.

How the host treats plugins
---------------------------
One plugin manager per process loads every entry point of the group. A plugin that fails
to import, whose hook raises, or whose source breaks the contract or raises from its
methods is recorded and shown by ``musetalk doctor`` and the app; the other sources keep
working. Methods may be called from several threads; guard non-thread-safe engines with
a lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "musetalk"
ENTRY_POINT_GROUP = "musetalk.audio_sources"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_audio_sources(register: Callable[[Any], None]) -> None:
    """Add audio sources: call ``register(source)`` once for each source this plugin offers.

    Called once per process, when the plugin manager is first built. Keep it cheap: build
    the source objects, but load no model and touch no network here (do that on the first
    ``synthesize``), since every command and the app's start-up pay for it.

    ``register`` checks the object against the contract above; a source that does not fit,
    or whose id another source already took, is reported and left out, and this plugin's
    other sources are still registered.
    """
