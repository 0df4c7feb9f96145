"""Pieces both engine modules share: the argv accumulator that checks spellings, and the child env."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamactl.engines.capabilities import Capabilities
from llamactl.errors import ProfileError, UnsupportedFlag
from llamactl.profiles import Profile, owned_flag_problem

STRIPPED_ENV_PREFIXES = ("LLAMA_ARG_", "AIP_")
STRIPPED_ENV_KEYS = frozenset({"LLAMA_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to exec one llama-server: built by a pure function, run by the supervisor."""

    engine: str
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class LaunchInputs:
    """Resolved facts the pure builders need besides the profile."""

    binary: Path
    model_path: Path
    port: int
    draft_model_path: Path | None = None
    api_key_file: Path | None = None  # a file, never argv: /proc/PID/cmdline is world-readable
    host: str = "127.0.0.1"
    swa_full: bool = False  # the prompt cache needs the full KV of sliding-window layers (promptcache.Persist)
    slot_save_path: Path | None = None  # where the engine may save and restore slots (the daemon's prompt cache)


class ArgvBuilder:
    """Collects flags, choosing for each the first spelling the binary accepts."""

    def __init__(self, profile: Profile, caps: Capabilities) -> None:
        self.profile = profile
        self.caps = caps
        self.argv: list[str] = []
        self.set_by_key: dict[str, str] = {}  # every spelling of a flag added -> the profile key it came from

    def add(self, key: str, spellings: tuple[str, ...], *values: object) -> None:
        spelling = self.caps.first(*spellings, values=values)
        if spelling is None:
            self.refuse(key, spellings)
        # every name this flag goes by, ours and the binary's own aliases (extra_args may not set it again)
        self.set_by_key.update(dict.fromkeys((*spellings, *self.caps.aliases(spelling)), key))
        self.argv.append(spelling)
        self.argv.extend(str(v) for v in values)

    def refuse(self, key: str, spellings: tuple[str, ...], why: str = "") -> None:
        names = " / ".join(spellings)
        raise UnsupportedFlag(
            f"profile '{self.profile.name}' sets {key}, which needs {names}; "
            f"{self.caps.binary} (version {self.caps.version}) does not accept it{why}",
            hint=f"remove {key} from the profile, or use a {self.profile.engine} build that has {spellings[0]}",
        )

    def value_documented(self, flag: str, value: str) -> bool:
        """True when the binary's help for `flag` mentions `value` (e.g. a split mode or spec type)."""
        text = self.caps.help_for(flag).replace(" - ", "-")
        return value in text


def gpu_env(profile: Profile) -> dict[str, str]:
    """GPU selection is by CUDA_VISIBLE_DEVICES in PCI bus order, the same indices NVML reports."""
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if profile.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in profile.gpus)
    return env


def child_env(base: Mapping[str, str], profile: Profile) -> dict[str, str]:
    """The parent's environment minus variables that would override llamactl's flags or leak tokens."""
    env = {k: v for k, v in base.items()
           if k not in STRIPPED_ENV_KEYS and not k.startswith(STRIPPED_ENV_PREFIXES)}
    env.update(gpu_env(profile))
    env.update(profile.env)
    return env


def draft_devices(profile: Profile) -> list[str] | None:
    """Draft GPUs as the engine's device names (CUDA<n>, renumbered by CUDA_VISIBLE_DEVICES)."""
    wanted = profile.speculation.draft_gpus
    if wanted is None:
        return None
    if profile.gpus is None:
        return [f"CUDA{g}" for g in wanted]
    missing = [g for g in wanted if g not in profile.gpus]
    if missing:
        raise ProfileError(
            f"{profile.source}: speculation.draft_gpus: GPU {missing} is not in gpus = {profile.gpus}",
            hint="add the draft's GPUs to `gpus`, or pick draft_gpus among them",
        )
    return [f"CUDA{profile.gpus.index(g)}" for g in wanted]


def rpc_devices(profile: Profile) -> list[str]:
    """The -dev list of a planned profile with RPC workers: its tensor_split covers the workers' devices
    (RPC0, RPC1, ... in --rpc order), then the local GPUs (CUDA0.. under CUDA_VISIBLE_DEVICES)."""
    if not profile.rpc or not isinstance(profile.tensor_split, list):
        return []
    n_local = len(profile.gpus or [])
    n_remote = len(profile.tensor_split) - n_local
    return [f"RPC{i}" for i in range(n_remote)] + [f"CUDA{i}" for i in range(n_local)]


def add_rpc_args(b: ArgvBuilder) -> None:
    """--rpc host:port,... (resolved by the planner from worker names) and the matching -dev list."""
    from llamactl.rpc.workers import is_endpoint

    p = b.profile
    if not p.rpc:
        return
    names = [entry for entry in p.rpc if not is_endpoint(entry)]
    if names:
        raise ProfileError(f"profile '{p.name}': rpc worker {names[0]!r} was not resolved to host:port",
                           hint="start it with `llamactl up`, which plans it and resolves its workers")
    b.add("rpc", ("--rpc",), ",".join(p.rpc))
    devices = rpc_devices(p)
    if devices:
        b.add("rpc (devices)", ("-dev", "--device"), ",".join(devices))


