"""The arithmetic of a --tp/--pp split (split.py) and each rank's slice of the weights (packed
blocks, Meta shards, tp.shard_weights), without starting any process."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import random_blocks

from llamarun.config import KNOWN_MODELS, ModelArgs
from llamarun.errors import ConfigError, MemoryPlanError
from llamarun.loaders.files import drop_file_pages
from llamarun.loaders.hf import HalfSplitRows, unpermute
from llamarun.packed import PackedLinear
from llamarun.plan import weight_bytes
from llamarun.quantize import Int8Linear
from llamarun.split import (
    Split,
    check_split,
    plan_rank,
    rank_option,
    shard_bounds,
    stage_layers,
    tp_sizes_that_work,
)
from llamarun.tp import shard_weights
from llamarun.weights import PackedWeight, ShardedWeight, StoredTensor, expected_shapes

GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320)
STORIES110M = KNOWN_MODELS["stories110M"]


def test_stages_cover_the_layers_contiguously_and_evenly():
    assert [list(stage_layers(12, 2, s)) for s in range(2)] == [list(range(6)), list(range(6, 12))]
    assert [len(stage_layers(5, 3, s)) for s in range(3)] == [2, 2, 1]
    assert [i for s in range(4) for i in stage_layers(10, 4, s)] == list(range(10))


def test_an_uneven_vocabulary_gives_the_last_rank_the_short_share():
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 4), (8, 2)]


def test_the_sizes_that_work_keep_whole_heads_and_whole_packed_blocks():
    assert tp_sizes_that_work(GQA) == [1, 2]
    # n_heads x head_dim = 64 and hidden_dim = 128 over 32-column blocks: 2 works, 4 would not
    wide = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=320, hidden_dim=128)
    assert tp_sizes_that_work(wide) == [1, 2, 4]
    assert tp_sizes_that_work(wide, block=32) == [1, 2]


@pytest.mark.parametrize(
    ("split", "block", "message"),
    [
        (Split(tp=3), None, r"n_heads \(4\) is not divisible by --tp 3.*--tp can be 1 or 2 for this model \(n_heads=4, n_kv_heads=2, hidden_dim=128\)"),
        (Split(tp=4), None, r"n_kv_heads \(2\) is not divisible by --tp 4: each rank holds whole attention heads"),
        (Split(pp=3), None, r"--pp 3 asks for more pipeline stages than the model has layers \(2\): --pp can be 1 to 2"),
    ],
)  # fmt: skip
def test_a_split_the_model_cannot_take_is_one_sentence_with_the_numbers(split, block, message):
    with pytest.raises(ConfigError, match=message):
        check_split(GQA, split, block=block)


def test_packed_weights_refuse_a_split_inside_their_blocks():
    wide = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=320, hidden_dim=128)
    with pytest.raises(
        ConfigError,
        match="would cut the packed weights' inputs .* inside their 32-column blocks. --tp can be 1 or 2",
    ):
        check_split(wide, Split(tp=4), block=32)


@pytest.mark.parametrize("tp", [2, 4])
def test_each_tensor_parallel_rank_holds_a_1_over_n_share_of_the_110m_model(tp):
    total = weight_bytes(STORIES110M, torch.float32)
    ranks = [
        rank_option(STORIES110M, Split(tp=tp), r, torch.float32, None, 1, 1024, gpu=False)
        for r in range(tp)
    ]
    assert max(o.weights for o in ranks) <= total / tp * 1.05  # the target
    # nothing is held twice but the replicated norms (dim numbers per norm, on every rank)
    norms = (2 * STORIES110M.n_layers + 1) * STORIES110M.dim * 4
    assert sum(o.weights for o in ranks) == total + (tp - 1) * norms


def test_a_pipeline_stage_holds_its_layers_and_a_tied_embedding_both_ends_need():
    args = STORIES110M  # tied: the first stage embeds with it, the last classifies with it
    first, last = (
        rank_option(args, Split(pp=2), r, torch.float32, None, 1, 1024, gpu=False) for r in (0, 1)
    )
    embedding = args.vocab_size * args.dim * 4
    assert first.weights == last.weights  # 6 layers and the matrix each
    assert (
        first.weights + last.weights == weight_bytes(args, torch.float32) + embedding + args.dim * 4
    )


def test_a_rank_that_does_not_fit_gets_its_figures_and_the_quantization_that_fits():
    need = rank_option(STORIES110M, Split(tp=2), 0, torch.float32, None, 1, 1024, gpu=False).total
    kwargs = dict(device=torch.device("cpu"), dtype=torch.float32, batch=1, seq_len=1024, sharing=2)
    with pytest.raises(
        MemoryPlanError,
        match=r"split with --tp 2 needs .* on rank 0 .* shared by 2 ranks.* It fits with --quantize int8",
    ):
        plan_rank(STORIES110M, Split(tp=2), 0, quantize=None, free=2 * need - 2, **kwargs)
    chosen = plan_rank(STORIES110M, Split(tp=2), 0, quantize="auto", free=2 * need - 2, **kwargs)
    assert chosen.quantize == "int8"


def test_a_packed_files_ranks_hold_their_shares_of_its_stored_bytes():
    args = ModelArgs(
        dim=512,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=1024,
        vocab_size=256,
        max_seq_len=64,
    )
    stored = {  # Q4_K matrices (144 bytes per 256 weights), float32 norms
        name: StoredTensor("Q4_K", shape, shape[0] * shape[1] // 256 * 144, packed=True)
        if len(shape) == 2
        else StoredTensor("F32", shape, 4 * shape[0])
        for name, shape in expected_shapes(args).items()
    }
    whole = sum(t.n_bytes for t in stored.values())
    norms = sum(t.n_bytes for t in stored.values() if len(t.shape) == 1)

    def weights(split: Split, r: int) -> int:
        option = rank_option(args, split, r, torch.float32, "Q4_K", 1, 64, gpu=False, stored=stored)
        return option.weights

    assert [weights(Split(tp=2), r) for r in (0, 1)] == [(whole - norms) // 2 + norms] * 2
    assert weights(Split(pp=2), 0) + weights(Split(pp=2), 1) == whole + 4 * args.dim  # 2 norms


def q8_0(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random float weights and their GGUF Q8_0 blocks, (rows, cols / 32 * 34) bytes."""
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    return w, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)


