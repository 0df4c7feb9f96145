"""The memory ledger as `llamactl status`, `llamactl top` and the scheduler's status show it."""

from __future__ import annotations

from rich.console import Console

from llamactl.box.ledger import Ledger
from llamactl.cli.serve import box_lines
from llamactl.top import TopView


def box_status() -> dict:
    book = Ledger(capacity={"CUDA0": 23000, "CPU": 60000}, reserve={"CUDA0": 2048},
                  total={"CUDA0": 24576, "CPU": 65536})
    book.hold("coding", "coding", {"CUDA0": 15000, "CPU": 900}, "running")
    book.hold("chat", "chat", {"CUDA0": 5000}, "loading")
    return {"devices": book.view(), "waiting": {"embed": {"lane": "embed", "why": "short by 100 MiB on CUDA0",
                                                          "waits_for": ["coding"]}},
            "evictions": [{"lane": "old", "for": "coding", "why": "short by 3 MiB on CUDA0", "at_unix": 0}]}


def test_the_ledger_in_words():
    lines = box_lines(box_status())
    assert lines[0] == ("memory CUDA0: ours coding 15000, loading chat 5000, reserve 2048, others 1576, "
                        "free 952 MiB")
    assert lines[1].startswith("memory CPU: ours coding 900, reserve 0, others 5536, free 59100")
    assert "embed waits for memory: short by 100 MiB on CUDA0" in lines[2]
    assert "stopped idle old for coding" in lines[3]
    assert box_lines(None) == []


def test_top_shows_the_ledger():
    view = TopView()
    view.status = {"box": box_status(), "lanes": []}
    console = Console(width=160, record=True)
    console.print(view.render())
    text = console.export_text()
    assert "memory ledger" in text and "coding 15000" in text and "chat 5000" in text and "embed waits" in text


def test_nvml_capacity_counts_our_engines_once_and_a_grown_engine_by_what_it_uses(monkeypatch, settings):
    """With NVML, the capacity is the free memory plus what our processes use (the ledger counts them by plan), and
    an engine NVML sees using more than its plan is held at what it uses."""
    from llamactl.box.scheduler import BoxScheduler
    from llamactl.daemon.sizing import PlanSizer
    from tests.test_gpus import _fake_pynvml

    # a 24 GiB card: 20000 free; our engine (pid 222) and another process (111) use 512 MiB each
    devices = [{"name": "RTX A", "bus": "00000000:01:00.0", "total": 24576, "free": 20000, "pids": [111, 222]}]
    _fake_pynvml(monkeypatch, devices=devices)
    monkeypatch.setattr("llamactl.gpus._descendant_pids", lambda: {222})
    monkeypatch.setattr("llamactl.daemon.sizing._our_resident_mib", lambda: 0)
    sizer = PlanSizer(settings, lambda name: None, pids=lambda: {"coding": 222}, margin_mib=512)
    capacity = sizer.capacity()
    assert capacity.mib["CUDA0"] == 20000 + 512 - 512  # free + ours, less the plan's margin
    assert capacity.measured == {"coding": {"CUDA0": 512}}
    box = BoxScheduler(sizer)
    box.ledger.capacity, box.ledger.measured = dict(capacity.mib), {p: dict(m) for p, m in capacity.measured.items()}
    box.ledger.hold("coding", "coding", {"CUDA0": 400}, "running")  # planned 400, uses 512
    assert box.ledger.free()["CUDA0"] == 20000 - 512
    box.ledger.hold("coding", "coding", {"CUDA0": 900}, "running")  # planned above what it uses: the plan counts
    assert box.ledger.free()["CUDA0"] == 20000 - 900
