"""Older trees of llamactl beside this one, for the benchmarks that compare them in one run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree_of(rev: str) -> Path:
    """The llamactl package and bundled profiles of `rev`, unpacked into a temporary directory. Run it with
    that directory as the working directory and on PYTHONPATH: `python -m` puts the working directory first,
    so a command run from this checkout would import this checkout's package whatever PYTHONPATH says."""
    out = Path(tempfile.mkdtemp(prefix="llamactl-bench-tree-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "llamactl", "profiles"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out


def tree_env(tree: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), **extra}


def llamactl_file(tree: Path) -> str:
    """Where `python -m llamactl` run in `tree` imports llamactl from: said, not assumed."""
    return subprocess.run([sys.executable, "-c", "import llamactl; print(llamactl.__file__)"], cwd=tree,
                          capture_output=True, text=True, env=tree_env(tree)).stdout.strip()
