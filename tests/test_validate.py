"""`profiles validate` checks what `up` would: model and draft files that exist, are regular files and are
complete GGUFs (also for a profile extending a bundled one in a fresh home); a user's profile may extend the
bundled profile of the same name; a variant that joins its parent's switch group is a visible warning."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from llamactl.cli import main
from llamactl.profiles import load_profile
from llamactl.settings import Settings
from llamactl.validate import validate_profiles
from tests.conftest import write_tiny_gguf


def validate(*names: str):
    return CliRunner().invoke(main, ["profiles", "validate", *names])


def test_a_missing_draft_of_a_profile_extending_the_bundled_demo_is_an_error(home: Path, write_profile):
    write_profile("mine", '''
        extends = "demo"
        group = "mine"
        parallel = 1
        [speculation]
        type = "draft"
        draft_model = "missing-draft.gguf"
    ''')
    result = validate("mine")
    assert result.exit_code == 2
    assert "speculation.draft_model: file not found" in result.output and "missing-draft.gguf" in result.output


def test_truncated_device_directory_and_fifo_models_say_what_is_wrong(home: Path, write_profile, settings):
    good = write_tiny_gguf(home / "good.gguf")
    truncated = home / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-20])
    os.mkfifo(home / "pipe.gguf")
    for name, model, says in (("cut", truncated, "is truncated"), ("zero", "/dev/zero", "not a regular file"),
                              ("dir", home, "is a directory"), ("fifo", home / "pipe.gguf", "not a regular file"),
                              ("fine", good, None)):
        write_profile(name, f'model = "{model}"\n')
        problem = validate_profiles(Settings(), [name])[name]
        if says is None:
            assert problem is None
        else:
            assert problem is not None and says in str(problem) and "model" in str(problem), (name, problem)


def test_a_user_profile_may_extend_the_bundled_one_of_the_same_name(home: Path, write_profile, settings):
    write_profile("demo", 'extends = "demo"\nctx_size = 2048\n')
    demo = load_profile("demo", settings)
    assert demo.ctx_size == 2048 and demo.model == "builtin:gemma3-270m"  # the rest from the bundled demo
    assert demo.source == home / "profiles" / "demo.toml"
    write_profile("solo", 'extends = "solo"\n')
    result = validate("solo")
    assert result.exit_code == 2 and "no other profile named 'solo'" in result.output


def test_a_variant_that_copies_its_parents_group_is_a_visible_warning(home: Path, write_profile):
    write_profile("demo-long", 'extends = "demo"\nctx_size = 8192\n')  # copies group = "demo"
    result = validate()
    assert result.exit_code == 0, result.output
    assert "switch group 'demo' needs one speculative and one plain profile" in result.output
    assert "demo-long extends 'demo', and `extends` copies `group`" in result.output
