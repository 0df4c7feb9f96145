"""llama.cpp mainline llama-server: argv from a profile (pure), plus its log lines."""

from __future__ import annotations

from llamactl.engines.capabilities import Capabilities
from llamactl.engines.common import (
    ArgvBuilder, LaunchInputs, add_common_model_args, add_rpc_args, check_extra_args, draft_devices,
)
from llamactl.profiles import Profile

ENGINE = "llama.cpp"
PATH_NAME = "llama-server"
# Our speculation type names -> mainline's --spec-type values.
SPEC_TYPE_NAMES = {"draft": "draft-simple", "mtp": "draft-mtp"}


def build_argv(profile: Profile, caps: Capabilities, inputs: LaunchInputs) -> list[str]:
    b = ArgvBuilder(profile, caps)
    b.argv.append(str(inputs.binary))
    add_rpc_args(b)  # before anything else: --rpc registers the devices -dev names
    add_common_model_args(b, inputs)
    if profile.parallel is not None:
        b.add("parallel", ("-np", "--parallel"), profile.parallel)
    if profile.gpus == [] and not profile.rpc:
        b.add("gpus = [] (CPU only)", ("-ngl", "--gpu-layers", "--n-gpu-layers"), 0)
    elif profile.n_gpu_layers is not None:
        b.add("n_gpu_layers", ("-ngl", "--gpu-layers", "--n-gpu-layers"), profile.n_gpu_layers)
    _add_speculation(b, profile, inputs)
    check_extra_args(b)
    return b.argv


def _add_speculation(b: ArgvBuilder, profile: Profile, inputs: LaunchInputs) -> None:
    spec = profile.speculation
    if not spec.enabled:
        return
    name = SPEC_TYPE_NAMES.get(spec.type, spec.type)
    if not b.caps.accepts("--spec-type"):
        b.refuse(f"speculation.type = '{spec.type}'", ("--spec-type",))
    if not b.value_documented("--spec-type", name):
        b.refuse(f"speculation.type = '{spec.type}'", ("--spec-type",), f" with value '{name}'")
    # Without --spec-type a draft model loads but never drafts (reference: -md alone drafts nothing).
    b.add("speculation.type", ("--spec-type",), name)
    if spec.uses_draft_model:
        b.add("speculation.draft_model", ("--spec-draft-model", "-md", "--model-draft"), inputs.draft_model_path)
        draft_ngl = 0 if profile.gpus == [] else spec.draft_n_gpu_layers
        if draft_ngl is not None:
            b.add("speculation.draft_n_gpu_layers", ("--spec-draft-ngl", "-ngld", "--gpu-layers-draft"), draft_ngl)
        devices = draft_devices(profile)
        if devices:
            b.add("speculation.draft_gpus", ("--spec-draft-device", "-devd", "--device-draft"), ",".join(devices))
    if spec.uses_draft_context:  # a draft model's context, or the MTP context on the target's weights
        if spec.draft_cache_type_k:
            b.add("speculation.draft_cache_type_k", ("--spec-draft-type-k", "-ctkd"), spec.draft_cache_type_k)
        if spec.draft_cache_type_v:
            b.add("speculation.draft_cache_type_v", ("--spec-draft-type-v", "-ctvd"), spec.draft_cache_type_v)
    if spec.type == "ngram-mod":
        n_max_flags, n_min_flags = ("--spec-ngram-mod-n-max",), ("--spec-ngram-mod-n-min",)
    else:
        n_max_flags, n_min_flags = ("--spec-draft-n-max",), ("--spec-draft-n-min",)
    if spec.n_max is not None:
        b.add("speculation.n_max", n_max_flags, spec.n_max)
    if spec.n_min is not None:
        b.add("speculation.n_min", n_min_flags, spec.n_min)
    if spec.p_min is not None:
        b.add("speculation.p_min", ("--spec-draft-p-min", "--draft-p-min"), spec.p_min)
