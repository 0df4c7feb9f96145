"""Profiles: TOML files describing one llama-server each, with `extends` and friendly errors.

A profile is found by name in the search path (settings.profile_search_path()); the first file
named NAME.toml wins. `extends = "other"` deep-merges the other profile under this one.
Relative paths (model, binary, speculation.draft_model) are relative to the file that set them.
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llamactl.errors import ProfileError, ProfileNotFound
from llamactl.hf.refs import HF_PREFIX, parse_ref
from llamactl.names import check_profile_name, closest_names
from llamactl.settings import Settings

MAX_CTX = 524288
BUILTIN_PREFIX = "builtin:"

EngineName = Literal["llama.cpp", "ik_llama.cpp"]
KVType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q6_0", "q8_KV"]
SpecType = Literal[
    "none", "draft", "mtp", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache"
]
MAX_DEPTHS = 8  # per member: each depth is a choice (and a /metrics label value)
QUANTISED_KV = {"q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q6_0", "q8_KV"}
LayerCount = int | Literal["auto", "all"]

# Flags llamactl owns or plans with: a profile may not set them through extra_args. Each says why, and the
# profile key to use instead where there is one (the memory plan reads the keys, not extra_args).
_MANAGED = "llamactl manages it"
OWNED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("--port", "--host", "--reuse-port"), f"{_MANAGED} (engines listen on 127.0.0.1 on a free "
                                                          "port it checks is theirs)"),
    **dict.fromkeys(("--api-key", "--api-key-file"), f"{_MANAGED} (a per-start key in the state dir)"),
    **dict.fromkeys(("--api-prefix", "--path", "--ssl-key-file", "--ssl-cert-file", "--log-file"),
                    f"{_MANAGED} (it talks to the engine at http://127.0.0.1:PORT/ and reads its log)"),
    **dict.fromkeys(("-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"),
                    "use the `model` key"),
    **dict.fromkeys(("-a", "--alias"), "use the `alias` key"),
    **dict.fromkeys(("-c", "--ctx-size"), "use the `ctx_size` key (the memory plan sizes the KV cache from it)"),
    **dict.fromkeys(("-np", "--parallel"), "use the `parallel` key (the plan and the router count slots)"),
    **dict.fromkeys(("-ngl", "--gpu-layers", "--n-gpu-layers"), "use the `n_gpu_layers` key (the plan places layers)"),
    **dict.fromkeys(("-ts", "--tensor-split"), "use the `tensor_split` key"),
    **dict.fromkeys(("-sm", "--split-mode"), "use the `split_mode` key"),
    **dict.fromkeys(("-mg", "--main-gpu"), "use the `main_gpu` key"),
    **dict.fromkeys(("-ctk", "--cache-type-k"), "use the `cache_type_k` key (the plan sizes the KV cache)"),
    **dict.fromkeys(("-ctv", "--cache-type-v"), "use the `cache_type_v` key (the plan sizes the KV cache)"),
    **dict.fromkeys(("-md", "--model-draft"), "use the `speculation.draft_model` key"),
    **dict.fromkeys(("-b", "--batch-size"), "use the `batch_size` key (the plan sizes compute buffers from it)"),
    **dict.fromkeys(("-ub", "--ubatch-size"), "use the `ubatch_size` key (the plan sizes compute buffers from it)"),
    **dict.fromkeys(("-cram", "--cache-ram"), "use the `cache_ram_mib` key (the plan counts the prompt cache's RAM)"),
    "--slot-save-path": f"{_MANAGED} (its prompt cache on disk; [cache] persist turns it on or off)",
    **dict.fromkeys(("-fa", "--flash-attn"), "use the `flash_attn` key (the plan sizes compute and a quantised V "
                                             "cache with it)"),
    **dict.fromkeys(("-t", "--threads", "-tb", "--threads-batch"),
                    "use the `threads` / `threads_batch` keys (a draft model runs on them too)"),
    **dict.fromkeys(("-dev", "--device"), "use the `gpus` key (the engine sees those GPUs only, and the plan "
                                          "places on them)"),
    "--rpc": "use the `rpc` key (the plan counts the workers' devices)",
    **dict.fromkeys(("--embedding", "--embeddings"), "use the `embeddings` key (the router serves its routes)"),
    **dict.fromkeys(("--rerank", "--reranking"), "use the `reranking` key (the router serves its routes)"),
    "--pooling": "use the `pooling` key",
    **dict.fromkeys(("--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale", "--yarn-orig-ctx",
                     "--yarn-ext-factor", "--yarn-attn-factor", "--yarn-beta-slow", "--yarn-beta-fast"),
                    "use the [rope] keys (the context check reads them)"),
    **dict.fromkeys(("--spec-type", "-mtp", "--multi-token-prediction", "-no-mtp", "--no-multi-token-prediction",
                     "--spec-draft-model", "--draft-max", "--draft", "--draft-n", "--draft-min", "--draft-n-min",
                     "--draft-p-min", "--spec-draft-n-max",
                     "--spec-draft-n-min", "--spec-draft-p-min", "--spec-ngram-mod-n-max", "--spec-ngram-mod-n-min"),
                    "use the [speculation] keys (the plan sizes the draft's context, the router measures it)"),
    **dict.fromkeys(("-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft", "--spec-draft-ngl"),
                    "use the `speculation.draft_n_gpu_layers` key (the plan places the draft model)"),
    **dict.fromkeys(("-devd", "--device-draft", "--spec-draft-device"),
                    "use the `speculation.draft_gpus` key (the plan places the draft model)"),
    **dict.fromkeys(("-ctkd", "--cache-type-k-draft", "--spec-draft-type-k", "-ctvd", "--cache-type-v-draft",
                     "--spec-draft-type-v"),
                    "use the `speculation.draft_cache_type_k` / `draft_cache_type_v` keys (the plan sizes the "
                    "draft's KV cache)"),
}


def owned_flag_problem(args: list[str]) -> str | None:
    """Why `args` (a profile's extra_args) may not be passed as they are, or None."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            return f"extra_args sets {flag}, which llamactl manages: {OWNED_FLAGS[flag]}; remove it from extra_args"
    return None
# Keys whose values are paths, relative to the profile file that sets them.
PATH_KEYS = (("model",), ("binary",), ("speculation", "draft_model"))


def _checked_ref(value: str | None) -> str | None:
    """An `hf:` reference must parse (its syntax, and names that are never paths); other values pass."""
    if value is not None and value.startswith(HF_PREFIX):
        try:
            parse_ref(value)
        except ProfileError as e:
            raise ValueError(f"{e.message.removeprefix('model reference ')}; write it as "
                             "hf:OWNER/REPO:QUANT or hf:OWNER/REPO/FILE.gguf[@REVISION]") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rope(_Strict):
    """Rope / YaRN settings for contexts beyond the model's training context."""

    scaling: Literal["none", "linear", "yarn"] | None = None
    scale: float | None = Field(default=None, gt=0)
    freq_base: float | None = Field(default=None, gt=0)
    freq_scale: float | None = Field(default=None, gt=0)
    yarn_orig_ctx: int | None = Field(default=None, ge=0)
    yarn_ext_factor: float | None = None
    yarn_attn_factor: float | None = None
    yarn_beta_slow: float | None = None
    yarn_beta_fast: float | None = None

    @property
    def extends_context(self) -> bool:
        return self.scaling in ("linear", "yarn") or (self.scale or 1) > 1 or (self.freq_scale or 1) < 1


class Speculation(_Strict):
    type: SpecType = "none"
    draft_model: str | None = None
    draft_gpus: list[int] | None = None
    draft_n_gpu_layers: LayerCount | None = None
    draft_cache_type_k: KVType | None = None
    draft_cache_type_v: KVType | None = None
    n_max: int | None = Field(default=None, ge=1, le=256)
    n_min: int | None = Field(default=None, ge=0, le=256)
    p_min: float | None = Field(default=None, ge=0, le=1)
    depths: list[int] | None = Field(
        default=None, description="Draft depths the router may choose per request (a switch group member on an "
        "engine that honours a per-request depth); n_max defaults to the largest")

    @field_validator("draft_model")
    @classmethod
    def _draft_ref(cls, value: str | None) -> str | None:
        return _checked_ref(value)

    @field_validator("depths")
    @classmethod
    def _depths(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty list; list the draft depths the router may choose, e.g. [2, 4, 8, 16], "
                             "or remove the key")
        if len(value) > MAX_DEPTHS:
            raise ValueError(f"{len(value)} depths; at most {MAX_DEPTHS} (each is a choice the router explores)")
        if bad := [d for d in value if not 1 <= d <= 256]:
            raise ValueError(f"depth {bad[0]} is out of range; each depth is 1..256 tokens drafted per step")
        if len(set(value)) != len(value):
            raise ValueError("a depth is listed twice; list each once")
        return sorted(value)

    @model_validator(mode="after")
    def _consistent(self) -> "Speculation":
        if self.type == "draft" and not self.draft_model:
            raise ValueError("type = 'draft' needs draft_model = '/path/to/draft.gguf' (or use an ngram type)")
        if self.depths is not None:
            if self.type != "draft":
                raise ValueError(f"speculation.depths needs type = 'draft' (a draft model), not '{self.type}': "
                                 "only a draft model's depth is chosen per request; remove depths")
            if self.n_max is None:
                object.__setattr__(self, "n_max", max(self.depths))  # frozen: set once, while validating
            elif max(self.depths) > self.n_max:
                raise ValueError(f"speculation.depths lists {max(self.depths)}, above speculation.n_max "
                                 f"({self.n_max}): the engine drafts at most n_max; raise n_max or drop the depth")
        if self.n_min is not None and self.n_max is not None and self.n_min > self.n_max:
            raise ValueError(f"n_min ({self.n_min}) is larger than n_max ({self.n_max})")
        return self

    @property
    def enabled(self) -> bool:
        return self.type != "none"

    @property
    def uses_draft_model(self) -> bool:
        return self.type == "draft"

    @property
    def uses_draft_context(self) -> bool:
        """A second context beside the target's: a draft model's, or MTP's (the target's NextN layers, with
        their own KV cache). Mainline sizes its KV with draft_cache_type_k / _v."""
        return self.type in ("draft", "mtp")


class Cache(_Strict):
    """The prompt cache that outlives the engine: slots saved to disk before llamactl stops the engine, restored
    after it starts again (llamactl/promptcache.py decides the default)."""

    persist: bool | None = Field(
        default=None, description="Keep long prompts' KV across stops and restarts; unset: on where it costs no "
        "memory, off on sliding-window models (they need --swa-full, which true adds and the plan counts)")


class Profile(_Strict):
    name: str
    source: Path | None = None
    extends: str | None = None
    description: str = ""
    engine: EngineName = "llama.cpp"
    binary: str | None = None
    model: str
    alias: str | None = None
    group: str | None = Field(
        default=None,
        description="Switch group: profiles sharing a group are one routable name; the router picks the "
        "speculative or the plain member by workload",
    )
    ctx_size: int = Field(default=0, ge=0, le=MAX_CTX, description="0 = the model's training context")
    rope: Rope = Rope()
    cache_type_k: KVType = "f16"
    cache_type_v: KVType = "f16"
    flash_attn: Literal["on", "off", "auto"] = "auto"
    parallel: int | None = Field(default=None, ge=1, le=256)
    threads: int | None = Field(default=None, ge=1)
    threads_batch: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    ubatch_size: int | None = Field(default=None, ge=1)
    gpus: list[int] | None = Field(default=None, description="GPU indices (PCI bus order); [] = CPU only")
    n_gpu_layers: LayerCount | None = None
    split_mode: Literal["none", "layer", "row", "graph", "attn", "tensor"] | None = None
    tensor_split: list[float] | Literal["auto"] | None = None
    main_gpu: int | None = Field(default=None, ge=0)
    rpc: list[str] = Field(
        default=[], description="llama.cpp RPC workers (names in workers.toml, or host:port) whose devices take "
        "layers like local GPUs")
    speculation: Speculation = Speculation()
    embeddings: bool = Field(default=False, description="Serve embeddings (/v1/embeddings) instead of generation")
    pooling: Literal["none", "mean", "cls", "last", "rank"] | None = Field(
        default=None, description="How token embeddings are pooled (default: the model's own)")
    reranking: bool = Field(default=False, description="Serve reranking (/v1/rerank); needs a reranker model")
    env: dict[str, str] = {}
    extra_args: list[str] = []
    keep: bool = Field(default=False, description="`llamactl serve` never stops this profile's engine to make "
                       "room for another (the idle TTL still applies)")
    cache_ram_mib: int | None = Field(
        default=None, ge=0, le=1 << 20, description="Host RAM for the engine's prompt cache (--cache-ram), counted "
        "by the plan; 0 turns it off; unset: twice the KV cache, at most 8192 MiB (the engine's own default)")
    cache: Cache = Cache()
    load_timeout_s: float = Field(default=900, gt=0)
    stop_timeout_s: float = Field(default=15, gt=0)

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        return _checked_ref(value)

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        if self.cache_type_v in QUANTISED_KV and self.flash_attn == "off":
            raise ValueError(
                f"cache_type_v = '{self.cache_type_v}' needs flash attention; set flash_attn = 'on' "
                "or use cache_type_v = 'f16'"
            )
        problem = owned_flag_problem(self.extra_args)
        if problem:
            raise ValueError(problem)
        for key in self.env:
            if key.startswith("LLAMA_ARG_") or key == "LLAMA_API_KEY":
                raise ValueError(
                    f"env sets {key}, which overrides llamactl's own flags; use the profile key or extra_args"
                )
        if isinstance(self.tensor_split, list) and self.gpus and len(self.tensor_split) != len(self.gpus):
            raise ValueError(
                f"tensor_split has {len(self.tensor_split)} entries but gpus lists {len(self.gpus)} GPUs; "
                "give one share per GPU or tensor_split = 'auto'"
            )
        if self.pooling is not None and not (self.embeddings or self.reranking):
            raise ValueError(f"pooling = '{self.pooling}' applies to embeddings; set embeddings = true or remove it")
        if self.embeddings or self.reranking:
            key = "embeddings" if self.embeddings else "reranking"
            if self.speculation.enabled:
                raise ValueError(f"{key} = true serves no generation, so speculation has nothing to speed up; "
                                 "set speculation.type = 'none'")
            if self.group:
                raise ValueError(f"{key} = true: a switch group pairs a speculative and a plain generation "
                                 "profile; remove `group` (the profile is a routable name of its own)")
        if self.gpus is not None and len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus lists a GPU twice: {self.gpus}")
        return self

    @property
    def served_alias(self) -> str:
        return self.alias or self.name

    @property
    def is_builtin_model(self) -> bool:
        return self.model.startswith(BUILTIN_PREFIX)


# ---------------------------------------------------------------------------------------------
# Finding and loading


def profile_files(settings: Settings) -> dict[str, Path]:
    """Every profile name in the search path and the file that wins for it."""
    found: dict[str, Path] = {}
    for directory in settings.profile_search_path():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def find_profile_file(name: str, settings: Settings, *, after: Path | None = None) -> Path:
    """The file that wins for `name`; with `after`, the next one in the search order after that file (a
    user's profiles/demo.toml with `extends = "demo"` extends the bundled demo, not itself)."""
    check_profile_name(name)
    if after is not None:
        dirs = settings.profile_search_path()
        later = [d / f"{name}.toml" for d in dirs[_dir_position(after.parent, dirs) + 1:]]
        for candidate in later:
            if candidate.exists():
                return candidate
        raise ProfileNotFound(f"no other profile named '{name}' after {after} in the search path",
                              hint=f"`extends = \"{name}\"` in {name}.toml means the next {name}.toml in the search "
                                   "path (LLAMACTL_PROFILES_DIRS, the config dir, /etc, the bundled profiles)")
    files = profile_files(settings)
    if name in files:
        return files[name]
    searched = ", ".join(str(d) for d in settings.profile_search_path())
    hint = (closest_names(name, files) + f"; or create {settings.config_dir / 'profiles' / (name + '.toml')} "
            "(or set LLAMACTL_PROFILES_DIRS)")
    raise ProfileNotFound(f"no profile named '{name}' (searched: {searched})", hint=hint)


def _dir_position(directory: Path, dirs: list[Path]) -> int:
    for i, d in enumerate(dirs):
        if d == directory or (d.exists() and directory.exists() and d.samefile(directory)):
            return i
    return len(dirs)


MAX_PROFILE_BYTES = 1 << 20  # a profile is a few hundred bytes; this bounds what a wrong path can cost


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; a FIFO or device is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ProfileError(f"{path}: not a regular file", hint="a profile is a .toml file; remove or rename it")
            raw = f.read(MAX_PROFILE_BYTES + 1)
        if len(raw) > MAX_PROFILE_BYTES:
            raise ProfileError(f"{path}: larger than {MAX_PROFILE_BYTES // 1024} KiB; not a profile",
                               hint="a profile is a short .toml file; check the path")
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}", hint="fix the syntax at the line shown") from e
    except OSError as e:
        raise ProfileError(f"{path}: cannot read: {e.strerror}") from e
    for reserved in ("name", "source"):
        if reserved in data:
            raise ProfileError(
                f"{path}: key '{reserved}' is not allowed",
                hint="a profile's name is its file name; remove the key",
            )
    return data


