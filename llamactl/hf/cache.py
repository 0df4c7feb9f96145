"""What `hf:` models are in huggingface_hub's cache, and removing one, through its cache manager
(scan_cache_dir, delete_files): no network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import HubError
from llamactl.hf.pull import HubConfig
from llamactl.hf.refs import HfRef
from llamactl.hf.select import gguf_groups, is_complete, select


@dataclass(frozen=True)
class CachedModel:
    repo: str
    commit: str
    refs: tuple[str, ...]  # the branches / tags that point at this commit here
    files: tuple[str, ...]  # a model: one file or a split GGUF's parts
    size_bytes: int
    first_path: Path
    complete: bool

    @property
    def reference(self) -> str:
        revision = "" if "main" in self.refs else f"@{self.refs[0] if self.refs else self.commit}"
        return f"hf:{self.repo}/{self.files[0]}{revision}"


def cached_models(config: HubConfig) -> list[CachedModel]:
    """Every GGUF model in the cache (a split GGUF as one), largest first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    if not config.cache_dir.is_dir():
        return []
    try:
        info = scan_cache_dir(config.cache_dir)
    except CacheNotFound:
        return []
    models = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            by_name = {f.file_path.relative_to(revision.snapshot_path).as_posix(): f for f in revision.files}
            for first, group in gguf_groups(by_name).items():
                models.append(CachedModel(
                    repo=repo.repo_id, commit=revision.commit_hash, refs=tuple(sorted(revision.refs)),
                    files=group.files, size_bytes=sum(by_name[f].size_on_disk for f in group.files),
                    first_path=revision.snapshot_path / first, complete=is_complete(group)))
    return sorted(models, key=lambda m: (-m.size_bytes, m.reference))


def remove_model(ref: HfRef, config: HubConfig) -> tuple[list[str], int]:
    """Remove the cached files `ref` names (a blob another revision still uses stays); returns (the files, the
    bytes freed). A HubError when nothing in the cache matches."""
    from huggingface_hub import scan_cache_dir

    repo = next((r for r in (scan_cache_dir(config.cache_dir).repos if config.cache_dir.is_dir() else ())
                 if r.repo_id == ref.repo and r.repo_type == "model"), None)
    wanted = ref.revision_or_main
    revisions = [] if repo is None else [r for r in repo.revisions if wanted in r.refs or r.commit_hash == wanted]
    if not revisions:
        raise HubError(f"{ref} is not in the Hugging Face cache ({config.cache_dir})",
                       hint="`llamactl models` lists what is there")
    revision = revisions[0]
    by_name = {f.file_path.relative_to(revision.snapshot_path).as_posix(): f for f in revision.files}
    selection = select(ref, by_name, where=f"{ref}")
    strategy = scan_cache_dir(config.cache_dir).delete_files(*(by_name[f] for f in selection.files))
    freed = strategy.expected_freed_size
    strategy.execute()
    left = scan_cache_dir(config.cache_dir)
    for cached in left.repos:
        for rev in cached.revisions:
            if cached.repo_id == ref.repo and rev.commit_hash == revision.commit_hash and not rev.files:
                left.delete_revisions(rev.commit_hash).execute()  # nothing left of it: its refs go too
    return list(selection.files), freed
