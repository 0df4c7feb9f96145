"""The dashboard's own routes over real loopback HTTP with fake engines: `lines` of the log route (0 is none of
the tail, and with follow=1 new lines only; a negative or non-number is a 400 naming it), and two concurrent
actions on one profile (the second is a 409 naming the first; the first is not failed by it)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llamactl.supervisor.logs import follow_lines, tail_lines
from tests.fakes.fast_backend import FakeBackends, FakeConfig
from tests.router_harness import fake_backends, profile, served


def write(path: Path, *lines: str) -> None:
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)


def test_zero_lines_is_none_of_the_tail(tmp_path: Path):
    log = tmp_path / "p.log"
    write(log, "one", "two", "three")
    assert tail_lines(log, 0) == [] and tail_lines(log, -3) == []
    assert tail_lines(log, 2) == ["two", "three"]


def test_zero_lines_with_follow_gives_new_lines_only(tmp_path: Path):
    log = tmp_path / "p.log"
    write(log, "old one", "old two")

    async def first_line() -> str:
        lines = follow_lines(log, 0, True, poll_s=0.01)
        task = asyncio.ensure_future(anext(lines))
        await asyncio.sleep(0)  # one turn of the loop: the follower has taken the file's end (no I/O waited on)
        write(log, "new")
        try:
            return await asyncio.wait_for(task, 10)
        finally:
            await lines.aclose()

    assert asyncio.run(first_line()) == "new"


class FakeControl:
    """The daemon's log follower, over a file of the test's."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def follow_log(self, profile: str, lines: int, follow: bool):
        async for line in follow_lines(self.path, lines, follow):
            yield line


def test_log_route_lines(tmp_path: Path):
    log = tmp_path / "solo.log"
    write(log, "alpha", "beta")
    profiles = [profile("solo")]
    backends = fake_backends(profiles)
    with served(profiles, backends) as (url, router):
        router.control = FakeControl(log)
        assert "beta" in httpx.get(f"{url}/llamactl/logs/solo?lines=1", timeout=10).text
        none = httpx.get(f"{url}/llamactl/logs/solo?lines=0", timeout=10)
        assert none.status_code == 200 and "alpha" not in none.text and "beta" not in none.text
        for bad in ("-1", "-200", "x", "1.5", ""):
            r = httpx.get(f"{url}/llamactl/logs/solo", params={"lines": bad}, timeout=10)
            assert r.status_code == 400, (bad, r.status_code)
            assert "'lines'" in r.json()["error"]["message"]


class GatedBackends(FakeBackends):
    """A start that waits for the test to let it finish (a slow load, held still)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.gate = threading.Event()

    async def ensure_ready(self, profile_name: str):
        if profile_name not in self.servers:
            self.entered.set()
            await asyncio.to_thread(self.gate.wait, 30)
        return await super().ensure_ready(profile_name)


@pytest.mark.parametrize("second", ["restart", "load", "unload"])
def test_a_second_action_while_one_runs_is_a_409_and_the_first_succeeds(second):
    profiles = [profile("solo")]
    backends = GatedBackends({"solo": FakeConfig(name="solo")})
    with served(profiles, backends) as (url, _router), ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(httpx.post, f"{url}/llamactl/profiles/solo/restart", timeout=30)
            assert backends.entered.wait(10), "the first restart never started the engine"
            again = httpx.post(f"{url}/llamactl/profiles/solo/{second}", timeout=30)
        finally:
            backends.gate.set()
        assert again.status_code == 409, again.text
        message = again.json()["error"]["message"]
        assert "restart of 'solo' is in progress" in message
        done = first.result()
        assert done.status_code == 200, done.text
        assert httpx.post(f"{url}/llamactl/profiles/solo/{second}", timeout=30).status_code == 200
