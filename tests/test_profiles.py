from __future__ import annotations

import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.errors import ProfileError, ProfileNotFound
from llamactl.profiles import load_profile, profile_files
from llamactl.validate import validate_profiles
from tests.conftest import write_tiny_gguf


def test_extends_inherits_and_overrides(settings, write_profile, model_file):
    write_profile("coding", f"""
        model = "{model_file}"
        ctx_size = 2048
        cache_type_k = "q8_0"
        [speculation]
        type = "ngram-mod"
        n_max = 16
    """)
    write_profile("coding-plain", """
        extends = "coding"
        [speculation]
        type = "none"
    """)
    plain = load_profile("coding-plain", settings)
    assert plain.ctx_size == 2048 and plain.cache_type_k == "q8_0"
    assert not plain.speculation.enabled
    assert load_profile("coding", settings).speculation.n_max == 16


def test_relative_model_path_is_relative_to_the_profile_file(settings, write_profile, home):
    write_profile("rel", 'model = "models/x.gguf"')
    assert load_profile("rel", settings).model == str(home / "profiles" / "models" / "x.gguf")


def test_search_order_first_directory_wins(settings, home, monkeypatch, model_file):
    first, second = home / "first", home / "second"
    for d, ctx in ((first, 1024), (second, 2048)):
        d.mkdir()
        (d / "p.toml").write_text(f'model = "{model_file}"\nctx_size = {ctx}\n')
    monkeypatch.setenv("LLAMACTL_PROFILES_DIRS", f"{first}:{second}")
    from llamactl.settings import Settings

    s = Settings()
    assert load_profile("p", s).ctx_size == 1024
    assert profile_files(s)["p"] == first / "p.toml"


def test_unknown_key_names_file_key_and_closest_valid_key(settings, write_profile, model_file):
    path = write_profile("typo", f"""
        model = "{model_file}"
        ctx_sise = 4096
        [speculation]
        n_maxx = 4
    """)
    with pytest.raises(ProfileError) as err:
        load_profile("typo", settings)
    text = str(err.value)
    assert f"{path}: ctx_sise: unknown key; did you mean 'ctx_size'?" in text
    assert "speculation.n_maxx: unknown key; did you mean 'n_max'?" in text


def test_bad_values_are_explained(settings, write_profile, model_file):
    write_profile("bad", f"""
        model = "{model_file}"
        ctx_size = 1048576
        cache_type_k = "q3_0"
    """)
    with pytest.raises(ProfileError) as err:
        load_profile("bad", settings)
    text = str(err.value)
    assert "ctx_size: Input should be less than or equal to 524288 (got 1048576)" in text
    assert "cache_type_k:" in text and "'q8_0'" in text


def test_draft_without_draft_model_and_quantised_v_without_fa(settings, write_profile, model_file):
    write_profile("d", f"""
        model = "{model_file}"
        [speculation]
        type = "draft"
    """)
    with pytest.raises(ProfileError, match="needs draft_model"):
        load_profile("d", settings)
    write_profile("v", f"""
        model = "{model_file}"
        cache_type_v = "q4_0"
        flash_attn = "off"
    """)
    with pytest.raises(ProfileError, match="needs flash attention"):
        load_profile("v", settings)


def test_managed_flags_and_env_are_refused(settings, write_profile, model_file):
    write_profile("x", f"""
        model = "{model_file}"
        extra_args = ["--port", "9999"]
    """)
    with pytest.raises(ProfileError, match="extra_args sets --port, which llamactl manages"):
        load_profile("x", settings)
    write_profile("e", f"""
        model = "{model_file}"
        env = {{ LLAMA_ARG_PORT = "1" }}
    """)
    with pytest.raises(ProfileError, match="env sets LLAMA_ARG_PORT"):
        load_profile("e", settings)


def test_extends_missing_parent_and_cycles(settings, write_profile):
    path = write_profile("child", 'extends = "codng"')
    write_profile("coding", 'model = "x.gguf"')
    with pytest.raises(ProfileError) as err:
        load_profile("child", settings)
    assert str(path) in str(err.value) and "did you mean 'coding'" in str(err.value)
    write_profile("a", 'extends = "b"')
    write_profile("b", 'extends = "a"')
    with pytest.raises(ProfileError, match="cycle: a -> b -> a"):
        load_profile("a", settings)


