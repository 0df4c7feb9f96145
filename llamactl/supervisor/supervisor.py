"""Supervisor: start / stop / inspect llama-servers by profile; state lives in the state dir."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from llamactl.engines import Capabilities, build_launch, probe
from llamactl.engines.binaries import find_binary
from llamactl.engines.common import LaunchInputs
from llamactl.engines.logs import classify_exit
from llamactl.errors import ProfileError, StartCancelled, StartError
from llamactl.models import ensure_model
from llamactl.vocab import check_draft_vocabulary
from llamactl.names import check_profile_name
from llamactl.profiles import Profile
from llamactl.settings import Settings
from llamactl.supervisor.process import ManagedProcess, ReadyOutcome, stop_group
from llamactl.supervisor.logs import rotate_if_large, rotate_logs, tail_lines
from llamactl.supervisor.state import ServerRecord, StateStore, process_matches

PORT_ATTEMPTS = 5  # a port can be taken between choosing it and the engine binding it (or squatted)
LOG_TAIL_LINES = 15


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerStatus:
    record: ServerRecord
    alive: bool
    rss_bytes: int | None
    key_file: Path | None = None  # where the engine's API key is (None: started without one)

    def to_json(self) -> dict[str, object]:
        r = self.record
        return {
            "profile": r.profile, "state": r.state if self.alive else "dead", "pid": r.pid, "port": r.port,
            "url": r.url, "uptime_s": round(time.time() - r.started_at, 1) if self.alive else None,
            "model": r.model, "alias": r.alias, "engine": r.engine, "version": r.version,
            "rss_mib": round(self.rss_bytes / 2**20, 1) if self.rss_bytes is not None else None,
            "log": r.log_path, "key_file": str(self.key_file) if self.key_file else None,
            "placement": r.placement,
        }


def check_context(profile: Profile, model_path: Path, where: str) -> None:
    """A context beyond the model's training context needs rope scaling; say so before launching."""
    from llamactl.gguf import read_model_info

    info = read_model_info(model_path)
    train = info.context_length
    if train and profile.ctx_size > train and not profile.rope.extends_context:
        raise ProfileError(
            f"{where}: ctx_size = {profile.ctx_size} is above the model's training context ({train}) "
            "and no rope scaling is set",
            hint=f"lower ctx_size to {train}, or add [rope] scaling = 'yarn', scale = "
                 f"{profile.ctx_size / train:g}, yarn_orig_ctx = {train}",
        )


def needs_swa_full(profile: Profile, model_path: Path) -> bool:
    """The prompt cache of a sliding-window model that persists its slots needs --swa-full (promptcache)."""
    from llamactl.gguf import read_model_info
    from llamactl.promptcache import persist_decision

    return persist_decision(profile, sliding_window=read_model_info(model_path).has_sliding_window).swa_full


