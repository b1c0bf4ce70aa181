"""`llamarun info` and read_args: the architecture from configs and headers alone, equal to what
the loaders produce, with no weights loaded."""

import struct

import pytest
from conftest import shared_model
from tiny import (
    hf_config,
    llamarun_state,
    meta_params,
    meta_to_hf,
    random_blocks,
    write_gguf,
    write_hf_state,
    write_meta,
)

import llamarun.loaders
import llamarun.loaders.meta
from llamarun.cli import main
from llamarun.config import ModelArgs, RopeScaling
from llamarun.loaders import load_checkpoint, read_header
from llamarun.model import Transformer
from llamarun.sniff import LLAMA2C_MAGIC


def no_weights(*_args, **_kwargs):
    raise AssertionError("info must not read weights")


def test_info_on_a_known_shape_prints_parameters_and_memory_per_option(capsys):
    rc = main(["info", "llama-2-7b", "--max-seq-len", "2048"])

    out = capsys.readouterr().out
    assert rc == 0
    assert "6,738,415,616 (6.74 B)" in out
    assert "Memory at 2048 tokens of context x 1 row(s)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["bfloat16"][1:5] == ["13.5", "GB", "1.1", "GB"]  # weights, KV cache
    assert lines["int8"][0] == "int8" and lines["int4"][0] == "int4"


def test_info_on_a_meta_folder_reads_no_weights(
    tmp_path, tiny_model, tiny_args, capsys, monkeypatch
):
    path = write_meta(llamarun_state(tiny_model), meta_params(tiny_args), tmp_path / "m", shards=2)
    monkeypatch.setattr(llamarun.loaders.meta, "merge_shards", no_weights)
    monkeypatch.setattr(llamarun.loaders, "load_checkpoint", no_weights)

    rc = main(["info", str(path)])

    out = capsys.readouterr().out
    assert rc == 0
    assert f"{path} (meta format)" in out
    assert (
        "dim=64 n_layers=2 n_heads=4 n_kv_heads=2 head_dim=16 hidden_dim=128 vocab_size=320" in out
    )
    assert "stored as     float32" in out


def test_info_on_a_missing_path_is_an_error_naming_it(tmp_path, capsys):
    rc = main(["info", str(tmp_path / "nothing-here")])

    assert rc == 2
    assert "nothing-here does not exist" in capsys.readouterr().err


def test_read_args_matches_the_hf_loader_with_llama3_rope(tmp_path, tiny_model):
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        vocab_size=320,
        max_seq_len=256,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(),
    )
    path = write_hf_state(
        meta_to_hf(llamarun_state(tiny_model), args), hf_config(args), tmp_path / "hf"
    )

    header = read_header(path)

    assert header.format == "hf" and header.args == args
    assert header.args == load_checkpoint(path).args


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_read_args_matches_the_gguf_loader_and_sees_packed_linears(
    tmp_path, tiny_model, tiny_args, qtype
):
    path = write_gguf(llamarun_state(tiny_model), tiny_args, tmp_path / "m.gguf", qtype=qtype)

    header = read_header(path)

    assert header.args == load_checkpoint(path).args
    assert header.packed == (None if qtype == "F32" else "Q8_0")


def test_read_args_on_the_real_gguf_and_llama2c_files():
    smollm = read_header(shared_model("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
    stories = read_header(shared_model("stories260K/stories260K.bin"))

    assert (
        smollm.args.n_layers,
        smollm.args.n_kv_heads,
        smollm.args.vocab_size,
        smollm.packed,
    ) == (30, 3, 49152, "Q4_1+Q8_0")  # Q4_1 linears, a Q8_0 embedding
    assert smollm.tokenizer == "byte-level BPE (in the GGUF file, 49152 tokens)"
    assert stories.args == load_checkpoint(stories.path).args
    assert (stories.args.dim, stories.args.n_layers, stories.args.tie_embeddings) == (64, 5, True)


def test_read_args_on_a_llama2c_v1_header(tmp_path):
    header = struct.pack("<Ii7iB", LLAMA2C_MAGIC, 1, 288, 768, 6, 6, 6, 32000, 256, 1).ljust(
        256, b"\0"
    )
    (tmp_path / "model.bin").write_bytes(header)

    got = read_header(tmp_path / "model.bin")

    assert got.args == ModelArgs(
        dim=288,
        hidden_dim=768,
        n_layers=6,
        n_heads=6,
        vocab_size=32000,
        max_seq_len=256,
        tie_embeddings=True,
    )
    assert got.stored == "float32"


def test_info_on_a_mixed_gguf_file_lists_each_type_with_its_tensors_and_bytes(tmp_path, capsys):
    args = ModelArgs(
        dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=64, max_seq_len=64
    )
    types = {"tok_embeddings.weight": "Q8_0"}  # the rest: Q4_K, and Q6_K for w2 (as Q4_K_M does)
    state = {
        name: p.detach()
        for name, p in Transformer(args).state_dict().items()
        if name != "output.weight"
    }
    blocks = {}
    for name, w in state.items():
        if w.dim() == 2:
            types.setdefault(name, "Q6_K" if name.endswith("w2.weight") else "Q4_K")
            blocks[name] = random_blocks(types[name], *w.shape)
    path = write_gguf(state, args, tmp_path / "m.gguf", blocks=blocks, block_types=types)

    rc = main(["info", str(path)])

    out = capsys.readouterr().out
    assert rc == 0
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.split("Stored tensors:")[1].splitlines()[2:]
    }
    # 2 layers x (wq wk wv wo w1 w3) Q4_K, 2 x w2 Q6_K, the Q8_0 embedding, 5 float32 norms
    assert rows["Q4_K"][:3] == ["12", "516", "kB"]  # 917,504 weights, 144 bytes per 256
    assert rows["Q6_K"][:3] == ["2", "215", "kB"]  # 262,144 weights, 210 bytes per 256
    assert rows["Q8_0"][:3] == ["1", "17", "kB"]
    assert rows["F32"][0] == "5"
    assert "matrices stay packed in their Q4_K+Q6_K+Q8_0 blocks" in out


def test_info_with_tp_refuses_a_split_inside_k_quant_blocks(tmp_path, capsys):
    args = ModelArgs(
        dim=256, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=64, max_seq_len=64
    )
    state = {
        n: p.detach() for n, p in Transformer(args).state_dict().items() if n != "output.weight"
    }
    types = {n: "Q4_K" for n, w in state.items() if w.dim() == 2}
    blocks = {n: random_blocks("Q4_K", *state[n].shape) for n in types}
    path = write_gguf(state, args, tmp_path / "m.gguf", blocks=blocks, block_types=types)

    assert main(["info", str(path), "--tp", "2"]) == 2
    assert "inside their 256-column blocks" in capsys.readouterr().err


def test_info_with_tp_and_pp_gives_each_rank_its_figures_and_its_layers(capsys):
    rc = main(["info", "llama-2-70b", "--tp", "2", "--pp", "2", "--max-seq-len", "4096"])

    out = capsys.readouterr().out
    assert rc == 0
    assert "Memory per rank with --tp 2 --pp 2 (4 ranks)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["bfloat16"][1:3] == ["34.5", "GB"]  # a quarter of the 138 GB in bfloat16
    assert (
        "rank 3: layers 40-79, 32 of 64 heads, 4 of 8 key/value heads, vocabulary rows 16000-31999, the classifier"
        in out
    )


def test_info_refuses_a_tp_the_heads_do_not_divide(capsys):
    assert main(["info", "llama-2-70b", "--tp", "3"]) == 2
    assert "n_heads (64) is not divisible by --tp 3" in capsys.readouterr().err
