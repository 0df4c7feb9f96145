"""systemd units for `llamactl serve`: what the unit says (render_unit, pure) and what this machine needs
(detect_params: executable, user, directories, whether anything lives under /home, NVIDIA devices).

Why the unit looks the way it does:
- Type=notify + WatchdogSec: llamactl sends READY once the configured profiles are up and pings the
  watchdog (llamactl.daemon.notify); a wedged daemon is restarted. ExecReload sends SIGHUP (reload profiles).
- KillMode=mixed: SIGTERM goes to llamactl alone so it can drain requests and stop its children in
  order; after TimeoutStopSec everything left in the service's cgroup gets SIGKILL, so no llama-server
  outlives the service even if llamactl itself hangs.
- Hardening stops where GPU access starts: /dev/nvidia* must stay visible (no PrivateDevices), CUDA
  JIT-compiles into writable+executable memory (no MemoryDenyWriteExecute), and the setuid
  nvidia-modprobe cannot run under NoNewPrivileges, so it runs privileged once in ExecStartPre (+).
- User units cannot use mount namespaces or device policies without unprivileged user namespaces
  (disabled on some distributions), so they get only the settings that need neither.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llamactl.daemon.unit_syntax import command_line, environment_item, escape_specifiers, plain_path, quoted
from llamactl.settings import Settings

HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
NVIDIA_FIXED = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
NVIDIA_CLASSES = ("char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps")  # GPUs added later too
SECRET_ENV = frozenset({"LLAMACTL_API_KEYS"})
SYSTEM_DIRS = {"XDG_STATE_HOME": "/var/lib", "XDG_CACHE_HOME": "/var/cache", "XDG_CONFIG_HOME": "/etc"}


@dataclass(frozen=True)
class UnitParams:
    exec_start: tuple[str, ...]  # argv of `llamactl serve`
    user_unit: bool
    state_dir: Path
    cache_dir: Path
    config_dir: Path
    user: str | None = None  # system unit: User= (None: root)
    protect_home: str = "yes"  # "read-only" when anything llamactl needs lives under a home directory
    environment: tuple[tuple[str, str], ...] = ()
    nvidia_devices: tuple[str, ...] = NVIDIA_FIXED
    nvidia_modprobe: str | None = None
    system_dirs: bool = False  # state/cache/config are /var/lib, /var/cache, /etc (StateDirectory= & co.)
    watchdog_s: int = 60
    start_timeout_s: int = 900  # READY comes once the configured profiles are loaded
    stop_timeout_s: int = 120  # drain in-flight requests, then stop each child (SIGTERM, wait, SIGKILL)
    extra_rw: tuple[Path, ...] = field(default=())
    worker: bool = False  # `llamactl worker` (rpc-server for a main box) instead of `llamactl serve`
    specifiers_on_purpose: bool = False  # the values use %h, %S... (the committed user example): keep their `%`

    @property
    def unit_name(self) -> str:
        return "llamactl-worker.service" if self.worker else "llamactl.service"


def render_unit(p: UnitParams) -> str:
    """The unit file text. Pure: everything machine-specific is in `p`; every value is escaped (unit_syntax)
    so systemd reads back the paths and settings as they are, whatever characters they hold."""
    esc = not p.specifiers_on_purpose

    def env_line(key: str, value: str) -> str:
        return "Environment=" + environment_item(key, value, specifiers=esc)

    lines = [
        "# Rendered by `llamactl systemd install" + (" --user" if p.user_unit else "") + (" --worker" if p.worker else "")
        + "`; re-run it after moving llamactl.",
        "[Unit]",
        "Description=" + ("llamactl worker: llama.cpp rpc-server for a main box (unauthenticated: private network only)"
                          if p.worker else "llamactl: supervised llama.cpp servers behind one OpenAI-compatible endpoint"),
    ]
    if not p.user_unit:
        lines += ["Wants=network-online.target", "After=network-online.target nvidia-persistenced.service"]
    lines += [
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        *(["Type=exec"] if p.worker else ["Type=notify", "NotifyAccess=main"]),
        "ExecStart=" + command_line(p.exec_start, specifiers=esc),
        *([] if p.worker else ["ExecReload=/bin/kill -HUP $MAINPID", f"WatchdogSec={p.watchdog_s}"]),
        "Restart=on-failure",
        "RestartSec=5",
        f"TimeoutStartSec={p.start_timeout_s}",
        f"TimeoutStopSec={p.stop_timeout_s}",
        "KillMode=mixed",
        "SyslogIdentifier=" + ("llamactl-worker" if p.worker else "llamactl"),
        env_line("PYTHONUNBUFFERED", "1"),
    ]
    lines += [env_line(k, v) for k, v in p.environment]
    lines += ["# LLAMACTL_API_KEYS=... here, chmod 600, not in this world-readable file",
              "EnvironmentFile=-" + plain_path(str(p.config_dir / "service.env"), "EnvironmentFile", specifiers=esc)]
    if not p.user_unit:
        if p.user:
            lines += [f"User={escape_specifiers(p.user) if esc else p.user}"]
        if p.nvidia_modprobe:
            # setuid helper that loads nvidia-uvm and creates device nodes; cannot run under NoNewPrivileges
            lines += ["ExecStartPre=+-" + command_line((p.nvidia_modprobe, "-u", "-c=0"), specifiers=esc)]
        if p.system_dirs:
            lines += ["StateDirectory=llamactl", "StateDirectoryMode=0700", "CacheDirectory=llamactl",
                      "CacheDirectoryMode=0700", "ConfigurationDirectory=llamactl"]
        lines += [
            "",
            "# Hardening, as far as GPU access allows",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=" + " ".join(quoted("-" + str(d), specifiers=esc)
                                         for d in (p.state_dir, p.cache_dir, *p.extra_rw)),
            f"ProtectHome={p.protect_home}",
            "PrivateTmp=yes",
            "DevicePolicy=closed",
            *[f"DeviceAllow={d} rw" for d in p.nvidia_devices],
            *[f"DeviceAllow={c} rw" for c in NVIDIA_CLASSES],
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            "RestrictNamespaces=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
            "CapabilityBoundingSet=",
            "# profiles that lock model memory (load_mode mlock)",
            "LimitMEMLOCK=infinity",
        ]
    else:
        lines += ["", "# Hardening a user manager can apply without user namespaces", "NoNewPrivileges=yes"]
    lines += [
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "SystemCallArchitectures=native",
        "UMask=0077",
        "# Not set on purpose: PrivateDevices (hides /dev/nvidia*), MemoryDenyWriteExecute (CUDA JIT).",
        "",
        "[Install]",
        "WantedBy=" + ("default.target" if p.user_unit else "multi-user.target"),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- this machine


def llamactl_exec() -> tuple[str, ...]:
    """How to run `llamactl serve`: the console script next to this interpreter, on PATH, or `python -m`."""
    beside = Path(sys.executable).parent / "llamactl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return (str(beside), "serve")
    found = shutil.which("llamactl")
    if found:
        return (str(Path(found).resolve()), "serve")
    return (str(Path(sys.executable)), "-m", "llamactl", "serve")


def _under_home(paths: Iterable[Path]) -> bool:
    for path in paths:
        try:
            resolved = Path(path).expanduser().resolve()
        except OSError:
            continue
        if any(resolved == root or root in resolved.parents for root in HOME_ROOTS):
            return True
    return False


def _model_paths(settings: Settings) -> list[Path]:
    try:
        from llamactl.profiles import load_all

        profiles, _errors = load_all(settings)
    except Exception:  # a broken profile must not stop the unit from being written
        return []
    paths = []
    for profile in profiles.values():
        for name in (profile.model, getattr(profile.speculation, "draft_model", None)):
            if name and ("/" in str(name)):
                paths.append(Path(str(name)))
        if profile.binary:
            paths.append(Path(str(profile.binary)))
    return paths


def detect_params(settings: Settings, *, user_unit: bool, system_dirs: bool = False,
                  service_user: str | None = None, environ: Mapping[str, str] | None = None,
                  worker_args: tuple[str, ...] | None = None) -> UnitParams:
    """UnitParams for this machine, as the current user sees it. worker_args: a `llamactl worker` unit with
    these arguments (--host ADDR ...) instead of `llamactl serve`."""
    env = os.environ if environ is None else environ
    exec_start = llamactl_exec()
    if worker_args is not None:
        exec_start = (*exec_start[:-1], "worker", *worker_args)
    environment: list[tuple[str, str]] = []
    if system_dirs:
        environment += sorted(SYSTEM_DIRS.items())
        state, cache, config = Path("/var/lib/llamactl"), Path("/var/cache/llamactl"), Path("/etc/llamactl")
    else:
        state, cache, config = settings.state_dir, settings.cache_dir, settings.config_dir
        environment += [(k, env[k]) for k in ("XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME") if env.get(k)]
    environment += sorted((k, v) for k, v in env.items()
                          if k.startswith("LLAMACTL_") and k not in SECRET_ENV and k != "LLAMACTL_REQUIRE_ENGINES")
    user = None
    if not user_unit:
        user = service_user or env.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
        if user == "root":
            user = None
    needed = [Path(exec_start[0]), state, cache, config, settings.engine_cache_dir, *settings.profile_search_path(),
              *_model_paths(settings)]
    protect_home = "read-only" if _under_home(needed) else "yes"
    devices = tuple(dict.fromkeys([*NVIDIA_FIXED, *sorted(glob.glob("/dev/nvidia[0-9]*"))]))
    modprobe = shutil.which("nvidia-modprobe")
    return UnitParams(exec_start=exec_start, user_unit=user_unit, state_dir=state, cache_dir=cache,
                      config_dir=config, user=user, protect_home=protect_home, environment=tuple(environment),
                      nvidia_devices=devices, nvidia_modprobe=modprobe, system_dirs=system_dirs,
                      worker=worker_args is not None)


def unit_path(user_unit: bool, environ: Mapping[str, str] | None = None, name: str = "llamactl.service") -> Path:
    env = os.environ if environ is None else environ
    if user_unit:
        base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return base / "systemd" / "user" / name
    return Path("/etc/systemd/system") / name


def enable_instructions(p: UnitParams, path: Path) -> list[str]:
    if p.worker:
        ctl = "systemctl --user" if p.user_unit else "sudo systemctl"
        return [f"{ctl} daemon-reload", f"{ctl} enable --now llamactl-worker",
                "journalctl " + ("--user " if p.user_unit else "") + "-u llamactl-worker -f",
                "# rpc-server is unauthenticated: keep its port off the router (private network or a tunnel)"]
    if p.user_unit:
        user = pwd.getpwuid(os.getuid()).pw_name
        return [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now llamactl",
            f"sudo loginctl enable-linger {user}   # start at boot, not at login",
            "journalctl --user -u llamactl -f",
        ]
    return [
        "sudo systemctl daemon-reload",
        "sudo systemctl enable --now llamactl",
        "journalctl -u llamactl -f",
        f"# API keys: put LLAMACTL_API_KEYS=... in {p.config_dir / 'service.env'} (chmod 600)",
    ]


# The committed examples in systemd/ are these, rendered (tests keep them in sync).
EXAMPLE_SYSTEM = UnitParams(
    exec_start=("/usr/local/bin/llamactl", "serve"), user_unit=False, user="llamactl",
    state_dir=Path("/var/lib/llamactl"), cache_dir=Path("/var/cache/llamactl"), config_dir=Path("/etc/llamactl"),
    protect_home="yes", environment=tuple(sorted(SYSTEM_DIRS.items())), nvidia_modprobe="/usr/bin/nvidia-modprobe",
    system_dirs=True,
)
EXAMPLE_USER = UnitParams(
    exec_start=("%h/.local/bin/llamactl", "serve"), user_unit=True, state_dir=Path("%S/llamactl"),
    cache_dir=Path("%C/llamactl"), config_dir=Path("%E/llamactl"), specifiers_on_purpose=True,
)