def test_packed_blocks_slice_by_rows_and_by_whole_blocks_of_columns():
    _, blocks = q8_0(8, 128)
    packed = PackedWeight("Q8_0", torch.from_numpy(blocks), (8, 128))
    whole = PackedLinear.from_packed(packed).dequantize()

    rows = PackedLinear.from_packed(packed.narrow(0, 2, 4)).dequantize()
    cols = PackedLinear.from_packed(packed.narrow(1, 64, 64)).dequantize()

    torch.testing.assert_close(rows, whole[2:6], atol=0, rtol=0)
    torch.testing.assert_close(cols, whole[:, 64:], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="blocks hold 32 columns each"):
        packed.narrow(1, 16, 64)


def test_k_quant_blocks_slice_by_whole_256_column_blocks():
    packed = PackedWeight("Q4_K", torch.from_numpy(random_blocks("Q4_K", 4, 768)), (4, 768))
    whole = PackedLinear.from_packed(packed).dequantize()

    cols = PackedLinear.from_packed(packed.narrow(1, 256, 512)).dequantize()

    torch.testing.assert_close(cols, whole[:, 256:], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="blocks hold 256 columns each"):
        packed.narrow(1, 32, 256)


def test_sharded_weights_read_only_the_pieces_a_slice_needs():
    pieces = [torch.arange(12.0).view(2, 6), torch.arange(12.0, 24.0).view(2, 6)]
    merged = torch.cat(pieces, 0)
    w = ShardedWeight(pieces, dim=0)

    assert w.shape == merged.shape
    assert w.narrow(0, 2, 2).data_ptr() == pieces[1].data_ptr()  # a piece itself, uncopied
    torch.testing.assert_close(w.narrow(0, 1, 2), merged[1:3])
    torch.testing.assert_close(w.narrow(1, 2, 3), merged[:, 2:5])


def test_shard_weights_gives_each_rank_its_share_and_copies_it_out_of_the_file():
    weights = {
        "layers.0.attention.wq.weight": torch.randn(64, 64),
        "layers.0.attention.wo.weight": torch.randn(64, 64),
        "tok_embeddings.weight": torch.randn(320, 64),
        "layers.0.attention_norm.weight": torch.randn(64),
    }
    share = shard_weights(weights, Split(tp=2), 1)

    torch.testing.assert_close(
        share["layers.0.attention.wq.weight"], weights["layers.0.attention.wq.weight"][32:]
    )
    torch.testing.assert_close(
        share["layers.0.attention.wo.weight"], weights["layers.0.attention.wo.weight"][:, 32:]
    )
    torch.testing.assert_close(
        share["tok_embeddings.weight"], weights["tok_embeddings.weight"][160:]
    )
    norm = share["layers.0.attention_norm.weight"]
    torch.testing.assert_close(norm, weights["layers.0.attention_norm.weight"])
    assert norm.data_ptr() != weights["layers.0.attention_norm.weight"].data_ptr()


def resident_mb(path) -> float:
    """This process's resident memory in the mappings of `path` (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total / 1e3


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux smaps")
def test_dropping_file_pages_lets_the_mapping_go_and_leaves_anonymous_memory_alone(tmp_path):
    path = tmp_path / "weights.bin"
    np.arange(1 << 21, dtype=np.float32).tofile(path)  # 8 MB
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    assert float(mapped.sum()) > 0 and resident_mb(path) > 7  # read: resident

    drop_file_pages(mapped)
    anonymous = torch.arange(1 << 21, dtype=torch.float32)
    drop_file_pages(anonymous)  # not a file's: DONTNEED would zero it, so it is left alone

    assert resident_mb(path) < 1
    assert float(mapped[123456]) == 123456.0  # read again from the file
    assert torch.equal(anonymous, torch.arange(1 << 21, dtype=torch.float32))


def test_a_share_of_each_row_quantizes_to_the_whole_rows_integers_given_their_maxima():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    whole = Int8Linear.from_float(w)
    absmax = w.abs().amax(dim=1, keepdim=True)  # what tp.quantize_rowwise_int8_ all-reduces

    share = Int8Linear.from_float(w[:, 64:], absmax)
    alone = Int8Linear.from_float(w[:, 64:])

    assert torch.equal(share.weight, whole.weight[:, 64:])
    assert torch.equal(share.scales, whole.scales)
    assert not torch.equal(alone.scales, whole.scales)  # its own half's maxima: other integers


def test_hugging_face_q_rows_are_permuted_only_for_the_heads_a_rank_reads():
    w = torch.randn(4 * 16, 64)  # 4 heads of 16 rows, in HF's half-split layout
    lazy = HalfSplitRows(w, n_heads=4)
    whole = unpermute(w, 4)

    torch.testing.assert_close(lazy.narrow(0, 32, 32), whole[32:], atol=0, rtol=0)
    torch.testing.assert_close(
        lazy.narrow(0, 8, 16), whole[8:24], atol=0, rtol=0
    )  # not whole heads
    assert lazy.shape == w.shape and lazy.sources == [w]
