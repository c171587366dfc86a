"""The plugin manager: audio sources from the project's own plugins and installed ones, one path for both.

Every source comes from an entry point of the group ``musetalk.audio_sources`` (see
``musetalk.hookspecs`` for the contract). The manager is built once per process, on first
use; building it imports the plugin modules, which must stay cheap.

Sources are handed out wrapped in :class:`AudioSource`, which keeps a broken plugin from
taking the host down: ``available()`` and ``voices()`` never raise, and ``synthesize()``
raises only :class:`~musetalk.errors.MuseTalkError`. Whatever went wrong is kept as a
readable line in :func:`plugin_problems` for ``musetalk doctor`` and the app.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

import pluggy

from musetalk import hookspecs
from musetalk.errors import InputError, MuseTalkError
from musetalk.hookspecs import ENTRY_POINT_GROUP, hookimpl

logger = logging.getLogger(__name__)

__all__ = [
    "AudioClip",
    "AudioSource",
    "PluginManager",
    "SpeechEvent",
    "Voice",
    "audio_sources",
    "get_source",
    "hookimpl",
    "plugin_manager",
    "plugin_problems",
]

OWN_DISTRIBUTION = "musetalk-studio"
DEFAULT_SOURCE = "espeak"  # offline and installed with the package: what text is spoken with unless told
REQUIRED_ATTRIBUTES = ("id", "label", "can_clone", "options", "available", "voices", "synthesize")
OPTION_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Voice:
    id: str  # what synthesize() takes: "en-us", "de-DE-KatjaNeural"
    label: str  # what a person reads: "English (America)"
    language: str  # BCP-47 style code when known ("en-us"), else ""


@dataclass(frozen=True)
class SpeechEvent:
    """A moment in synthesized speech, for sources that report them (eSpeak, edge)."""

    kind: str  # "sentence", "word" or "phoneme"
    time: float  # seconds from the start of the clip
    text: str  # the word, or the phoneme's name in the engine's own alphabet (eSpeak mnemonics)
    position: int = -1  # character offset of the word in the synthesized text; -1 when unknown


@dataclass(frozen=True)
class AudioClip:
    path: str  # a WAV file
    sample_rate: int
    duration: float  # seconds
    source: str  # id of the audio source that made it
    voice: str | None  # the voice it used (None: the source has no voices)
    events: tuple[SpeechEvent, ...] = ()  # word / phoneme timings where the source gives them


# --------------------------------------------------------------------------- the manager


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the registered sources and the problems met on the way."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.sources: dict[str, AudioSource] = {}
        self._problems: list[str] = []
        self._distributions: dict[str, str] = {}  # plugin name -> the installed package that named it
        self._lock = threading.Lock()

    @property
    def problems(self) -> list[str]:
        with self._lock:
            return list(self._problems)

    def report(self, line: str) -> None:
        """Keep one readable line about a misbehaving plugin (each line once)."""
        with self._lock:
            if line in self._problems:
                return
            self._problems.append(line)
        logger.warning("%s", line)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every plugin of the group; a failure is reported, not raised."""
        for entry_point in sorted(metadata.entry_points(group=group), key=lambda ep: ep.name):
            where = _describe(entry_point)
            if self.has_plugin(entry_point.name):
                self.report(f"plugin {where}: another plugin already uses the name {entry_point.name!r}; skipped")
                continue
            try:
                plugin = entry_point.load()
                self.register(plugin, name=entry_point.name)
                dist = getattr(entry_point, "dist", None)
                if dist is not None:
                    self._distributions[entry_point.name] = dist.name
            except Exception as error:  # a broken plugin must never stop the host
                self.report(f"plugin {where} failed to load: {_error_line(error)}")

    def collect_sources(self) -> None:
        """Call each plugin's register_audio_sources on its own, so one that raises spoils only itself.

        The project's own plugins go first: an installed package cannot take over their ids.
        """
        def not_own(impl) -> bool:
            return self._distributions.get(self.get_name(impl.plugin)) != OWN_DISTRIBUTION

        for impl in sorted(self.hook.register_audio_sources.get_hookimpls(), key=not_own):
            plugin_name = self.get_name(impl.plugin) or repr(impl.plugin)
            register = _Registrar(self, plugin_name, self._distributions.get(plugin_name))
            try:
                impl.function(**{name: register for name in impl.argnames})
            except Exception as error:
                self.report(f"plugin {plugin_name!r}: register_audio_sources raised {_error_line(error)}")

    def add_source(self, source: Any, plugin_name: str, distribution: str | None) -> None:
        missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(source, name)]
        if missing:
            self.report(f"plugin {plugin_name!r}: {source!r} is not an audio source, it lacks "
                        f"{', '.join(missing)}; see musetalk.hookspecs")
            return
        source_id = source.id
        if not isinstance(source_id, str) or not source_id or source_id != source_id.strip():
            self.report(f"plugin {plugin_name!r}: a source id must be a non-empty string, got {source_id!r}")
            return
        if not _valid_options(source.options):
            self.report(f"plugin {plugin_name!r}: source {source_id!r} options must map names to "
                        f"defaults of type bool, int, float or str, got {source.options!r}")
            return
        if source_id in self.sources:
            self.report(f"plugin {plugin_name!r}: the source id {source_id!r} is already taken by plugin "
                        f"{self.sources[source_id].plugin!r}; skipped")
            return
        self.sources[source_id] = AudioSource(source, plugin_name, distribution, self)


