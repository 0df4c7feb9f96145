"""Settings: LLAMACTL_* environment variables and the paths derived from them.

Built once by the CLI (or a test) and passed down. Nothing here reads the working directory.
Every setting is one scalar (a path, a number, a word), so a pydantic model fed the matching variables does
what pydantic-settings did (names matched without regard to case, values given to the model take precedence,
unknown LLAMACTL_* variables ignored) at a third of the import time of every command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_PROFILES_DIR = PACKAGE_DIR.parent / "profiles"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


ENV_PREFIX = "LLAMACTL_"


class Settings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def __init__(self, **values: object) -> None:
        super().__init__(**{**from_environment(), **values})

    home: Path | None = Field(
        default=None,
        description="One directory for state, logs, cache and config (default: the XDG directories).",
    )
    profiles_dirs: str = Field(default="", description="Colon-separated profile directories searched first.")
    etc_profiles_dir: Path = Path("/etc/llamactl/profiles")
    llama_server: Path | None = Field(default=None, description="llama-server binary for engine llama.cpp.")
    ik_llama_server: Path | None = Field(default=None, description="llama-server binary for engine ik_llama.cpp.")
    engines_dir: Path | None = Field(default=None, description="Where scripts/install-engines puts builds.")
    gpus_file: Path | None = Field(
        default=None, description="JSON file describing the GPUs (`llamactl gpus --json`); replaces the NVML probe."
    )
    log_max_bytes: int = 20 * 1024 * 1024
    fit_ctx_min: int = Field(default=4096, ge=256, description="The least context the planner lowers an unset "
                                                                "ctx_size to when the model's own does not fit.")
    # Router (`llamactl serve`)
    router_host: str = Field(default="127.0.0.1", description="Address `llamactl serve` binds.")
    router_port: int = Field(default=8080, ge=0, le=65535, description="Port `llamactl serve` binds.")
    router_max_queue: int = Field(default=64, ge=1, description="Requests waiting per lane before 429.")
    router_queue_timeout_s: float = Field(default=300.0, gt=0, description="Longest wait in a lane's queue.")
    router_idle_ttl_s: float = Field(default=0.0, ge=0, description="Unload a lane idle this long (0: never).")
    router_keep_both_warm: bool | Literal["auto"] = Field(
        default="auto", description="Switch without stopping the other member: auto = when the memory plan says "
                                    "both members fit together; true / false = always / never.")
    router_per_process_groups: str = Field(
        default="", max_length=2000,
        description="Switch groups served per process even where a drafting member's engine could serve its plain "
                    "twin per request (drafting off): comma-separated group names, '*' for every group.")
    router_classes: str = Field(
        default="", max_length=2000,
        description="Extra traffic classes clients may name in X-Llamactl-Class, comma-separated (each one becomes "
                    "a metrics label; other names are ignored).")
    reserve_mib: str = Field(
        default="", max_length=2000,
        description="MiB per device `llamactl serve` leaves free beyond the plan's margin, for the desktop, a game or "
                    "another tool, e.g. 'CUDA0=2048,host=8192' (devices: CUDA0.., RPC0.., host).")
    min_residence_s: float = Field(
        default=0.0, ge=0, le=86400,
        description="Least time an engine runs before `llamactl serve` may stop it to make room for another (it also "
                    "always runs at least as long as its own load took).")
    router_min_dwell_s: float = Field(default=10.0, ge=0, description="Least time on a member before a switch.")
    router_explore_share: float = Field(
        default=0.1, ge=0, le=1,
        description="Share of a class's requests, and of a lane's serving time in reloads, that may go to finding "
                    "out how a member not yet measured does; 0 never explores.")
    default_model: str = Field(default="", description="Profile, alias or group for requests without `model` "
                                                       "when more than one is served.")
    route_default_models: str = Field(default="", description="Per-route defaults for requests without `model`: "
                                                              "'/infill=coder,/tokenize=coder'.")
    model_map: str = Field(default="", description="Client model names (globs) to served names, first match "
                                                   "wins: 'claude-*=coding,gpt-*=chat'.")
    log_backups: int = 5
    # Security (`llamactl serve`): see llamactl/auth.py
    api_keys: str = Field(default="", repr=False, description="Comma-separated API keys the router accepts.")
    api_key_file: Path | None = Field(default=None, description="File with one API key per line (# comments).")
    allow_insecure_bind: bool = Field(default=False, description="Allow a non-loopback bind without API keys.")
    allowed_hosts: str = Field(
        default="", max_length=4000,
        description="Comma-separated Host names the router answers besides loopback and its bound address "
                    "(a reverse proxy's name; '*' for any). Other Host headers get 421 (DNS rebinding).")
    allowed_origins: str = Field(
        default="", max_length=4000,
        description="Comma-separated browser origins (scheme://host:port) allowed to call the router "
                    "cross-origin; same-origin pages are always allowed, other origins get 403.")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_body_bytes_in_flight: int = Field(
        default=128 * 1024 * 1024, ge=1024,
        description="Bytes of request bodies the router holds at once, across all requests (at least "
                    "MAX_BODY_BYTES); a body past it gets 503 with Retry-After, so memory stays bounded.")
    # Daemon (`llamactl serve`): see llamactl/daemon/service.py
    daemon_answer_s: float = Field(
        default=5.0, gt=0, le=600, description="How long the CLI waits for a running daemon to answer at all "
                                               "before a command (and between progress lines during one).")
    preload: str = Field(default="", description="Comma-separated profiles loaded before READY=1 (`serve --preload`).")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="On SIGTERM, wait this long for requests in flight.")
    health_interval_s: float = Field(default=5.0, gt=0, description="How often a served child's /health is probed.")
    health_timeout_s: float = Field(default=3.0, gt=0, description="A /health probe slower than this failed.")
    hang_probes: int = Field(default=3, ge=1, description="Failed probes in a row (process alive) that mean hung.")
    restart_base_delay_s: float = Field(default=1.0, ge=0, description="First restart delay; doubles per crash.")
    restart_max_delay_s: float = Field(default=60.0, ge=0, description="Longest restart delay.")
    restart_max_crashes: int = Field(default=5, ge=1, description="Crashes within restart_window_s that mean failed.")
    restart_window_s: float = Field(default=300.0, gt=0, description="The crash-loop window.")
    relay_child_logs: bool = Field(default=True, description="Copy children's log lines into the daemon's log.")
    alert_acceptance_below: float = Field(default=0.6, ge=0, le=1, description="Alert when a (group, class)'s "
                                          "rolling draft acceptance is under this.")
    alert_min_drafted: int = Field(default=200, ge=1, description="Drafted tokens in the window before an "
                                   "acceptance alert can be raised.")
    prompt_cache_mib: int = Field(
        default=16384, ge=0, le=1 << 30,
        description="Disk the prompt cache may use for the whole box (slots saved before llamactl stops an engine, "
                    "restored after it starts again), least recently used out first; 0 turns it off.")
    prompt_cache_min_tokens: int = Field(
        default=1024, ge=1, description="A slot holding fewer tokens is not saved (its prefill is cheap).")
    prompt_cache_save_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest an engine's stop waits for its slots to be saved "
                                                 "(then it stops anyway, keeping what was saved).")
    prompt_cache_restore_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest a start waits for saved slots to be restored (requests "
                                                 "wait as during a load; what is not restored by then is skipped).")
    memory_sample_s: float = Field(default=2.0, gt=0, description="How often `serve` samples device memory for "
                                   "the dashboard and `llamactl top`.")

    @property
    def state_dir(self) -> Path:
        return self.home / "state" if self.home else _xdg("XDG_STATE_HOME", ".local/state") / "llamactl"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def daemon_socket(self) -> Path:
        """The running daemon's control socket (daemon/control.py); a command with no socket here needs no client."""
        return self.state_dir / "llamactl.sock"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache" if self.home else _xdg("XDG_CACHE_HOME", ".cache") / "llamactl"

    @property
    def config_dir(self) -> Path:
        return self.home / "config" if self.home else _xdg("XDG_CONFIG_HOME", ".config") / "llamactl"

    @property
    def prompt_cache_dir(self) -> Path:
        return self.cache_dir / "prompts"

    @property
    def engine_cache_dir(self) -> Path:
        return self.engines_dir or self.cache_dir / "engines"

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    def profile_search_path(self) -> list[Path]:
        """Directories searched for profiles, first match wins."""
        dirs = [Path(p).expanduser() for p in self.profiles_dirs.split(":") if p]
        dirs += [self.config_dir / "profiles", self.etc_profiles_dir, BUNDLED_PROFILES_DIR]
        return dirs


def from_environment() -> dict[str, str]:
    """The LLAMACTL_* variables that name a setting: setting name -> the variable's text."""
    fields = Settings.model_fields
    found = {}
    for key, value in os.environ.items():
        name = key[len(ENV_PREFIX):].lower() if key.upper().startswith(ENV_PREFIX) else None
        if name in fields:
            found[name] = value
    return found


def load_settings() -> Settings:
    """Settings from the environment; a bad LLAMACTL_* value is a ConfigError naming the variable."""
    from pydantic import ValidationError

    from llamactl.errors import ConfigError

    try:
        return Settings()
    except ValidationError as e:
        problems = []
        for error in e.errors():
            key = "_".join(str(part) for part in error["loc"]).upper()
            value = os.environ.get(f"LLAMACTL_{key}", "")
            problems.append(f"LLAMACTL_{key}={value[:80]!r}: {error['msg']}")
        raise ConfigError("invalid setting: " + "; ".join(problems),
                          hint="fix or unset the variable (`llamactl --help` lists the commands; "
                               "llamactl/settings.py describes each setting)") from None
