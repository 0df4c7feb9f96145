#!/usr/bin/env python3
"""Truth on a real GPU: llamactl's memory plan, its NVML probe and its lifecycle against llama-server on the card.

  scripts/gpu_check.sh OUT_DIR                  # on the GPU machine: builds llama-server (CUDA, sm_90), then this
  python scripts/gpu_check.py --binary BIN --out OUT_DIR [--cpu] [--quick] [--budget-s N]

For each case of the matrix (synthetic GGUFs written with tests/synth_gguf.py: weights are zeros, memory is
what is under test) it writes a profile, runs `llamactl plan PROFILE --json`, starts the planned argv (plus
`-lv 4`), waits for /health, reads NVML's per-process used memory, sends one request, reads NVML again, stops
the engine with SIGTERM (so it prints its memory breakdown) and compares per device:
  plan buffers (weights + KV + compute + output + draft) vs the engine's own buffer lines (CUDA0, CUDA_Host, CPU);
  NVML per-process used memory vs the engine's CUDA buffers (the difference is the CUDA context, cuBLAS
  workspace and pools: what the plan's fixed per-GPU overhead stands for).
Then `llamactl gpus --json` vs `nvidia-smi --query-gpu=...`, and `llamactl up` -> /health -> chat -> `down`.
Writes OUT/gpu-check.json and OUT/gpu-check.md after every step (a run cut short still leaves its results).

--cpu: a rehearsal on a CPU-only build (no NVML, plans for the host). --quick: small models and contexts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from llamactl.plan.actual import ActualMemory, BreakdownRow, parse_memory_breakdown, parse_memory_log  # noqa: E402

TARGET_PCT = 2.0  # plan vs engine, per device: within 2% or 64 MiB, never under
TARGET_MIB = 64.0
COMPONENTS = ("model", "kv", "compute", "output")
PLAN_COMPONENTS = {"model": "weights_mib", "kv": "kv_mib", "compute": "compute_mib", "output": "output_mib"}
CASE_TIMEOUT_S = 240.0
# A case is started only while this much of the budget is left (load + request + stop of the largest one).
CASE_RESERVE_S = 45.0


# ------------------------------------------------------------------------------------------------ the matrix
@dataclass(frozen=True)
class Case:
    label: str
    model: str  # key into the written models
    ctx: int
    kv: str = "f16"
    flash_attn: str = "on"
    parallel: int | None = None
    draft: str | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "gc-" + "".join(c if c.isalnum() else "-" for c in self.label).strip("-")

    def profile_toml(self, models: dict[str, Path], binary: Path) -> str:
        lines = [f'model = "{models[self.model]}"', f'binary = "{binary}"', f"ctx_size = {self.ctx}",
                 f'cache_type_k = "{self.kv}"', f'cache_type_v = "{self.kv}"', f'flash_attn = "{self.flash_attn}"',
                 "load_timeout_s = 300"]
        if self.parallel is not None:
            lines.append(f"parallel = {self.parallel}")
        if self.extra_args:
            lines.append("extra_args = [" + ", ".join(f'"{a}"' for a in self.extra_args) + "]")
        if self.draft:
            lines += ["", "[speculation]", 'type = "draft"', f'draft_model = "{models[self.draft]}"']
        return "\n".join(lines) + "\n"


def write_models(directory: Path, quick: bool) -> dict[str, Path]:
    """The synthetic models. Full: an 8B-like dense GQA model (Llama-3.1-8B shapes, Q8_0, weights a sparse
    hole), a 1B-like draft with the same vocabulary, a Gemma-3-1B-like SWA model and a 16-expert MoE.
    Quick: the same kinds at toy sizes."""
    import synth_gguf as s

    d = directory
    d.mkdir(parents=True, exist_ok=True)
    if quick:
        return {
            "dense": s.write_header_only(d / "dense.gguf", n_layer=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=512,
                                         n_vocab=4096, ctx_train=131072, loadable=True),
            "draft": s.write_header_only(d / "draft.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256,
                                         n_vocab=4096, ctx_train=131072, loadable=True),
            "swa": s.write_gemma3(d / "swa.gguf"),
            "moe": s.write_header_only(d / "moe.gguf", n_layer=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=256,
                                       n_vocab=4096, n_expert=8, n_expert_used=2, ctx_train=131072, loadable=True),
        }
    return {
        "dense": s.write_header_only(d / "dense.gguf", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
                                     n_vocab=128256, ctx_train=131072, loadable=True),
        "draft": s.write_header_only(d / "draft.gguf", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192,
                                     n_vocab=128256, ctx_train=131072, loadable=True),
        "swa": s.write_gemma3(d / "swa.gguf", n_layer=26, n_embd=1152, n_head=4, n_head_kv=1, head_dim=256,
                              n_ff=6912, n_vocab=32768, n_swa=512, ctx_train=131072),
        "moe": s.write_header_only(d / "moe.gguf", n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=2048,
                                   n_vocab=32768, n_expert=16, n_expert_used=2, ctx_train=131072, loadable=True),
    }


def matrix(quick: bool) -> list[Case]:
    """Most telling first: a run cut short by its time budget still has them."""
    ctxs = (4096, 8192) if quick else (4096, 32768, 131072)
    mid = ctxs[1]
    cases = [Case(f"dense {ctxs[0]} f16", "dense", ctxs[0])]
    cases += [Case(f"dense {mid} f16 np1", "dense", mid, parallel=1),
              Case(f"dense {mid} f16 + draft np1", "dense", mid, parallel=1, draft="draft"),
              Case(f"moe {mid} f16 all experts on GPU", "moe", mid),
              Case(f"moe {mid} f16 n_cpu_moe", "moe", mid, extra_args=("--n-cpu-moe", "2" if quick else "8")),
              Case(f"swa {mid} f16", "swa", mid),
              Case(f"swa {ctxs[-1]} q8_0", "swa", ctxs[-1], kv="q8_0")]
    for ctx in ctxs:
        if ctx != ctxs[0]:
            cases.append(Case(f"dense {ctx} f16", "dense", ctx))
        cases += [Case(f"dense {ctx} q8_0", "dense", ctx, kv="q8_0"),
                  Case(f"dense {ctx} f16 fa off", "dense", ctx, flash_attn="off")]
    cases.append(Case(f"dense {mid} f16 np4 split", "dense", mid, parallel=4))
    return cases


# ---------------------------------------------------------------------------------- comparison (pure, tested)
def device_key(buffer_name: str, gpus: list[int]) -> str:
    """The plan's device key for one of the engine's buffer names. The engine numbers the GPUs it sees
    (CUDA_VISIBLE_DEVICES = the plan's `gpus`, in that order); every host buffer (CPU, CPU_Mapped, CPU_REPACK,
    CUDA_Host) is the plan's CPU."""
    if buffer_name.startswith("CUDA") and buffer_name[4:].isdigit():
        i = int(buffer_name[4:])
        return f"CUDA{gpus[i]}" if i < len(gpus) else buffer_name
    return "CPU"


