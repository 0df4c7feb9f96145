"""`hf:` models through the real huggingface_hub client against a loopback stand-in for the Hub: `llamactl
pull`, `models`, `plan`; only what is asked is downloaded; errors exit 2 with nothing half-written kept as
complete; a cut download resumes; no network once the files are there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamactl.cli import main
from tests.conftest import FAKES, write_tiny_gguf
from tests.hub_standin import GOOD_TOKEN, HubStandin, StandinRepo

REPO = "acme/tiny-GGUF"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home):
    """The stand-in, HF_ENDPOINT pointed at it, a fresh cache; REPO holds a Q4_K_M, a Q8_0 and a projector."""
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    standin = HubStandin().start()
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_cpu.json"))
    files = tmp_path / "served"
    files.mkdir()
    standin.repos[REPO] = StandinRepo({
        "tiny-Q4_K_M.gguf": write_tiny_gguf(files / "q4.gguf", context_length=4096),
        "tiny-Q8_0.gguf": write_tiny_gguf(files / "q8.gguf", context_length=8192),
        "mmproj-tiny-Q4_K_M.gguf": write_tiny_gguf(files / "mmproj.gguf"),
    })
    yield standin
    standin.stop()


def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-home" / "hub"


def run(*args: str, code: int = 0, env: dict[str, str] | None = None):
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output
    return result


def test_pull_downloads_only_the_quant_asked_for_and_only_once(hub, tmp_path):
    pulled = run("pull", f"hf:{REPO}:q4_k_m")
    [path] = [Path(line.split(": ", 1)[1]) for line in pulled.output.splitlines() if line.startswith("hf:")]
    assert path.read_bytes() == hub.repos[REPO].files["tiny-Q4_K_M.gguf"].read_bytes()
    assert cache(tmp_path) in path.parents
    assert [r.path for r in hub.downloads()] == [f"/{REPO}/resolve/main/tiny-Q4_K_M.gguf"]
    run("pull", f"hf:{REPO}:Q4_K_M")
    assert len(hub.downloads()) == 1  # in the cache: not fetched again
    assert "downloading" in pulled.output  # plain progress lines (not a terminal)


def test_a_profile_is_pulled_listed_with_its_users_and_removed(hub, write_profile, tmp_path):
    write_profile("tiny", f'model = "hf:{REPO}:Q8_0"\n')
    run("pull", "tiny")
    listed = run("models").output
    assert f"hf:{REPO}/tiny-Q8_0.gguf" in listed and "tiny" in listed.split(f"hf:{REPO}")[0]
    assert "Q4_K_M" not in listed
    plan = run("plan", "tiny").output
    assert "8192" in plan  # the plan read the downloaded GGUF (its training context)
    removed = run("models", "rm", f"hf:{REPO}:Q8_0")
    assert "removed tiny-Q8_0.gguf" in removed.output and "tiny" in removed.output
    assert "no models in the Hugging Face cache" in run("models").output


def test_plan_of_a_profile_not_pulled_says_to_pull_first(hub, write_profile):
    write_profile("later", f'model = "hf:{REPO}:Q8_0"\n')
    result = run("plan", "later", code=2)
    assert "not downloaded yet" in result.output and "run `llamactl pull` first" in result.output
    assert hub.downloads() == []


@pytest.mark.parametrize("ref, message", [
    (f"hf:{REPO}:IQ2_XXS", "matches no GGUF file in acme/tiny-GGUF; its GGUF files: tiny-Q4_K_M.gguf, tiny-Q8_0.gguf"),
    (f"hf:{REPO}:tiny", "matches several GGUF files in acme/tiny-GGUF: tiny-Q4_K_M.gguf, tiny-Q8_0.gguf"),
    (f"hf:{REPO}/nope.gguf", "has no file 'nope.gguf'"),
    ("hf:acme/missing-GGUF:Q4_K_M", "no repo acme/missing-GGUF"),
    (f"hf:{REPO}:Q4_K_M@v9", "has no revision 'v9'"),
])
def test_bad_references_exit_2_naming_the_problem_and_download_nothing(hub, tmp_path, ref, message):
    result = run("pull", ref, code=2)
    assert message in result.output
    assert hub.downloads() == []


def test_a_gated_repo_needs_a_token(hub, tmp_path):
    hub.repos[REPO].gated = True
    result = run("pull", f"hf:{REPO}:Q4_K_M", code=2)
    assert "gated repo and no HF_TOKEN is set" in result.output and "accept its terms" in result.output
    assert not list(cache(tmp_path).rglob("*.gguf"))
    wrong = run("pull", f"hf:{REPO}:Q4_K_M", code=2, env={"HF_TOKEN": "hf_wrong"})
    assert "the token in HF_TOKEN has no access" in wrong.output
    run("pull", f"hf:{REPO}:Q4_K_M", env={"HF_TOKEN": GOOD_TOKEN})


def test_a_disk_without_room_is_refused_before_downloading(hub, tmp_path):
    hub.repos[REPO].claimed_sizes["tiny-Q8_0.gguf"] = 1 << 60
    result = run("pull", f"hf:{REPO}:Q8_0", code=2)
    assert "GB free; nothing was downloaded" in result.output and "HF_HUB_CACHE" in result.output
    assert hub.downloads() == []


def test_a_connection_dropped_mid_file_is_resumed_with_a_range_request(hub, tmp_path):
    big = tmp_path / "served" / "big.gguf"
    big.write_bytes(os.urandom(16 << 20))
    hub.repos[REPO].files["big-Q6_K.gguf"] = big
    hub.cut_once["big-Q6_K.gguf"] = 12 << 20  # past the client's first 10 MiB chunk
    run("pull", f"hf:{REPO}:Q6_K")
    ranges = [r.range for r in hub.downloads()]
    assert ranges[0] is None and ranges[1] == f"bytes={10 << 20}-"  # the first 10 MiB were not fetched again
    [done] = cache(tmp_path).glob("models--*/snapshots/*/big-Q6_K.gguf")
    assert done.read_bytes() == big.read_bytes()


def test_a_download_that_keeps_failing_exits_2_and_leaves_nothing_passing_for_complete(hub, tmp_path,
                                                                                        write_profile):
    hub.cut_after["tiny-Q8_0.gguf"] = 100
    write_profile("tiny", f'model = "hf:{REPO}:Q8_0"\n')
    result = run("pull", "tiny", code=2)
    assert "could not be reached or failed" in result.output and "nothing incomplete was kept" in result.output
    assert not list(cache(tmp_path).rglob("*.gguf")) and not list(cache(tmp_path).rglob("*.incomplete"))
    assert "not downloaded yet" in run("plan", "tiny", code=2).output
    del hub.cut_after["tiny-Q8_0.gguf"]
    run("pull", "tiny")
    assert "8192" in run("plan", "tiny").output


def test_a_split_gguf_is_fetched_whole_and_used_by_its_first_part(hub, tmp_path, write_profile):
    whole = hub.repos[REPO].files["tiny-Q8_0.gguf"].read_bytes()
    parts = tmp_path / "served"
    (parts / "p1").write_bytes(whole[:100])
    (parts / "p2").write_bytes(whole[100:])
    hub.repos[REPO].files.update({"Q2_K/tiny-Q2_K-00001-of-00002.gguf": parts / "p1",
                                  "Q2_K/tiny-Q2_K-00002-of-00002.gguf": parts / "p2"})
    pulled = run("pull", f"hf:{REPO}:Q2_K").output
    assert "tiny-Q2_K-00001-of-00002.gguf" in pulled.splitlines()[-1]
    assert sorted(r.path.rsplit("/", 1)[1] for r in hub.downloads()) == ["tiny-Q2_K-00001-of-00002.gguf",
                                                                          "tiny-Q2_K-00002-of-00002.gguf"]
    assert "(2 parts)" in run("models").output


def test_no_network_needed_once_pulled_and_offline_mode_uses_the_cache(hub, tmp_path, write_profile):
    write_profile("tiny", f'model = "hf:{REPO}:Q4_K_M"\n')
    write_profile("other", f'model = "hf:{REPO}:Q8_0"\n')
    run("pull", "tiny")
    hub.stop()  # the Hub is gone
    assert "4096" in run("plan", "tiny").output
    run("pull", "tiny")  # out of reach: the cache answers
    assert "4096" in run("plan", "tiny", env={"HF_HUB_OFFLINE": "1"}).output
    offline = run("pull", "other", code=2, env={"HF_HUB_OFFLINE": "1"})
    assert "not in the Hugging Face cache" in offline.output and "HF_HUB_OFFLINE is set" in offline.output
    unreachable = run("pull", "other", code=2)
    assert "could not be reached" in unreachable.output


def test_a_download_its_caller_stops_ends_at_once_and_leaves_nothing(hub, tmp_path):
    from llamactl.hf.pull import HubConfig, PullCancelled, pull_model
    from llamactl.hf.refs import parse_ref

    seen = []
    with pytest.raises(PullCancelled):
        pull_model(parse_ref(f"hf:{REPO}:Q8_0"), HubConfig.from_environ(), where="t", progress=seen.append,
                   cancelled=lambda: True)
    assert not list(cache(tmp_path).rglob("*.gguf")) and not list(cache(tmp_path).rglob("*.incomplete"))


def test_the_terminal_bar_and_the_plain_lines_show_bytes_rate_and_eta(capsys):
    from llamactl.cli.hub import PullDisplay
    from llamactl.hf.pull import PullProgress

    state = PullProgress(ref=f"hf:{REPO}:Q8_0", file="tiny-Q8_0.gguf", done_bytes=0, total_bytes=4_000_000)
    with PullDisplay(tty=True) as bar:
        for done in (1_000_000, 2_000_000, 4_000_000):
            state.done_bytes = done
            bar(state)
        [task] = bar._bars.tasks
        assert task.completed == 4_000_000 and task.total == 4_000_000
    with PullDisplay(tty=False) as plain:
        state.done_bytes = 1_000_000
        plain(state)
        plain(state)  # within a couple of seconds: no second line
        state.done_bytes = 4_000_000
        plain(state)  # done: always said
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("downloading")]
    assert len(lines) == 2 and "1.0/4.0 MB (25%)" in lines[0] and "MB/s" in lines[0]
    assert "4.0/4.0 MB (100%)" in lines[1]
