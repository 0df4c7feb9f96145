"""The web guard's verdict (a pure function) over every combination of what a request can carry: no request
from another site, of any method or mode, reaches a route, except a top-level navigation to the dashboard's
page; a configured origin, a same-origin page and a client that is not a browser always do."""

from __future__ import annotations

from hypothesis import given, strategies as st

from llamactl.daemon.web_guard import GuardPolicy, verdict
from llamactl.router.dashboard import UI_PAGES

OURS = "127.0.0.1:8080"
POLICY = GuardPolicy(frozenset({"127.0.0.1"}), allowed_origins=frozenset({"http://dashboard.test:3000"}),
                     page_paths=UI_PAGES)
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
PATHS = st.one_of(st.sampled_from(sorted(UI_PAGES) + ["/ui/app.js", "/upstream/coding/", "/props", "/llamactl/events",
                                                      "/v1/chat/completions", "/llamactl/profiles/a/load"]),
                  st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda t: "/" + t))
MODES = st.sampled_from(["navigate", "no-cors", "cors", "same-origin", "websocket", "nested-navigate", None])
DESTS = st.sampled_from(["document", "iframe", "frame", "image", "script", "empty", "embed", "object", None])
FOREIGN_ORIGINS = st.sampled_from(["http://evil.example", "null", "http://127.0.0.1:9999", "http://127.0.0.1:8081",
                                   "http://localhost:8080", "garbage"])
JSON = {"content-type": "application/json", "content-length": "2"}


def headers_of(**values: str | None) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in values.items() if v is not None}


@given(METHODS, PATHS, st.sampled_from(["cross-site", "same-site"]), MODES, DESTS)
def test_another_site_reaches_nothing_but_the_page(method, path, site, mode, dest):
    headers = headers_of(host=OURS, sec_fetch_site=site, sec_fetch_mode=mode, sec_fetch_dest=dest) | JSON
    decided = verdict(POLICY, method, path, headers)
    page_navigation = (method in ("GET", "HEAD") and path in UI_PAGES and mode in ("navigate", None)
                       and dest in ("document", None))
    assert decided.refused != page_navigation, (method, path, site, mode, dest, decided)
    if decided.refused:
        assert decided.status == 403 and "LLAMACTL_ALLOWED_ORIGINS" in decided.message


@given(METHODS, PATHS, FOREIGN_ORIGINS, st.sampled_from(["cross-site", "same-site", "same-origin", None]), MODES)
def test_a_foreign_origin_is_refused_whatever_else_it_says(method, path, origin, site, mode):
    headers = headers_of(host=OURS, origin=origin, sec_fetch_site=site, sec_fetch_mode=mode)
    decided = verdict(POLICY, method, path, headers)
    assert decided.status == 403 and decided.cors_origin is None


@given(METHODS, PATHS, st.sampled_from(["http://evil.example/x", "http://127.0.0.1:8081/ui", "http://[::1]:8080/"]))
def test_a_foreign_referer_counts_as_another_site_without_fetch_metadata(method, path, referer):
    decided = verdict(POLICY, method, path, headers_of(host=OURS, referer=referer) | JSON)
    assert decided.refused == (not (method in ("GET", "HEAD") and path in UI_PAGES))


@given(METHODS, PATHS, st.sampled_from(["same-origin", "none", None]))
def test_our_own_pages_configured_origins_and_plain_clients_pass(method, path, site):
    for extra in ({}, {"origin": "http://127.0.0.1:8080"}, {"origin": "http://dashboard.test:3000"},
                  {"referer": "http://127.0.0.1:8080/ui"}):
        decided = verdict(POLICY, method, path, headers_of(host=OURS, sec_fetch_site=site) | JSON | extra)
        assert not decided.refused, (extra, decided)
        allowed = extra.get("origin") == "http://dashboard.test:3000"
        assert (decided.cors_origin is not None) == allowed


@given(METHODS, PATHS, st.sampled_from(["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "[::2]"]))
def test_a_rebound_host_is_refused_before_anything_else(method, path, host):
    decided = verdict(POLICY, method, path, {"host": host, "origin": "http://dashboard.test:3000"})
    assert decided.status == 421