def engine_by_device(models: list[ActualMemory], gpus: list[int]) -> dict[str, dict[str, float]]:
    """MiB per plan device and component: model / kv / compute / output for the target, draft_* for the draft."""
    out: dict[str, dict[str, float]] = {}
    for role, mem in zip(("", "draft_"), models):
        for comp in COMPONENTS:
            for buf, mib in getattr(mem, comp).items():
                dev = out.setdefault(device_key(buf, gpus), {})
                dev[role + comp] = dev.get(role + comp, 0.0) + mib
    return out


def engine_buffers_by_name(models: list[ActualMemory]) -> dict[str, float]:
    """MiB per engine buffer name (CUDA0, CUDA_Host, CPU_Mapped ...), all components and both models."""
    out: dict[str, float] = {}
    for mem in models:
        for comp in COMPONENTS:
            for buf, mib in getattr(mem, comp).items():
                out[buf] = out.get(buf, 0.0) + mib
    return out


def within_target(plan_mib: float, engine_mib: float) -> tuple[bool, bool]:
    """(within 2% or 64 MiB and not under, under). The plan rounds each component up to whole MiB."""
    err = plan_mib - engine_mib
    under = err < -0.01
    return (not under and err <= max(TARGET_MIB, TARGET_PCT / 100 * engine_mib)), under


