"""Pure tests of the engine modules: capability parsing, argv building per fork, log classification."""

from __future__ import annotations

from pathlib import Path

import re

import pytest

from llamactl.engines import build_launch, ik, mainline
from llamactl.engines.capabilities import parse_capabilities
from llamactl.engines.common import LaunchInputs, child_env
from llamactl.engines.logs import classify_exit, parse_acceptance
from llamactl.errors import ProfileError, UnsupportedFlag
from llamactl.profiles import Profile

# Help excerpts in each fork's own format (mainline 0.3.36 vendored tree; ik April 2026 / HEAD).
MAINLINE_HELP = """
-lv,   --verbosity, --log-verbosity N
-m,    --model FNAME
-a,    --alias STRING
--host HOST
--port PORT
--api-key KEY
-c,    --ctx-size N
-np,   --parallel N
-ngl,  --gpu-layers, --n-gpu-layers N
-ctk,  --cache-type-k TYPE
-ctv,  --cache-type-v TYPE
-fa,   --flash-attn [on|off|auto]
-t,    --threads N
-sm,   --split-mode {none,layer,row,tensor}
-ts,   --tensor-split N0,N1,N2,...
--rope-scaling {none,linear,yarn}
--rope-scale N
--yarn-orig-ctx N
--spec-type [none|draft-simple|draft-mtp|ngram-simple|ngram-mod]
--spec-draft-model, -md, --model-draft FNAME
--spec-draft-ngl, -ngld, --gpu-layers-draft N
--spec-draft-device, -devd, --device-draft <dev1,dev2,..>
--spec-draft-n-max N
--spec-draft-n-min N
--spec-draft-p-min P
--spec-draft-type-k, -ctkd, --cache-type-k-draft TYPE
--spec-draft-type-v, -ctvd, --cache-type-v-draft TYPE
--spec-ngram-mod-n-max N
--metrics
"""
IK_LEGACY_HELP = """
-m,    --model FNAME
-a,    --alias STRING
--host HOST
--port PORT
-c,    --ctx-size N
-np,   --parallel N
-ngl,  --gpu-layers N
-ctk,  --cache-type-k TYPE
-ctv,  --cache-type-v TYPE
-fa, --flash-attn (auto|on|off|0|1)
-sm,   --split-mode SPLIT_MODE   none, layer, attn, graph
-md,   --model-draft FNAME
-ngld, --gpu-layers-draft N
-devd, --device-draft
--draft-max, --draft, --draft-n N
--draft-min, --draft-n-min N
--draft-p-min P
--spec-type Name [none | ngram - cache | ngram - simple | ngram - map - k | ngram - map - k4v | ngram - mod]
-mtp, --multi-token-prediction
-t,    --threads N
-tb,   --threads-batch N
-td,   --threads-draft N
-draft, --draft-params
--metrics
"""
IK_HEAD_HELP = IK_LEGACY_HELP.replace("--draft-max, --draft, --draft-n N\n", "").replace(
    "--draft-min, --draft-n-min N\n", "").replace("--draft-p-min P\n", "").replace(
    "--spec-type Name [none | ngram - cache", "--spec-type TYPE[:k=v,...] [none | draft | mtp | ngram - cache")


def caps(help_text: str, version: str = "b9999 (test)"):
    return parse_capabilities("/opt/llama-server", help_text, f"version: {version}")


def inputs(draft: bool = False) -> LaunchInputs:
    return LaunchInputs(binary=Path("/opt/llama-server"), model_path=Path("/m/target.gguf"), port=4321,
                        draft_model_path=Path("/m/draft.gguf") if draft else None)


def profile(**fields) -> Profile:
    return Profile.model_validate({"name": "p", "model": "/m/target.gguf", **fields})


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_capabilities_parse_flags_and_version():
    c = caps(MAINLINE_HELP, "0.5.0-dev (build 1, commit 0c1e570)")
    assert c.accepts("--spec-draft-n-max") and c.accepts("-ngl") and not c.accepts("--draft-max")
    assert c.version == "0.5.0-dev (build 1, commit 0c1e570)"
    assert c.first("--nope", "-md") == "-md"


