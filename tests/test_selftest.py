"""The per-request depth self-test: the verdict from what the engine reported (pure), its cache by binary, a
cancel that leaves nothing running, and both real engines (ik honours a per-request depth, mainline ignores it)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil
import pytest

from llamactl.engines import selftest
from llamactl.engines.selftest import Observation, SelfTest, Verdict, cached, judge
from tests.conftest import FAKE_SERVER, require_engine


def test_depth_zero_is_honoured_only_when_it_drafts_nothing_and_the_other_request_drafts():
    assert judge(Observation(None, None), Observation(None, 6)).honoured  # ik: the log line only
    assert judge(Observation(0, None), Observation(6, None)).honoured  # timings
    ignored = judge(Observation(6, None), Observation(6, None))
    assert not ignored.honoured and "still drafted 6" in ignored.detail
    assert not judge(Observation(None, 3), Observation(None, 6)).honoured  # a log line for the depth-0 one
    unknown = judge(Observation(0, None), Observation(0, None))
    assert not unknown.honoured and "cannot tell" in unknown.detail


def test_the_verdict_is_cached_per_binary_and_a_changed_binary_is_tested_again(tmp_path: Path):
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    assert cached(binary, tmp_path) is None
    selftest._store(binary, tmp_path, Verdict(True, "measured"))
    assert cached(binary, tmp_path) == Verdict(True, "measured")
    # run() answers from the cache without starting anything (the model does not even exist)
    assert SelfTest("llama.cpp", binary, tmp_path / "missing.gguf", tmp_path).run() == Verdict(True, "measured")
    os.utime(binary, ns=(1, 1))
    assert cached(binary, tmp_path) is None
    selftest.cache_file(binary, tmp_path).parent.mkdir(parents=True, exist_ok=True)
    selftest.cache_file(binary, tmp_path).write_text("{not json")
    assert cached(binary, tmp_path) is None  # a damaged cache entry is no verdict


def test_a_cancel_stops_its_server_and_the_run_answers_nothing(tmp_path: Path, monkeypatch, model_file: Path):
    monkeypatch.setenv("FAKE_LLAMA_MODE", "hang")  # listens, never answers /health
    test = SelfTest("llama.cpp", FAKE_SERVER, model_file, tmp_path)
    result: list[Verdict | None] = []
    thread = threading.Thread(target=lambda: result.append(test.run()))
    thread.start()
    assert test.started.wait(60), "the self-test's server never started"
    pid = test.pid
    test.cancel()
    thread.join(30)
    assert not thread.is_alive() and result == [None]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert cached(FAKE_SERVER, tmp_path) is None  # nothing learnt: tried again next time


@pytest.mark.engine
@pytest.mark.parametrize(("engine", "honoured"), [("ik_llama.cpp", True), ("llama.cpp", False)])
def test_the_pinned_engines_on_per_request_depth(engine: str, honoured: bool, gemma_path: Path, tmp_path: Path):
    binary = require_engine(engine)
    verdict = SelfTest(engine, binary, gemma_path, tmp_path).run()
    assert verdict is not None and verdict.honoured is honoured, verdict
    assert cached(binary, tmp_path) == verdict