class Supervisor:
    """Starts and stops servers. Safe to use from several CLIs at once (per-profile locks)."""

    def __init__(self, settings: Settings, *, die_with_parent: bool = False,
                 environ: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.store = StateStore(settings.state_dir)
        self.die_with_parent = die_with_parent
        self.environ = dict(os.environ if environ is None else environ)

    # -- queries ---------------------------------------------------------------------------------

    def running(self, name: str) -> ServerRecord | None:
        record = self.store.read(name)
        if record is None or process_matches(record) is None:
            return None
        return record

    def status(self) -> list[ServerStatus]:
        """Every recorded server, alive or not. Also rotates logs of live servers that grew too large."""
        out = []
        for name in self.store.names():
            record = self.store.read(name)
            if record is None:
                continue
            proc = process_matches(record)
            rss = None
            if proc is not None:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    proc = None
            if proc is not None:
                rotate_if_large(Path(record.log_path), self.settings.log_max_bytes, self.settings.log_backups)
            out.append(ServerStatus(record, proc is not None, rss,
                                    self.store.key_path(name) if record.api_key else None))
        return out

    def log_path(self, name: str) -> Path:
        return self.settings.log_dir / f"{check_profile_name(name)}.log"

    # -- start -----------------------------------------------------------------------------------

    def prepare(self, profile: Profile, slot_save_path: Path | None = None) -> tuple[LaunchInputs, Capabilities]:
        """Everything that can fail before a process exists: binary, flags, model files, context.
        `slot_save_path`: where the engine may save slots (the daemon's prompt cache; None: no slot files)."""
        where = str(profile.source or profile.name)
        found = find_binary(profile.engine, self.settings, profile.binary)
        caps = probe(found.path, self.settings.cache_dir)
        model_path = ensure_model(profile.model, self.settings, where=where)
        draft_path = None
        if profile.speculation.uses_draft_model:
            draft_path = ensure_model(profile.speculation.draft_model or "", self.settings,
                                      where=f"{where} (speculation.draft_model)")
            check_draft_vocabulary(model_path, draft_path, where=f"{where} (speculation.draft_model)")
        check_context(profile, model_path, where)
        inputs = LaunchInputs(binary=found.path, model_path=model_path, port=0, draft_model_path=draft_path,
                              swa_full=needs_swa_full(profile, model_path), slot_save_path=slot_save_path)
        build_launch(profile, caps, inputs, self.environ)  # refuses unsupported flags before any spawn
        return inputs, caps

    def start(self, profile: Profile, *, api_key: str | None = None,
              cancelled: Callable[[], bool] | None = None, placement: str | None = None,
              slot_save_path: Path | None = None) -> ServerRecord:
        """Start `profile` and block until it is ready. Returns the running record if already up.

        `cancelled` is polled while the engine loads: once it says True the engine is stopped and
        StartCancelled raised. Whatever interrupts a start (that, Ctrl-C, an error) leaves nothing running
        and no record behind.
        """
        with self.store.lock(profile.name):
            existing = self.running(profile.name)
            if existing is not None and existing.state == "ready":
                return existing
            if existing is not None:
                # Still "starting" although we hold its lock: the llamactl that started it died mid-load.
                stop_group(existing.pid, profile.stop_timeout_s)
                self.store.remove_key(profile.name)
            self.store.remove(profile.name)
            inputs, caps = self.prepare(profile, slot_save_path)
            for attempt in range(1, PORT_ATTEMPTS + 1):
                _check_cancelled(profile.name, cancelled)
                try:
                    return self._start_once(profile, inputs, caps, api_key, cancelled, placement)
                except StartError as e:
                    if e.cause != "port in use" or attempt == PORT_ATTEMPTS:
                        raise
        raise AssertionError("unreachable")

    def _start_once(self, profile: Profile, inputs: LaunchInputs, caps, api_key: str | None,
                    cancelled: Callable[[], bool] | None, placement: str | None = None) -> ServerRecord:
        port = free_port()
        try:
            key_file = self.store.write_key(profile.name, api_key) if api_key else None
        except OSError as e:
            raise StartError(f"{profile.name}: cannot write the engine's key file: {e}", cause="state dir unwritable",
                             log_tail=[], hint=f"check that {self.settings.state_dir} is writable") from None
        inputs = dataclasses.replace(inputs, port=port, api_key_file=key_file)
        spec = build_launch(profile, caps, inputs, self.environ)
        log_path = self.log_path(profile.name)
        rotate_logs(log_path, self.settings.log_backups)
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        child = ManagedProcess(spec, log_path, cwd=self.settings.state_dir, die_with_parent=self.die_with_parent)
        child.spawn()
        # From here on the child exists: spawn, record and ready are one step. Any failure or interruption
        # (a record that cannot be written, Ctrl-C, a cancel, SIGTERM raised as an exception) stops it.
        try:
            record = ServerRecord(
                profile=profile.name, engine=profile.engine, binary=str(inputs.binary), version=caps.version,
                model=str(inputs.model_path), alias=profile.served_alias, pid=child.pid,
                create_time=child.create_time(), cmdline=spec.argv, port=port, log_path=str(log_path),
                started_at=time.time(), api_key=api_key, placement=placement,
            )
            self._write_record(record)
            outcome = child.wait_ready(record.url, profile.load_timeout_s,
                                       lambda: _check_cancelled(profile.name, cancelled), port=port)
            if outcome is ReadyOutcome.READY:
                record = record.with_state("ready", ready_at=time.time())
                self._write_record(record)
                return record
        except BaseException:
            self._discard(child, profile)
            raise
        self._discard(child, profile)
        lines = tail_lines(log_path, LOG_TAIL_LINES)
        if outcome is ReadyOutcome.PORT_TAKEN:
            raise StartError(
                f"{profile.name}: another process answered on port {port} before llama-server could listen there; "
                "stopped the engine", cause="port in use", log_tail=lines,
                hint="something on this machine takes the ports llamactl picks; `ss -ltnp` shows who")
        if outcome is ReadyOutcome.TIMED_OUT:
            raise StartError(
                f"{profile.name}: not ready after {profile.load_timeout_s:g} s (load_timeout_s); stopped it",
                cause="load timeout", log_tail=lines,
                hint="raise load_timeout_s in the profile if the model is just slow to load",
            )
        cause = classify_exit(lines)
        raise StartError(
            f"{profile.name}: llama-server exited with code {child.exit_code} while starting: {cause.cause}"
            + (f" ({cause.line})" if cause.line else ""),
            cause=cause.cause, log_tail=lines, hint=cause.hint,
        )

    def _write_record(self, record: ServerRecord) -> None:
        try:
            self.store.write(record)
        except OSError as e:
            raise StartError(
                f"{record.profile}: cannot write the state record ({e.strerror or e}); stopped the engine, "
                "since `status` and `down` could not see it", cause="state dir unwritable", log_tail=[],
                hint=f"free space or fix permissions in {self.settings.state_dir}") from None

    def _discard(self, child: ManagedProcess, profile: Profile) -> None:
        child.stop(profile.stop_timeout_s)
        with contextlib.suppress(OSError):
            self.store.remove(profile.name)
            self.store.remove_key(profile.name)

    # -- stop ------------------------------------------------------------------------------------

    def stop(self, name: str, timeout_s: float = 15.0) -> bool:
        """Stop a profile's server. False if it was not running (a stale record is cleaned up)."""
        with self.store.lock(name):
            record = self.store.read(name)
            if record is None:
                return False
            proc = process_matches(record)
            if proc is None:
                self.store.remove(name)
                return False
            # The child leads its own session, so its pid is its process group id.
            stop_group(record.pid, timeout_s)
            self.store.remove(name)
            self.store.remove_key(name)
            return True

    def stop_all(self, timeout_s: float = 15.0) -> list[str]:
        return [name for name in self.store.names() if self.stop(name, timeout_s)]


def _check_cancelled(name: str, cancelled: Callable[[], bool] | None) -> None:
    if cancelled is not None and cancelled():
        raise StartCancelled(f"{name}: start cancelled (llamactl down or shutdown); stopped the engine")