def test_mainline_basic_argv():
    argv = mainline.build_argv(profile(ctx_size=8192, parallel=2, gpus=[], alias="a"), caps(MAINLINE_HELP), inputs())
    assert argv[0] == "/opt/llama-server"
    assert flag_value(argv, "-m") == "/m/target.gguf"
    assert flag_value(argv, "--host") == "127.0.0.1" and flag_value(argv, "--port") == "4321"
    assert flag_value(argv, "-c") == "8192" and flag_value(argv, "-np") == "2"
    assert flag_value(argv, "-ngl") == "0"  # gpus = [] means CPU only
    assert flag_value(argv, "-a") == "a"
    assert "--metrics" in argv


def test_mainline_draft_speculation_enables_spec_type():
    p = profile(speculation={"type": "draft", "draft_model": "/m/draft.gguf", "n_max": 8, "p_min": 0.5,
                             "draft_n_gpu_layers": "all"})
    argv = mainline.build_argv(p, caps(MAINLINE_HELP), inputs(draft=True))
    # -md alone loads the draft but never drafts: --spec-type draft-simple must be there.
    assert flag_value(argv, "--spec-type") == "draft-simple"
    assert flag_value(argv, "--spec-draft-model") == "/m/draft.gguf"
    assert flag_value(argv, "--spec-draft-n-max") == "8"
    assert flag_value(argv, "--spec-draft-p-min") == "0.5"
    assert flag_value(argv, "--spec-draft-ngl") == "all"
    assert "--draft-max" not in argv


def test_mainline_ngram_mod_uses_its_own_n_max():
    argv = mainline.build_argv(profile(speculation={"type": "ngram-mod", "n_max": 32}), caps(MAINLINE_HELP), inputs())
    assert flag_value(argv, "--spec-type") == "ngram-mod"
    assert flag_value(argv, "--spec-ngram-mod-n-max") == "32"


def test_mainline_mtp_runs_draft_mtp_with_the_draft_cache_types():
    """MTP drafts from the target's NextN layers in a context of its own, whose KV takes the draft cache types."""
    p = profile(speculation={"type": "mtp", "n_max": 2, "draft_cache_type_k": "q8_0", "draft_cache_type_v": "q8_0"})
    argv = mainline.build_argv(p, caps(MAINLINE_HELP), inputs())
    assert flag_value(argv, "--spec-type") == "draft-mtp" and flag_value(argv, "--spec-draft-n-max") == "2"
    assert flag_value(argv, "--spec-draft-type-k") == "q8_0" and flag_value(argv, "--spec-draft-type-v") == "q8_0"
    assert "--spec-draft-model" not in argv and "-md" not in argv


def test_ik_legacy_mtp_is_its_own_flag():
    argv = ik.build_argv(profile(engine="ik_llama.cpp", speculation={"type": "mtp", "n_max": 2}),
                         caps(IK_LEGACY_HELP), inputs())
    assert "-mtp" in argv and flag_value(argv, "--draft-max") == "2" and "--spec-type" not in argv


def test_ik_legacy_uses_draft_max_and_no_spec_type_for_draft():
    p = profile(engine="ik_llama.cpp", speculation={"type": "draft", "draft_model": "/m/draft.gguf", "n_max": 8},
                n_gpu_layers="all")
    argv = ik.build_argv(p, caps(IK_LEGACY_HELP), inputs(draft=True))
    assert flag_value(argv, "-md") == "/m/draft.gguf" and flag_value(argv, "--draft-max") == "8"
    assert "--spec-type" not in argv
    assert flag_value(argv, "-ngl") == str(ik.ALL_LAYERS)