def _expand_path(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or value.startswith((BUILTIN_PREFIX, HF_PREFIX)):
        return value
    expanded = Path(os.path.expandvars(value)).expanduser()
    if not expanded.is_absolute():
        expanded = base / expanded
    return str(expanded)


def _absolutise_paths(data: dict[str, Any], base: Path) -> None:
    for keys in PATH_KEYS:
        holder: Any = data
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and keys[-1] in holder:
            holder[keys[-1]] = _expand_path(holder[keys[-1]], base)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _raw_with_parents(name: str, settings: Settings, chain: tuple[tuple[str, Path], ...] = (),
                      after: Path | None = None) -> tuple[dict[str, Any], Path]:
    path = find_profile_file(name, settings, after=after)
    if path in (p for _, p in chain):
        cycle = " -> ".join([n for n, _ in chain] + [name])
        raise ProfileError(f"profile '{chain[0][0]}': extends forms a cycle: {cycle}", hint="remove one extends")
    data = _read_toml(path)
    _absolutise_paths(data, path.parent)
    parent_name = data.get("extends")
    if parent_name is None:
        return data, path
    if not isinstance(parent_name, str):
        raise ProfileError(f"{path}: extends: must be a profile name (a string)")
    try:
        # A profile extending its own name extends the next file of that name in the search order.
        parent, _ = _raw_with_parents(parent_name, settings, chain + ((name, path),),
                                      after=path if parent_name == name else None)
    except ProfileNotFound as e:
        raise ProfileError(f"{path}: extends: {e.message}", hint=e.hint) from e
    parent.pop("description", None)
    return deep_merge(parent, data), path


def load_profile(name: str, settings: Settings) -> Profile:
    """Load, merge `extends`, and validate a profile. Raises ProfileError naming file and key."""
    data, path = _raw_with_parents(name, settings)
    return parse_profile(name, data, path)


def parse_profile(name: str, data: dict[str, Any], path: Path | None) -> Profile:
    try:
        return Profile.model_validate({**data, "name": name, "source": path})
    except ValidationError as e:
        where = str(path) if path else f"<profile {name}>"
        if data.get("extends"):
            where += f" (merged with the profile it extends, '{data['extends']}')"
        raise ProfileError(format_validation_error(e, where), hint="see profiles/README.md for every key") from e


def load_all(settings: Settings) -> tuple[dict[str, Profile], dict[str, ProfileError]]:
    """Every profile in the search path; errors are collected, not raised."""
    profiles: dict[str, Profile] = {}
    errors: dict[str, ProfileError] = {}
    for name in profile_files(settings):
        try:
            profiles[name] = load_profile(name, settings)
        except ProfileError as e:
            errors[name] = e
    return profiles, errors


# ---------------------------------------------------------------------------------------------
# Error messages


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Profile
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def format_validation_error(error: ValidationError, where: str) -> str:
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        loc = tuple(item["loc"])
        # Drop pydantic's union-branch markers such as 'literal[...]' or 'int'.
        key_parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in {"int", "float", "str"}))]
        key = ".".join(key_parts) or "(profile)"
        if item["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            valid = [v for v in (owner.model_fields if owner else []) if v not in ("name", "source")]
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            fix = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
            problems.setdefault(key, []).append(f"unknown key; {fix}")
        elif item["type"] == "missing":
            problems.setdefault(key, []).append("required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.setdefault(key, []).append(message)
            shown = item.get("input")
            if loc and not isinstance(shown, dict):
                problems.setdefault(f"{key}\0got", []).append(repr(shown))
    lines = []
    for key, messages in problems.items():
        if key.endswith("\0got"):
            continue
        got = problems.get(f"{key}\0got")
        detail = f" (got {got[0]})" if got else ""
        lines.append(f"{where}: {key}: {' -- or: '.join(dict.fromkeys(messages))}{detail}")
    return "\n".join(lines)