def compare_devices(plan: dict[str, Any], engine: list[ActualMemory], breakdown: list[BreakdownRow],
                    nvml: dict[str, dict[str, int | None]]) -> list[dict[str, Any]]:
    """One row per plan device: plan vs engine per component and in total; for GPUs the NVML per-process
    reading against the engine's CUDA buffers and the plan's total (buffers + per-GPU overhead)."""
    gpus = list(plan.get("gpus") or [])
    actual = engine_by_device(engine, gpus)
    by_name = {r.name: r for r in breakdown}
    rows = []
    for dev in plan["devices"]:
        key = dev["key"]
        act = actual.get(key, {})
        p = {comp: float(dev[PLAN_COMPONENTS[comp]]) for comp in COMPONENTS}
        p["draft"] = float(dev.get("draft_mib", 0))
        e = {comp: act.get(comp, 0.0) for comp in COMPONENTS}
        e["draft"] = sum(act.get("draft_" + comp, 0.0) for comp in COMPONENTS)
        plan_buffers = sum(p.values())
        engine_buffers = sum(e.values())
        ok, under = within_target(plan_buffers, engine_buffers)
        row: dict[str, Any] = {
            "device": key, "plan": p, "engine": e, "plan_buffers_mib": round(plan_buffers, 2),
            "engine_buffers_mib": round(engine_buffers, 2), "err_mib": round(plan_buffers - engine_buffers, 2),
            "err_pct": round((plan_buffers - engine_buffers) / engine_buffers * 100, 2) if engine_buffers else None,
            "within_target": ok, "underestimate": under, "plan_overhead_mib": dev.get("overhead_mib", 0),
            "plan_total_mib": dev.get("total_mib"),
        }
        if dev.get("gpu_index") is not None:
            engine_name = f"CUDA{gpus.index(dev['gpu_index'])}" if dev["gpu_index"] in gpus else None
            bd = by_name.get(engine_name) if engine_name else None
            if bd is not None:
                row["engine_breakdown"] = asdict(bd)
            reading = nvml.get(key, {})
            row["nvml"] = reading
            used = reading.get("process_loaded_mib")
            if used is None:
                used = reading.get("device_delta_loaded_mib")
            if used is not None:
                row["nvml_used_mib"] = used
                row["context_overhead_mib"] = round(used - engine_buffers, 1)
                row["nvml_within_plan"] = used <= (dev.get("total_mib") or 0)
        rows.append(row)
    return rows


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for c in cases for r in c.get("devices", []) if r.get("engine_buffers_mib")]
    gpu_rows = [r for r in rows if r["device"] != "CPU"]
    overheads = [r["context_overhead_mib"] for r in gpu_rows if r.get("context_overhead_mib") is not None]
    errs = [r["err_mib"] for r in rows]
    return {
        "cases": len(cases), "cases_loaded": sum(1 for c in cases if c.get("engine", {}).get("loaded")),
        "device_rows": len(rows), "within_target": sum(1 for r in rows if r["within_target"]),
        "underestimates": sum(1 for r in rows if r["underestimate"]),
        "err_min_mib": min(errs) if errs else None, "err_max_mib": max(errs) if errs else None,
        "context_overhead_min_mib": min(overheads) if overheads else None,
        "context_overhead_max_mib": max(overheads) if overheads else None,
        "nvml_over_plan": sum(1 for r in gpu_rows if r.get("nvml_within_plan") is False),
    }


def parse_smi_csv(text: str) -> list[dict[str, Any]]:
    """`nvidia-smi --query-gpu=index,name,memory.total,memory.free,memory.used,pci.bus_id,uuid
    --format=csv,noheader,nounits` -> one dict per GPU."""
    out = []
    for line in text.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < 7:
            continue
        out.append({"index": int(parts[0]), "name": parts[1], "total_mib": int(parts[2]), "free_mib": int(parts[3]),
                    "used_mib": int(parts[4]), "pci_bus_id": parts[5], "uuid": parts[6]})
    return out


