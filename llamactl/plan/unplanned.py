"""Flags a profile may pass in extra_args that change memory the plan does not count (pure, no I/O).

The plan reads every flag it plans with from profile keys (and refuses those flags in extra_args), plus the few
extra_args it models (--swa-full, -kvu, --n-cpu-moe). The rest are passed as they are; these few move weights,
the KV cache or whole models between devices or add memory of their own, so a plan of a profile that sets them
is off by what they do, and says so.
"""

from __future__ import annotations

from llamactl.profiles import Profile

UNPLANNED_MEMORY_FLAGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("-nkvo", "--no-kv-offload"), "keeps the KV cache in RAM: the plan counts it on the GPUs"),
    (("-ot", "--override-tensor", "-otd", "--override-tensor-draft", "--spec-draft-override-tensor"),
     "moves tensors between devices: the plan places whole layers"),
    (("-cmoed", "--cpu-moe-draft", "-ncmoed", "--n-cpu-moe-draft", "--spec-draft-cpu-moe", "--spec-draft-n-cpu-moe",
      "--spec-draft-ncmoe"),
     "keeps the draft model's experts in RAM: the plan places the draft by layer"),
    (("-cd", "--ctx-size-draft"), "sets the draft model's context (ik): the plan gives it the target's"),
    (("-mm", "--mmproj", "-mmu", "--mmproj-url"),
     "loads a multimodal projector (its weights and its image encoder's compute, on the first GPU unless "
     "--no-mmproj-offload): not counted"),
    (("--lora", "--lora-scaled", "--control-vector", "--control-vector-scaled"),
     "loads adapter weights: not counted"),
    (("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"),
     "sets how many context checkpoints each slot keeps in RAM: the plan counts none"),
    (("-draft", "--draft-params"),
     "is the draft model's own command line (ik): what it sets of -c, -ngl, -ctk/-ctv or -dev is not in the plan"),
)


def notes(profile: Profile) -> list[str]:
    """One note per flag of extra_args whose memory the plan does not count."""
    given = {arg.split("=", 1)[0] for arg in profile.extra_args}
    return [f"extra_args {flag} {why}; the plan is off by that much"
            for spellings, why in UNPLANNED_MEMORY_FLAGS for flag in spellings if flag in given]
