"""Engines: one module per llama-server fork (mainline llama.cpp, ik_llama.cpp).

Each builds argv from a profile as a pure function of (profile, capabilities, inputs); the
capability probe tells which spellings a binary accepts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import ModuleType

from llamactl.engines import ik, mainline
from llamactl.engines.capabilities import Capabilities, probe
from llamactl.engines.common import LaunchInputs, LaunchSpec, child_env
from llamactl.profiles import Profile
from llamactl.settings import Settings

ENGINES: dict[str, ModuleType] = {mainline.ENGINE: mainline, ik.ENGINE: ik}
PORT_PLACEHOLDER = "<port>"


def build_launch(profile: Profile, caps: Capabilities, inputs: LaunchInputs,
                 base_env: Mapping[str, str]) -> LaunchSpec:
    """Pure: the argv and environment for one start of `profile`."""
    module = ENGINES[profile.engine]
    return LaunchSpec(engine=profile.engine, argv=module.build_argv(profile, caps, inputs),
                      env=child_env(base_env, profile))


def preview_argv(profile: Profile, settings: Settings) -> list[str]:
    """The argv `llamactl up` would run, with the port shown as a placeholder (it is chosen at launch)."""
    from llamactl.engines.binaries import find_binary
    from llamactl.gguf import read_model_info
    from llamactl.models import resolve_model_path
    from llamactl.promptcache import persist_decision

    found = find_binary(profile.engine, settings, profile.binary)
    caps = probe(found.path, settings.cache_dir)
    draft = profile.speculation.draft_model
    model_path = resolve_model_path(profile.model, settings)
    try:
        sliding = read_model_info(model_path).has_sliding_window
    except Exception:  # noqa: BLE001 - a preview of a model not fetched yet: the start reads it
        sliding = False
    inputs = LaunchInputs(binary=found.path, model_path=model_path, port=0,
                          draft_model_path=resolve_model_path(draft, settings) if draft else None,
                          swa_full=persist_decision(profile, sliding_window=sliding).swa_full)
    argv = build_launch(profile, caps, inputs, os.environ).argv
    return [PORT_PLACEHOLDER if prev == "--port" else arg for prev, arg in zip([""] + argv, argv)]


__all__ = ["ENGINES", "Capabilities", "LaunchInputs", "LaunchSpec", "build_launch", "preview_argv", "probe"]