class _Registrar:
    """The ``register`` callable handed to one plugin's hook."""

    def __init__(self, manager: PluginManager, plugin_name: str, distribution: str | None):
        self.manager, self.plugin_name, self.distribution = manager, plugin_name, distribution

    def __call__(self, source: Any) -> None:
        self.manager.add_source(source, self.plugin_name, self.distribution)


def _valid_options(options: Any) -> bool:
    return isinstance(options, dict) and all(
        isinstance(name, str) and isinstance(value, OPTION_TYPES) for name, value in options.items())


def _describe(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    origin = f" from {dist.name} {dist.version}" if dist is not None else ""
    return f"{entry_point.name!r} ({entry_point.value}{origin})"


def _error_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().rstrip(":")


# --------------------------------------------------------------------------- one source, guarded


class AudioSource:
    """A registered source as the host sees it: the plugin's object behind a guard.

    The attributes mirror the plugin's; calls that fail inside the plugin are reported to
    the manager and turned into a usable answer (``available``, ``voices``) or a
    :class:`MuseTalkError` (``synthesize``).
    """

    def __init__(self, source: Any, plugin: str, distribution: str | None, manager: PluginManager):
        self._source = source
        self._manager = manager
        self.plugin = plugin  # entry-point name of the plugin that registered it
        self.distribution = distribution  # the installed package it came from, when known
        self.id: str = source.id
        self.label: str = str(getattr(source, "label", "") or source.id)
        self.can_clone: bool = bool(getattr(source, "can_clone", False))
        self.options: dict[str, Any] = dict(source.options)

    def __repr__(self) -> str:
        return f"AudioSource({self.id!r}, plugin={self.plugin!r})"

    @property
    def default_voice(self) -> str | None:
        return getattr(self._source, "default_voice", None)

    def available(self) -> tuple[bool | None, str]:
        """(True, ...) it works here; (False, what to do) it cannot; (None, what it needs) not known until
        a call has worked (an online service): it may be tried, and is not called usable."""
        try:
            answer = self._source.available()
            ok, reason = answer
            return (None if ok is None else bool(ok)), str(reason or "")
        except Exception as error:
            line = self._broken("available()", error)
            return False, line

    def voices(self) -> list[Voice]:
        try:
            voices = list(self._source.voices())
        except Exception as error:
            self._broken("voices()", error)
            return []
        bad = [voice for voice in voices if not isinstance(voice, Voice)]
        if bad:
            self._manager.report(f"source {self.id!r} (plugin {self.plugin!r}): voices() must return "
                                 f"musetalk.plugins.Voice objects, got {bad[0]!r}")
            return [voice for voice in voices if isinstance(voice, Voice)]
        return voices

    def synthesize(self, text: str, voice: str | None, options: dict[str, Any],
                   reference_audio: str | None = None) -> AudioClip:
        try:
            if reference_audio is None:
                clip = self._source.synthesize(text, voice, options)
            else:
                clip = self._source.synthesize(text, voice, options, reference_audio=reference_audio)
        except MuseTalkError:
            raise  # the plugin's own message for the person: passed on as it is
        except Exception as error:
            line = self._broken("synthesize()", error)
            raise MuseTalkError(line) from error
        return self._checked_clip(clip)

    def _checked_clip(self, clip: Any) -> AudioClip:
        problem = None
        if not isinstance(clip, AudioClip):
            problem = f"synthesize() must return musetalk.plugins.AudioClip, got {type(clip).__name__}"
        elif not os.path.isfile(clip.path) or os.path.getsize(clip.path) == 0:
            problem = f"synthesize() returned {clip.path!r}, which is not a non-empty file"
        elif clip.sample_rate <= 0 or clip.duration <= 0:
            problem = f"synthesize() returned sample_rate={clip.sample_rate}, duration={clip.duration}"
        if problem:
            line = f"source {self.id!r} (plugin {self.plugin!r}): {problem}"
            self._manager.report(line)
            raise MuseTalkError(line)
        return clip

    def _broken(self, method: str, error: Exception) -> str:
        line = f"source {self.id!r} (plugin {self.plugin!r}): {method} raised {_error_line(error)}"
        self._manager.report(line)
        return line


# --------------------------------------------------------------------------- module API


def build_plugin_manager(group: str = ENTRY_POINT_GROUP) -> PluginManager:
    """A new manager with every plugin of ``group`` loaded and its sources collected."""
    manager = PluginManager()
    manager.load_entry_points(group)
    manager.collect_sources()
    logger.debug("audio sources: %s", ", ".join(manager.sources) or "none")
    return manager


@lru_cache(maxsize=1)
def plugin_manager() -> PluginManager:
    """The process's plugin manager, built on first use."""
    return build_plugin_manager()


def audio_sources() -> dict[str, AudioSource]:
    """Every registered source by id, usable or not (ask each one's ``available()``); the default first."""
    sources = plugin_manager().sources
    return {source_id: sources[source_id] for source_id in sorted(sources, key=lambda i: (i != DEFAULT_SOURCE, i))}


def plugin_problems() -> list[str]:
    """Plugins that failed to load or register, and sources that raised: one readable line each."""
    return plugin_manager().problems


def get_source(source_id: str) -> AudioSource:
    """The source with this id, or InputError naming the ones there are."""
    sources = audio_sources()
    if source_id not in sources:
        known = ", ".join(sorted(sources)) or "none"
        raise InputError(f"unknown audio source {source_id!r}; installed sources: {known} "
                         f"(musetalk voices lists them)")
    return sources[source_id]


def resolve_options(source: AudioSource, given: dict[str, Any] | None) -> dict[str, Any]:
    """Every option of the source: defaults, then ``given`` converted to each default's type."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(source.options))
    if unknown:
        known = ", ".join(f"{name}={value!r}" for name, value in source.options.items()) or "none"
        raise InputError(f"source {source.id!r} has no option {', '.join(unknown)}; its options: {known}")
    resolved = dict(source.options)
    for name, value in given.items():
        resolved[name] = _convert_option(source.id, name, value, source.options[name])
    return resolved


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert_option(source_id: str, name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        what = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise InputError(f"option {name} of source {source_id!r} must be {what}, got {value!r}") from None
