"""NextN / MTP layers in the plan (pure, no I/O).

A model with NextN heads (GLM-4.5, DeepSeek V3, Qwen 3.5, ...) counts them in `block_count`: the last
`nextn_predict_layers` blocks. What the pinned engines do with them (llama.cpp src/models/glm4-moe.cpp,
src/llama-model.cpp create_memory; ik_llama.cpp src/llama-load-tensors.cpp, src/llama.cpp kv_cache_init):
- MTP off: neither engine loads their weights (TENSOR_SKIP) nor caches their KV. They still take a place in
  the layer count (n_gpu_layers, the tensor split), as the engines count them.
- MTP on: their weights load with the target's, on the devices of those layers, and a second context (the MTP
  context) drafts with them: its KV holds only the NextN layers, as long as the target's context, at the draft
  cache types on mainline (-ctkd/-ctvd, f16 by default), at the target's on ik. Mainline's target context then
  caches the trunk only; ik's target context caches the NextN layers too (engines.facts).
"""

from __future__ import annotations

from dataclasses import replace

from llamactl.engines import facts as engine_facts
from llamactl.plan.model import ModelSpec
from llamactl.profiles import Profile


def is_on(profile: Profile) -> bool:
    return profile.speculation.type == "mtp"


def nextn_layers(spec: ModelSpec) -> range:
    return range(spec.n_layer - spec.n_nextn, spec.n_layer)


def problem(profile: Profile, spec: ModelSpec) -> str | None:
    """Why MTP cannot run on this model, or None."""
    if not is_on(profile):
        return None
    if spec.n_nextn > 0 and spec.nextn_head_tensors == 0:
        layers = nextn_layers(spec)
        blocks = f"block {layers[0]}" if len(layers) == 1 else f"blocks {layers[0]}-{layers[-1]}"
        return (f"speculation.type = 'mtp': {spec.name or 'the model'} ({spec.architecture}) declares "
                f"{spec.n_nextn} NextN/MTP layer{'s' if spec.n_nextn > 1 else ''} "
                f"({spec.architecture}.nextn_predict_layers = {spec.n_nextn}: {blocks}) but the file holds no "
                "tensor of one (blk.N.nextn.*, mtp.*): it was converted without its MTP head (a trunk-only "
                "file), so the engine has nothing to draft with; use a GGUF that keeps the MTP head, or set "
                "speculation.type = 'draft' with a draft_model, an ngram type, or 'none'")
    if spec.n_nextn > 0:
        return None
    return (f"speculation.type = 'mtp': {spec.name or 'the model'} ({spec.architecture}) has no NextN/MTP layers "
            f"({spec.architecture}.nextn_predict_layers is 0 or missing), so there is nothing to draft with; use a "
            "model converted with its MTP heads, or set speculation.type = 'draft' with a draft_model, an ngram "
            "type, or 'none'")


def ignored_keys(profile: Profile) -> str | None:
    """A note when the profile sets draft cache types its engine's MTP context does not take."""
    sp = profile.speculation
    if not is_on(profile) or engine_facts.mtp_uses_draft_cache_types(profile.engine):
        return None
    keys = [k for k in ("draft_cache_type_k", "draft_cache_type_v") if getattr(sp, k)]
    if not keys:
        return None
    return (f"speculation.{' and '.join(keys)}: {profile.engine}'s MTP context takes the target's cache types "
            f"(cache_type_k / cache_type_v: {profile.cache_type_k}/{profile.cache_type_v}), as planned")


def _drop(values: tuple[int, ...], layers: range) -> tuple[int, ...]:
    return tuple(0 if il in layers else v for il, v in enumerate(values))


def target_view(spec: ModelSpec, profile: Profile) -> ModelSpec:
    """The target as the engine loads it for this profile: NextN weights only with MTP on, their KV in the
    target's context only where the engine puts it there."""
    if not spec.n_nextn:
        return spec
    layers = nextn_layers(spec)
    if is_on(profile):
        if engine_facts.mtp_kv_in_target_context(profile.engine):
            return spec
        return replace(spec, n_head_kv=_drop(spec.n_head_kv, layers))
    skipped = sum(spec.layer_bytes[il] for il in layers)
    skipped_repack = sum(spec.layer_repack_bytes[il] for il in layers) if spec.layer_repack_bytes else 0
    return replace(
        spec, n_head_kv=_drop(spec.n_head_kv, layers), layer_bytes=_drop(spec.layer_bytes, layers),
        layer_expert_bytes=_drop(spec.layer_expert_bytes, layers),
        layer_repack_bytes=_drop(spec.layer_repack_bytes, layers) if spec.layer_repack_bytes else (),
        tensor_bytes=spec.tensor_bytes - skipped, cpu_repack_bytes=spec.cpu_repack_bytes - skipped_repack)


def context_spec(spec: ModelSpec) -> ModelSpec:
    """The MTP context: no weights of its own (it runs on the target's), KV for the NextN layers only."""
    layers = nextn_layers(spec)
    zero = (0,) * spec.n_layer
    return replace(
        spec, n_head_kv=tuple(h if il in layers else 0 for il, h in enumerate(spec.n_head_kv)),
        recurrent=(False,) * spec.n_layer, layer_bytes=zero, layer_expert_bytes=zero,
        layer_repack_bytes=zero if spec.layer_repack_bytes else (), input_bytes=0, output_bytes=0, tensor_bytes=0,
        cpu_repack_bytes=0)
