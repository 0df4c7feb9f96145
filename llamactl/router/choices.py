"""Per request: which member's behaviour a request gets, which process serves it, drafting on or off, at which
depth, and why. Pure, no I/O.

A switch group's plain member can be served by a speculative twin's process with drafting turned off per
request (`"speculative.n_max": 0`), where that process's binary honours a per-request depth (the engine
self-test, engines/selftest.py) and the two profiles run the same model the same way: then a switch between
them is no reload and no drain, only a field in the next request. Elsewhere each member is its own process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llamactl.profiles import Profile
from llamactl.router.policy import Role

# What must be equal for two profiles to give the same output from one process (the rest, slots, timeouts,
# placement, only changes how fast or where it runs).
SAME_OUTPUT_KEYS = ("engine", "binary", "model", "ctx_size", "rope", "cache_type_k", "cache_type_v",
                    "embeddings", "reranking", "pooling")
DEPTH_FIELD = "speculative.n_max"
# Why a request got its member, bounded (a /metrics label): the lane's trigger for the member it serves.
WHY = frozenset({"policy", "explore", "forced", "pinned", "only", "loading"})


def twins(spec: Profile, plain: Profile) -> bool:
    """`spec` drafts with a draft model and is otherwise `plain`: its process can serve `plain`'s requests."""
    return spec.speculation.uses_draft_model and not plain.speculation.enabled and all(
        getattr(spec, key) == getattr(plain, key) for key in SAME_OUTPUT_KEYS)


def host_candidates(members: Mapping[str, Role], profiles: Mapping[str, Profile]) -> dict[str, list[str]]:
    """plain member -> its speculative twins, the first first (what could serve it, if the engine allows)."""
    plain = [m for m, role in members.items() if role == "plain" and m in profiles]
    return {p: found for p in plain
            if (found := [s for s, role in members.items()
                          if role == "spec" and s in profiles and twins(profiles[s], profiles[p])])}


def hosts(candidates: Mapping[str, list[str]], honours: Mapping[str, bool]) -> dict[str, str]:
    """plain member -> the first twin whose binary honours a per-request depth (`honours`: spec member -> the
    self-test's verdict; a member not in it is not known yet and hosts nothing)."""
    return {plain: found[0] for plain, twins_ in candidates.items()
            if (found := [s for s in twins_ if honours.get(s)])}


def process_for(member: str, hosts_: Mapping[str, str], running: frozenset[str] | set[str]) -> str:
    """The member whose engine serves `member`: its own where it runs (it may have more slots), else its host."""
    host = hosts_.get(member)
    return member if host is None or member in running else host


@dataclass(frozen=True)
class Choice:
    """What one request was given."""

    member: str  # whose behaviour it gets (the policy's choice, a pin, a forced member)
    process: str  # the member whose engine serves it
    drafting: bool
    depth: int | None  # drafting: the depth it drafts at (None: the engine's own); off: 0
    why: str  # one of WHY

    def request_fields(self) -> dict[str, int]:
        """What the request's body must carry: depth 0 where a drafting process serves a plain member."""
        return {DEPTH_FIELD: 0} if self.process != self.member and not self.drafting else {}


def choose(member: str, process: str, roles: Mapping[str, Role], depths: Mapping[str, int | None],
           why: str) -> Choice:
    drafting = roles.get(member) == "spec"
    return Choice(member, process, drafting, depths.get(member) if drafting else 0,
                  why if why in WHY else "policy")
