"""Which members one engine can serve per request (twins), which process serves a member, and what a request is
told (pure)."""

from __future__ import annotations

from llamactl.profiles import Profile, Speculation
from llamactl.router.choices import DEPTH_FIELD, Choice, choose, host_candidates, hosts, process_for, twins


def profile(name: str, **kw) -> Profile:
    return Profile(name=name, **{"model": "/m/target.gguf", "engine": "ik_llama.cpp", **kw})


DRAFT = Speculation(type="draft", draft_model="/m/draft.gguf", n_max=8)


def test_twins_run_the_same_model_the_same_way_and_only_a_draft_model_drafter_hosts():
    spec, plain = profile("s", speculation=DRAFT, parallel=1), profile("p", parallel=4, load_timeout_s=30)
    assert twins(spec, plain)  # slots and timeouts change speed, not output
    assert not twins(profile("s", speculation=DRAFT, ctx_size=2048), plain)
    assert not twins(profile("s", speculation=DRAFT, cache_type_k="q8_0"), plain)
    assert not twins(profile("s", speculation=DRAFT, engine="llama.cpp"), plain)
    assert not twins(profile("s", speculation=Speculation(type="ngram-mod")), plain)  # not what was self-tested
    assert not twins(spec, profile("p2", speculation=DRAFT))


def test_a_plain_member_is_hosted_by_the_first_twin_whose_engine_honours_per_request_depth():
    members = {"a-spec": "spec", "b-spec": "spec", "plain": "plain", "other": "spec"}
    profiles = {"a-spec": profile("a-spec", speculation=DRAFT), "b-spec": profile("b-spec", speculation=DRAFT),
                "plain": profile("plain"), "other": Profile(name="other", model="/m/x.gguf", speculation=DRAFT)}
    candidates = host_candidates(members, profiles)
    assert candidates == {"plain": ["a-spec", "b-spec"]}
    assert hosts(candidates, {}) == {}  # not known yet: per process
    assert hosts(candidates, {"a-spec": False, "b-spec": True}) == {"plain": "b-spec"}
    assert hosts(candidates, {"a-spec": True, "b-spec": True}) == {"plain": "a-spec"}


def test_a_member_runs_on_its_own_engine_where_it_runs_else_on_its_host():
    assert process_for("plain", {"plain": "spec"}, {"spec"}) == "spec"
    assert process_for("plain", {"plain": "spec"}, {"spec", "plain"}) == "plain"
    assert process_for("spec", {"plain": "spec"}, set()) == "spec"
    assert process_for("plain", {}, {"spec"}) == "plain"


def test_a_request_carries_depth_zero_only_where_a_drafting_engine_serves_a_plain_member():
    roles, depths = {"spec": "spec", "plain": "plain"}, {"spec": 8}
    hosted = choose("plain", "spec", roles, depths, "policy")
    assert hosted == Choice("plain", "spec", False, 0, "policy") and hosted.request_fields() == {DEPTH_FIELD: 0}
    assert choose("spec", "spec", roles, depths, "forced").request_fields() == {}
    assert choose("spec", "spec", roles, depths, "forced").depth == 8
    assert choose("plain", "plain", roles, depths, "policy").request_fields() == {}
    assert choose("plain", "spec", roles, depths, "a label nobody bounded").why == "policy"
