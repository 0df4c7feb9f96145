"""Routable names: which lane (a switch group or a single profile) a request's `model` goes to.

A lane is what owns a queue. A switch group `g` (profiles with group = "g") is one lane with a
speculative member and a plain member; a profile without a group is a lane of its own. A request may
name the group, any profile or alias: naming a member of a group pins the request to that member.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

from llamactl.names import shown
from llamactl.policy import Role
from llamactl.profiles import Profile
from llamactl.router.errors import BadRequest, ModelNotFound

ENGINE_DEFAULT_SLOTS = {"llama.cpp": 4, "ik_llama.cpp": 1}


def slots_of(profile: Profile) -> int:
    return profile.parallel or ENGINE_DEFAULT_SLOTS.get(profile.engine, 1)


@dataclass(frozen=True)
class LaneSpec:
    name: str
    members: dict[str, Role]  # profile name -> role ("spec" / "plain")
    slots: dict[str, int]  # profile name -> concurrent requests it serves
    is_group: bool

    def member(self, role: Role) -> str | None:
        return next((name for name, r in self.members.items() if r == role), None)


@dataclass(frozen=True)
class Route:
    lane: str
    pin: str | None  # a specific member profile, or None: the lane decides
    alias: str | None  # the profile alias named, used as a traffic class hint


@dataclass
class Catalog:
    lanes: dict[str, LaneSpec] = field(default_factory=dict)
    names: dict[str, Route] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_profiles(cls, profiles: Iterable[Profile]) -> "Catalog":
        catalog = cls()
        groups: dict[str, list[Profile]] = {}
        singles: list[Profile] = []
        for profile in sorted(profiles, key=lambda p: p.name):
            (groups.setdefault(profile.group, []) if profile.group else singles).append(profile)
        for group, members in groups.items():
            roles: dict[str, Role] = {p.name: ("spec" if p.speculation.enabled else "plain") for p in members}
            if len(members) == 1:  # a group of one: a lane named after the group, nothing to switch
                catalog._add_lane(LaneSpec(group, roles, {members[0].name: slots_of(members[0])}, False), members)
                continue
            if len(members) != 2 or sorted(roles.values()) != ["plain", "spec"]:
                desc = ", ".join(f"{n} ({r})" for n, r in roles.items())
                catalog.problems.append(
                    f"switch group '{group}' needs exactly one speculative and one plain profile, has: {desc}; "
                    "its profiles are served on their own (a profile with `extends` copies its parent's group: give "
                    "a variant its own `group`)"
                )
                singles += members
                continue
            catalog._add_lane(LaneSpec(group, roles, {p.name: slots_of(p) for p in members}, True), members)
        for profile in singles:
            role: Role = "spec" if profile.speculation.enabled else "plain"
            catalog._add_lane(LaneSpec(profile.name, {profile.name: role}, {profile.name: slots_of(profile)}, False),
                              [profile])
        return catalog

    def _add_lane(self, spec: LaneSpec, members: list[Profile]) -> None:
        if spec.name in self.names:
            self.problems.append(f"'{spec.name}' is both a group and a profile name; the group wins")
        self.lanes[spec.name] = spec
        self.names[spec.name] = Route(spec.name, None, None)
        for profile in members:
            pin = profile.name if spec.is_group else None
            for name in dict.fromkeys([profile.name, profile.served_alias]):
                if name in self.names and self.names[name].lane != spec.name:
                    self.problems.append(f"name '{name}' is used twice; keeping the first ({self.names[name].lane})")
                    continue
                alias = profile.alias if profile.alias and name == profile.alias else None
                self.names.setdefault(name, Route(spec.name, pin, alias))

    def valid_names(self) -> list[str]:
        return sorted(self.names)

    def resolve(self, model: object) -> Route:
        if model is None or model == "":
            if len(self.lanes) == 1:
                return Route(next(iter(self.lanes)), None, None)
            raise BadRequest(
                "the request has no 'model'; name a profile, alias or switch group",
                extra={"valid_models": self.valid_names()},
            )
        if not isinstance(model, str):
            raise BadRequest(f"'model' must be a string, got {type(model).__name__}",
                             extra={"valid_models": self.valid_names()})
        route = self.names.get(model)
        if route is None:
            # The name is the client's: bounded and escaped in the message, and no fuzzy match on a huge one.
            close = difflib.get_close_matches(model, self.valid_names(), n=3) if len(model) <= 128 else []
            raise ModelNotFound(
                f"unknown model {shown(model)}; valid: {', '.join(self.valid_names()) or '(no profiles)'}",
                hint=f"did you mean {', '.join(repr(c) for c in close)}?" if close else None,
                extra={"valid_models": self.valid_names()},
            )
        return route
