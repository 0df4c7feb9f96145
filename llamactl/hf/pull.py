"""Fetching what an `hf:` reference names into huggingface_hub's cache, through huggingface_hub (its resumable
downloads, its cache layout, HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE / HF_HUB_CACHE as users set them).

A reference whose files are all in the cache resolves with no network at all (`cached_model`); `pull_model`
asks the Hub for the repo's file list, picks the files (llamactl.hf.select) and downloads only those. Every
failure is a HubError saying what to do. A connection that drops mid-file is resumed by the library within the
same pull (a Range request); a download that fails for good leaves nothing that passes for complete (the
library writes to a temporary file, renamed only once whole) and the next pull fetches that file again, while
the parts of a split GGUF already fetched stay.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llamactl.errors import HubError, ProfileError
from llamactl.hf.refs import HfRef, is_safe_repo_path
from llamactl.hf.select import Selection, is_complete, select

_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubConfig:
    """The Hub settings, read when asked (huggingface_hub reads them once, when it is imported)."""

    endpoint: str
    token: str | None
    offline: bool
    cache_dir: Path

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HubConfig:
        env = os.environ if environ is None else environ
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                  "huggingface")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE
        return cls(endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"), token=env.get("HF_TOKEN") or None,
                   offline=offline, cache_dir=Path(os.path.expandvars(os.path.expanduser(cache))))

    def repo_folder(self, repo: str) -> Path:
        return self.cache_dir / ("models--" + repo.replace("/", "--"))


@dataclass
class PullProgress:
    """Where a pull is: bytes of all the reference's files, the file being fetched."""

    ref: str
    file: str
    done_bytes: int
    total_bytes: int
    started: float = field(default_factory=time.monotonic)
    resumed_bytes: int = 0  # already there when this pull began (a resumed download)

    @property
    def rate_bps(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done_bytes - self.resumed_bytes) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate_bps
        return (self.total_bytes - self.done_bytes) / rate if rate > 0 and self.total_bytes else None

    def text(self) -> str:
        total = f"/{_mb(self.total_bytes)}" if self.total_bytes else ""
        pct = f" ({100 * self.done_bytes // self.total_bytes}%)" if self.total_bytes else ""
        eta = f", ETA {self.eta_s:.0f} s" if self.eta_s is not None else ""
        return (f"downloading {self.ref} ({self.file}): {_mb(self.done_bytes)}{total} MB{pct}, "
                f"{self.rate_bps / 1e6:.1f} MB/s{eta}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


ProgressFn = Callable[[PullProgress], None]


class PullCancelled(Exception):
    """Raised inside a download when its caller says stop; the library removes the partial file."""


@dataclass(frozen=True)
class Remote:
    """A repo's GGUF files at one commit, with their sizes, as the Hub listed them."""

    commit: str
    sizes: dict[str, int | None]


# ---------------------------------------------------------------------------------------------
# The cache, no network


def cached_files(ref: HfRef, config: HubConfig) -> tuple[str, Path, list[str]] | None:
    """(commit, its snapshot folder, the files there) for the reference's revision, or None if never fetched."""
    folder = config.repo_folder(ref.repo)
    revision = ref.revision_or_main
    if _COMMIT.fullmatch(revision):
        commit = revision
    else:
        try:
            commit = (folder / "refs" / revision).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _COMMIT.fullmatch(commit):
            return None
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return commit, snapshot, files


def cached_model(ref: HfRef, config: HubConfig, *, where: str) -> Path | None:
    """The first file of what `ref` names if every file of it is in the cache, else None. No network."""
    found = cached_files(ref, config)
    if found is None:
        return None
    _, snapshot, files = found
    try:
        selection = select(ref, files, where=where)
    except ProfileError:  # not there (or ambiguous): the Hub's listing decides, and its error says why
        return None
    if not is_complete(selection):
        return None
    return snapshot / selection.first


# ---------------------------------------------------------------------------------------------
# The Hub


def remote_files(ref: HfRef, config: HubConfig, *, where: str) -> Remote:
    """The repo's file list at the reference's revision (one model-info request)."""
    from huggingface_hub import HfApi

    with hub_errors(ref, config, where=where):
        info = HfApi(endpoint=config.endpoint, token=config.token).model_info(
            ref.repo, revision=ref.revision, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or [] if is_safe_repo_path(s.rfilename)}
    return Remote(commit=str(info.sha or ref.revision_or_main), sizes=sizes)


def pull_model(ref: HfRef, config: HubConfig, *, where: str, progress: ProgressFn | None = None,
               cancelled: Callable[[], bool] | None = None) -> Path:
    """Download what `ref` names (only that) unless the cache has it; return its first file. Offline
    (HF_HUB_OFFLINE), only the cache is used."""
    if config.offline:
        cached = cached_model(ref, config, where=where)
        if cached is None:
            raise HubError(f"{where}: {ref} is not in the Hugging Face cache ({config.cache_dir}) and HF_HUB_OFFLINE "
                           "is set", hint=f"unset HF_HUB_OFFLINE and run `llamactl pull {ref}` once online")
        return cached
    try:
        remote = remote_files(ref, config, where=where)
    except HubError as e:
        if not getattr(e, "network", False):
            raise
        cached = cached_model(ref, config, where=where)  # the Hub is out of reach: what we have will do
        if cached is None:
            raise
        return cached
    selection = select(ref, remote.sizes, where=where)
    return _download(ref, selection, remote, config, where=where, progress=progress, cancelled=cancelled)


def _download(ref: HfRef, selection: Selection, remote: Remote, config: HubConfig, *, where: str,
              progress: ProgressFn | None, cancelled: Callable[[], bool] | None) -> Path:
    from huggingface_hub import hf_hub_download

    total = sum(remote.sizes.get(f) or 0 for f in selection.files)
    have = {f: _bytes_present(config, ref.repo, remote.commit, f) for f in selection.files}
    state = PullProgress(ref=str(ref), file=selection.first, done_bytes=sum(have.values()), total_bytes=total)
    state.resumed_bytes = state.done_bytes
    _check_room(config, total - state.done_bytes, where=where, ref=ref)
    finished = dict(have)  # file -> its bytes, for the files not being fetched right now
    first: Path | None = None
    for name in selection.files:
        state.file = name
        finished.pop(name)
        bar = _bar_class(state, sum(finished.values()), progress, cancelled)
        with hub_errors(ref, config, where=where, file=name):
            path = Path(hf_hub_download(ref.repo, name, revision=ref.revision_or_main, cache_dir=config.cache_dir,
                                        endpoint=config.endpoint, token=config.token, tqdm_class=bar))
        finished[name] = path.stat().st_size
        state.done_bytes = sum(finished.values())
        if progress is not None:
            progress(state)
        first = first or path
    assert first is not None
    return first


def _bytes_present(config: HubConfig, repo: str, commit: str, name: str) -> int:
    """Bytes of `name` already complete in the snapshot (a partial download is counted as the library resumes
    it, through the bar's `initial`)."""
    path = config.repo_folder(repo) / "snapshots" / commit / name
    return path.stat().st_size if path.is_file() else 0


def _check_room(config: HubConfig, needed: int, *, where: str, ref: HfRef) -> None:
    probe = config.cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(f"{where}: {ref} needs {needed / 1e9:.1f} GB but {probe} has {free / 1e9:.1f} GB free; "
                       "nothing was downloaded", hint="free some space, or set HF_HUB_CACHE to a disk with room")


def _bar_class(state: PullProgress, before: int, progress: ProgressFn | None,
               cancelled: Callable[[], bool] | None) -> type:
    """A class huggingface_hub can use as its tqdm: each update moves `state` on and may stop the download."""

    class Bar:
        def __init__(self, *args, initial: int = 0, **kwargs) -> None:
            self.n = initial
            state.resumed_bytes += initial  # a partial download the library resumes: not this pull's rate
            self._report()

        def update(self, n: int = 1) -> None:
            self.n += n
            self._report()

        def _report(self) -> None:
            state.done_bytes = before + self.n
            if cancelled is not None and cancelled():
                raise PullCancelled(f"download of {state.ref} stopped")
            if progress is not None:
                progress(state)

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc) -> None:
            self.close()

    return Bar


