"""Build llama-server from the pinned PyPI sdists into llamactl's engine cache.

llama.cpp comes from the tree vendored in llama-cpp-python's sdist, ik_llama.cpp from
ik-llama-cpp-python's. Builds are CPU-only unless CUDA is usable (nvcc and an NVIDIA driver).
Result: <engine cache>/<engine>-<version>/bin/llama-server plus build.json describing the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamactl.errors import EngineBuildError
from llamactl.settings import Settings

COMMON_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary we can copy into the cache
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_CURL=OFF",
)


@dataclass(frozen=True)
class EngineSource:
    engine: str
    package: str
    version: str
    subdir: str
    cmake_args: tuple[str, ...] = field(default=())
    needs_build_info: bool = False
    # Extra things the build carries beyond llama-server, e.g. "rpc" (GGML_RPC + rpc-server).
    # Part of the install directory's name, so a build with other features never replaces one in use.
    flavour: str = ""
    # Binaries besides llama-server: (cmake target, name installed under bin/).
    extra_binaries: tuple[tuple[str, str], ...] = field(default=())

    @property
    def build_name(self) -> str:
        return f"{self.engine}-{self.version}" + (f"-{self.flavour}" if self.flavour else "")

    @property
    def sdist_stem(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}"


SOURCES = {
    "llama.cpp": EngineSource(
        "llama.cpp", "llama-cpp-python", "0.3.36", "vendor/llama.cpp",
        ("-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_RPC=ON"),
        flavour="rpc",
        extra_binaries=(("ggml-rpc-server", "rpc-server"),),
    ),
    "ik_llama.cpp": EngineSource(
        "ik_llama.cpp", "ik-llama-cpp-python", "0.1.5", "vendor/ik_llama.cpp",
        ("-DGGML_IQK_FA_ALL_QUANTS=OFF",),
        needs_build_info=True,  # the sdist lacks the script that writes common/build-info.cpp
    ),
}

Progress = Callable[[str], None]


def cuda_usable() -> bool:
    """CUDA builds take hours on a small CPU and are useless without a driver: need nvcc AND a driver."""
    return shutil.which("nvcc") is not None and Path("/proc/driver/nvidia/version").exists()


def cpu_signature() -> str:
    """Builds use -march=native; a cached build is reused only on a CPU with the same flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return hashlib.sha1(" ".join(sorted(flags.split()[2:])).encode()).hexdigest()[:12]


def install_dir(source: EngineSource, settings: Settings) -> Path:
    return settings.engine_cache_dir / source.build_name


def _stamp(source: EngineSource, cuda: bool) -> dict[str, object]:
    return {"engine": source.engine, "package": source.package, "version": source.version,
            "cuda": cuda, "cpu": cpu_signature(), "cmake_args": list(COMMON_CMAKE_ARGS + source.cmake_args)}


_RPC_VERSION = re.compile(r"#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)")


def rpc_protocol_version(tree: Path) -> str | None:
    """The RPC protocol version ggml-rpc speaks in this source tree ("7.0.0"), None without ggml-rpc.
    rpc-server and llama-server --rpc refuse each other when their versions differ."""
    try:
        text = (tree / "ggml" / "include" / "ggml-rpc.h").read_text()
    except OSError:
        return None
    parts = dict(_RPC_VERSION.findall(text))
    if set(parts) != {"MAJOR", "MINOR", "PATCH"}:
        return None
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}"


def installed_stamp(source: EngineSource, settings: Settings) -> dict[str, object] | None:
    try:
        return json.loads((install_dir(source, settings) / "build.json").read_text())
    except (OSError, ValueError):
        return None


def _sdist(source: EngineSource, settings: Settings, progress: Progress) -> Path:
    sdists = settings.cache_dir / "sdists"
    path = sdists / f"{source.sdist_stem}.tar.gz"
    if path.is_file():
        return path
    progress(f"downloading {source.package}=={source.version} (source distribution) from PyPI")
    sdists.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           f"{source.package}=={source.version}", "-d", str(sdists)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        raise EngineBuildError(f"could not download {source.package}=={source.version}: "
                               f"{(done.stderr or done.stdout).strip()[-800:]}",
                               hint="check that PyPI is reachable (pip config list)")
    return path


def _unpack(source: EngineSource, sdist: Path, settings: Settings, progress: Progress) -> Path:
    src_root = settings.cache_dir / "src"
    tree = src_root / source.sdist_stem / source.subdir
    if (tree / "CMakeLists.txt").is_file():
        return tree
    progress(f"unpacking {sdist.name}")
    src_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(src_root, filter="data")
    if not (tree / "CMakeLists.txt").is_file():
        raise EngineBuildError(f"{sdist.name} has no {source.subdir}/CMakeLists.txt",
                               hint="the pinned sdist changed layout; update llamactl/engines/install.py")
    return tree


