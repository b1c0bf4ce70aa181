"""Memory plan arithmetic from ModelArgs alone, and the fitting advice against faked free memory."""

import pytest
import torch

from llamarun.config import KNOWN_MODELS
from llamarun.errors import MemoryPlanError
from llamarun.plan import (
    GB,
    check_fits,
    kv_cache_bytes,
    linear_bytes,
    plan_memory,
    weight_bytes,
    working_bytes,
)

BF16 = torch.bfloat16


@pytest.mark.parametrize(
    ("name", "n_params"),
    # exact counts of the released checkpoints (sum of their tensors' sizes)
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-2-13b", 13_015_864_320),
        ("llama-3-8b", 8_030_261_248),
        ("llama-3.2-1b", 1_235_814_400),
    ],
)
def test_parameter_count_and_16_bit_size_match_the_model_cards(name, n_params):
    args = KNOWN_MODELS[name]

    assert args.n_params() == n_params
    assert weight_bytes(args, BF16) == 2 * args.n_params()
    assert weight_bytes(args, torch.float32) == 4 * args.n_params()


def test_llama_2_7b_is_13_5_gb_in_16_bit():
    assert round(weight_bytes(KNOWN_MODELS["llama-2-7b"], torch.float16) / GB, 1) == 13.5


def test_kv_cache_is_batch_context_layers_kv_heads_head_dim_two_bytes():
    args = KNOWN_MODELS["llama-3-8b"]  # 8 kv heads of 128: GQA shrinks the cache 4x

    got = kv_cache_bytes(args, batch=2, seq_len=8192, dtype=BF16)

    assert got == 2 * 8192 * 32 * 8 * 128 * 2 * 2  # 2 GiB
    assert kv_cache_bytes(KNOWN_MODELS["llama-2-7b"], 1, 2048, BF16) == 2**30


def test_a_float16_kv_cache_is_planned_at_two_bytes_under_float32_weights():
    args = KNOWN_MODELS["llama-3.2-1b"]
    cpu = torch.device("cpu")
    f32 = plan_memory(args, device=cpu, dtype=torch.float32, seq_len=4096, free=100 * GB)
    f16 = plan_memory(
        args, device=cpu, dtype=torch.float32, seq_len=4096, free=100 * GB, kv_dtype=torch.float16
    )
    assert f16.asked.kv_cache == f32.asked.kv_cache // 2
    assert f16.asked.weights == f32.asked.weights


def test_int8_and_int4_linears_count_weights_and_scales_as_quantize_stores_them():
    # int8: a byte per weight and a float32 scale per output channel
    assert linear_bytes(4096, 4096, BF16, "int8") == 4096 * 4096 + 4096 * 4
    # int4: half a byte per weight, a float16 scale and minimum per 32 weights
    cpu = 4096 * 4096 // 2 + 4096 * 128 * (2 + 2)
    assert linear_bytes(4096, 4096, BF16, "int4") == cpu
    # on CUDA, Int4Linear also keeps torch's tile-packed copy (int4 + bf16 scale/zero per 32)
    assert (
        linear_bytes(4096, 4096, BF16, "int4", gpu=True) == cpu + 4096 * 4096 // 2 + 4096 * 128 * 4
    )
    assert linear_bytes(4096, 11008, BF16, "int4", gpu=True) == linear_bytes(
        4096, 11008, BF16, "int4"
    )
    # GGUF blocks kept packed: Q8_0 as int8 with a float32 scale per 32; Q4_1 like int4
    assert linear_bytes(64, 64, BF16, "Q8_0") == 64 * 64 + 64 * 2 * 4
    assert linear_bytes(64, 64, BF16, "Q4_1") == linear_bytes(64, 64, BF16, "int4")


def test_quantization_keeps_embeddings_and_norms_in_dtype():
    args = KNOWN_MODELS["llama-2-7b"]
    embeddings = args.vocab_size * args.dim * 2

    int8 = weight_bytes(args, BF16, "int8")

    # about one byte per linear weight, plus the embedding table's second byte per weight
    assert args.n_params() < int8 < args.n_params() + embeddings + 10 * 2**20
    assert weight_bytes(args, BF16, "int4") < int8 < weight_bytes(args, BF16)


def test_working_memory_grows_with_batch_and_has_a_gpu_reserve():
    args = KNOWN_MODELS["llama-3.2-1b"]

    cpu1 = working_bytes(args, 1, 2048, BF16, gpu=False)
    cpu4 = working_bytes(args, 4, 2048, BF16, gpu=False)
    gpu1 = working_bytes(args, 1, 2048, BF16, gpu=True)

    assert cpu4 == 4 * cpu1
    assert gpu1 > cpu1
    assert args.vocab_size * 4 < cpu1 < 1 * GB  # logits plus one 512-token chunk's activations


