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
from llamactl.router.policy import Role, split_depth

# What must be equal for two profiles to give the same output from one process (the rest, slots, timeouts,
# placement, only changes how fast or where it runs).
SAME_OUTPUT_KEYS = ("engine", "binary", "model", "ctx_size", "rope", "cache_type_k", "cache_type_v",
                    "embeddings", "reranking", "pooling")
DEPTH_FIELD = "speculative.n_max"
# A drafting member with `[speculation] depths` offers one choice per depth, named MEMBER@DEPTH, all served by
# the member's own engine (the depth goes in the request): the policy weighs them like members.
DEPTH_SEP = "@"
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


def depth_choice(member: str, depth: int) -> str:
    return f"{member}{DEPTH_SEP}{depth}"


def split_choice(name: str) -> tuple[str, int | None]:
    """'d1b@4' -> ('d1b', 4); a member's own name -> (name, None)."""
    return split_depth(name)


def member_of(pin: str | None) -> str | None:
    """The member profile a pin names: a depth choice's member, a member itself; None for no pin."""
    return split_choice(pin)[0] if pin is not None else None


def depth_choices(depths: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """MEMBER@DEPTH -> MEMBER, for every member whose depths are chosen per request."""
    return {depth_choice(member, d): member for member, ds in depths.items() for d in ds}


def entry_depth(depths: tuple[int, ...], n_max: int | None = None) -> int:
    """The depth a member with depth choices serves at when nothing chose one yet: the middle one (the policy
    then tries the depths beside it: policy._depth_beside)."""
    return sorted(depths)[len(depths) // 2]


def middle_out(depths: tuple[int, ...]) -> list[int]:
    """The depths from the middle one outwards (the order the policy breaks ties in: the entry depth first)."""
    ordered = sorted(depths)
    mid = len(ordered) // 2
    return sorted(ordered, key=lambda d: (abs(ordered.index(d) - mid), -d))


@dataclass(frozen=True)
class Choice:
    """What one request was given."""

    member: str  # whose behaviour it gets (the policy's choice, a pin, a forced member)
    process: str  # the member whose engine serves it
    drafting: bool
    depth: int | None  # drafting: the depth it drafts at (None: the engine's own); off: 0
    why: str  # one of WHY
    option: str | None = None  # the depth choice it was given (MEMBER@DEPTH), whose evidence it is; None: none

    def request_fields(self) -> dict[str, int]:
        """What the request's body must carry: its depth where it was given a depth choice; depth 0 where a
        drafting process serves a plain member."""
        if self.option is not None and self.depth is not None:
            return {DEPTH_FIELD: self.depth}
        return {DEPTH_FIELD: 0} if self.process != self.member and not self.drafting else {}

    @property
    def key(self) -> str:
        """What the policy calls it (its evidence's member): the depth choice, else the member."""
        return self.option or self.member


def choose(member: str, process: str, roles: Mapping[str, Role], depths: Mapping[str, int | None],
           why: str) -> Choice:
    """`member` may be a depth choice (MEMBER@DEPTH, of a member `roles` names): its member drafts at that depth."""
    why = why if why in WHY else "policy"
    base, depth = split_choice(member)
    if depth is not None and base in roles and member not in roles:
        return Choice(base, process, True, depth, why, member)
    drafting = roles.get(member) == "spec"
    return Choice(member, process, drafting, depths.get(member) if drafting else 0, why)