def test_unknown_profile_suggests_close_names(settings, write_profile, model_file):
    write_profile("coding", f'model = "{model_file}"')
    with pytest.raises(ProfileNotFound, match="did you mean 'coding'"):
        load_profile("codin", settings)


def test_invalid_toml_names_the_file(settings, write_profile):
    path = write_profile("broken", "model = \n")
    with pytest.raises(ProfileError, match=f"{path}: not valid TOML"):
        load_profile("broken", settings)


def test_validate_checks_model_file_and_training_context(settings, write_profile, home):
    missing = home / "nope.gguf"
    write_profile("missing", f'model = "{missing}"')
    small = write_tiny_gguf(home / "small.gguf", context_length=8192)
    write_profile("toolong", f'model = "{small}"\nctx_size = 32768')
    write_profile("scaled", f"""
        model = "{small}"
        ctx_size = 32768
        [rope]
        scaling = "yarn"
        scale = 4
        yarn_orig_ctx = 8192
    """)
    results = validate_profiles(settings)
    assert f"looked at {missing}" in str(results["missing"])
    too_long = str(results["toolong"])
    assert "above the model's training context (8192)" in too_long and "scaling = 'yarn'" in too_long
    assert results["scaled"] is None


def test_validate_command_exit_status(settings, write_profile, model_file):
    write_profile("good", f'model = "{model_file}"')
    runner = CliRunner()
    ok = runner.invoke(main, ["profiles", "validate"])
    assert ok.exit_code == 0, ok.output
    assert "ok      good" in ok.output
    write_profile("bad", f'model = "{model_file}"\nthreads = 0')
    failed = runner.invoke(main, ["profiles", "validate"])
    assert failed.exit_code == 2
    assert "ERROR   bad" in failed.output and "threads" in failed.output


def test_bundled_profiles_are_valid(monkeypatch):
    for key in ("LLAMACTL_PROFILES_DIRS", "LLAMACTL_HOME"):
        monkeypatch.delenv(key, raising=False)
    from llamactl.settings import BUNDLED_PROFILES_DIR, Settings

    examples = BUNDLED_PROFILES_DIR / "examples"
    for directory in (BUNDLED_PROFILES_DIR, examples):
        s = Settings(profiles_dirs=str(directory))
        names = sorted(p.stem for p in directory.glob("*.toml"))
        results = validate_profiles(s, names, check_files=False)
        assert len(results) >= 3 and all(problem is None for problem in results.values()), results


def test_speculation_depths_default_n_max_and_bad_lists_are_explained(settings, write_profile, model_file):
    def profile(name: str, speculation: str):
        write_profile(name, f"""
            model = "{model_file}"
            [speculation]
            {speculation}
        """)
        return name

    good = load_profile(profile("good", f'type = "draft"\ndraft_model = "{model_file}"\ndepths = [8, 2, 16, 4]'),
                        settings)
    assert good.speculation.depths == [2, 4, 8, 16] and good.speculation.n_max == 16  # n_max: the largest
    explicit = load_profile(profile("explicit", f'type = "draft"\ndraft_model = "{model_file}"\ndepths = [2, 4]\n'
                                                "n_max = 6"), settings)
    assert explicit.speculation.n_max == 6
    cases = {
        'type = "ngram-mod"\ndepths = [2, 4]': "speculation: speculation.depths needs type = 'draft'",
        f'type = "draft"\ndraft_model = "{model_file}"\ndepths = [2, 32]\nn_max = 16':
            "speculation.depths lists 32, above speculation.n_max (16)",
        f'type = "draft"\ndraft_model = "{model_file}"\ndepths = [2, 2]': "speculation.depths: a depth is listed twice",
        f'type = "draft"\ndraft_model = "{model_file}"\ndepths = [0, 4]': "speculation.depths: depth 0 is out of range",
        f'type = "draft"\ndraft_model = "{model_file}"\ndepths = [1, 2, 3, 4, 5, 6, 7, 8, 9]':
            "speculation.depths: 9 depths; at most 8",
        f'type = "draft"\ndraft_model = "{model_file}"\ndepths = []': "speculation.depths: an empty list",
    }
    for i, (body, expected) in enumerate(cases.items()):
        with pytest.raises(ProfileError) as err:
            load_profile(profile(f"bad{i}", body), settings)
        assert expected in str(err.value), str(err.value)
        assert "bad" in str(err.value)  # the file is named
