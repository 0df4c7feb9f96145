"""`llamactl serve`: profiles + Supervisor + router, served by uvicorn.

Kept small on purpose: the service issue adds sd_notify, signals (SIGHUP reload, SIGTERM drain), the
control socket and API keys around `build_app` / `serve` (keys: pass a Starlette Middleware to
`create_app(..., middleware=[...])`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable

from llamactl.errors import ConfigError
from llamactl.policy import PolicyConfig
from llamactl.profiles import Profile, load_all
from llamactl.router import Backends, LaneConfig, Router, RouterConfig, Upstream, create_app
from llamactl.settings import Settings

log = logging.getLogger("llamactl.service")


class SupervisorBackends:
    """The router's Backends over the (synchronous) Supervisor, one thread per call.

    Every start gets a fresh random API key that only this process knows, so nothing else on the
    machine can talk to a child behind the router's back."""

    def __init__(self, supervisor, profiles: dict[str, Profile]) -> None:
        self.supervisor = supervisor
        self.profiles = profiles

    async def ensure_ready(self, profile_name: str) -> Upstream:
        profile = self.profiles[profile_name]
        record = await asyncio.to_thread(self.supervisor.start, profile, api_key=secrets.token_urlsafe(24))
        return Upstream(record.url, record.api_key)

    async def stop(self, profile_name: str) -> None:
        profile = self.profiles.get(profile_name)
        timeout = profile.stop_timeout_s if profile else 15.0
        await asyncio.to_thread(self.supervisor.stop, profile_name, timeout)


def router_config(settings: Settings) -> RouterConfig:
    return RouterConfig(lane=LaneConfig(
        max_queue=settings.router_max_queue,
        queue_timeout_s=settings.router_queue_timeout_s,
        idle_ttl_s=settings.router_idle_ttl_s,
        keep_both_warm=settings.router_keep_both_warm,
        policy=PolicyConfig(min_dwell_s=settings.router_min_dwell_s),
    ))


def load_profiles(settings: Settings, only: Iterable[str] = ()) -> dict[str, Profile]:
    profiles, errors = load_all(settings)
    for name, error in errors.items():
        log.warning("profile %s is not served: %s", name, error)
    wanted = list(only)
    if wanted:
        missing = [n for n in wanted if n not in profiles]
        if missing:
            raise ConfigError(f"cannot serve {', '.join(missing)}: " + "; ".join(
                str(errors[n]) if n in errors else f"no profile named '{n}'" for n in missing))
        chosen = {n: profiles[n] for n in wanted}
        # A profile named on the command line brings its switch group's other member along.
        for p in list(chosen.values()):
            if p.group:
                chosen.update({q.name: q for q in profiles.values() if q.group == p.group})
        profiles = chosen
    if not profiles:
        raise ConfigError("no valid profiles to serve", hint="`llamactl profiles validate` shows what is wrong")
    return profiles


def build_router(settings: Settings, profiles: dict[str, Profile], backends: Backends | None = None) -> Router:
    if backends is None:
        from llamactl.supervisor import Supervisor

        backends = SupervisorBackends(Supervisor(settings, die_with_parent=True), profiles)
    return Router(profiles.values(), backends, router_config(settings))


def serve(settings: Settings, *, host: str | None = None, port: int | None = None,
          profiles: Iterable[str] = (), log_level: str = "info") -> None:
    """Run the router until interrupted; engines it started are stopped on the way out."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    chosen = load_profiles(settings, profiles)
    router = build_router(settings, chosen)
    host = host or settings.router_host
    port = settings.router_port if port is None else port
    log.info("serving %s on http://%s:%d", ", ".join(router.catalog.valid_names()), host, port)
    uvicorn.run(create_app(router), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=30)
