"""The routes behind the /ui page and `llamactl top` (besides /llamactl/status, /switch and /events):

- GET /ui, /ui/app.js, /ui/style.css: the page, plain files from the package (llamactl/ui/). They hold no
  data, so they are served without a key; everything they show comes from the routes below, which need one.
- GET /llamactl/logs/PROFILE?follow=1&lines=N: the engine's log as SSE (`llamactl logs -f`).
- POST /llamactl/profiles/PROFILE/load | unload | restart: through the profile's lane.
- GET /llamactl/plan/PROFILE: `llamactl plan` against the memory free now.
- GET /llamactl/devices: the latest memory sample (GPUs and host RAM: ours, others', free).

Logs, plans and devices are the daemon's (`router.control`, a DaemonControl); a router without one says so.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llamactl.errors import LlamactlError
from llamactl.names import shown
from llamactl.router.errors import RouterError, error_body

UI_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
            "style.css": "text/css; charset=utf-8"}
UI_PATHS = frozenset({"/ui", "/ui/", *(f"/ui/{name}" for name in UI_FILES)})  # open without a key: no data
UI_PAGES = frozenset({"/ui", "/ui/", "/ui/index.html"})  # what a link from another site may open (web_guard)
# Nothing the page loads may come from elsewhere (no CDN); no inline script either.
UI_HEADERS = {"content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
              "x-content-type-options": "nosniff", "cache-control": "no-cache", "referrer-policy": "no-referrer"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
ACTIONS = ("load", "unload", "restart")
MAX_LOG_LINES = 2000


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error" if status < 500 else "server_error", code,
                                   "llamactl"), status_code=status)


def _ui_file(name: str) -> bytes:
    return resources.files("llamactl.ui").joinpath(name).read_bytes()


def routes(router: Any) -> list[Route]:
    def known_profile(name: str) -> JSONResponse | None:
        if name not in router.catalog.profiles:
            return _error(404, f"no profile '{name[:64]}'; served: {', '.join(sorted(router.catalog.profiles))}",
                          "model_not_found")
        return None

    def control(what: str) -> Any:
        if router.control is None:
            return None
        return getattr(router.control, what, None)

    async def page(request: Request) -> Response:
        name = request.path_params.get("file") or "index.html"
        if name not in UI_FILES:
            return _error(404, "no such file in the dashboard", "not_found")
        return Response(_ui_file(name), media_type=UI_FILES[name], headers=UI_HEADERS)

    async def logs(request: Request) -> Response:
        name = request.path_params["profile"]
        if (refused := known_profile(name)) is not None:
            return refused
        text = request.query_params.get("lines", "200")
        if not (text.isascii() and text.isdigit()):
            return _error(400, f"'lines' must be a whole number of lines from the end (0 for none: with follow=1, "
                               f"new lines only; at most {MAX_LOG_LINES}), got {shown(text)}", "bad_request")
        lines = min(MAX_LOG_LINES, int(text))
        follow_log = control("follow_log")
        if follow_log is None:
            return _error(501, "engine logs are served by the daemon (`llamactl serve`) only", "not_supported")
        follow = request.query_params.get("follow", "0") in ("1", "true", "yes")

        async def body() -> AsyncIterator[bytes]:
            yield b": log of " + name.encode() + b"\n\n"
            async for line in follow_log(name, lines, follow):
                yield b"event: log\ndata: " + json.dumps({"profile": name, "line": line}).encode() + b"\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    in_progress: dict[str, str] = {}  # profile -> the page's action running on it (one at a time per profile)

    async def action(request: Request) -> Response:
        name, what = request.path_params["profile"], request.path_params["action"]
        if what not in ACTIONS:
            return _error(404, f"no action '{what[:32]}'; actions: {', '.join(ACTIONS)}", "not_found")
        if (refused := known_profile(name)) is not None:
            return refused
        if (running := in_progress.get(name)) is not None:
            # A second action would cancel the first one's load half-way, and the first would fail with words
            # about a stop nobody asked it for.
            return _error(409, f"a {running} of '{name}' is in progress; {what} it again once that has finished",
                          "action_in_progress")
        in_progress[name] = what
        try:
            return await run_action(name, what)
        finally:
            del in_progress[name]

    async def run_action(name: str, what: str) -> Response:
        lane = router.lane_of_profile(name)
        try:
            if what in ("unload", "restart"):
                await lane.unload(name, why=f"{what} from the dashboard")
            if what in ("load", "restart"):
                up = control("up")
                if up is not None:
                    await up(name)  # the daemon's `llamactl up`: clears a crash loop first
                else:
                    await lane.serve_once(name, timeout_s=router.catalog.profiles[name].load_timeout_s + 60)
        except RouterError as e:  # before LlamactlError, its base: a router error keeps its own status
            return JSONResponse(e.body(), status_code=e.status)
        except LlamactlError as e:
            return _error(503, str(e), "engine_unavailable")
        except TimeoutError:
            return _error(503, f"'{name}' did not become ready in time", "engine_unavailable")
        return JSONResponse(lane.status())

    async def plan(request: Request) -> Response:
        name = request.path_params["profile"]
        if (refused := known_profile(name)) is not None:
            return refused
        plan_of = control("plan")
        if plan_of is None:
            return _error(501, "plans are made by the daemon (`llamactl serve`) only", "not_supported")
        try:
            return JSONResponse(await plan_of(name))
        except LlamactlError as e:
            return JSONResponse({"profile": name, "error": str(e), "hint": e.hint}, status_code=422)

    async def devices(_: Request) -> Response:
        sample = control("devices")
        if sample is None:
            return _error(501, "device memory is sampled by the daemon (`llamactl serve`) only", "not_supported")
        return JSONResponse(await sample())

    return [
        Route("/ui", page, methods=["GET"]),
        Route("/ui/", page, methods=["GET"]),
        Route("/ui/{file}", page, methods=["GET"]),
        Route("/llamactl/logs/{profile}", logs, methods=["GET"]),
        Route("/llamactl/profiles/{profile}/{action}", action, methods=["POST"]),
        Route("/llamactl/plan/{profile}", plan, methods=["GET"]),
        Route("/llamactl/devices", devices, methods=["GET"]),
    ]
