"""GGUF loader: tiny random models written with gguf.GGUFWriter load to the right numbers, and
each way a file can be broken gives one clear sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tiny import random_blocks, write_gguf  # noqa: E402

from llamarun import build_model, cpu_kernels  # noqa: E402
from llamarun.config import ModelArgs, RopeScaling  # noqa: E402
from llamarun.errors import CheckpointError  # noqa: E402
from llamarun.loaders.gguf import load, read_header  # noqa: E402
from llamarun.model import Transformer  # noqa: E402
from llamarun.packed import PackedEmbedding, PackedLinear  # noqa: E402
from llamarun.sniff import detect_format  # noqa: E402
from llamarun.weights import PackedWeight  # noqa: E402

# dim 64 / hidden 128 are multiples of 32, the block size of Q8_0/Q4_0/Q4_1/Q5_0; K-quants need 256
ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96, max_seq_len=64
)
ARGS_256 = ModelArgs(
    dim=256, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=40, max_seq_len=64
)


def random_state(args: ModelArgs, *, tied: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(args)
    state = {}
    for name, p in model.state_dict().items():
        if name == "output.weight" and tied:
            continue
        state[name] = (
            1.0 + 0.1 * torch.randn(p.shape) if p.dim() == 1 else 0.1 * torch.randn(p.shape)
        )
    return state


def logits_of(
    args: ModelArgs, state: dict[str, torch.Tensor], tokens: torch.Tensor
) -> torch.Tensor:
    model = Transformer(args)
    full = dict(state)
    if "output.weight" not in full:
        full["output.weight"] = full["tok_embeddings.weight"]
    model.load_state_dict({k: v.float() for k, v in full.items()})
    model.setup_caches(1, args.max_seq_len, torch.float32)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None], all_logits=True)


def gguf_logits(path, tokens: torch.Tensor, **load_kwargs) -> torch.Tensor:
    ckpt = load(path, **load_kwargs)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    model.setup_caches(1, ckpt.args.max_seq_len, torch.float32)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None], all_logits=True)


def gguf_roundtrip(array: np.ndarray, qtype: str) -> torch.Tensor:
    kind = gguf.GGMLQuantizationType[qtype]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind).copy())


TOKENS = torch.randint(0, ARGS.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [False, True])
def test_f32_file_matches_the_state_it_was_written_from(tmp_path, tied):
    state = random_state(ARGS, tied=tied)
    path = write_gguf(state, ARGS, tmp_path / "m.gguf")

    ckpt = load(path)

    assert detect_format(path) == "gguf"
    assert ckpt.args == ARGS.__class__(**{**ARGS.__dict__, "tie_embeddings": tied})
    assert ("output.weight" in ckpt.weights) is not tied
    torch.testing.assert_close(
        gguf_logits(path, TOKENS), logits_of(ARGS, state, TOKENS), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_half_precision_file_matches_the_rounded_state(tmp_path, qtype):
    dtype = torch.float16 if qtype == "F16" else torch.bfloat16
    state = random_state(ARGS)
    path = write_gguf(state, ARGS, tmp_path / "m.gguf", qtype=qtype)
    rounded = {k: v.to(dtype).float() if v.dim() == 2 else v for k, v in state.items()}

    ckpt = load(path)

    assert ckpt.weights["layers.0.attention.wq.weight"].dtype == dtype  # kept as stored (mmapped)
    torch.testing.assert_close(
        gguf_logits(path, TOKENS), logits_of(ARGS, rounded, TOKENS), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_file_matches_the_state_dequantized_by_gguf(tmp_path, qtype):
    state = random_state(ARGS)
    path = write_gguf(state, ARGS, tmp_path / "m.gguf", qtype=qtype)
    reference = {
        k: gguf_roundtrip(v.numpy(), qtype) if v.dim() == 2 else v for k, v in state.items()
    }

    got = gguf_logits(path, TOKENS, keep_quantized=False)

    torch.testing.assert_close(got, logits_of(ARGS, reference, TOKENS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_file_matches_its_blocks_dequantized_by_gguf(tmp_path, monkeypatch, qtype):
    # The loader's test, so the prompt runs the float32 computation (the integer GEMM's own
    # precision is test_prompt_gemm.py's).
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")
    # gguf-py cannot quantize K-quants, so the blocks are random bytes; bytes below 0x28 keep
    # every float16 scale finite and small (< 2**-5).
    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    state = random_state(ARGS_256)
    blocks = {}
    for name, w in state.items():
        if w.dim() == 2:
            blocks[name] = rng.integers(
                0, 0x28, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8
            )
            state[name] = torch.from_numpy(gguf.quants.dequantize(blocks[name], kind).copy())
    path = write_gguf(state, ARGS_256, tmp_path / "m.gguf", qtype=qtype, blocks=blocks)
    tokens = TOKENS.clamp(max=ARGS_256.vocab_size - 1)

    got = gguf_logits(path, tokens)

    torch.testing.assert_close(got, logits_of(ARGS_256, state, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype, bytes_per_block", [("Q8_0", 34), ("Q4_0", 18), ("Q4_1", 20)])
def test_packed_types_stay_packed_the_embedding_too(tmp_path, qtype, bytes_per_block):
    state = random_state(ARGS)
    path = write_gguf(state, ARGS, tmp_path / "m.gguf", qtype=qtype)

    ckpt = load(path)

    w1 = ckpt.weights["layers.0.feed_forward.w1.weight"]
    assert isinstance(w1, PackedWeight) and w1.qtype == qtype
    assert w1.shape == (ARGS.hidden_dim, ARGS.dim)
    assert w1.data.dtype == torch.uint8 and tuple(w1.data.shape) == (
        ARGS.hidden_dim,
        ARGS.dim // 32 * bytes_per_block,
    )
    kind = gguf.GGMLQuantizationType[qtype]
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(state["layers.0.feed_forward.w1.weight"].numpy(), kind), kind
    )
    np.testing.assert_array_equal(gguf.quants.dequantize(w1.data.numpy(), kind), expected)
    assert isinstance(ckpt.weights["tok_embeddings.weight"], PackedWeight)  # rows looked up packed
    assert ckpt.weights["layers.0.attention_norm.weight"].dtype == torch.float32


K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]


def k_quant_file(tmp_path, qtypes: list[str], args: ModelArgs = ARGS_256):
    """A GGUF file whose matrices cycle through `qtypes` (random blocks), and its state dict of
    the matrices as gguf-py dequantizes them."""
    state = random_state(args)
    blocks, types = {}, {}
    for i, (name, w) in enumerate((n, w) for n, w in state.items() if w.dim() == 2):
        qtype = qtypes[i % len(qtypes)]
        blocks[name] = random_blocks(qtype, w.shape[0], w.shape[1], seed=i, scale=0.002)
        kind = gguf.GGMLQuantizationType[qtype]
        state[name] = torch.from_numpy(gguf.quants.dequantize(blocks[name], kind).copy())
        types[name] = qtype
    return write_gguf(state, args, tmp_path / "m.gguf", blocks=blocks, block_types=types), state


def test_mixed_k_quant_file_stays_in_its_bytes(tmp_path):
    path, state = k_quant_file(tmp_path, K_TYPES)
    header = read_header(path)

    ckpt = load(header)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)

    assert isinstance(model.tok_embeddings, PackedEmbedding)
    assert isinstance(model.layers[0].feed_forward.w2, PackedLinear)
    packed = {k: w for k, w in ckpt.weights.items() if isinstance(w, PackedWeight)}
    assert {w.qtype for w in packed.values()} == set(K_TYPES)
    down = header.state.data(header.state.tensors["blk.0.ffn_down.weight"])  # the mapped bytes
    assert ckpt.weights["layers.0.feed_forward.w2.weight"].data.data_ptr() == down.ctypes.data
    assert model.layers[0].feed_forward.w2.data.data_ptr() == down.ctypes.data


@pytest.mark.parametrize("path_kind", ["kernel", "torch"])
def test_mixed_k_quant_model_computes_its_dequantized_weights(tmp_path, path_kind, monkeypatch):
    from llamarun import cpu_kernels

    if path_kind == "kernel" and cpu_kernels.ops() is None:
        pytest.skip("no CPU kernels on this machine")
    if path_kind == "torch":
        monkeypatch.setitem(cpu_kernels._state, "ops", None)
    path, state = k_quant_file(tmp_path, ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q3_K"])
    tokens = TOKENS.clamp(max=ARGS_256.vocab_size - 1)

    got = gguf_logits(path, tokens)

    # 16-bit activations per 32 on the kernel path; float32 with a different sum order otherwise
    torch.testing.assert_close(got, logits_of(ARGS_256, state, tokens), atol=1e-3, rtol=1e-3)


def test_types_without_a_kernel_load_dequantized_with_a_notice(tmp_path, caplog):
    kind = gguf.GGMLQuantizationType.IQ2_XXS
    block, size = gguf.GGML_QUANT_SIZES[kind]
    state = random_state(ARGS_256)
    blocks, types = {}, {}
    for name, w in state.items():
        if w.dim() == 2 and name != "tok_embeddings.weight":
            blocks[name] = np.random.default_rng(0).integers(
                0, 0x28, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8
            )
            state[name] = torch.from_numpy(gguf.quants.dequantize(blocks[name], kind).copy())
            types[name] = "IQ2_XXS"
    path = write_gguf(state, ARGS_256, tmp_path / "m.gguf", blocks=blocks, block_types=types)

    with caplog.at_level("WARNING"):
        ckpt = load(path)

    notices = [r.getMessage() for r in caplog.records if "IQ2_XXS" in r.getMessage()]
    assert len(notices) == 1
    assert "has no kernel yet" in notices[0] and "dequantized to float32" in notices[0]
    assert "MB in memory" in notices[0]
    w2 = ckpt.weights["layers.0.feed_forward.w2.weight"]
    assert w2.dtype == torch.float32
    torch.testing.assert_close(w2, state["layers.0.feed_forward.w2.weight"])


def test_packed_q8_0_model_matches_the_dequantized_one(tmp_path):
    state = random_state(ARGS)
    path = write_gguf(state, ARGS, tmp_path / "m.gguf", qtype="Q8_0")

    packed = gguf_logits(path, TOKENS)

    # the kernels quantize activations to 16 bits per block of 32
    torch.testing.assert_close(
        packed, gguf_logits(path, TOKENS, keep_quantized=False), atol=1e-3, rtol=1e-3
    )


def test_rope_freqs_become_llama3_scaling(tmp_path):
    args = ModelArgs(
        dim=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        vocab_size=96,
        rope_theta=500000.0,
        max_seq_len=64,
    )
    scaling = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
    )
    freqs = 1.0 / args.rope_theta ** (
        torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim
    )
    factors = freqs / scaling.apply(freqs)  # llama.cpp stores the divisor of each frequency
    path = write_gguf(random_state(args), args, tmp_path / "m.gguf", rope_freqs=factors)

    ckpt = load(path)

    assert ckpt.args.rope_scaling == scaling
    assert "rope_freqs.weight" not in ckpt.weights


def test_bad_magic_is_named(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(100))

    with pytest.raises(
        CheckpointError, match=r"m\.gguf is not a GGUF file: it starts with b'GGML'"
    ):
        load(path)


def test_truncated_file_is_named(tmp_path):
    path = write_gguf(random_state(ARGS), ARGS, tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])

    with pytest.raises(CheckpointError, match=r"m\.gguf is (a )?truncated.*Download it again"):
        load(path)


def test_truncated_metadata_is_named(tmp_path):
    path = write_gguf(random_state(ARGS), ARGS, tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(CheckpointError, match=r"truncated or corrupt GGUF file"):
        load(path)


def test_version_2_file_loads(tmp_path):
    state = random_state(ARGS)
    path = write_gguf(state, ARGS, tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")  # v2 and v3 differ only in allowing big-endian files
    path.write_bytes(bytes(data))

    torch.testing.assert_close(
        gguf_logits(path, TOKENS), logits_of(ARGS, state, TOKENS), atol=1e-5, rtol=1e-5
    )


def test_old_version_is_named(tmp_path):
    path = write_gguf(random_state(ARGS), ARGS, tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="GGUF version 1; llamarun reads versions 2 and 3"):
        load(path)


def test_unsupported_architecture_lists_supported(tmp_path):
    path = write_gguf(random_state(ARGS), ARGS, tmp_path / "m.gguf", arch="qwen2")

    with pytest.raises(
        CheckpointError, match=r"architecture 'qwen2'; llamarun supports only llama"
    ):
        load(path)


def test_unsupported_tensor_type_names_tensor_and_lists_supported(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]  # activations only
    state = random_state(ARGS_256)
    blocks = {
        k: np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
        for k, w in state.items()
        if w.dim() == 2
    }
    path = write_gguf(state, ARGS_256, tmp_path / "m.gguf", qtype="Q8_K", blocks=blocks)

    with pytest.raises(
        CheckpointError,
        match=r"Unsupported GGUF tensor type Q8_K for \S+\.weight in .*Supported: F32, F16, BF16, Q4_0",
    ):
        load(path)


def test_truncated_k_quant_tensor_is_named(tmp_path):
    path, _ = k_quant_file(tmp_path, ["Q4_K"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])

    with pytest.raises(
        CheckpointError, match=r"m\.gguf is truncated: tensor \S+\.weight ends at byte"
    ):
        load(path)


def test_k_quant_tensor_of_partial_blocks_is_named(tmp_path):
    path, _ = k_quant_file(tmp_path, ["Q4_K"])
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(name) + len(name)  # then n_dims (uint32) and the dims (uint64 each)
    assert int.from_bytes(data[at + 4 : at + 12], "little") == 256
    data[at + 4 : at + 12] = (200).to_bytes(8, "little")
    path.write_bytes(bytes(data))

    with pytest.raises(
        CheckpointError,
        match=r"m\.gguf is corrupt: tensor blk\.0\.ffn_down\.weight has rows of 200 Q4_K weights, "
        r"not a whole number of its 256-weight blocks",
    ):
        load(path)


def test_missing_tensor_is_named(tmp_path):
    state = random_state(ARGS)
    del state["layers.1.feed_forward.w2.weight"]
    path = write_gguf(state, ARGS, tmp_path / "m.gguf")

    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.weight"):
        load(path)


def test_folder_with_one_gguf_file_loads_it(tmp_path):
    state = random_state(ARGS)
    write_gguf(state, ARGS, tmp_path / "model.gguf")
    (tmp_path / "README.md").write_text("not a model")

    ckpt = load(tmp_path)

    assert detect_format(tmp_path) == "gguf" and ckpt.path == tmp_path / "model.gguf"