class hub_errors:
    """Maps huggingface_hub's and the network's exceptions to a HubError naming the reference and the fix."""

    def __init__(self, ref: HfRef, config: HubConfig, *, where: str, file: str | None = None) -> None:
        self.ref, self.config, self.where, self.file = ref, config, where, file

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, (HubError, PullCancelled)) or not isinstance(error, Exception):
            return False
        raise self._mapped(error) from error

    def _mapped(self, error: Exception) -> HubError:
        import httpx2
        from huggingface_hub import errors as hf

        ref, where, endpoint = self.ref, self.where, self.config.endpoint
        what = f"{where}: {ref}"
        if isinstance(error, hf.GatedRepoError):
            token = "the token in HF_TOKEN has no access" if self.config.token else "no HF_TOKEN is set"
            return HubError(f"{what}: {ref.repo} is a gated repo and {token}",
                            hint=f"accept its terms at {endpoint}/{ref.repo}, then set HF_TOKEN to a token of that "
                                 "account (`hf auth login` stores one)")
        if isinstance(error, hf.RevisionNotFoundError):
            return HubError(f"{what}: {ref.repo} has no revision '{ref.revision_or_main}'",
                            hint="use a branch, tag or commit of the repo after '@'")
        if isinstance(error, hf.RepositoryNotFoundError):
            return HubError(f"{what}: no repo {ref.repo} on {endpoint} (or it is private and "
                            + ("HF_TOKEN has no access)" if self.config.token else "no HF_TOKEN is set)"),
                            hint="check OWNER/REPO on the Hub; for a private repo set HF_TOKEN")
        if isinstance(error, hf.EntryNotFoundError):
            return HubError(f"{what}: {ref.repo} has no file '{self.file or ref.path}'",
                            hint="check the file name on the repo's page (Files and versions)")
        if isinstance(error, hf.OfflineModeIsEnabled):
            return HubError(f"{what}: not in the cache and huggingface_hub is in offline mode",
                            hint="unset HF_HUB_OFFLINE and pull once online")
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return HubError(f"{what}: the disk filled up while downloading into {self.config.cache_dir}; the "
                            "partial file was removed",
                            hint="free some space (or set HF_HUB_CACHE elsewhere), then `llamactl pull` again")
        if isinstance(error, (httpx2.TransportError, hf.HfHubHTTPError, ConnectionError, TimeoutError)):
            mapped = HubError(f"{what}: the Hub at {endpoint} could not be reached or failed ({_short(error)}); "
                              "nothing incomplete was kept (files already whole stay in the cache)",
                              hint="check the network (and HF_ENDPOINT), then `llamactl pull` again")
            mapped.network = True  # type: ignore[attr-defined]
            return mapped
        if isinstance(error, OSError):
            return HubError(f"{what}: cannot write into {self.config.cache_dir}: {error.strerror or error}",
                            hint="check that HF_HUB_CACHE is a writable folder")
        return HubError(f"{what}: the download failed: {_short(error)}", hint="`llamactl pull` again")


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(error).__name__