def test_7b_on_a_12_gb_gpu_fails_with_the_figures_and_the_options_that_fit():
    plan = plan_memory(
        KNOWN_MODELS["llama-2-7b"],
        device="cuda",
        dtype=BF16,
        seq_len=2048,
        name="Llama-2-7B",
        free=int(11.7 * GB),
        free_cpu=int(32 * GB),
    )

    with pytest.raises(MemoryPlanError) as e:
        check_fits(plan)

    msg = str(e.value)
    assert msg.startswith(
        "Llama-2-7B needs 13.5 GB in bfloat16 plus 1.1 GB of KV cache at 2048 tokens"
    )
    assert "this GPU has 11.7 GB free" in msg
    # int4 is larger than int8 on CUDA while Int4Linear keeps two layouts (see linear_bytes)
    assert "It fits with --quantize int8 (8.7 GB), --quantize int4 (9.7 GB)" in msg
    assert "or by offloading 9 of 32 layers to the CPU (--offload)" in msg


def test_auto_picks_the_best_quality_that_fits():
    args = KNOWN_MODELS["llama-2-7b"]

    def chosen(free_gb):
        plan = plan_memory(
            args,
            device="cpu",
            dtype=BF16,
            quantize="auto",
            free=int(free_gb * GB),
            free_cpu=int(64 * GB),
        )
        return plan.chosen.quantize if plan.chosen else "none"

    assert chosen(80) is None  # bfloat16 fits 80 GB of RAM
    assert chosen(11.7) == "int8"
    assert chosen(7) == "int4"
    assert chosen(3) == "none"


def test_offload_moves_as_few_layers_as_needed_and_checks_cpu_ram():
    args = KNOWN_MODELS["llama-2-7b"]
    layer = weight_bytes(args, BF16) // args.n_layers

    plan = plan_memory(
        args, device="cuda", dtype=BF16, offload=True, free=int(11.7 * GB), free_cpu=int(32 * GB)
    )
    no_ram = plan_memory(
        args, device="cuda", dtype=BF16, offload=True, free=int(11.7 * GB), free_cpu=layer
    )

    assert plan.chosen.offload_layers == 9
    assert plan.chosen.total <= 11.7 * GB
    assert (
        plan_memory(
            args,
            device="cuda",
            dtype=BF16,
            offload=True,
            free=int(11.7 * GB),
            free_cpu=int(32 * GB),
            seq_len=256,
        ).chosen.offload_layers
        < 9
    )
    assert no_ram.chosen is None
    assert "--offload" not in no_ram.describe()


def test_cpu_plan_suggests_quantization_or_a_shorter_context_never_offload():
    args = KNOWN_MODELS["llama-3-8b"]  # 16 GB in bf16, 2 GB of KV cache at 8192 tokens

    plan = plan_memory(args, device="cpu", dtype=BF16, seq_len=8192, free=int(17 * GB))

    msg = plan.describe()
    assert "this machine's RAM has 17.0 GB free" in msg
    assert "--quantize int8" in msg and "--max-seq-len 2048" in msg
    assert "--offload" not in msg


def test_when_nothing_fits_the_message_says_so():
    plan = plan_memory(
        KNOWN_MODELS["llama-2-70b"],
        device="cuda",
        dtype=BF16,
        free=int(8 * GB),
        free_cpu=int(16 * GB),
    )

    assert plan.chosen is None
    assert "Nothing fits" in plan.describe()


def test_probes_are_injectable():
    seen = []

    def memory(device):
        seen.append(device.type)
        return 100 * GB

    plan = plan_memory(KNOWN_MODELS["stories15M"], device="cuda", dtype=BF16, memory=memory)

    assert seen == ["cuda", "cpu"]
    assert plan.fits and plan.chosen.quantize is None


def test_unknown_quantize_mode_is_a_user_error():
    with pytest.raises(MemoryPlanError, match="int8, int4 or auto"):
        plan_memory(KNOWN_MODELS["stories15M"], device="cpu", dtype=BF16, quantize="int3", free=GB)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_free_memory_on_cuda_comes_from_mem_get_info():
    from llamarun.plan import free_memory

    free, total = torch.cuda.mem_get_info()

    assert abs(free_memory(torch.device("cuda")) - free) < 0.05 * total
