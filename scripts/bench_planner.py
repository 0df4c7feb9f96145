#!/usr/bin/env python3
"""Planner speed: a 524288-context profile for a ~100 GiB GGUF on 8 GPUs (and smaller boxes), with the
automatic placement's searches and the suggestions' searches.

The GGUF is header-only (tests/synth_gguf.py write_header_only): its tensor table describes
~100 GiB of Q8_0 weights while the data section is a sparse hole, so the planner sees exactly what
it would see for a real file of that size (it never reads weights).

  .venv/bin/python scripts/bench_planner.py [--repeat 20] [--out docs/planner-speed.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from llamactl.gguf import clear_header_cache  # noqa: E402
from llamactl.gpus import Gpu, GpuInventory  # noqa: E402
from llamactl.plan import plan_profile  # noqa: E402
from llamactl.planning import load_spec  # noqa: E402
from llamactl.profiles import Profile  # noqa: E402


def box(n: int, total_mib: int) -> GpuInventory:
    gpus = tuple(Gpu(index=i, name=f"GPU{i}", total_mib=total_mib, free_mib=total_mib - 600) for i in range(n))
    return GpuInventory(gpus=gpus, source=f"{n}x{total_mib // 1024}G", host_total_mib=1 << 20, host_free_mib=1 << 20)


def timed(fn, repeat: int) -> tuple[float, float, object]:
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import synth_gguf

    rows = []
    with tempfile.TemporaryDirectory(prefix="llamactl-planbench-") as tmp:
        # ~100 GiB of Q8_0, trained for 524288 tokens (so an unset ctx_size starts there).
        path = synth_gguf.write_header_only(Path(tmp) / "big.gguf", n_layer=118, ctx_train=524288)
        moe_path = synth_gguf.write_header_only(Path(tmp) / "moe.gguf", n_layer=40, n_embd=4096, n_head=32,
                                                n_head_kv=4, n_ff=1536, n_expert=128, n_expert_used=8,
                                                ctx_train=524288)
        size_gib = path.stat().st_size / 2**30
        def cold_read():
            clear_header_cache()  # read_gguf caches per (path, mtime, size): time the real read
            return load_spec(path)

        read_med, read_max, spec = timed(cold_read, args.repeat)
        rows.append(("read GGUF header + model spec (cold)", f"{size_gib:.0f} GiB GGUF", read_med, read_max, "-"))
        read_med, read_max, spec = timed(lambda: load_spec(path), args.repeat)
        rows.append(("read GGUF header + model spec (cached)", f"{size_gib:.0f} GiB GGUF", read_med, read_max, "-"))
        moe = load_spec(moe_path)
        moe_gib = moe_path.stat().st_size / 2**30
        mixed = GpuInventory(gpus=box(4, 81920).gpus + tuple(Gpu(index=4 + i, name="small", total_mib=24576,
                                                                  free_mib=24000) for i in range(4)),
                             source="mixed", host_total_mib=1 << 20, host_free_mib=1 << 20)
        big = dict(name="b", model=str(path))
        cases = [
            ("8 x 80 GiB, fits", spec, box(8, 81920),
             Profile(**big, ctx_size=524288, cache_type_k="q8_0", cache_type_v="q8_0")),
            ("8 x 24 GiB, n_gpu_layers = all: does not fit (+ suggestions)", spec, box(8, 24576),
             Profile(**big, ctx_size=524288, n_gpu_layers="all")),
            ("8 x 24 GiB, n_gpu_layers unset: auto, layers on the CPU", spec, box(8, 24576),
             Profile(**big, ctx_size=524288)),
            ("8 x 24 GiB, n_gpu_layers and ctx_size unset: context lowered", spec, box(8, 24576), Profile(**big)),
            ("8 x 80 GiB, n_gpu_layers = auto", spec, box(8, 81920),
             Profile(**big, ctx_size=524288, n_gpu_layers="auto")),
            ("4 x 80 GiB + 4 x 24 GiB, fits", spec, mixed,
             Profile(**big, ctx_size=524288, cache_type_k="q4_0", cache_type_v="q4_0")),
            (f"MoE {moe_gib:.0f} GiB on 8 x 12 GiB, auto: experts to the CPU", moe, box(8, 12288),
             Profile(name="m", model=str(moe_path), ctx_size=524288, cache_type_k="q8_0", cache_type_v="q8_0")),
            (f"MoE {moe_gib:.0f} GiB on 8 x 12 GiB, n_gpu_layers = all (+ suggestions)", moe, box(8, 12288),
             Profile(name="m", model=str(moe_path), ctx_size=524288, cache_type_k="q8_0", cache_type_v="q8_0",
                     n_gpu_layers="all")),
        ]
        for label, model, inv, prof in cases:
            med, worst, plan = timed(lambda: plan_profile(prof, model, inv), args.repeat)
            rows.append((f"plan: {label}", f"ctx {plan.ctx.n_ctx}, KV {prof.cache_type_k}",
                         med, worst, f"fits={plan.fits}, gpus={len(plan.gpus)}, n_gpu_layers={plan.n_gpu_layers}, "
                                     f"n_cpu_moe={plan.cpu_moe}, suggestions={len(plan.suggestions)}"))
    for r in rows:
        print(f"{r[0]:66s} {r[1]:22s} median {r[2] * 1000:8.1f} ms  max {r[3] * 1000:8.1f} ms  {r[4]}")
    if args.out:
        lines = [
            "# Planner speed",
            "",
            f"Generated by `.venv/bin/python scripts/bench_planner.py --repeat {args.repeat} --out docs/planner-speed.md`.",
            "",
            f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with builds while measured), "
            f"Python {platform.python_version()}, no GPU (boxes are described, as with `--gpus FILE`).",
            "- Model: a header-only GGUF (tests/synth_gguf.py `write_header_only`, 118 layers of a 70B-wide "
            "llama, Q8_0, trained for 524288 tokens) whose tensor table describes ~100 GiB; the data section is a "
            "sparse hole. The planner reads the same header it would read from a real file of that size. The MoE "
            "rows: 40 layers of 128 experts (8 used), Q8_0, the same way.",
            "- Boxes: every GPU has 600 MiB taken; the host has 1 TiB free. `n_gpu_layers` / `ctx_size` unset "
            "is the automatic placement (the most on the GPUs that fits; the context lowered in steps of 256 when "
            "that keeps more there); `all` is judged as given, with the suggestions' exact searches.",
            f"- Each row: median and max of {args.repeat} runs, wall clock (`time.perf_counter`).",
            "- `plan` rows are the pure planner (the placement search, context lowering and suggestions, each "
            "suggestion replanned), without the file read. `ctx` is the context planned.",
            "",
            "| step | input | median ms | max ms | result |",
            "|---|---|---:|---:|---|",
        ]
        lines += [f"| {r[0]} | {r[1]} | {r[2] * 1000:.1f} | {r[3] * 1000:.1f} | {r[4]} |" for r in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
