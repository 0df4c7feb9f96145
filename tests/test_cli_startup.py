"""What the CLI imports decides its start-up time (docs/startup-overhead.md measures it): `--help` loads no
settings library, HTTP client, router or numpy, and `up`'s own modules load none of the router, httpx, numpy or
asyncio (an event loop is the daemon's).
Checked by module, not by a timer."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("pydantic_settings", "httpx", "llamactl.router", "numpy", "starlette", "rich")


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_nothing_heavy():
    modules = loaded_after("from llamactl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not {m for m in modules if m.split(".")[0] in HEAVY or m.startswith("llamactl.router")}


def test_what_up_runs_imports_no_router_httpx_or_numpy():
    modules = loaded_after("from llamactl.cli import main\n"
                           "from llamactl.daemon.auth import new_child_key\n"
                           "from llamactl.daemon.control import try_daemon\n"
                           "from llamactl.launch import start_profile\n"
                           "from llamactl.profiles import load_profile\n"
                           "import llamactl.gguf, llamactl.planning\n"
                           "llamactl.gguf._type_tables()")
    heavy = {m for m in modules if m.split(".")[0] in ("httpx", "numpy", "starlette", "pydantic_settings", "asyncio")
             or m.startswith("llamactl.router")}
    assert not heavy, sorted(heavy)


def test_pydantic_looks_for_no_plugins_in_a_command():
    """Its scan of every installed package's entry points ran when the first model class was made (`_plugins`
    stays None until a scan)."""
    probe = ("from llamactl.cli import main\nfrom llamactl.profiles import Profile\nimport llamactl.settings\n"
             "from pydantic.plugin import _loader\nprint(_loader._plugins is None)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"


def test_up_spawns_before_importing_what_only_other_paths_need(fake_profile, home):
    """At the moment `llamactl up` spawns the engine (a local model, no daemon running): the Hub's client, the
    daemon's control client and pynvml (on a box whose NVIDIA library does not load) are not imported, and the
    HTTP client of the readiness poll comes only after the spawn."""
    from llamactl.gpus import _nvml_library_loads

    name = fake_profile()
    probe = ("import json, subprocess, sys\n"
             "real = subprocess.Popen\n"
             "class Spy(real):\n"
             "    def __init__(self, args, *a, **k):\n"
             "        if '--help' not in args and '--version' not in args:\n"
             "            print('AT-SPAWN ' + json.dumps(sorted(sys.modules)), flush=True)\n"
             "            raise SystemExit(0)\n"
             "        super().__init__(args, *a, **k)\n"
             "subprocess.Popen = Spy\n"
             "from llamactl.cli import main\n"
             f"main(['up', {name!r}])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    line = next((l for l in out.stdout.splitlines() if l.startswith("AT-SPAWN ")), None)
    assert line is not None, out.stdout + out.stderr
    modules = set(json.loads(line.removeprefix("AT-SPAWN ")))
    assert "llamactl.supervisor.process" in modules  # the spy really stood at the engine's spawn
    unwanted = {"llamactl.hf.pull", "llamactl.hf.select", "llamactl.daemon.control", "http.client"}
    if not _nvml_library_loads():
        unwanted.add("pynvml")
    assert not modules & unwanted, sorted(modules & unwanted)