def test_ik_draft_model_gets_the_profiles_threads_through_draft_params():
    """ik's server gives the draft model every physical core whatever -t or -td say; --draft-params reaches it."""
    draft = {"type": "draft", "draft_model": "/m/draft.gguf", "n_max": 8}
    argv = ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft, threads=2, threads_batch=4),
                         caps(IK_LEGACY_HELP), inputs(draft=True))
    assert flag_value(argv, "-draft") == "-t 2 -tb 4" and "-td" not in argv
    assert flag_value(argv, "-t") == "2"
    argv = ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft, threads=3), caps(IK_HEAD_HELP),
                         inputs(draft=True))
    assert flag_value(argv, "-draft") == "-t 3"
    unset = ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft), caps(IK_LEGACY_HELP), inputs(draft=True))
    assert "-draft" not in unset and "--draft-params" not in unset  # the engine's own default, as the target's
    own = ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft, threads=2,
                                extra_args=["--draft-params", "-t 1 -c 512"]), caps(IK_LEGACY_HELP), inputs(draft=True))
    assert own.count("--draft-params") == 1 and "-draft" not in own  # the profile's own draft command line wins
    older = IK_LEGACY_HELP.replace("-draft, --draft-params\n", "")
    argv = ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft, threads=2), caps(older),
                         inputs(draft=True))
    assert flag_value(argv, "-td") == "2"
    ngram = ik.build_argv(profile(engine="ik_llama.cpp", speculation={"type": "ngram-mod"}, threads=2),
                          caps(IK_LEGACY_HELP), inputs())
    assert "-draft" not in ngram  # no draft model, no draft threads


def test_a_flag_the_argv_has_from_a_profile_key_is_refused_in_extra_args_whatever_it_is():
    """The engine takes the last of two spellings of one flag: extra_args's, which the plan and the key do not
    know. Beyond the flags refused when the profile loads, any flag the builder set from a key is refused when
    the argv is built (here -td, which an ik build without --draft-params gets from `threads`); without that key
    set, the flag passes (the engine's default is all it replaces)."""
    draft = {"type": "draft", "draft_model": "/m/draft.gguf", "n_max": 8}
    older = IK_LEGACY_HELP.replace("-draft, --draft-params\n", "")
    with pytest.raises(ProfileError, match=r"extra_args sets -td, which llamactl sets already from threads") as e:
        ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft, threads=2, extra_args=["-td", "1"]),
                      caps(older), inputs(draft=True))
    assert e.value.hint == "set it with threads"
    with pytest.raises(ProfileError, match=r"extra_args sets --threads-draft, which llamactl sets already"):
        ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft, threads=2,  # the binary's alias of -td
                              extra_args=["--threads-draft", "1"]), caps(older), inputs(draft=True))
    argv = ik.build_argv(profile(engine="ik_llama.cpp", speculation=draft, extra_args=["-td", "1"]), caps(older),
                         inputs(draft=True))
    assert flag_value(argv, "-td") == "1"


def test_ik_legacy_ngram_spec_type():
    argv = ik.build_argv(profile(engine="ik_llama.cpp", speculation={"type": "ngram-mod"}), caps(IK_LEGACY_HELP),
                         inputs())
    assert flag_value(argv, "--spec-type") == "ngram-mod"


def test_ik_head_uses_typed_spec_and_one_slot():
    p = profile(engine="ik_llama.cpp", speculation={"type": "draft", "draft_model": "/m/d.gguf", "n_max": 12,
                                                     "p_min": 0.75})
    argv = ik.build_argv(p, caps(IK_HEAD_HELP), inputs(draft=True))
    assert flag_value(argv, "--spec-type") == "draft:n_max=12,p_min=0.75"
    assert flag_value(argv, "-np") == "1"
    with pytest.raises(ProfileError, match="one slot only"):
        ik.build_argv(p.model_copy(update={"parallel": 4}), caps(IK_HEAD_HELP), inputs(draft=True))


def test_unsupported_flag_is_refused_with_flag_binary_and_version():
    p = profile(engine="ik_llama.cpp", split_mode="row")
    with pytest.raises(UnsupportedFlag) as err:
        ik.build_argv(p, caps(IK_LEGACY_HELP, "0 (ik-llama-cpp-python-0.1.5)"), inputs())
    text = str(err.value)
    assert "split_mode = 'row'" in text and "-sm" in text and "0 (ik-llama-cpp-python-0.1.5)" in text
    with pytest.raises(UnsupportedFlag, match="n_gpu_layers = 'auto'"):
        ik.build_argv(profile(engine="ik_llama.cpp", n_gpu_layers="auto"), caps(IK_LEGACY_HELP), inputs())
    old_mainline = MAINLINE_HELP.replace("--spec-draft-n-max N\n", "")
    p = profile(speculation={"type": "draft", "draft_model": "/m/d.gguf", "n_max": 4})
    with pytest.raises(UnsupportedFlag, match="speculation.n_max, which needs --spec-draft-n-max"):
        mainline.build_argv(p, caps(old_mainline), inputs(draft=True))