SMI_QUERY = "index,name,memory.total,memory.free,memory.used,pci.bus_id,uuid"


def compare_gpus(ours: list[dict[str, Any]], smi: list[dict[str, Any]], free_tolerance_mib: int = 64
                 ) -> list[dict[str, Any]]:
    """Checks of `llamactl gpus --json` against nvidia-smi: same GPUs in the same order, same names, totals,
    bus ids and uuids, free memory within a tolerance (both are readings of a moving value)."""
    checks = [{"check": "GPU count", "ok": len(ours) == len(smi), "detail": f"llamactl {len(ours)}, nvidia-smi {len(smi)}"}]
    for a, b in zip(ours, smi):
        i = b["index"]
        free_diff = abs(a["free_mib"] - b["free_mib"])
        checks += [
            {"check": f"GPU {i} index", "ok": a["index"] == i, "detail": f"{a['index']} vs {i}"},
            {"check": f"GPU {i} name", "ok": a["name"] == b["name"], "detail": f"{a['name']!r} vs {b['name']!r}"},
            {"check": f"GPU {i} total MiB", "ok": a["total_mib"] == b["total_mib"],
             "detail": f"{a['total_mib']} vs {b['total_mib']}"},
            {"check": f"GPU {i} free MiB", "ok": free_diff <= free_tolerance_mib,
             "detail": f"{a['free_mib']} vs {b['free_mib']} (tolerance {free_tolerance_mib})"},
            {"check": f"GPU {i} PCI bus id", "ok": (a.get("pci_bus_id") or "").lower() == b["pci_bus_id"].lower(),
             "detail": f"{a.get('pci_bus_id')} vs {b['pci_bus_id']}"},
            {"check": f"GPU {i} uuid", "ok": a.get("uuid") == b["uuid"], "detail": f"{a.get('uuid')} vs {b['uuid']}"},
        ]
    return checks


def _pe(p: float, e: float) -> str:
    return f"{p:.0f} / {e:.1f}" if (p or e) else "-"


