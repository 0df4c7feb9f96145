#!/usr/bin/env python3
"""Prepare what scripts/gpu_check.sh needs on the GPU machine, which has no network: a trimmed copy of
the pinned llama.cpp source and the wheels of llamactl's runtime dependencies its Python lacks.

  .venv/bin/python scripts/gpu_check_prepare.py            # both, into .gpu-check/ (git-ignored)
  .venv/bin/python scripts/gpu_check_prepare.py --source   # only the llama.cpp tree
  .venv/bin/python scripts/gpu_check_prepare.py --wheels   # only the wheels

The source comes from the llama-cpp-python sdist that `llamactl engines install` builds (its cache, else
`pip download`); the copy drops what building llama-server does not read (docs, models, tests, examples,
the web UI's sources, the other GPU backends). The wheels are the versions installed here (the ones the
tests ran with), for CPython 3.12 on x86-64 Linux. The sizes are printed: together they must stay well
under the device's 64 MiB carry limit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamactl.engines.install import SOURCES  # noqa: E402

PREPARED = ROOT / ".gpu-check"
SOURCE_DIR = PREPARED / "llama.cpp"
WHEELS_DIR = PREPARED / "wheels"
CARRY_LIMIT_MIB = 64

# Not read when building llama-server (LLAMA_BUILD_TESTS / EXAMPLES off, no web UI build, CUDA + CPU only).
DROPPED = (
    "docs", "models", "tests", "benches", "media", "examples", "pocs", "gguf-py", "conversion", "ci", "skills",
    "requirements", "grammars", ".github", ".devops", "AUTHORS",
    "tools/ui/src", "tools/ui/tests", "tools/ui/static", "tools/ui/package-lock.json",
    "ggml/src/ggml-blas", "ggml/src/ggml-cann", "ggml/src/ggml-et", "ggml/src/ggml-hexagon", "ggml/src/ggml-hip",
    "ggml/src/ggml-metal", "ggml/src/ggml-musa", "ggml/src/ggml-opencl", "ggml/src/ggml-openvino",
    "ggml/src/ggml-sycl", "ggml/src/ggml-virtgpu", "ggml/src/ggml-vulkan", "ggml/src/ggml-webgpu",
    "ggml/src/ggml-zdnn", "ggml/src/ggml-zendnn",
)
DROPPED_GLOBS = ("convert_*.py", "build-xcframework.sh")

# llamactl's runtime dependencies the GPU machine's Python does not have (device KINDS.md package list),
# with what they need in turn. click, httpx, psutil, nvidia-ml-py, numpy, prometheus-client, pyyaml, tqdm,
# requests, anyio, h11 and uvloop are there already. typing-extensions is there too, but pydantic needs a
# recent one (>= 4.16): the carried copy comes first on PYTHONPATH.
MISSING_ON_DEVICE = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
                     "msgspec", "gguf", "uvicorn", "starlette", "httptools")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")


def size_mib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def pinned_sdist() -> Path:
    """The llama-cpp-python sdist `llamactl engines install` uses: its cache, else pip download."""
    from llamactl.settings import Settings

    source = SOURCES["llama.cpp"]
    cached = Settings().cache_dir / "sdists" / f"{source.sdist_stem}.tar.gz"
    if cached.is_file():
        return cached
    dest = Path(tempfile.mkdtemp(prefix="gpu-check-sdist-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                    f"{source.package}=={source.version}", "-d", str(dest)], check=True)
    return dest / f"{source.sdist_stem}.tar.gz"


def trim(tree: Path) -> None:
    for rel in DROPPED:
        p = tree / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for pattern in DROPPED_GLOBS:
        for p in tree.glob(pattern):
            p.unlink()


def make_source() -> float:
    source = SOURCES["llama.cpp"]
    sdist = pinned_sdist()
    prefix = f"{source.sdist_stem}/{source.subdir}/"
    if SOURCE_DIR.exists():
        shutil.rmtree(SOURCE_DIR)
    SOURCE_DIR.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        tar.extractall(SOURCE_DIR, members=members, filter="data")
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise SystemExit(f"{sdist.name} has no {source.subdir}/CMakeLists.txt")
    full = size_mib(SOURCE_DIR)
    trim(SOURCE_DIR)
    (SOURCE_DIR / "LLAMACTL_SOURCE").write_text(f"{source.package}=={source.version} {source.subdir}, trimmed by "
                                               "scripts/gpu_check_prepare.py\n")
    trimmed = size_mib(SOURCE_DIR)
    print(f"llama.cpp source: {full:.1f} MiB in the sdist, {trimmed:.1f} MiB trimmed -> {SOURCE_DIR.relative_to(ROOT)}")
    return trimmed


def make_wheels() -> float:
    if WHEELS_DIR.exists():
        shutil.rmtree(WHEELS_DIR)
    WHEELS_DIR.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in MISSING_ON_DEVICE]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--quiet", "-d", str(WHEELS_DIR)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + pins, check=True)
    total = size_mib(WHEELS_DIR)
    print(f"wheels: {', '.join(pins)}: {total:.1f} MiB -> {WHEELS_DIR.relative_to(ROOT)}")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="store_true", help="only the trimmed llama.cpp tree")
    ap.add_argument("--wheels", action="store_true", help="only the wheels")
    args = ap.parse_args()
    both = not (args.source or args.wheels)
    if both or args.source:
        make_source()
    if both or args.wheels:
        make_wheels()
    carried = sum(size_mib(p) for p in (SOURCE_DIR, WHEELS_DIR) if p.exists())
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    tree = sum((ROOT / f).stat().st_size for f in tracked if f and (ROOT / f).is_file()) / 2**20
    total = carried + tree
    print(f"carried {carried:.1f} MiB + tracked files {tree:.1f} MiB = {total:.1f} MiB "
          f"of the {CARRY_LIMIT_MIB} MiB limit")
    return 0 if total < CARRY_LIMIT_MIB * 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