def test_extra_args_are_checked_against_the_binary():
    argv = mainline.build_argv(profile(extra_args=["-lv", "3"]), caps(MAINLINE_HELP), inputs())
    assert argv[-2:] == ["-lv", "3"]
    with pytest.raises(UnsupportedFlag, match="--mlock"):
        mainline.build_argv(profile(extra_args=["--mlock"]), caps(MAINLINE_HELP), inputs())


def test_child_env_is_cleaned_and_gpu_order_fixed():
    base = {"PATH": "/bin", "LLAMA_ARG_PORT": "1", "LLAMA_API_KEY": "k", "HF_TOKEN": "t", "AIP_MODE": "x",
            "HOME": "/h"}
    env = child_env(base, profile(gpus=[2, 0], env={"OMP_NUM_THREADS": "2"}))
    assert env["PATH"] == "/bin" and env["HOME"] == "/h" and env["OMP_NUM_THREADS"] == "2"
    assert not {"LLAMA_ARG_PORT", "LLAMA_API_KEY", "HF_TOKEN", "AIP_MODE"} & set(env)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "2,0"


def test_draft_gpus_are_renumbered_within_visible_gpus():
    p = profile(gpus=[1, 3], speculation={"type": "draft", "draft_model": "/m/d.gguf", "draft_gpus": [3]})
    spec = build_launch(p, caps(MAINLINE_HELP), inputs(draft=True), {})
    assert flag_value(spec.argv, "--spec-draft-device") == "CUDA1"
    bad = p.model_copy(update={"speculation": p.speculation.model_copy(update={"draft_gpus": [2]})})
    with pytest.raises(ProfileError, match="GPU \\[2\\] is not in gpus"):
        build_launch(bad, caps(MAINLINE_HELP), inputs(draft=True), {})


@pytest.mark.parametrize("line,cause", [
    ("error: invalid argument: --mlock", "bad flag"),
    ("the argument has been removed. use --spec-draft-n-max or --spec-ngram-mod-n-max", "bad flag"),
    ("gguf_init_from_file: failed to open GGUF file '/x.gguf' (No such file or directory)", "model file unreadable"),
    ("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0: cudaMalloc failed: "
     "out of memory", "out of memory"),
    ("srv    operator(): couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080", "port in use"),
    ("something else entirely", "exited"),
])
def test_classify_exit(line, cause):
    assert classify_exit(["loading...", line]).cause == cause


def test_classify_exit_finds_the_cause_before_its_consequences():
    """llama-server's real sequence after a failed allocation: the newest lines say "failed to load model"
    (which alone means an unreadable file); the cause is the allocation failure above them."""
    log = [
        "llama_model_load: loading model tensors, this can take a while...",
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0: cudaMalloc failed: "
        "out of memory",
        "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
        "llama_model_load_from_file_impl: failed to load model",
        "srv    load_model: failed to load model, '/models/big.gguf'",
        "main: exiting due to model loading error",
    ]
    exit_cause = classify_exit(log)
    assert exit_cause.cause == "out of memory"
    assert exit_cause.line == "llama_model_load: error loading model: unable to allocate CUDA0 buffer"
    assert classify_exit(log[3:]).cause == "model file unreadable"


def test_parse_acceptance_both_forks():
    ik_line = "draft acceptance rate = 0.62500 (   10 accepted /    16 generated)"
    ml_line = "slot print_timing: draft acceptance = 0.75000 (    6 accepted /     8 generated), mean len =  2.00"
    assert parse_acceptance(ik_line).accepted == 10 and parse_acceptance(ik_line).generated == 16
    assert parse_acceptance(ml_line).rate == 0.75 and parse_acceptance(ml_line).mean_len == 2.0
    assert parse_acceptance(ik_line).mean_len is None
    assert parse_acceptance("nothing here") is None


