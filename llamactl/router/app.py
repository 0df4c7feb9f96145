"""The ASGI app: every llama-server inference route by `model`, the streaming relay, and the Router that
owns the lanes.

Every route in routes.RELAYED (OpenAI chat / completions / responses / embeddings / audio, Anthropic
Messages, llama.cpp's /completion, /infill, /rerank, /tokenize, ...) is relayed to the engine the request's
`model` resolves to (profile, alias, switch group, or a client name through the model map), after a slot in
that lane's queue. Streams are relayed chunk by chunk as the engine sends them (no re-encoding, nothing
held back); a client that disconnects cancels the upstream request (its connection is closed, which
llama-server treats as a cancel). GET /props and /slots take ?model=; /upstream/PROFILE/ANY reaches
everything else an engine serves (its web UI included). GET /v1/models, /health, /metrics (Prometheus),
/llamactl/status; POST /llamactl/switch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.routing import Router as StarletteRouter
from starlette.types import Receive, Scope, Send

from llamactl.errors import LlamactlError
from llamactl.inputs import parse_json_object, switch_request
from llamactl.profiles import Profile
from llamactl.router.asgi import read_body, send_error, send_json, while_connected
from llamactl.box.scheduler import BoxCollector, BoxScheduler
from llamactl.router.backends import Backends, Upstream
from llamactl.router.body_fields import with_fields
from llamactl.router.catalog import Catalog, Routing
from llamactl.router.choices import host_candidates, hosts
from llamactl.router.per_request import PerRequestProbe
from llamactl.router.config_from_settings import EngineFacts, EngineFactsProbe, routing_from_settings
from llamactl.router.direct import EngineGet, Passthrough, redirect_to_slash
from llamactl.router.classifier import classify
from llamactl.router.errors import (
    BadRequest, EngineUnavailable, ModelNotFound, RouteNotServed, RouterError, UpstreamError, error_body,
    upstream_error_body,
)
from llamactl.router.alerts import AcceptanceAlerts, AlertConfig
from llamactl.router import dashboard
from llamactl.router.events import EventHub, stream as event_stream
from llamactl.router.lane import Lane, LaneConfig, Ticket
from llamactl.router.learned import fingerprint
from llamactl.router.routes import ENGINE_GETS, RELAYED, RouteInfo, multipart_field
from llamactl.router.shapes import ShapeError, check_shape
from llamactl.router.telemetry import (
    Sample, SSEScanner, Telemetry, acceptance_from_log, log_size, mean_accepted_length, parse_engine_metrics,
    scan_body,
)
from llamactl.router.upstream import (
    Body, UpstreamBroken, UpstreamConnectError, UpstreamPool, UpstreamResponse, UpstreamTimeout,
)

log = logging.getLogger("llamactl.router")
# The pinned ik writes a request's acceptance line before its response ends (measured: already there
# 0.1 ms after the last byte); a short wait covers a slow disk without reaching into the next request.
LOG_ACCEPTANCE_WAIT_S = 0.25

CLASS_HEADER = "x-llamactl-class"
WANTED_HEADERS = frozenset({b"content-type", b"accept", CLASS_HEADER.encode()})  # ASGI names are lower-case


@dataclass
class RouterConfig:
    lane: LaneConfig = field(default_factory=LaneConfig)
    max_body_bytes: int = 16 * 1024 * 1024  # the daemon sets it from LLAMACTL_MAX_BODY_BYTES
    extra_classes: frozenset[str] = frozenset()  # traffic classes a client may name beyond the built-in ones
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0  # longest silence from an engine mid-request
    stop_on_shutdown: bool = True
    routing: Routing | None = None  # None: from the Backends' settings (the daemon's), else none
    alerts: AlertConfig = field(default_factory=AlertConfig)


class Router:
    """Owns the catalog, one Lane per routable target, the telemetry and the upstream HTTP client."""

    def __init__(self, profiles: Iterable[Profile], backends: Backends, config: RouterConfig | None = None,
                 telemetry: Telemetry | None = None, box: BoxScheduler | None = None) -> None:
        self.config = config or RouterConfig()
        self.box = box  # the daemon's memory scheduler: every lane's loads ask it for room
        profiles = list(profiles)
        # The daemon's Backends carries its Settings: the model map and defaults, and where binaries are.
        settings = getattr(backends, "settings", None)
        routing = self.config.routing or (routing_from_settings(settings) if settings is not None else None)
        self.routing = routing
        self.catalog = Catalog.from_profiles(profiles, routing)
        self.engine_facts = EngineFactsProbe(settings) if settings is not None else None
        # Whether a drafting member's engine serves its plain twin per request: asked lazily (learn_per_request)
        self.per_request = PerRequestProbe(settings) if settings is not None else None
        self._per_request_asked: set[Lane] = set()
        self._per_request_known: dict[Lane, asyncio.Event] = {}  # set once a lane's self-tests are answered
        for problem in self.catalog.problems:
            log.warning("%s", problem)
        self.backends = backends
        self.telemetry = telemetry or Telemetry()
        self.events = EventHub()
        self.alerts = AcceptanceAlerts(self.telemetry.registry, self.config.alerts,
                                       on_change=lambda alert: self.events.publish("alert", **alert))
        self.control: Any = None  # the daemon's DaemonControl (logs, plan, devices); None when embedded
        self.profiles = {p.name: p for p in profiles}
        if box is not None:
            box.on_event = lambda what, data: self.events.publish("box", what=what, **data)
            self.telemetry.registry.register(BoxCollector(box))
        self.lanes = {name: self._new_lane(spec) for name, spec in self.catalog.lanes.items()}
        if self.per_request is not None and (typos := self.per_request.unknown(
                name for name, spec in self.catalog.lanes.items() if spec.is_group)):
            log.warning("LLAMACTL_ROUTER_PER_PROCESS_GROUPS names no switch group %s: use the "
                        "profiles' `group` names, or '*'", ", ".join(repr(t) for t in typos))
        self.pool: UpstreamPool | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._dispatchers: dict[Lane, asyncio.Task[None]] = {}
        self._engine_metrics: dict[str, tuple[float, dict[str, float]]] = {}  # profile -> (when, values)
        self.mean_len: dict[str, float] = {}  # profile -> mean accepted length at the last scrape
        self._log_claimed: dict[str, int] = {}  # engine log -> end of the last acceptance line used
        self._background: set[asyncio.Task[None]] = set()
        self._streams: set[asyncio.Task[Any]] = set()  # requests relaying a stream now (cut at shutdown)
        self.cutting_streams = False
        self.started_at = time.time()

    @asynccontextmanager
    async def running(self) -> AsyncIterator["Router"]:
        """Run the lane dispatchers and the HTTP client; on exit stop the engines (stop_on_shutdown: loads in
        progress are cancelled), then the dispatchers and the router's own telemetry tasks."""
        self.pool = UpstreamPool(connect_timeout_s=self.config.connect_timeout_s,
                                 read_timeout_s=self.config.read_timeout_s)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                for lane in self.lanes.values():
                    self._start_dispatcher(lane)
                try:
                    yield self
                finally:
                    if self.per_request is not None:
                        self.per_request.cancel_all()  # a self-test under way stops its server now
                    try:
                        if self.config.stop_on_shutdown:
                            await asyncio.gather(*(lane.shutdown() for lane in self.lanes.values()))
                    finally:
                        self._tasks = None
                        for task in [*self._dispatchers.values(), *self._background]:
                            task.cancel()
        finally:
            await self.pool.aclose()
            self.pool = None

    def _new_lane(self, spec) -> Lane:
        lane = Lane(spec, self.backends, self.telemetry, self.config.lane)
        if self.box is not None:
            lane.box = self.box
            lane.keep = any(getattr(self.profiles.get(m), "keep", False) for m in spec.members)
            self.box.register(lane)
        lane.on_event = lambda what, data: self.events.publish("lane", lane=lane.name, what=what, state=lane.state.value,
                                                                active=lane.active, **data)
        return lane

    def _start_dispatcher(self, lane: Lane) -> None:
        assert self._tasks is not None
        task = self._dispatchers[lane] = self._tasks.create_task(lane.run(), name=f"lane:{lane.name}")
        task.add_done_callback(lambda _t: self._dispatchers.pop(lane, None))

    async def reconfigure(self, profiles: Iterable[Profile], *, drain_timeout_s: float,
                          prepare: Callable[[dict[str, Lane]], None] | None = None) -> list[str]:
        """A reload: rebuild the catalog and the lanes. A lane whose members or their profiles changed is
        replaced: new requests wait in the new lane's queue while the old one drains what it holds (up to
        `drain_timeout_s`) and stops its engines; then the new lane runs (and starts members with the new
        profiles on demand). Unchanged lanes keep running untouched. `prepare` sees the new lanes before they
        run (the daemon's warm planning). Returns the names of the lanes replaced, added or removed."""
        profiles = {p.name: p for p in profiles}
        catalog = Catalog.from_profiles(profiles.values(), self.routing)
        for problem in catalog.problems:
            log.warning("%s", problem)
        kept: dict[str, Lane] = {}
        for name, spec in catalog.lanes.items():
            old = self.lanes.get(name)
            if old is not None and old.spec == spec and all(self.profiles.get(m) == profiles[m] for m in spec.members):
                kept[name] = old
        retired = [lane for name, lane in self.lanes.items() if kept.get(name) is not lane]
        changed_members = [name for name, old_profile in self.profiles.items()
                           if name not in profiles or fingerprint(profiles[name]) != fingerprint(old_profile)]
        fresh = {name: self._new_lane(spec) for name, spec in catalog.lanes.items() if name not in kept}
        if prepare is not None:
            prepare(fresh)
        self.catalog, self.profiles = catalog, profiles
        self.lanes = {name: kept.get(name) or fresh[name] for name in catalog.lanes}
        await asyncio.gather(*(self._retire(lane, drain_timeout_s) for lane in retired))
        for name in changed_members:  # what a member measured was for its old configuration
            self.telemetry.forget(name)
        if self._tasks is not None:
            for lane in fresh.values():
                self._start_dispatcher(lane)
        changed = sorted({lane.name for lane in retired} | set(fresh))
        if changed:
            log.info("reload: lanes rebuilt: %s", ", ".join(changed))
        return changed

    async def _retire(self, lane: Lane, drain_timeout_s: float) -> None:
        try:
            async with asyncio.timeout(drain_timeout_s):
                await lane.drained()
        except TimeoutError:
            log.warning("lane %s: %d requests still running after %.0f s; stopping its engines anyway",
                        lane.name, lane.in_flight, drain_timeout_s)
        if lane in self._dispatchers:
            await lane.shutdown()
            self._dispatchers[lane].cancel()

    def cut_streams(self) -> int:
        """The drain deadline: end every stream still running with an error event (not a bare close)."""
        self.cutting_streams = True
        for task in list(self._streams):
            task.cancel("llamactl is shutting down")
        return len(self._streams)

    def _spawn(self, coro, name: str) -> None:
        """A telemetry task of the router's own (cancelled at shutdown). Whatever it raises is logged, never
        raised into the router's task group: one that raised would end every lane with it."""
        if self._tasks is None:
            coro.close()
            return

        async def guarded() -> None:
            try:
                await coro
            except Exception:  # noqa: BLE001 - telemetry must never take the router down
                log.exception("router: %s failed; serving goes on", name)

        task = self._tasks.create_task(guarded(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def finish(self, lane: Lane, sample: Sample, upstream: Upstream, log_offset: int | None) -> None:
        """Record a finished request. A speculative one whose timings carry no drafting counts (the pinned
        ik_llama.cpp prints acceptance only in its log, just after the response) is recorded once its
        log line has been read, or has not come within LOG_ACCEPTANCE_WAIT_S. Only for single-slot members:
        with several slots, lines of concurrent requests interleave and could not be told apart."""
        if (log_offset is not None and upstream.log_path and sample.role == "spec" and not sample.draft_n
                and sample.status < 400 and self._tasks is not None):
            self._spawn(self._finish_from_log(lane, sample, upstream, log_offset), name=f"log:{sample.profile}")
            return
        self.record(sample, lane)
        self.after_request(lane, sample, upstream)

    def record(self, sample: Sample, lane: Lane | None = None) -> None:
        """A finished request: telemetry, the acceptance alerts, one event (all O(1), nothing awaited). A request
        of a lane a reload retired (draining) is counted, but is no evidence: it ran the old configuration."""
        self.telemetry.record(sample, evidence=lane is None or self.lanes.get(lane.name) is lane)
        if sample.status < 400:
            self.alerts.observe(sample.lane, sample.cls, sample.draft_n, sample.draft_accepted)
            observed = getattr(self.backends, "prompt_observed", None)  # the daemon's prompt cache judges a restore
            if observed is not None and sample.cache_n is not None:
                observed(sample.profile, sample.timed_prompt_n, sample.cache_n)
        self.events.publish("request", **request_event(sample))

    async def _finish_from_log(self, lane: Lane, sample: Sample, upstream: Upstream, log_offset: int) -> None:
        try:
            start = max(log_offset, self._log_claimed.get(upstream.log_path, 0))
            found = await acceptance_from_log(upstream.log_path, start, LOG_ACCEPTANCE_WAIT_S)
            if found is not None:
                acceptance, line_end = found
                self._log_claimed[upstream.log_path] = line_end  # a line counts for one request only
                sample.draft_n, sample.draft_accepted = acceptance.generated, acceptance.accepted
        except Exception as e:  # noqa: BLE001 - telemetry must never take the router down
            log.warning("reading acceptance from %s failed: %s", upstream.log_path, e)
        finally:
            self.record(sample, lane)
        self.after_request(lane, sample, upstream)

    def after_request(self, lane: Lane, sample: Sample, upstream: Upstream) -> None:
        """A speculative request finished: scrape the engine's /metrics (at most every 2 s per profile)
        for the mean accepted length, 1 + d(accepted) / d(verification steps) since the last scrape."""
        if not sample.draft_n or self._tasks is None:
            return
        last = self._engine_metrics.get(sample.profile)
        if last is not None and time.monotonic() - last[0] < 2.0:
            return
        # No earlier scrape: the counters since the engine started (they start at zero).
        before = last[1] if last else {}
        self._engine_metrics[sample.profile] = (time.monotonic(), before)
        self._spawn(self._scrape(lane.name, sample.profile, upstream, before), name=f"scrape:{sample.profile}")

    async def _scrape(self, lane: str, profile: str, upstream: Upstream, before: dict[str, float]) -> None:
        if self.pool is None:
            return
        headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
        try:
            async with asyncio.timeout(5):
                response = await self.pool.request(upstream.base_url, "GET", "/metrics", headers, b"")
                try:
                    text = (await response.read()).decode("utf-8", "replace") if response.status == 200 else ""
                finally:
                    await response.aclose()
        except (UpstreamBroken, UpstreamConnectError, UpstreamTimeout, TimeoutError):
            return
        values = parse_engine_metrics(text)
        if not values:
            return
        self._engine_metrics[profile] = (time.monotonic(), values)
        length = mean_accepted_length(before, values)
        if length is not None:
            self.telemetry.mean_len.labels(lane, profile).set(length)
            self.mean_len[profile] = round(length, 3)

    def learn_per_request(self, lane: Lane) -> None:
        """The first time a group could use it: find out, in a thread, whether its drafting members' engines serve
        their plain twins per request (the engine self-test; cached per binary). Until then, per process."""
        if self.per_request is None or not lane.spec.is_group or lane in self._per_request_asked:
            return
        self._per_request_asked.add(lane)
        known = self._per_request_known[lane] = asyncio.Event()
        if not self.per_request.allowed(lane.name):
            log.info("lane %s: served per process (LLAMACTL_ROUTER_PER_PROCESS_GROUPS)", lane.name)
            self._refuse_depths(lane, {m: "its group is kept per process (LLAMACTL_ROUTER_PER_PROCESS_GROUPS)"
                                       for m in lane.spec.choice_depths})
            known.set()
            return
        candidates = host_candidates(lane.spec.members, self.catalog.profiles)
        if candidates or lane.spec.choice_depths:
            self._spawn(self._learn_hosts(lane, candidates), name=f"per-request:{lane.name}")
        else:
            known.set()

    async def switch(self, lane: Lane, member: str, timeout_s: float) -> None:
        """`llamactl switch`: force `member` ('auto': back to the policy; MEMBER@DEPTH: that member at that depth,
        where its engine honours a per-request depth), returning once it serves."""
        self.learn_per_request(lane)
        if member != "auto" and member not in lane.spec.members:
            lane.check_choice(member)  # a bad name or depth is told at once
            await self.per_request_known(lane, timeout_s)  # is it served per request?
        await lane.force(None if member == "auto" else member, timeout_s=timeout_s)

    async def depth_known(self, lane: Lane) -> None:
        """Before a request naming MEMBER@DEPTH is queued: wait for the lane's self-tests (the first request after
        a start may come before their verdict), at most the queue's timeout; then a 503 saying to retry."""
        try:
            await self.per_request_known(lane, lane.config.queue_timeout_s)
        except TimeoutError:
            raise EngineUnavailable(f"'{lane.name}': its engine self-test has not said yet whether depths are "
                                    "chosen per request", hint="retry in a few seconds",
                                    headers={"Retry-After": "5"}) from None

    async def per_request_known(self, lane: Lane, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until `lane`'s self-tests are answered (a switch to MEMBER@DEPTH needs it)."""
        self.learn_per_request(lane)
        known = self._per_request_known.get(lane)
        if known is not None:
            async with asyncio.timeout(timeout_s):
                await known.wait()

    def _refuse_depths(self, lane: Lane, refused: dict[str, str]) -> None:
        """Members whose depths are not chosen per request: said once (a log line and a problem), and the lane
        told (a switch to MEMBER@DEPTH then says why)."""
        for member, why in refused.items():
            depths = ", ".join(map(str, lane.spec.choice_depths[member]))
            n_max = lane.spec.depths.get(member)
            problem = (f"profile '{member}' lists depths {depths}, but they are not chosen per request: {why}; "
                       f"it drafts at its n_max ({n_max})")
            log.warning("lane %s: %s", lane.name, problem)
            self.catalog.problems.append(problem)

    async def _learn_hosts(self, lane: Lane, candidates: dict[str, list[str]]) -> None:
        assert self.per_request is not None
        profiles = dict(self.catalog.profiles)
        honours = {}
        try:
            for member in sorted({s for found in candidates.values() for s in found} | set(lane.spec.choice_depths)):
                honours[member] = await asyncio.to_thread(self.per_request.verdict, profiles[member])
            found = hosts(candidates, honours)
            depths = {m: ds for m, ds in lane.spec.choice_depths.items() if honours.get(m)}
            refused = {m: "its engine does not honour a per-request draft depth (the engine self-test)"
                       for m in lane.spec.choice_depths if not honours.get(m)}
            self._refuse_depths(lane, refused)
            if found or depths or refused:
                lane.set_hosts(found, depths, refused)
            if not found and candidates:
                log.info("lane %s: its members' engines do not honour a per-request draft depth: switched per "
                         "process", lane.name)
        finally:
            self._per_request_known[lane].set()

    def lane(self, name: str) -> Lane:
        try:
            return self.lanes[name]
        except KeyError:
            raise ModelNotFound(f"no lane '{name}'; valid: {', '.join(self.lanes)}") from None

    def status(self) -> dict[str, Any]:
        routing = self.catalog.routing
        return {"lanes": [lane.status() for lane in self.lanes.values()], "problems": self.catalog.problems,
                "model_map": dict(routing.model_map), "default_model": routing.default_model,
                "route_default_models": dict(routing.route_defaults),
                "uptime_s": round(time.time() - self.started_at, 1), "alerts": self.alerts.active(),
                "classes": self.class_summary(), **({"box": self.box.status()} if self.box is not None else {}),
                **({"prompt_cache": cache.status()} if (cache := getattr(self.backends, "prompt_cache", None)) else {})}

    def class_summary(self) -> list[dict[str, Any]]:
        """Per (lane, class): each member's rolling tok/s and acceptance, the mean accepted length of its
        speculative members, and the effective speedup (best speculative tok/s over the plain member's)."""
        out = []
        for name, lane in self.lanes.items():
            for cls, ev in sorted(self.telemetry.evidence(name).items()):
                roles = {**lane.spec.members, **lane.choices()}  # depth choices are measured on their own
                spec = [m for m, role in roles.items() if role == "spec" and m in ev.tok_s]
                plain = [m for m, role in roles.items() if role != "spec" and m in ev.tok_s]
                speedup = (max(ev.tok_s[m] for m in spec) / ev.tok_s[plain[0]]
                           if spec and plain and ev.tok_s[plain[0]] else None)
                out.append({"lane": name, "class": cls, "tok_s": {m: round(v, 2) for m, v in ev.tok_s.items()},
                            "requests": dict(ev.n), "acceptance": {m: round(v, 4) for m, v in ev.acceptance.items()},
                            "mean_accepted_length": {m: self.mean_len[m] for m in spec
                                                     if m in self.mean_len and m in ev.acceptance},
                            "speedup": None if speedup is None else round(speedup, 3)})
        return out

    def lane_of_profile(self, profile: str) -> Lane:
        return next(lane for lane in self.lanes.values() if profile in lane.spec.members)

    async def facts(self, profile: str) -> EngineFacts:
        p = self.catalog.profiles[profile]
        if self.engine_facts is None:
            return EngineFacts(p.engine, "unknown", None)
        return self.engine_facts.cached(p) or await asyncio.to_thread(self.engine_facts.facts, p)

    async def check_route(self, lane: Lane, pin: str | None, info: RouteInfo) -> None:
        """Refuse, before queueing or loading anything, a route no member that could serve it offers (`pin`: the
        member profile pinned)."""
        members = [pin] if pin else list(lane.spec.members)
        profiles = [self.catalog.profiles[m] for m in members]
        for kind, key, flags in (("embed", "embeddings", ("--embedding", "--embeddings")),
                                 ("rerank", "reranking", ("--rerank", "--reranking"))):
            if info.kind == kind and not any(getattr(p, key) or set(flags) & set(p.extra_args) for p in profiles):
                raise BadRequest(f"profile '{members[0]}' does not serve {key} ({info.path})",
                                 hint=f"set `{key} = true` in a profile for a model made for it and send its name "
                                      "as `model`", extra={"profile": members[0]})
        facts = [await self.facts(m) for m in members]
        if all(f.routes is not None and info.path not in f.routes for f in facts):
            raise await self.missing_route(members[0], info.path)

    def check_shape(self, lane: Lane, pin: str | None, info: RouteInfo, payload: dict[str, Any]) -> None:
        """Refuse, before queueing, a body whose fields the route cannot take (shapes.py), token ids included:
        below the smallest vocabulary of the members that could serve it (their facts are known by now)."""
        members = [pin] if pin else list(lane.spec.members)
        known = [f.n_vocab for m in members if (f := self._facts_now(m)) is not None and f.n_vocab]
        try:
            check_shape(info.path, payload, min(known) if known else None)
        except ShapeError as e:
            raise BadRequest(str(e), extra={"param": e.field}) from None

    def _facts_now(self, profile: str) -> EngineFacts | None:
        return self.engine_facts.cached(self.catalog.profiles[profile]) if self.engine_facts else None

    async def missing_route(self, profile: str, path: str) -> RouteNotServed:
        facts = await self.facts(profile)
        return RouteNotServed(
            f"profile '{profile}' runs {facts.engine} (version {facts.version}), which does not serve POST {path}",
            hint=f"send {path} to a profile on an engine that has it (the pinned llama.cpp serves every relayed "
                 f"route), or use a newer {facts.engine} build; /upstream/{profile}/... reaches the routes this "
                 "engine does have",
            extra={"profile": profile, "engine": facts.engine, "engine_version": facts.version, "route": path})

    async def upstream_for(self, profile: str) -> Upstream:
        """A profile's engine for a request outside the queue (monitoring, /upstream): the running one at
        once, else loaded through its lane's queue like any request (and the slot handed straight back)."""
        lane = self.lane_of_profile(profile)
        upstream = lane.upstreams.get(profile)
        if upstream is not None:
            return upstream
        ticket = Ticket(cls="utility", pin=profile, evidence=False)
        upstream = await lane.acquire(ticket)
        lane.release(ticket)
        return upstream

    def model_entries(self) -> list[dict[str, Any]]:
        """/v1/models: every routable name with what serves it, its state, context size and engine."""
        data = []
        for name, route in sorted(self.catalog.names.items()):
            lane = self.lanes[route.lane]
            is_group = lane.spec.is_group and route.pin is None
            profile_name = route.pin or lane.active
            profile = self.catalog.profiles[profile_name]
            data.append({
                "id": name, "object": "model", "created": int(self.started_at), "owned_by": "llamactl",
                "llamactl": {
                    "kind": "group" if is_group else "profile", "is_group": is_group, "lane": lane.name,
                    "profile": None if is_group else profile_name, "members": dict(lane.spec.members),
                    "state": member_state(lane, profile_name), "engine": profile.engine,
                    "ctx_size": profile.ctx_size or self._train_ctx(profile), "serves": serves(profile),
                },
            })
        for glob, target in self.catalog.routing.model_map:
            data.append({"id": glob, "object": "model", "created": int(self.started_at), "owned_by": "llamactl",
                         "llamactl": {"kind": "mapped", "maps_to": target, "glob": any(c in glob for c in "*?[")}})
        return data


    def _train_ctx(self, profile: Profile) -> int | None:
        facts = self.engine_facts.cached(profile) if self.engine_facts else None
        return facts.train_ctx if facts else None

    async def probe_all(self) -> None:
        """Engine facts of every profile whose context size comes from its model (for /v1/models)."""
        for profile in self.catalog.profiles.values():
            if not profile.ctx_size:
                await self.facts(profile.name)


def request_event(sample: Sample) -> dict[str, Any]:
    """A finished request as the event stream shows it (names are the catalog's: bounded already)."""
    def r(value: float | None, digits: int = 3) -> float | None:
        return None if value is None else round(value, digits)

    return {"lane": sample.lane, "member": sample.profile, "role": sample.role, "class": sample.cls,
            "endpoint": sample.endpoint, "status": sample.status, "queue_wait_s": r(sample.queue_wait_s),
            "ttft_s": r(sample.ttft_s), "total_s": r(sample.total_s), "tok_s": r(sample.gen_tok_s, 2),
            "prompt_tokens": sample.prompt_tokens, "cached_tokens": sample.cache_n,
            "completion_tokens": sample.completion_tokens,
            "drafted": sample.draft_n, "accepted": sample.draft_accepted, "process": sample.process,
            "drafting": sample.drafting, "depth": sample.depth, "choice": sample.choice, "why": sample.why}


def member_state(lane: Lane, profile: str) -> str:
    """unloaded / loading / ready / failed, as /v1/models shows a profile."""
    if profile in lane.upstreams:
        return "ready"
    if profile == lane.active and lane.state in ("loading", "switching"):
        return "loading"
    if profile == lane.active and lane.state == "failed":
        return "failed"
    return "unloaded"


def serves(profile: Profile) -> str:
    return "embeddings" if profile.embeddings else "reranking" if profile.reranking else "generation"


# ---------------------------------------------------------------------------------------------- responses


def error_response(error: RouterError | LlamactlError) -> JSONResponse:
    if isinstance(error, RouterError):
        headers = {"x-llamactl-error-source": error.source, **error.headers}
        return JSONResponse(error.body(), status_code=error.status, headers=headers)
    body = error_body(str(error), "server_error", "llamactl_error", "llamactl")
    return JSONResponse(body, status_code=500, headers={"x-llamactl-error-source": "llamactl"})


# ---------------------------------------------------------------------------------------------- the relay


class Relay:
    """The ASGI endpoint for one relayed path (see routes.RELAYED)."""

    def __init__(self, router: Router, info: RouteInfo) -> None:
        self.router = router
        self.info = info
        self.path = info.path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        try:
            body = await read_body(receive, self.router.config.max_body_bytes)
        except RouterError as e:
            await self._error(send, e)
            return
        await while_connected(receive, self._handle(scope, body, send, arrived))

    async def _error(self, send: Send, error: RouterError) -> None:
        await send_error(send, error, anthropic=self.info.api == "anthropic")

    def _model_and_payload(self, body: bytes, headers: dict[str, str]) -> tuple[object, dict[str, Any]]:
        if self.info.multipart:
            content_type = headers.get("content-type", "")
            if not content_type.startswith("multipart/form-data"):
                raise BadRequest(f"{self.path} takes a multipart/form-data body (file, model, ...)")
            try:
                return multipart_field(body, content_type, "model"), {}
            except ValueError as e:
                raise BadRequest(f"{self.path}: {e}") from None
        try:
            payload = parse_json_object(body) if body else {}
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        return payload.get("model"), payload

    async def _handle(self, scope: Scope, body: bytes | bytearray, send: Send, arrived: float) -> None:
        router = self.router
        headers = {name.decode(): value.decode("latin-1") for name, value in scope["headers"] if name in WANTED_HEADERS}
        try:
            model, payload = self._model_and_payload(body, headers)
            route = router.catalog.resolve(model, self.path)
            lane = router.lanes[route.lane]
            router.learn_per_request(lane)
            await router.check_route(lane, route.profile, self.info)
            router.check_shape(lane, route.profile, self.info, payload)
            if route.pin is not None and route.pin != route.profile:
                await router.depth_known(lane)  # MEMBER@DEPTH: is the depth chosen per request there?
        except RouterError as e:
            await self._error(send, e)
            return
        cls = self.info.fixed_class or classify(payload, header=headers.get(CLASS_HEADER), alias=route.alias,
                                                extra_classes=router.config.extra_classes)
        # Work that is not generation goes to whichever member serves now: it is no evidence for switching.
        pin = route.pin or (lane.active if self.info.kind != "generate" and lane.spec.is_group else None)
        stream = bool(payload.get("stream"))
        del payload  # what was parsed is as large as the body: only the body itself is held while queued
        ticket = Ticket(cls=cls, pin=pin, enqueued_at=arrived, evidence=self.info.kind == "generate")
        sample: Sample | None = None
        retried = False
        while True:
            try:
                upstream = await lane.acquire(ticket, front=retried)
            except RouterError as e:
                router.telemetry.requests.labels(lane.name, pin or "", cls, self.path, str(e.status)).inc()
                await self._error(send, e)
                return
            assert ticket.profile is not None and ticket.role is not None
            single_slot = lane.spec.slots.get(ticket.profile, 1) == 1
            measured = self.info.kind == "generate"
            log_offset = log_size(upstream.log_path) if measured and ticket.role == "spec" and single_slot else None
            sample = Sample(lane=lane.name, profile=ticket.profile, role=ticket.role, cls=cls, endpoint=self.path,
                            status=0, queue_wait_s=(ticket.granted_at or arrived) - arrived)
            sent = body
            if ticket.choice is not None:
                c = ticket.choice
                sample.process, sample.drafting, sample.depth, sample.why = c.process, c.drafting, c.depth, c.why
                sample.choice = c.option
                fields = c.request_fields() if measured and not self.info.multipart else {}
                if fields:  # a drafting engine serving a plain member (drafting off), or a depth chosen per request
                    sent = with_fields(body, fields)
            try:
                outcome = await self._forward(upstream, sent, headers, send, stream, sample, arrived, ticket)
            except BaseException:
                lane.release(ticket)
                sample.status = sample.status or 499
                sample.total_s = time.perf_counter() - arrived
                router.record(sample, lane)
                raise
            if outcome == "retry" and not retried:
                # The engine was not there (crashed / restarting): back to the head of the queue, once.
                lane.release(ticket, upstream_failed=True)
                retried = True
                ticket = Ticket(cls=cls, pin=pin, enqueued_at=arrived, evidence=self.info.kind == "generate")
                continue
            lane.release(ticket, upstream_failed=outcome in ("retry", "broken"))
            if outcome == "retry":
                err = EngineUnavailable(f"llama-server for '{sample.profile}' refused the connection twice")
                sample.status = err.status
                await self._error(send, err)
            sample.total_s = time.perf_counter() - arrived
            router.finish(lane, sample, upstream, log_offset)
            return

    async def _forward(self, upstream: Upstream, body: Body, headers: dict[str, str], send: Send, stream: bool,
                       sample: Sample, arrived: float, ticket: Ticket) -> str:
        pool = self.router.pool
        assert pool is not None, "Router.running() is not active"
        out_headers = {"Content-Type": headers.get("content-type", "application/json"),
                       "Accept": headers.get("accept", "*/*")}
        if upstream.api_key:
            out_headers["Authorization"] = f"Bearer {upstream.api_key}"
        try:
            response = await pool.request(upstream.base_url, "POST", self.path, out_headers, body)
        except UpstreamConnectError:
            return "retry"
        except (UpstreamBroken, UpstreamTimeout) as e:
            err = UpstreamError(f"llama-server for '{sample.profile}' failed before answering: {e}",
                                extra={"profile": sample.profile})
            sample.status = err.status
            await self._error(send, err)
            return "broken"
        try:
            extra = [(b"x-llamactl-profile", sample.profile.encode()), (b"x-llamactl-class", sample.cls.encode()),
                     (b"x-llamactl-queue-wait-ms", f"{sample.queue_wait_s * 1000:.1f}".encode())]
            if sample.drafting is not None:
                extra += [(b"x-llamactl-process", (sample.process or sample.profile).encode()),
                          (b"x-llamactl-drafting", b"on" if sample.drafting else b"off")]
                if sample.depth is not None:
                    extra.append((b"x-llamactl-depth", str(sample.depth).encode()))
            content_type = response.headers.get("content-type", "application/json")
            if response.status >= 400:
                raw = await response.read()
                sample.status = response.status
                if response.status == 404 and b"File Not Found" in raw[:1000]:
                    err = await self.router.missing_route(sample.profile, self.path)
                    sample.status = err.status
                    await self._error(send, err)
                    return "ok"
                payload = upstream_error_body(response.status, raw, sample.profile)
                if self.info.api == "anthropic":
                    payload = {"type": "error", **payload}
                await send_json(send, response.status, payload,
                                 {"x-llamactl-error-source": "upstream", "x-llamactl-profile": sample.profile})
                return "ok"
            sample.status = response.status
            if not content_type.startswith("text/event-stream"):
                raw = await response.read()
                if self.info.kind == "generate" or self.info.kind == "embed":
                    scan_body(sample, raw)
                await send({"type": "http.response.start", "status": response.status, "headers": [
                    (b"content-type", content_type.encode()), (b"content-length", str(len(raw)).encode()), *extra]})
                await send({"type": "http.response.body", "body": raw})
                return "ok"
            return await self._relay_stream(response, send, sample, arrived, extra, content_type)
        finally:
            await response.aclose()

    async def _relay_stream(self, response: UpstreamResponse, send: Send, sample: Sample, arrived: float,
                            extra: list[tuple[bytes, bytes]], content_type: str) -> str:
        scanner = SSEScanner(sample)
        await send({"type": "http.response.start", "status": response.status, "headers": [
            (b"content-type", content_type.encode()), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), *extra]})
        task = asyncio.current_task()
        assert task is not None
        self.router._streams.add(task)
        try:
            async for chunk in response.aiter_body():
                scanner.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (UpstreamBroken, UpstreamTimeout) as e:
            # The engine died or broke the stream: tell the client in-band, then end the stream cleanly.
            err = error_body(f"llama-server for '{sample.profile}' broke the stream: {e}",
                             "upstream_error", "upstream_stream_broken", "upstream", profile=sample.profile)
            sample.status = 502
            await send({"type": "http.response.body", "body": self._stream_error(err), "more_body": False})
            return "broken"
        except asyncio.CancelledError:
            if not self.router.cutting_streams:
                raise  # the client went away
            task.uncancel()
            err = error_body("llamactl is shutting down: the stream was cut at the drain deadline "
                             "(LLAMACTL_DRAIN_TIMEOUT_S)", "server_error", "shutting_down", "llamactl")
            sample.status = 503
            await send({"type": "http.response.body", "body": self._stream_error(err), "more_body": False})
            return "broken"
        finally:
            self.router._streams.discard(task)
        if scanner.first_data_at is not None:
            sample.ttft_s = scanner.first_data_at - arrived
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return "ok"

    def _stream_error(self, err: dict[str, Any]) -> bytes:
        """An error as the last event of a stream, in the route's own stream format."""
        if self.info.api == "anthropic":
            return b"event: error\ndata: " + json.dumps({"type": "error", **err}).encode() + b"\n\n"
        return b"data: " + json.dumps(err).encode() + b"\n\n" + self.info.stream_end


# ---------------------------------------------------------------------------------------------- the app

SSE_HEADERS = dashboard.SSE_HEADERS


def create_app(router: Router, *, middleware: Sequence[Middleware] = ()) -> Starlette:
    """The ASGI app. `middleware` lets the service add authentication without touching the routes."""

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(_: Request) -> Response:
        await router.probe_all()
        return JSONResponse({"object": "list", "data": router.model_entries()})

    async def metrics(_: Request) -> Response:
        router.telemetry.refresh_gauges()
        return Response(generate_latest(router.telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    async def status(_: Request) -> Response:
        return JSONResponse(router.status())

    async def switch(request: Request) -> Response:
        try:
            group, member, timeout_s = switch_request(parse_json_object(await request.body()),
                                                      router.config.lane.queue_timeout_s)
        except ValueError as e:
            return error_response(BadRequest(f"{e}; send {{\"group\": ..., \"member\": ...}}"))
        try:
            lane = router.lane(group)
            await router.switch(lane, member, timeout_s)
        except RouterError as e:
            return error_response(e)
        except LlamactlError as e:
            return error_response(EngineUnavailable(str(e)))
        except TimeoutError:
            return error_response(EngineUnavailable(f"'{member}' did not become ready in time"))
        return JSONResponse(lane.status())

    async def events(_: Request) -> Response:
        return StreamingResponse(event_stream(router.events), media_type="text/event-stream", headers=SSE_HEADERS)

    async def not_found(request: Request, _exc: Exception) -> Response:
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", "invalid_request_error",
                                       "not_found", "llamactl"), status_code=404)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with router.running():
            yield

    routes = [Route(path, Relay(router, info), methods=["POST"]) for path, info in RELAYED.items()]
    routes += [Route(path, EngineGet(router, path), methods=["GET"]) for path in ENGINE_GETS]
    routes += [
        Route("/upstream/{profile}", redirect_to_slash),
        Route("/upstream/{profile}/{rest:path}", Passthrough(router)),
    ]
    routes += [
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/llamactl/status", status, methods=["GET"]),
        Route("/llamactl/switch", switch, methods=["POST"]),
        Route("/llamactl/events", events, methods=["GET"]),
        *dashboard.routes(router),
    ]
    app = Starlette(routes=routes, middleware=list(middleware), lifespan=lifespan,
                    exception_handlers={404: not_found})
    relays = {route.path: route.app for route in routes if isinstance(route.app, Relay)}
    app.router = _RelayFirst(routes=routes, lifespan=lifespan, relays=relays)
    return app


class _RelayFirst(StarletteRouter):
    """Starlette's router with one dict lookup first for the relayed POST routes (the hot path): no walk
    through the route list, no per-route regex match."""

    def __init__(self, *args: Any, relays: dict[str, Relay], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relays = relays

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            relay = self.relays.get(scope["path"])
            if relay is not None:
                await relay(scope, receive, send)
                return
        await super().app(scope, receive, send)
