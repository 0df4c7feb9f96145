"""The daemon's sizer with the real Gemma 3 270M GGUF on described boxes: what the plan says a profile needs,
alone and beside what runs, and on which cards it could go."""

from __future__ import annotations

import json

from llamactl.daemon.sizing import PlanSizer
from llamactl.profiles import Profile
from llamactl.settings import Settings


def two_cards(tmp_path, monkeypatch, free_mib=(4096, 4096)) -> Settings:
    box = tmp_path / "box.json"
    box.write_text(json.dumps({
        "host": {"total_mib": 32768, "free_mib": 16384},
        "gpus": [{"index": i, "name": "RTX 3060", "total_mib": 12288, "free_mib": f} for i, f in enumerate(free_mib)]}))
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(box))
    return Settings()


def test_a_model_that_fits_one_card_may_go_on_either(tmp_path, monkeypatch, home, gemma_path):
    settings = two_cards(tmp_path, monkeypatch)
    profile = Profile(name="small", model=str(gemma_path), ctx_size=2048)
    sizer = PlanSizer(settings, lambda name: profile)
    capacity = sizer.capacity()
    sizing = sizer.size("small", capacity.mib, capacity.mib)
    assert sizing.never is None
    (card,) = [d for d in sizing.alone if d.startswith("CUDA")]
    other = "CUDA1" if card == "CUDA0" else "CUDA0"
    assert [p.where for p in sizing.elsewhere] == [f" on {other}"]
    there = sizing.elsewhere[0].needs
    assert set(there) - {"CPU"} == {other} and there[other] == sizing.alone[card]
    # the start of that placement plans on a box showing only that card, so it lands there
    launch = sizing.elsewhere[0].launch.probe()
    assert {f"CUDA{g.index}": g.free_mib > 1024 for g in launch.gpus} == {card: False, other: True}


def test_a_profile_pinned_to_its_cards_or_split_over_both_has_no_other_placement(tmp_path, monkeypatch, home,
                                                                                 gemma_path):
    settings = two_cards(tmp_path, monkeypatch, free_mib=(1300, 1300))  # too little for one card alone
    pinned = Profile(name="pinned", model=str(gemma_path), ctx_size=2048, gpus=[0])
    split = Profile(name="split", model=str(gemma_path), ctx_size=2048)
    for profile in (pinned, split):
        sizer = PlanSizer(settings, lambda name, p=profile: p)
        capacity = sizer.capacity()
        sizing = sizer.size(profile.name, capacity.mib, capacity.mib)
        assert sizing.elsewhere == ()
        assert {d for d in sizing.alone if d != "CPU"} == ({"CUDA0"} if profile.gpus else {"CUDA0", "CUDA1"})