def test_undocumented_flags_are_tried_against_the_binary():
    tried = []

    def verifier(args):
        tried.append(tuple(args))
        return args[0] == "-a"

    c = parse_capabilities("/opt/ik", IK_LEGACY_HELP.replace("-a,    --alias STRING\n", ""), "version: 0", verifier)
    argv = ik.build_argv(profile(engine="ik_llama.cpp", alias="x"), c, inputs())
    assert flag_value(argv, "-a") == "x" and ("-a", "x") in tried
    with pytest.raises(UnsupportedFlag, match="extra_args \\(--nope\\)"):
        ik.build_argv(profile(engine="ik_llama.cpp", extra_args=["--nope"]), c, inputs())


@pytest.mark.parametrize("args, key", [
    (["-c", "100000000"], "ctx_size"), (["--ctx-size=100000000"], "ctx_size"), (["-ngl", "99"], "n_gpu_layers"),
    (["-np", "8"], "parallel"), (["-ctk", "f32"], "cache_type_k"), (["-ub", "4096"], "ubatch_size"),
    (["--api-prefix", "/x"], "http://127.0.0.1:PORT/"), (["--port", "1"], "free port"),
    (["--reuse-port"], "free port"), (["--api-key", "k"], "per-start key"), (["-md", "/d.gguf"], "draft_model"),
    (["-fa", "off"], "flash_attn"), (["-t", "16"], "threads"), (["--device", "CUDA1"], "gpus"),
    (["--spec-type", "draft-mtp"], "[speculation]"), (["-ctkd", "q4_0"], "draft_cache_type_k"),
    (["-ngld", "0"], "draft_n_gpu_layers"), (["--rope-freq-base=1e6"], "[rope]"), (["--pooling", "cls"], "pooling"),
    (["--draft-n", "32"], "[speculation]"), (["-no-mtp"], "[speculation]"),
])
def test_extra_args_that_change_the_plan_or_the_protocol_are_refused_with_the_key(args, key):
    """Whatever llamactl plans with or relies on comes from profile keys: in extra_args it is refused, when
    the profile is loaded (so `profiles validate` says it) and again when the argv is built."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="which llamactl manages") as e:
        profile(extra_args=args)
    assert key in str(e.value)
    unchecked = profile().model_copy(update={"extra_args": args})  # as a planner's model_copy would make it
    with pytest.raises(ProfileError, match=f"extra_args sets {args[0].split('=')[0]}.*{re.escape(key)}"):
        mainline.build_argv(unchecked, caps(MAINLINE_HELP), inputs())


def test_the_prompt_cache_adds_its_slot_directory_and_swa_full_where_the_binary_has_them():
    import dataclasses

    with_cache = dataclasses.replace(inputs(), swa_full=True, slot_save_path=Path("/c/prompts"))
    help_text = MAINLINE_HELP + "--slot-save-path PATH\n--swa-full\n"
    argv = mainline.build_argv(profile(), caps(help_text), with_cache)
    assert flag_value(argv, "--slot-save-path") == "/c/prompts" and argv.count("--swa-full") == 1
    argv = mainline.build_argv(profile(extra_args=["--swa-full"]), caps(help_text), with_cache)
    assert argv.count("--swa-full") == 1  # already in extra_args: not twice
    # a build without slot files runs without the cache; one without --swa-full cannot honour persist = true
    argv = mainline.build_argv(profile(), caps(MAINLINE_HELP + "--swa-full\n"), with_cache)
    assert "--slot-save-path" not in argv
    with pytest.raises(UnsupportedFlag, match="--swa-full"):
        mainline.build_argv(profile(), caps(MAINLINE_HELP), with_cache)
    with pytest.raises(ValueError, match="--slot-save-path, which llamactl manages"):
        profile(extra_args=["--slot-save-path", "/tmp"])