def add_common_model_args(b: ArgvBuilder, inputs: LaunchInputs) -> None:
    """Flags spelled the same in both forks."""
    p = b.profile
    b.add("model", ("-m", "--model"), inputs.model_path)
    b.add("alias", ("-a", "--alias"), p.served_alias)
    b.add("(host)", ("--host",), inputs.host)
    b.add("(port)", ("--port",), inputs.port)
    if inputs.api_key_file:
        b.add("(api key file)", ("--api-key-file",), inputs.api_key_file)
    b.add("ctx_size", ("-c", "--ctx-size"), p.ctx_size)
    rope = p.rope
    for key, flags, value in (
        ("rope.scaling", ("--rope-scaling",), rope.scaling),
        ("rope.scale", ("--rope-scale",), rope.scale),
        ("rope.freq_base", ("--rope-freq-base",), rope.freq_base),
        ("rope.freq_scale", ("--rope-freq-scale",), rope.freq_scale),
        ("rope.yarn_orig_ctx", ("--yarn-orig-ctx",), rope.yarn_orig_ctx),
        ("rope.yarn_ext_factor", ("--yarn-ext-factor",), rope.yarn_ext_factor),
        ("rope.yarn_attn_factor", ("--yarn-attn-factor",), rope.yarn_attn_factor),
        ("rope.yarn_beta_slow", ("--yarn-beta-slow",), rope.yarn_beta_slow),
        ("rope.yarn_beta_fast", ("--yarn-beta-fast",), rope.yarn_beta_fast),
    ):
        if value is not None:
            b.add(key, flags, value)
    b.add("cache_type_k", ("-ctk", "--cache-type-k"), p.cache_type_k)
    b.add("cache_type_v", ("-ctv", "--cache-type-v"), p.cache_type_v)
    b.add("flash_attn", ("-fa", "--flash-attn"), p.flash_attn)
    for key, flags, value in (
        ("threads", ("-t", "--threads"), p.threads),
        ("threads_batch", ("-tb", "--threads-batch"), p.threads_batch),
        ("batch_size", ("-b", "--batch-size"), p.batch_size),
        ("ubatch_size", ("-ub", "--ubatch-size"), p.ubatch_size),
        ("main_gpu", ("-mg", "--main-gpu"), p.main_gpu),
    ):
        if value is not None:
            b.add(key, flags, value)
    if p.split_mode is not None:
        if not b.value_documented("-sm", p.split_mode) and not b.value_documented("--split-mode", p.split_mode):
            b.refuse(f"split_mode = '{p.split_mode}'", ("-sm",), " with that value")
        b.add("split_mode", ("-sm", "--split-mode"), p.split_mode)
    if isinstance(p.tensor_split, list):
        b.add("tensor_split", ("-ts", "--tensor-split"), ",".join(f"{x:g}" for x in p.tensor_split))
    if p.embeddings:
        b.add("embeddings", ("--embeddings", "--embedding"))
    if p.reranking:
        b.add("reranking", ("--reranking", "--rerank"))
    if p.pooling is not None:
        if not b.value_documented("--pooling", p.pooling):
            b.refuse(f"pooling = '{p.pooling}'", ("--pooling",), " with that value")
        b.add("pooling", ("--pooling",), p.pooling)
    if p.cache_ram_mib is not None and b.caps.accepts("--cache-ram"):
        b.add("cache_ram_mib", ("--cache-ram", "-cram"), p.cache_ram_mib)
    if inputs.swa_full and "--swa-full" not in (a.split("=", 1)[0] for a in p.extra_args):
        b.add("cache.persist (a sliding-window model)", ("--swa-full",))
    if inputs.slot_save_path is not None and b.caps.accepts("--slot-save-path"):  # else: no slot files to keep
        b.add("cache.persist", ("--slot-save-path",), inputs.slot_save_path)
    if b.caps.accepts("--metrics"):
        b.argv.append("--metrics")


def check_extra_args(b: ArgvBuilder) -> None:
    """extra_args must be flags the binary documents, or that a try-run of the binary accepts, and none that
    llamactl owns or plans with (a profile built without validation, e.g. by model_copy, is checked here too)."""
    args = b.profile.extra_args
    problem = owned_flag_problem(args)
    if problem:
        raise ProfileError(f"{b.profile.source or b.profile.name}: {problem}")
    # any other flag this argv already has from a profile key: the engine would take the last one, extra_args's,
    # and run on a value the plan and the key do not know
    for arg in args:
        if (flag := arg.split("=", 1)[0]) in b.set_by_key:
            key = b.set_by_key[flag]
            raise ProfileError(f"{b.profile.source or b.profile.name}: extra_args sets {flag}, which llamactl sets "
                               f"already from {key}; remove it from extra_args",
                               hint=f"set it with {key.split(' (')[0]}")
    # a negative number, or a value holding spaces (a command line of its own, e.g. ik's --draft-params), is a
    # value, not a flag
    flags = [flag for a in args if (flag := a.split("=", 1)[0]).startswith("-")
             and not flag.lstrip("-")[:1].isdigit() and " " not in flag]
    unknown = [flag for flag in flags if flag not in b.caps.flags]
    if unknown and (b.caps.verifier is None or not b.caps.verifier(tuple(args))):
        b.refuse(f"extra_args ({' '.join(unknown)})", tuple(unknown))
    b.argv.extend(args)
