"""`llamactl top`: what the /ui page shows, in the terminal, from a local or remote `llamactl serve`.

`TopView` holds the picture (status snapshot, device memory, recent requests, alerts, load progress) and
turns it into rich renderables; `Feed` reads /llamactl/status, /llamactl/devices and the event stream
(/llamactl/events) over HTTP with the API key in the Authorization header. rich's Live redraws it.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import httpx
from rich.console import Group
from rich.table import Table
from rich.text import Text

from llamactl.errors import LlamactlError, NotRunning

BAR_WIDTH = 30
STATUS_EVERY_S = 2.0


class TopView:
    def __init__(self, max_requests: int = 15) -> None:
        self.status: dict[str, Any] = {}
        self.devices: dict[str, Any] | None = None
        self.requests: deque[dict[str, Any]] = deque(maxlen=max_requests)
        self.progress: dict[str, str] = {}  # profile -> its latest load line, while it starts
        self.connected = False

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "request":
            self.requests.appendleft(event)
        elif kind == "memory":
            self.devices = event
        elif kind == "engine":
            if event.get("state") == "starting" and event.get("progress"):
                self.progress[event["profile"]] = event["progress"]
            elif event.get("state") != "starting":
                self.progress.pop(event.get("profile", ""), None)

    # -- rendering ------------------------------------------------------------------------------------

    def render(self) -> Group:
        parts: list[Any] = [self._alerts(), self._devices(), self._ledger(), self._lanes(), self._classes(),
                            self._activity()]
        return Group(*[p for p in parts if p is not None])

    def _alerts(self) -> Text | None:
        alerts = self.status.get("alerts") or []
        if not alerts:
            return None
        return Text("\n".join(f"ALERT acceptance {a['acceptance']:.0%} < {a['threshold']:.0%} on "
                              f"{a['lane']}/{a['class']} ({a['drafted']} drafted)" for a in alerts), style="bold red")

    def _devices(self) -> Table:
        table = Table(title="devices", title_justify="left", expand=True)
        for col in ("device", "memory (ours | others | free)", "ours GiB", "others GiB", "free GiB", "total GiB"):
            table.add_column(col)
        for d in (self.devices or {}).get("devices", []):
            total = max(1, d["total_mib"])
            ours = round(BAR_WIDTH * d["ours_mib"] / total)
            others = round(BAR_WIDTH * d["others_mib"] / total)
            bar = Text("█" * ours, style="blue") + Text("█" * others, style="yellow") + Text(
                "░" * max(0, BAR_WIDTH - ours - others), style="dim")
            table.add_row(d["name"], bar, *(f"{d[k] / 1024:.1f}" for k in ("ours_mib", "others_mib", "free_mib",
                                                                            "total_mib")))
        if self.devices is None:
            table.add_row("(no sample yet)", "", "", "", "", "")
        return table

    def _ledger(self) -> Table | None:
        box = self.status.get("box")
        if not box:
            return None
        table = Table(title="memory ledger (MiB)", title_justify="left", expand=True)
        for col in ("device", "ours", "loading", "reserve", "others", "free"):
            table.add_column(col)
        for d in box["devices"]:
            table.add_row(d["device"], ", ".join(f"{p} {m}" for p, m in d["ours_mib"].items()) or "-",
                          ", ".join(f"{p} {m}" for p, m in d["loading_mib"].items()) or "-", str(d["reserve_mib"]),
                          "?" if d["others_mib"] is None else str(d["others_mib"]), str(d["free_mib"]))
        for profile, wait in (box.get("waiting") or {}).items():
            table.add_row(f"{profile} waits", wait["why"], "", "", "", "")
        return table

    def _lanes(self) -> Table:
        table = Table(title="lanes", title_justify="left", expand=True)
        for col in ("lane", "state", "active", "loaded", "queue", "in flight", "switching", "last decision"):
            table.add_column(col, overflow="fold")
        for lane in self.status.get("lanes", []):
            decision = lane.get("last_decision") or {}
            loading = [f"{m} ({self.progress[m][:60]})" if m in self.progress else m for m in lane.get("loading", [])]
            state = lane["state"] + (f": {', '.join(loading)}" if loading else "")
            switching = ("warm" if lane.get("keep_both_warm") else "hard") if lane.get("group") else "-"
            table.add_row(lane["lane"], state, lane["active"] + (" (forced)" if lane.get("forced") else ""),
                          ", ".join(lane.get("loaded", [])) or "-", str(lane.get("queue_depth", 0)),
                          str(lane.get("in_flight", 0)), switching, decision.get("reason", "") or "")
        return table

    def _classes(self) -> Table | None:
        classes = self.status.get("classes") or []
        if not classes:
            return None
        table = Table(title="traffic classes", title_justify="left", expand=True)
        for col in ("lane/class", "tok/s per member", "acceptance", "mean accepted length", "speedup"):
            table.add_column(col)
        for c in classes:
            table.add_row(f"{c['lane']}/{c['class']}", ", ".join(f"{m} {v:.1f}" for m, v in c["tok_s"].items()),
                          ", ".join(f"{m} {v:.0%}" for m, v in c["acceptance"].items()) or "-",
                          ", ".join(f"{m} {v:.2f}" for m, v in c["mean_accepted_length"].items()) or "-",
                          f"{c['speedup']:.2f}x" if c.get("speedup") else "-")
        return table

    def _activity(self) -> Table:
        table = Table(title="recent requests", title_justify="left", expand=True)
        for col in ("time", "lane", "member", "class", "status", "queue ms", "TTFT ms", "tok/s", "tokens", "drafted"):
            table.add_column(col)

        def ms(v: float | None) -> str:
            return "" if v is None else f"{v * 1000:.0f}"

        for r in self.requests:
            drafted = f"{r['accepted']}/{r['drafted']}" if r.get("drafted") else ""
            table.add_row(time.strftime("%H:%M:%S", time.localtime(r["at"])), r["lane"], r["member"], r["class"],
                          str(r["status"]), ms(r.get("queue_wait_s")), ms(r.get("ttft_s")),
                          f"{r['tok_s']:.1f}" if r.get("tok_s") else "",
                          f"{r.get('prompt_tokens') or 0}+{r.get('completion_tokens') or 0}", drafted)
        return table


class Feed:
    """HTTP to one `llamactl serve`: snapshots, and the event stream read in a thread into a queue."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=self.headers)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10_000)

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            response = self.client.get(self.url + path)
        except httpx.HTTPError as e:
            raise NotRunning(f"cannot reach llamactl serve at {self.url}: {e}",
                             hint="start it with `llamactl serve`, or pass --url") from None
        if response.status_code == 401:
            raise LlamactlError(f"{self.url} refused the API key" if self.headers else f"{self.url} needs an API key",
                                hint="set LLAMACTL_API_KEY or pass --key-file")
        if response.status_code == 501:
            return None  # not a daemon (no device sampling)
        response.raise_for_status()
        return response.json()

    def backlog(self) -> Iterator[dict[str, Any]]:
        """The recent events the stream starts with (up to its live mark)."""
        with self.client.stream("GET", self.url + "/llamactl/events") as response:
            for line in response.iter_lines():
                if line.startswith(": live"):
                    return
                if line.startswith("data:"):
                    yield json.loads(line[5:])

    def follow(self, stop: threading.Event) -> None:
        """Read the event stream into `self.events` until `stop` (reconnecting after an error)."""
        while not stop.is_set():
            try:
                with httpx.stream("GET", self.url + "/llamactl/events", headers=self.headers,
                                  timeout=httpx.Timeout(10.0, read=60.0)) as response:
                    for line in response.iter_lines():
                        if stop.is_set():
                            return
                        if line.startswith("data:"):
                            self._put(json.loads(line[5:]))
            except (httpx.HTTPError, ValueError):
                self._put(None)  # disconnected: shown, then retried
                stop.wait(2.0)

    def _put(self, event: dict[str, Any] | None) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            pass  # the screen only needs the latest picture


def snapshot(feed: Feed, view: TopView) -> TopView:
    view.status = feed.get("/llamactl/status") or {}
    view.devices = feed.get("/llamactl/devices")
    for event in feed.backlog():
        view.apply(event)
    return view


def run_live(feed: Feed, view: TopView, console) -> None:
    """Redraw on every event and every STATUS_EVERY_S until Ctrl-C."""
    from rich.live import Live

    stop = threading.Event()
    reader = threading.Thread(target=feed.follow, args=(stop,), name="llamactl-top-events", daemon=True)
    reader.start()
    last_status = time.monotonic()
    try:
        with Live(view.render(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                try:
                    event = feed.events.get(timeout=0.5)
                    if event is None:
                        view.connected = False
                    else:
                        view.apply(event)
                except queue.Empty:
                    pass
                if time.monotonic() - last_status >= STATUS_EVERY_S:
                    last_status = time.monotonic()
                    try:
                        view.status = feed.get("/llamactl/status") or view.status
                    except LlamactlError:
                        pass  # the stream's reconnect shows it
                live.update(view.render())
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
