"""Routable names: which lane (a switch group or a single profile) a request's `model` goes to.

A lane is what owns a queue. A switch group `g` (profiles with group = "g") is one lane with at most one
plain member and any number of speculative ones (drafters, depths, n-gram kinds, MTP); a profile without a group is a lane of its own. A request may
name the group, any profile or alias: naming a member of a group pins the request to that member, and naming
MEMBER@DEPTH (a depth in the member's `[speculation] depths`) pins it to that member drafting at that depth (not
listed among the names: one per depth would crowd a client's model picker).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from llamactl.engines import facts as engine_facts
from llamactl.names import shown
from llamactl.router.choices import member_of, split_choice
from llamactl.router.policy import Role
from llamactl.profiles import Profile
from llamactl.router.errors import BadRequest, ModelNotFound


def slots_of(profile: Profile) -> int:
    return engine_facts.slots(profile.engine, profile.parallel)


@dataclass(frozen=True)
class LaneSpec:
    name: str
    members: dict[str, Role]  # profile name -> role ("spec" / "plain")
    slots: dict[str, int]  # profile name -> concurrent requests it serves
    is_group: bool
    depths: dict[str, int | None] = field(default_factory=dict)  # speculative member -> its n_max (None: default)
    # drafting member -> the depths it may draft at per request (`[speculation] depths`), offered as choices
    # MEMBER@DEPTH where its engine honours a per-request depth (the lane is told: Lane.set_hosts)
    choice_depths: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def member(self, role: Role) -> str | None:
        return next((name for name, r in self.members.items() if r == role), None)


@dataclass(frozen=True)
class Route:
    lane: str
    pin: str | None  # a specific member profile (or MEMBER@DEPTH, one of its depths), or None: the lane decides
    alias: str | None  # the profile alias named, used as a traffic class hint

    @property
    def profile(self) -> str | None:
        """The member profile pinned (a pinned depth's member), or None."""
        return member_of(self.pin)


@dataclass(frozen=True)
class Routing:
    """How names a client sends reach a profile when they are not a profile's own: `model_map` (glob ->
    profile, alias or group; first match wins, e.g. "claude-*" -> "coding"), and what a request without
    `model` gets: `route_defaults` (path -> name, e.g. "/infill" -> "coder"), then `default_model`."""

    model_map: tuple[tuple[str, str], ...] = ()
    default_model: str | None = None
    route_defaults: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Catalog:
    lanes: dict[str, LaneSpec] = field(default_factory=dict)
    names: dict[str, Route] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    routing: Routing = field(default_factory=Routing)
    profiles: dict[str, Profile] = field(default_factory=dict)

    @classmethod
    def from_profiles(cls, profiles: Iterable[Profile], routing: Routing | None = None) -> "Catalog":
        catalog = cls()
        groups: dict[str, list[Profile]] = {}
        singles: list[Profile] = []
        for profile in sorted(profiles, key=lambda p: p.name):
            catalog.profiles[profile.name] = profile
            (groups.setdefault(profile.group, []) if profile.group else singles).append(profile)
        for group, members in groups.items():
            roles: dict[str, Role] = {p.name: ("spec" if p.speculation.enabled else "plain") for p in members}
            if len(members) == 1:  # a group of one: a lane named after the group, nothing to switch
                catalog._add_lane(LaneSpec(group, roles, {members[0].name: slots_of(members[0])}, False), members)
                continue
            if list(roles.values()).count("plain") > 1:
                desc = ", ".join(f"{n} ({r})" for n, r in roles.items())
                catalog.problems.append(
                    f"switch group '{group}' may have one plain profile and any number of speculative ones, has: "
                    f"{desc}; its profiles are served on their own (a profile with `extends` copies its parent's "
                    "group: give a variant its own `group`)"
                )
                singles += members
                continue
            depths = {p.name: p.speculation.n_max for p in members if p.speculation.enabled}
            choice_depths = {p.name: tuple(p.speculation.depths) for p in members
                             if p.speculation.uses_draft_model and p.speculation.depths}
            catalog._add_lane(LaneSpec(group, roles, {p.name: slots_of(p) for p in members}, True, depths,
                                       choice_depths), members)
        for profile in singles:
            role: Role = "spec" if profile.speculation.enabled else "plain"
            catalog._add_lane(LaneSpec(profile.name, {profile.name: role}, {profile.name: slots_of(profile)}, False),
                              [profile])
        catalog.routing = catalog._checked(routing or Routing())
        return catalog

    def _checked(self, routing: Routing) -> Routing:
        """Drop map entries and defaults that name nothing served, each with a problem saying so."""
        def known(target: str, where: str) -> bool:
            if target in self.names:
                return True
            self.problems.append(f"{where} names '{target}', which is not a served profile, alias or group; ignored")
            return False

        model_map = tuple((glob, target) for glob, target in routing.model_map if known(target, f"model map '{glob}'"))
        default = routing.default_model if routing.default_model and known(
            routing.default_model, "the default model") else None
        route_defaults = {path: name for path, name in routing.route_defaults.items()
                          if known(name, f"the default model for {path}")}
        return Routing(model_map, default, route_defaults)

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

    def _depth_route(self, model: str) -> Route | None:
        """MEMBER@DEPTH, a depth the group member drafts at per request: pinned to that choice."""
        member, depth = split_choice(model)
        route = self.names.get(member) if depth is not None else None
        if route is None or route.pin != member or depth not in self.lanes[route.lane].choice_depths.get(member, ()):
            return None
        return Route(route.lane, model, None)

    def valid_names(self) -> list[str]:
        return sorted(self.names)

    def mapped(self, model: str) -> str | None:
        """The served name a client's own model name is mapped to, or None."""
        return next((target for glob, target in self.routing.model_map if fnmatchcase(model, glob)), None)

    def resolve(self, model: object, path: str | None = None) -> Route:
        if model is None or model == "":
            if len(self.lanes) == 1:
                return Route(next(iter(self.lanes)), None, None)
            fallback = self.routing.route_defaults.get(path or "") or self.routing.default_model
            if fallback:
                return self.names[fallback]
            raise BadRequest(
                "the request has no 'model'; name a profile, alias or switch group",
                hint="or set LLAMACTL_DEFAULT_MODEL (LLAMACTL_ROUTE_DEFAULT_MODELS per route)",
                extra={"valid_models": self.valid_names()},
            )
        if not isinstance(model, str):
            raise BadRequest(f"'model' must be a string, got {type(model).__name__}",
                             extra={"valid_models": self.valid_names()})
        route = self.names.get(model) or self._depth_route(model)
        if route is None:
            target = self.mapped(model)
            if target is not None:
                return self.names[target]
            # The name is the client's: bounded and escaped in the message, and no fuzzy match on a huge one.
            close = difflib.get_close_matches(model, self.valid_names(), n=3) if len(model) <= 128 else []
            raise ModelNotFound(
                f"unknown model {shown(model)}; valid: {', '.join(self.valid_names()) or '(no profiles)'}",
                hint=f"did you mean {', '.join(repr(c) for c in close)}?" if close else (
                    "map client model names to profiles with LLAMACTL_MODEL_MAP (e.g. 'claude-*=coding')"),
                extra={"valid_models": self.valid_names()},
            )
        return route
