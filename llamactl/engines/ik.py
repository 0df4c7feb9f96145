"""ik_llama.cpp llama-server: argv from a profile (pure), plus its log lines.

Two generations of flags exist: the April 2026 tree vendored in ik-llama-cpp-python 0.1.5 (legacy:
--draft-max/--draft-min/--draft-p-min, -mtp, one ngram --spec-type) and HEAD (repeatable
--spec-type TYPE:k=v,..., speculation only with one slot). The binary's --help tells which.
"""

from __future__ import annotations

from llamactl.engines.capabilities import Capabilities
from llamactl.engines.common import ArgvBuilder, LaunchInputs, add_common_model_args, check_extra_args, draft_devices
from llamactl.errors import ProfileError
from llamactl.profiles import Profile

ENGINE = "ik_llama.cpp"
PATH_NAME = "ik-llama-server"
ALL_LAYERS = 999  # ik takes integers only; anything >= the layer count means all


def is_legacy(caps: Capabilities) -> bool:
    return caps.accepts("--draft-max")


def build_argv(profile: Profile, caps: Capabilities, inputs: LaunchInputs) -> list[str]:
    b = ArgvBuilder(profile, caps)
    b.argv.append(str(inputs.binary))
    add_common_model_args(b, inputs)
    spec = profile.speculation
    parallel = profile.parallel
    if spec.enabled and not is_legacy(caps):
        if parallel not in (None, 1):
            raise ProfileError(
                f"{profile.source}: parallel = {parallel}: ik_llama.cpp runs speculation with one slot only",
                hint="set parallel = 1, or speculation.type = 'none'",
            )
        parallel = 1
    if parallel is not None:
        b.add("parallel", ("-np", "--parallel"), parallel)
    ngl_flags = ("-ngl", "--gpu-layers", "--n-gpu-layers")
    if profile.gpus == []:
        b.add("gpus = [] (CPU only)", ngl_flags, 0)
    elif profile.n_gpu_layers == "auto":
        b.refuse("n_gpu_layers = 'auto'", ngl_flags, " with value 'auto' (ik takes a layer count)")
    elif profile.n_gpu_layers is not None:
        b.add("n_gpu_layers", ngl_flags, ALL_LAYERS if profile.n_gpu_layers == "all" else profile.n_gpu_layers)
    if spec.enabled:
        (_legacy_speculation if is_legacy(caps) else _speculation)(b, profile, inputs)
    check_extra_args(b)
    return b.argv


def _draft_placement(b: ArgvBuilder, profile: Profile, inputs: LaunchInputs) -> None:
    spec = profile.speculation
    b.add("speculation.draft_model", ("-md", "--model-draft"), inputs.draft_model_path)
    draft_ngl = 0 if profile.gpus == [] else spec.draft_n_gpu_layers
    if draft_ngl == "auto":
        b.refuse("speculation.draft_n_gpu_layers = 'auto'", ("-ngld",), " with value 'auto'")
    if draft_ngl is not None:
        b.add("speculation.draft_n_gpu_layers", ("-ngld", "--gpu-layers-draft"),
              ALL_LAYERS if draft_ngl == "all" else draft_ngl)
    devices = draft_devices(profile)
    if devices:
        b.add("speculation.draft_gpus", ("-devd", "--device-draft"), ",".join(devices))
    if spec.draft_cache_type_k:
        b.add("speculation.draft_cache_type_k", ("-ctkd", "--cache-type-k-draft"), spec.draft_cache_type_k)
    if spec.draft_cache_type_v:
        b.add("speculation.draft_cache_type_v", ("-ctvd", "--cache-type-v-draft"), spec.draft_cache_type_v)
    _draft_threads(b, profile)


DRAFT_PARAMS = ("-draft", "--draft-params")
DRAFT_THREAD_FLAGS = {"-t": ("-td", "--threads-draft"), "-tb": ("-tbd", "--threads-batch-draft")}


def _draft_threads(b: ArgvBuilder, profile: Profile) -> None:
    """The profile's threads for the draft model too. ik's server builds the draft's context from fresh defaults
    (every physical core) and reads -td/-tbd nowhere: only --draft-params, parsed as the draft's own command
    line, reaches it. Without this, a profile held to a few cores drafts on all of them, beside engines it was
    meant to share the box with. A profile that sets --draft-params in extra_args keeps its own."""
    threads = [(flag, n) for flag, n in (("-t", profile.threads), ("-tb", profile.threads_batch)) if n is not None]
    if not threads or any(a.split("=", 1)[0] in DRAFT_PARAMS for a in profile.extra_args):
        return
    if b.caps.first(*DRAFT_PARAMS) is not None:
        b.add("threads (for the draft model)", DRAFT_PARAMS, " ".join(f"{flag} {n}" for flag, n in threads))
    elif b.caps.accepts("-td"):
        for flag, n in threads:
            b.add("threads (for the draft model)", DRAFT_THREAD_FLAGS[flag], n)


def _legacy_speculation(b: ArgvBuilder, profile: Profile, inputs: LaunchInputs) -> None:
    spec = profile.speculation
    if spec.uses_draft_model:
        _draft_placement(b, profile, inputs)  # -md alone enables drafting in this generation
    elif spec.type == "mtp":
        b.add("speculation.type = 'mtp'", ("-mtp", "--multi-token-prediction"))
    else:
        if not b.value_documented("--spec-type", spec.type):
            b.refuse(f"speculation.type = '{spec.type}'", ("--spec-type",), f" with value '{spec.type}'")
        b.add("speculation.type", ("--spec-type",), spec.type)
    if spec.n_max is not None:
        b.add("speculation.n_max", ("--draft-max", "--draft"), spec.n_max)
    if spec.n_min is not None:
        b.add("speculation.n_min", ("--draft-min", "--draft-n-min"), spec.n_min)
    if spec.p_min is not None:
        b.add("speculation.p_min", ("--draft-p-min",), spec.p_min)


def _speculation(b: ArgvBuilder, profile: Profile, inputs: LaunchInputs) -> None:
    spec = profile.speculation
    if spec.uses_draft_model:
        _draft_placement(b, profile, inputs)
    params = [f"{k}={v}" for k, v in (("n_max", spec.n_max), ("n_min", spec.n_min), ("p_min", spec.p_min))
              if v is not None]
    value = spec.type + (":" + ",".join(params) if params else "")
    if not b.value_documented("--spec-type", spec.type):
        b.refuse(f"speculation.type = '{spec.type}'", ("--spec-type",), f" with value '{spec.type}'")
    b.add("speculation.type", ("--spec-type",), value)
