"""Whether a speculative member's engine can serve its plain twin per request: the engine self-test's verdict
for the member's binary (engines/selftest.py), read from its cache or, the first time a group could use it,
measured in a thread. Never at start-up: until the verdict is known the group is served per process.

Called from the event loop only through `verdict` in a thread (it may start a small server for tens of
seconds); `cancel_all` (the router's shutdown) kills any self-test still running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from llamactl.errors import LlamactlError
from llamactl.profiles import Profile
from llamactl.settings import Settings

log = logging.getLogger("llamactl.router")
BUNDLED_MODEL = "builtin:gemma3-270m"


def per_process_groups(setting: str) -> frozenset[str]:
    """LLAMACTL_ROUTER_PER_PROCESS_GROUPS: the groups never served per request ('*': all of them)."""
    return frozenset(name.strip() for name in setting.split(",") if name.strip())


class PerRequestProbe:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.per_process = per_process_groups(settings.router_per_process_groups)
        self._lock = threading.Lock()
        self._running: set = set()  # SelfTests under way
        self._closed = False

    def allowed(self, group: str) -> bool:
        """May `group` be served per request at all? Not where the settings keep it per process."""
        return "*" not in self.per_process and group not in self.per_process

    def unknown(self, groups: Iterable[str]) -> list[str]:
        """Names in LLAMACTL_ROUTER_PER_PROCESS_GROUPS that are no switch group here (a typo keeps nothing per process)."""
        return sorted(self.per_process - {"*", *groups})

    def verdict(self, profile: Profile) -> bool:
        """Does `profile`'s binary honour a per-request draft depth? False where it cannot be told."""
        from llamactl.engines.binaries import find_binary
        from llamactl.engines.selftest import SelfTest, cached

        try:
            binary = find_binary(profile.engine, self.settings, profile.binary).path
        except LlamactlError as e:
            log.warning("profile %s: no engine to self-test for per-request depth: %s", profile.name, e)
            return False
        known = cached(binary, self.settings.cache_dir)
        if known is not None:
            return known.honoured
        model = self._model(profile)
        if model is None:
            return False
        test = SelfTest(profile.engine, binary, model, self.settings.cache_dir)
        with self._lock:
            if self._closed:
                return False
            self._running.add(test)
        try:
            log.info("profile %s: finding out whether %s honours a per-request draft depth (once per binary)",
                     profile.name, binary)
            result = test.run()
        finally:
            with self._lock:
                self._running.discard(test)
        return bool(result and result.honoured)

    def _model(self, profile: Profile) -> Path | None:
        """The bundled model where it is installed (small: a quick test), else the profile's own draft model."""
        from llamactl.models import ensure_model

        for model in (BUNDLED_MODEL, profile.speculation.draft_model):
            if model is None:
                continue
            try:
                return ensure_model(model, self.settings, where=f"profile {profile.name} (engine self-test)")
            except (LlamactlError, OSError):
                continue
        log.warning("profile %s: no model to self-test per-request depth with; its group is served per process",
                    profile.name)
        return None

    def cancel_all(self) -> None:
        with self._lock:
            self._closed = True
            running = list(self._running)
        for test in running:
            test.cancel()
