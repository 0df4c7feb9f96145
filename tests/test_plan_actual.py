"""The engine's memory lines as a CUDA build prints them (llamactl.plan.actual): buffers and the breakdown table."""

from __future__ import annotations

from llamactl.plan.actual import parse_memory_breakdown, parse_memory_log

# A CUDA build, -lv 4: the target on CUDA0 (token embeddings mapped on the host), then a draft.
CUDA_TARGET_AND_DRAFT = """\
0.00.512.001 I load_tensors: offloaded 33/33 layers to GPU
0.00.512.002 I load_tensors:   CPU_Mapped model buffer size =   532.31 MiB
0.00.512.003 I load_tensors:        CUDA0 model buffer size =  7605.33 MiB
0.01.100.000 I llama_context:  CUDA_Host  output buffer size =     1.96 MiB
0.01.100.001 I llama_kv_cache:      CUDA0 KV buffer size =  4096.00 MiB
0.01.200.000 I sched_reserve:      CUDA0 compute buffer size =   296.00 MiB
0.01.200.001 I sched_reserve:  CUDA_Host compute buffer size =    40.01 MiB
0.01.300.000 I load_tensors:   CPU_Mapped model buffer size =   266.16 MiB
0.01.300.001 I load_tensors:        CUDA0 model buffer size =  1137.55 MiB
0.01.400.000 I llama_context:  CUDA_Host  output buffer size =     0.49 MiB
0.01.400.001 I llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB
0.01.500.000 I sched_reserve:      CUDA0 compute buffer size =   260.50 MiB
0.01.500.001 I sched_reserve:  CUDA_Host compute buffer size =    20.01 MiB
""".splitlines()

BREAKDOWN = """\
0.00.020.000 I common_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
0.00.020.001 I common_memory_breakdown_print: |   - CUDA0 (NVIDIA H200)  | 143771 = 143000 + (     0 =     0 +       0 +       0) +         771 |
0.09.000.000 I common_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
0.09.000.001 I common_memory_breakdown_print: |   - CUDA0 (NVIDIA H200)  | 143771 = 130180 + ( 12789 =  8742 +    4608 +     556) +         802 |
0.09.000.002 I common_memory_breakdown_print: |   - Host                 |                   860 =   798 +       2 +      60                |
""".splitlines()


def test_cuda_buffers_are_read_per_buffer_name_for_the_target_then_the_draft() -> None:
    target, draft = parse_memory_log(CUDA_TARGET_AND_DRAFT)
    assert target.model == {"CPU_Mapped": 532.31, "CUDA0": 7605.33}
    assert target.kv == {"CUDA0": 4096.0}
    assert target.output == {"CUDA_Host": 1.96}
    assert target.compute == {"CUDA0": 296.0, "CUDA_Host": 40.01}
    assert draft.model["CUDA0"] == 1137.55 and draft.compute["CUDA_Host"] == 20.01


def test_the_breakdown_is_the_last_table_with_the_device_and_host_rows() -> None:
    rows = parse_memory_breakdown(BREAKDOWN)
    assert [r.name for r in rows] == ["CUDA0", "Host"]
    gpu, host = rows
    assert gpu.description == "NVIDIA H200"
    assert (gpu.total_mib, gpu.free_mib, gpu.self_mib, gpu.unaccounted_mib) == (143771, 130180, 12789, 802)
    assert (gpu.model_mib, gpu.context_mib, gpu.compute_mib) == (8742, 4608, 556)
    assert host.total_mib is None and (host.self_mib, host.model_mib, host.compute_mib) == (860, 798, 60)


def test_no_breakdown_table_gives_no_rows() -> None:
    assert parse_memory_breakdown(CUDA_TARGET_AND_DRAFT) == []


# The pinned mainline (CPU build, -lv 4) with --spec-type draft-mtp: the MTP context has no model buffer (it runs
# on the target's weights) and reserves its graph twice, at the same size.
MTP_CONTEXT = """\
0.00.041.279 I load_tensors:   CPU_Mapped model buffer size =     0.33 MiB
0.00.041.647 I llama_context:        CPU  output buffer size =     0.00 MiB
0.00.041.675 I llama_kv_cache:        CPU KV buffer size =     0.25 MiB
0.00.042.629 I sched_reserve:        CPU compute buffer size =     2.01 MiB
0.00.664.563 I common_speculative_init_result: creating MTP draft context against the target model '/m/glm.gguf'
0.00.665.004 I llama_context:        CPU  output buffer size =     0.00 MiB
0.00.665.377 I llama_kv_cache:        CPU KV buffer size =     0.12 MiB
0.00.685.351 I sched_reserve:        CPU compute buffer size =     1.51 MiB
0.01.340.217 I spec common_specu: adding speculative implementation 'draft-mtp'
0.01.341.483 I sched_reserve:        CPU compute buffer size =     1.51 MiB
""".splitlines()


def test_the_mtp_context_is_a_context_of_its_own_without_weights_and_its_second_reserve_is_not_added() -> None:
    target, mtp = parse_memory_log(MTP_CONTEXT)
    assert target.model == {"CPU_Mapped": 0.33} and target.kv == {"CPU": 0.25} and target.compute == {"CPU": 2.01}
    assert mtp.model == {} and mtp.kv == {"CPU": 0.12} and mtp.compute == {"CPU": 1.51}


# The pinned ik_llama.cpp with -mtp (CPU build): its weights line has no "model", its MTP context follows.
IK_MTP = """\
llm_load_tensors:        CPU buffer size =     4.14 MiB
llama_kv_cache_init:        CPU KV buffer size =    24.00 MiB
llama_init_from_model: KV self size  =   24.00 MiB, K (f16):   12.00 MiB, V (f16):   12.00 MiB
llama_init_from_model:        CPU  output buffer size =     0.00 MiB
Free memory 0 MiB on device 0 is less the required compute buffer size 3.5 MiB
llama_init_from_model:        CPU compute buffer size =    36.00 MiB
llama_kv_cache_init:        CPU KV buffer size =     8.00 MiB
llama_init_from_model:        CPU  output buffer size =     0.00 MiB
llama_init_from_model:        CPU compute buffer size =    34.51 MiB
""".splitlines()


def test_iks_weights_line_and_its_mtp_context() -> None:
    target, mtp = parse_memory_log(IK_MTP)
    assert target.model == {"CPU": 4.14} and target.kv == {"CPU": 24.0} and target.compute == {"CPU": 36.0}
    assert mtp.model == {} and mtp.kv == {"CPU": 8.0} and mtp.compute == {"CPU": 34.51}