def render_markdown(report: dict[str, Any]) -> str:
    s = report.get("summary") or summarize(report.get("cases", []))
    m = report.get("meta", {})
    lines = [
        "# GPU check: plan vs engine vs NVML" + (" (CPU rehearsal)" if m.get("cpu") else ""),
        "",
        f"- Command: `{m.get('command', '')}`",
        f"- Machine: {m.get('machine', '?')}; GPUs: {m.get('gpus', '?')}",
        f"- Engine: {m.get('engine_version', '?')}" + (f"; build {m['build_s']:.0f} s" if m.get("build_s") else ""),
        f"- Time: {m.get('elapsed_s', 0):.0f} s" + (f"; stopped early: {m['stopped_early']}" if m.get("stopped_early") else ""),
        f"- Target: per device, plan buffers (weights + KV + compute + output + draft) vs the engine's buffer lines "
        f"within {TARGET_PCT:g}% or {TARGET_MIB:g} MiB, no underestimate. NVML per-process used memory = engine "
        "buffers on that GPU + CUDA context (the plan's fixed per-GPU overhead stands for it).",
        "",
        "## Summary",
        "",
        f"- {s['cases_loaded']} of {s['cases']} cases loaded; {s['within_target']} of {s['device_rows']} device rows "
        f"within the target; underestimates: {s['underestimates']}; error (plan - engine) from "
        f"{_num(s['err_min_mib'])} to {_num(s['err_max_mib'])} MiB.",
        f"- Measured per-GPU context overhead (NVML process used - engine CUDA buffers): "
        f"{_num(s['context_overhead_min_mib'])} to {_num(s['context_overhead_max_mib'])} MiB "
        f"(plan: {m.get('gpu_overhead_mib', '?')} MiB); NVML above the plan's total: {s['nvml_over_plan']}.",
        "",
        "## Plan vs engine, per device (MiB, plan / engine)",
        "",
        "| case | device | weights | KV | compute | output | draft | plan | engine | err | err % | ok | "
        "NVML proc loaded / after request | NVML - buffers | engine unaccounted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for c in report.get("cases", []):
        if not c.get("devices"):
            lines.append(f"| {c['label']} | - | {c.get('error') or 'not measured'} |||||||||||||")
            continue
        for r in c["devices"]:
            p, e = r["plan"], r["engine"]
            nv = r.get("nvml") or {}
            loaded = nv.get("process_loaded_mib", nv.get("device_delta_loaded_mib"))
            after = nv.get("process_after_request_mib", nv.get("device_delta_after_request_mib"))
            unacc = (r.get("engine_breakdown") or {}).get("unaccounted_mib")
            ok = "yes" if r["within_target"] else ("UNDER" if r["underestimate"] else "NO")
            lines.append(
                f"| {c['label']} | {r['device']} | " + " | ".join(_pe(p[k], e[k]) for k in (*COMPONENTS, "draft"))
                + f" | {r['plan_buffers_mib']:.0f} | {r['engine_buffers_mib']:.1f} | {r['err_mib']:+.1f} | "
                f"{_num(r['err_pct'], '+.1f')} | {ok} | "
                + (f"{_num(loaded)} / {_num(after)}" if r["device"] != "CPU" else "-")
                + f" | {_num(r.get('context_overhead_mib'))} | {_num(unacc)} |")
    named = [c for c in report.get("cases", []) if c.get("engine_buffers")]
    if named:
        names = ["CUDA0", "CUDA_Host", "CPU_Mapped", "CPU", "CPU_REPACK"]
        names += sorted({n for c in named for n in c["engine_buffers"]} - set(names))
        lines += ["", "## The engine's buffers by name (MiB, target + draft, all components)", "",
                  "| case | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for c in named:
            lines.append(f"| {c['label']} | " + " | ".join(
                _num(c["engine_buffers"].get(n), ".1f") for n in names) + " |")
    g = report.get("gpus_check")
    if g:
        lines += ["", "## `llamactl gpus --json` vs nvidia-smi", ""]
        if g.get("skipped"):
            lines.append(f"- skipped: {g['skipped']}")
        for chk in g.get("checks", []):
            lines.append(f"- {'ok' if chk['ok'] else 'FAIL'}: {chk['check']}: {chk['detail']}")
    life = report.get("lifecycle")
    if life:
        lines += ["", "## `llamactl up` -> /health -> chat -> `down`", ""]
        for step in life.get("steps", []):
            detail = " / ".join(x.strip() for x in str(step["detail"]).splitlines() if x.strip())
            lines.append(f"- {'ok' if step['ok'] else 'FAIL'}: {step['step']} ({step['seconds']:.1f} s): {detail}")
    return "\n".join(lines) + "\n"


def _num(v: Any, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


# ------------------------------------------------------------------------------------------------------- I/O
@dataclass
class Env:
    binary: Path
    work: Path
    out: Path
    cpu: bool
    deadline: float
    python: str = sys.executable
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.work / "home"

    def llamactl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, LLAMACTL_HOME=str(self.home), PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        return subprocess.run([self.python, "-m", "llamactl", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=self.work, stdin=subprocess.DEVNULL)

    def write_profile(self, name: str, text: str) -> None:
        d = self.home / "config" / "profiles"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.toml").write_text(text)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.report["summary"] = summarize(self.report.get("cases", []))
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.report, indent=2, default=str))
        (self.out / "gpu-check.md").write_text(render_markdown(self.report))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvml_reading(pid: int | None) -> dict[str, dict[str, int | None]]:
    """Per GPU (CUDA<index>): the device's used MiB and `pid`'s used MiB, through llamactl's own NVML probe."""
    from llamactl.gpus import NvmlProbe

    try:
        inv = NvmlProbe(our_pids=frozenset({pid} if pid else ())).probe()
    except Exception as e:  # a probe failure is a result here, not a reason to stop
        return {"error": {"detail": str(e)}}  # type: ignore[dict-item]
    out: dict[str, dict[str, int | None]] = {}
    for g in inv.gpus:
        proc = next((p for p in g.processes if p.pid == pid), None)
        out[f"CUDA{g.index}"] = {"device_used_mib": g.used_mib if g.used_mib is not None else g.total_mib - g.free_mib,
                                 "process_mib": None if proc is None else proc.used_mib}
    return out


def wait_ready(proc: subprocess.Popen[Any], url: str, timeout_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling a child's readiness, not synchronising threads
    return False


def stop(proc: subprocess.Popen[Any], timeout_s: float = 20) -> int | None:
    """SIGTERM (the engine prints its memory breakdown on the way out), SIGKILL after timeout_s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def run_case(env: Env, case: Case, models: dict[str, Path], plan_only: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"label": case.label, **{k: v for k, v in asdict(case).items() if k != "label"}}
    env.write_profile(case.name, case.profile_toml(models, env.binary))
    t0 = time.monotonic()
    done = env.llamactl("plan", case.name, "--json")
    result["plan_s"] = round(time.monotonic() - t0, 2)
    if done.returncode not in (0, 7):
        result["error"] = f"llamactl plan exited {done.returncode}: {done.stderr.strip()[-400:]}"
        return result
    plan = json.loads(done.stdout)
    result["plan"] = plan
    if not plan["fits"] or not plan.get("argv"):
        result["error"] = "the plan does not fit" if not plan["fits"] else "the plan has no argv: " + "; ".join(plan["notes"])
        return result
    if plan_only:
        result["error"] = "planned only: " + ", ".join(f"{d['key']} {d['total_mib']} MiB" for d in plan["devices"])
        return result
    port = free_port()
    argv = [str(port) if a == "<port>" else a for a in plan["argv"]] + ["-lv", "4"]
    result["argv"] = argv
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    child_env.update(plan.get("env") or {})
    log_path = env.work / "logs" / f"{case.name}.log"
    log_path.parent.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    before = {} if env.cpu else nvml_reading(None)
    with log_path.open("w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=env.work,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            ready = wait_ready(proc, url, min(CASE_TIMEOUT_S, max(10.0, env.left_s() - 15)))
            engine: dict[str, Any] = {"loaded": ready, "load_s": round(time.monotonic() - t0, 2)}
            loaded = {} if env.cpu else nvml_reading(proc.pid)
            after: dict[str, Any] = {}
            if ready:
                engine["request"] = one_request(url, timeout_s=min(60.0, max(5.0, env.left_s() - 10)))
                after = {} if env.cpu else nvml_reading(proc.pid)
        finally:
            engine_exit = stop(proc)
    lines = log_path.read_text(errors="replace").splitlines()
    engine["exit"] = engine_exit
    engine["log_tail"] = lines[-12:] if not ready else []
    result["engine"] = engine
    result["nvml"] = {"before": before, "loaded": loaded, "after_request": after}
    actual = parse_memory_log(lines)
    # the table printed at exit, after the buffers: --fit's probes print projections before the load
    last_compute = max((i for i, line in enumerate(lines) if "compute buffer size" in line), default=len(lines))
    breakdown = parse_memory_breakdown(lines[last_compute:])
    result["engine_buffers"] = engine_buffers_by_name(actual)
    result["engine_breakdown"] = [asdict(r) for r in breakdown]
    result["devices"] = compare_devices(plan, actual, breakdown, nvml_by_device(before, loaded, after)) if actual else []
    if not actual:
        result["error"] = "the engine reported no buffers"
    return result


def nvml_by_device(before: dict[str, Any], loaded: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, now in loaded.items():
        if key == "error":
            continue
        base = before.get(key, {}).get("device_used_mib")
        later = after.get(key, {})
        out[key] = {
            "process_loaded_mib": now.get("process_mib"),
            "process_after_request_mib": later.get("process_mib"),
            "device_delta_loaded_mib": None if base is None else now["device_used_mib"] - base,
            "device_delta_after_request_mib": None if base is None or not later else later["device_used_mib"] - base,
        }
    return out


def one_request(url: str, timeout_s: float = 60) -> dict[str, Any]:
    import httpx

    t0 = time.monotonic()
    try:
        r = httpx.post(url + "/completion", json={"prompt": "The memory plan says", "n_predict": 8}, timeout=timeout_s)
        timings = r.json().get("timings", {}) if r.status_code == 200 else {}
        return {"status": r.status_code, "seconds": round(time.monotonic() - t0, 2),
                "tokens_per_s": timings.get("predicted_per_second")}
    except (httpx.HTTPError, ValueError) as e:
        return {"status": None, "error": str(e)}


def check_gpus(env: Env) -> dict[str, Any]:
    done = env.llamactl("gpus", "--json")
    if done.returncode != 0:
        return {"checks": [{"check": "llamactl gpus --json", "ok": False, "detail": done.stderr.strip()[-300:]}]}
    ours = json.loads(done.stdout)
    smi_bin = shutil.which("nvidia-smi")
    if smi_bin is None:
        if env.cpu:
            return {"llamactl": ours, "skipped": "no nvidia-smi on this machine (CPU rehearsal)",
                    "checks": [{"check": "no GPU: llamactl gpus --json is []", "ok": ours == [],
                                "detail": json.dumps(ours)[:200]}]}
        return {"llamactl": ours, "checks": [{"check": "nvidia-smi on PATH", "ok": False, "detail": "not found"}]}
    smi = subprocess.run([smi_bin, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60)
    rows = parse_smi_csv(smi.stdout)
    return {"llamactl": ours, "nvidia_smi": rows, "checks": compare_gpus(ours, rows)}


def check_lifecycle(env: Env, model: Path) -> dict[str, Any]:
    """llamactl up -> /health -> a chat request -> llamactl down, on whatever the plan picks (the card)."""
    import httpx

    name = "gc-lifecycle"
    env.write_profile(name, f'model = "{model}"\nbinary = "{env.binary}"\nctx_size = 4096\nload_timeout_s = 240\n')
    steps: list[dict[str, Any]] = []

    def step(label: str, ok: bool, detail: str, t0: float) -> bool:
        steps.append({"step": label, "ok": ok, "detail": detail, "seconds": round(time.monotonic() - t0, 2)})
        return ok

    t0 = time.monotonic()
    up = env.llamactl("up", name, timeout=300)
    if not step("llamactl up", up.returncode == 0, (up.stdout + up.stderr).strip()[-300:], t0):
        env.llamactl("down", name)
        return {"steps": steps}
    status = json.loads(env.llamactl("status", "--json").stdout)
    rec = next((s for s in status.get("servers", []) if s.get("profile") == name), None)
    url = f"http://127.0.0.1:{rec['port']}" if rec else None
    pid = rec.get("pid") if rec else None
    try:
        t0 = time.monotonic()
        r = httpx.get(f"{url}/health", timeout=10) if url else None
        step("GET /health", r is not None and r.status_code == 200, f"{r.status_code if r else 'no record'} "
             f"{r.text[:80] if r else ''}", t0)
        t0 = time.monotonic()
        c = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}) if url else None
        content = c.json()["choices"][0]["message"]["content"] if c is not None and c.status_code == 200 else None
        step("POST /v1/chat/completions", content is not None,
             f"{c.status_code if c is not None else '-'}; {len(content or '')} characters of reply", t0)
        if not env.cpu:
            t0 = time.monotonic()
            reading = nvml_reading(pid)
            on_gpu = any(v.get("process_mib") is not None for k, v in reading.items() if k != "error")
            step("the engine holds GPU memory (NVML)", on_gpu, json.dumps(reading), t0)
    except httpx.HTTPError as e:
        step("HTTP", False, str(e), t0)
    finally:
        t0 = time.monotonic()
        down = env.llamactl("down", name, timeout=120)
        gone = pid is None or not _alive(pid)
        step("llamactl down", down.returncode == 0 and gone,
             f"exit {down.returncode}; pid {pid} {'gone' if gone else 'STILL RUNNING'}", t0)
    return {"steps": steps}


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # no such process (or psutil missing: then ask the kernel)
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def engine_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((done.stdout + done.stderr).split())[:200]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=Path, required=True, help="llama-server to measure")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu-check.json and gpu-check.md")
    ap.add_argument("--cpu", action="store_true", help="rehearsal on a CPU-only build: no NVML, no nvidia-smi")
    ap.add_argument("--quick", action="store_true", help="toy models and small contexts")
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting cases after this many seconds")
    ap.add_argument("--keep-work", action="store_true", help="keep the models, profiles and engine logs")
    ap.add_argument("--plan-only", action="store_true",
                    help="plan every case (with LLAMACTL_GPUS_FILE describing the card, say) and start nothing")
    ap.add_argument("--command", default=None, help="the command line to record in the report")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="llamactl-gpu-check-"))
    env = Env(binary=args.binary.resolve(), work=work, out=args.out, cpu=args.cpu, deadline=t_start + args.budget_s)
    from llamactl.plan.placement import GPU_OVERHEAD_MIB

    env.report = {"meta": {
        "command": args.command or " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "cpu": args.cpu, "quick": args.quick, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "engine_version": engine_version(env.binary), "gpu_overhead_mib": GPU_OVERHEAD_MIB,
        "build_s": float(os.environ["GPU_CHECK_BUILD_S"]) if os.environ.get("GPU_CHECK_BUILD_S") else None,
    }, "cases": []}
    try:
        print(f"work dir {work}; writing models ...", flush=True)
        t0 = time.monotonic()
        models = write_models(work / "models", args.quick)
        env.report["meta"]["models_s"] = round(time.monotonic() - t0, 1)
        env.report["gpus_check"] = check_gpus(env)
        gpus = env.report["gpus_check"].get("llamactl") or []
        env.report["meta"]["gpus"] = ", ".join(f"{g['name']} ({g['total_mib']} MiB)" for g in gpus) or "none"
        env.save()
        print("gpus check:", "ok" if all(c["ok"] for c in env.report["gpus_check"]["checks"]) else "FAILED", flush=True)
        if not args.plan_only:
            env.report["lifecycle"] = check_lifecycle(env, models["swa"])
            env.save()
            print("lifecycle:", "ok" if all(s["ok"] for s in env.report["lifecycle"]["steps"]) else "FAILED",
                  flush=True)
        for case in matrix(args.quick):
            if env.left_s() < CASE_RESERVE_S:
                env.report["meta"]["stopped_early"] = f"time budget: '{case.label}' and later cases not run"
                break
            res = run_case(env, case, models, args.plan_only)
            env.report["cases"].append(res)
            env.report["meta"]["elapsed_s"] = time.monotonic() - t_start
            env.save()
            worst = [f"{r['device']} {r['err_mib']:+.1f} MiB{'' if r['within_target'] else ' OUT'}"
                     for r in res.get("devices", [])]
            print(f"{case.label:36s} load {res.get('engine', {}).get('load_s', '-')} s  "
                  + ("; ".join(worst) or res.get("error", "")), flush=True)
    finally:
        env.report["meta"]["elapsed_s"] = time.monotonic() - t_start
        env.save()
        logs = work / "logs"
        if logs.is_dir():
            shutil.make_archive(str(args.out / "engine-logs"), "gztar", logs)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    s = env.report["summary"]
    print(f"{s['within_target']} of {s['device_rows']} device rows within the target; underestimates "
          f"{s['underestimates']}; {time.monotonic() - t_start:.0f} s; report in {args.out}")
    return 0 if all_passed(env.report) else 1


def all_passed(report: dict[str, Any]) -> bool:
    """Every check passed, every case loaded, and no device row is out of the target."""
    checks = [c["ok"] for c in (report.get("gpus_check") or {}).get("checks", [])]
    checks += [s["ok"] for s in (report.get("lifecycle") or {}).get("steps", [])]
    rows = [r for c in report.get("cases", []) for r in c.get("devices", [])]
    loaded = all(c.get("engine", {}).get("loaded") for c in report.get("cases", []))
    return all(checks) and loaded and all(r["within_target"] for r in rows) and not report["meta"].get("stopped_early")


if __name__ == "__main__":
    sys.exit(main())
