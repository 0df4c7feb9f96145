"""What the router takes from the daemon's Settings: the routing of client model names, and the facts about
each profile's engine binary (fork, version, routes it serves) for clear errors on routes a build lacks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llamactl.errors import ConfigError, LlamactlError
from llamactl.profiles import Profile
from llamactl.router.catalog import Routing
from llamactl.router.routes import RELAYED
from llamactl.settings import Settings

log = logging.getLogger("llamactl.router")


def _pairs(text: str, setting: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"LLAMACTL_{setting}: '{item.strip()}' is not NAME=PROFILE",
                              hint="e.g. LLAMACTL_MODEL_MAP='claude-*=coding,gpt-*=chat'")
        pairs.append((key.strip(), value.strip()))
    return pairs


def routing_from_settings(settings: Settings) -> Routing:
    route_defaults = dict(_pairs(settings.route_default_models, "ROUTE_DEFAULT_MODELS"))
    unknown = [path for path in route_defaults if path not in RELAYED and path not in ("/props", "/slots")]
    if unknown:
        raise ConfigError(f"LLAMACTL_ROUTE_DEFAULT_MODELS: no relayed route {', '.join(unknown)}",
                          hint=f"routes: {', '.join(sorted(RELAYED))}")
    return Routing(model_map=tuple(_pairs(settings.model_map, "MODEL_MAP")),
                   default_model=settings.default_model.strip() or None, route_defaults=route_defaults)


@dataclass(frozen=True)
class EngineFacts:
    engine: str
    version: str
    routes: frozenset[str] | None  # None: not probed (binary not found or unreadable)
    train_ctx: int | None = None  # the model's training context (what ctx_size = 0 gives), from its GGUF
    n_vocab: int | None = None  # how many tokens its vocabulary has (token ids a request may use are below)


class EngineFactsProbe:
    """Per profile, the binary it runs and what that binary serves; probed once (both probes are cached on
    disk by path + mtime), called from a thread: the first probe runs the binary's --help."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._known: dict[str, EngineFacts] = {}

    def cached(self, profile: Profile) -> EngineFacts | None:
        return self._known.get(profile.name)

    def facts(self, profile: Profile) -> EngineFacts:
        known = self._known.get(profile.name)
        if known is not None:
            return known
        from llamactl.engines.binaries import find_binary
        from llamactl.engines.capabilities import probe
        from llamactl.engines.routes import probe_routes

        try:
            binary = find_binary(profile.engine, self.settings, profile.binary).path
            version = probe(binary, self.settings.cache_dir).version
            routes = probe_routes(binary, self.settings.cache_dir, RELAYED)
        except LlamactlError as e:
            log.warning("profile %s: cannot probe its engine's routes: %s", profile.name, e)
            binary, version, routes = None, "unknown", None
        train_ctx, n_vocab = self._model_facts(profile)
        facts = EngineFacts(profile.engine, version, routes, train_ctx, n_vocab)
        self._known[profile.name] = facts
        return facts

    def _model_facts(self, profile: Profile) -> tuple[int | None, int | None]:
        from llamactl.gguf import read_model_info
        from llamactl.models import resolve_model_path

        try:
            info = read_model_info(resolve_model_path(profile.model, self.settings))
        except (LlamactlError, OSError):
            return None, None  # not there yet (a builtin model not assembled): shown as unknown
        return info.context_length, info.n_vocab