def write_build_info(tree: Path, version: str) -> None:
    """ik's sdist ships common/build-info.cpp.in but not common/cmake/build-info-gen-cpp.cmake, the
    script its build runs to fill it in (Ninja runs it on every first build). Write both."""
    values = {"BUILD_NUMBER": "0", "BUILD_COMMIT": f"ik-llama-cpp-python-{version}",
              "BUILD_COMPILER": "cc", "BUILD_TARGET": os.uname().machine}
    template = tree / "common" / "build-info.cpp.in"
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    target = tree / "common" / "build-info.cpp"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    script = tree / "common" / "cmake" / "build-info-gen-cpp.cmake"
    script.parent.mkdir(exist_ok=True)
    lines = [f'set({key} "{value}")' for key, value in values.items()]
    lines.append('configure_file("${CMAKE_CURRENT_LIST_DIR}/../build-info.cpp.in" '
                 '"${CMAKE_CURRENT_LIST_DIR}/../build-info.cpp")')
    script.write_text("\n".join(lines) + "\n")


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]")


def _run_logged(cmd: list[str], log: Path, progress: Progress, label: str) -> None:
    """Run a build step; show progress, keep the full output in `log`, show its tail on failure."""
    last_shown = -1.0
    started = time.monotonic()
    with log.open("a", buffering=1) as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            m = _NINJA_STEP.match(line)
            fraction = int(m.group(1)) / int(m.group(2)) if m else None
            if fraction is None and (m := _MAKE_STEP.match(line)):
                fraction = int(m.group(1)) / 100
            if fraction is not None and fraction - last_shown >= 0.1:
                last_shown = fraction
                progress(f"{label}: {fraction:4.0%} ({time.monotonic() - started:.0f} s)")
        code = proc.wait()
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise EngineBuildError(f"{label} failed (exit {code}); last lines:\n" + "\n".join(tail),
                               hint=f"full log: {log}")


def install(engine: str, settings: Settings, *, cuda: bool | None = None, jobs: int | None = None,
            force: bool = False, progress: Progress = print) -> Path:
    """Build (or reuse) llama-server for `engine`; return the installed binary."""
    source = SOURCES[engine]
    use_cuda = cuda_usable() if cuda is None else cuda
    dest = install_dir(source, settings)
    binary = dest / "bin" / "llama-server"
    wanted = _stamp(source, use_cuda)
    installed_stamp_now = installed_stamp(source, settings) or {}
    if not force and binary.is_file() and {k: installed_stamp_now.get(k) for k in wanted} == wanted:
        progress(f"{engine} {source.version}: already built ({binary})")
        return binary
    if shutil.which("cmake") is None:
        raise EngineBuildError("cmake is not installed", hint="apt-get install cmake (or pip install cmake)")
    tree = _unpack(source, _sdist(source, settings, progress), settings, progress)
    if source.needs_build_info:
        write_build_info(tree, source.version)
    build = settings.cache_dir / "build" / f"{source.build_name}{'-cuda' if use_cuda else ''}"
    log = settings.cache_dir / "build" / f"{source.build_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build / "Makefile").exists() else []
    configure = ["cmake", "-S", str(tree), "-B", str(build), *generator, *COMMON_CMAKE_ARGS,
                 *source.cmake_args, f"-DGGML_CUDA={'ON' if use_cuda else 'OFF'}"]
    progress(f"{engine} {source.version}: configuring ({'CUDA' if use_cuda else 'CPU only'}); log: {log}")
    _run_logged(configure, log, progress, f"{engine} configure")
    jobs = jobs or os.cpu_count() or 2
    targets = ["llama-server", *(target for target, _ in source.extra_binaries)]
    _run_logged(["cmake", "--build", str(build), "--target", *targets, "-j", str(jobs)], log, progress,
                f"{engine} build")
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    for target, name in (("llama-server", "llama-server"), *source.extra_binaries):
        built = build / "bin" / target
        if not built.is_file():
            raise EngineBuildError(f"the build finished but {built} is missing", hint=f"see {log}")
        installed = dest / "bin" / name
        tmp = installed.with_suffix(".tmp")
        shutil.copy2(built, tmp)
        tmp.replace(installed)
    stamp = dict(wanted)
    if source.flavour == "rpc":
        stamp["rpc_protocol"] = rpc_protocol_version(tree)
    (dest / "build.json").write_text(json.dumps(stamp, indent=2))
    progress(f"{engine} {source.version}: installed {binary}")
    return binary


def main(argv: list[str] | None = None) -> int:
    """scripts/install-engines: build the engines named on the command line (default: both)."""
    import argparse

    parser = argparse.ArgumentParser(prog="install-engines", description=__doc__)
    parser.add_argument("engines", nargs="*", metavar="ENGINE", help=f"one of {', '.join(SOURCES)} (default: all)")
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    unknown = [e for e in args.engines if e not in SOURCES]
    if unknown:
        parser.error(f"unknown engine {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    from llamactl.errors import ConfigError
    from llamactl.settings import load_settings

    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    try:
        for engine in args.engines or list(SOURCES):
            install(engine, settings, cuda=args.cuda, jobs=args.jobs, force=args.force,
                    progress=lambda msg: print(msg, flush=True))
    except EngineBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
