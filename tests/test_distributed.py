"""--tp/--pp on CPU with gloo, 2 processes started by the test: the same greedy tokens and
log-probabilities as one process for every checkpoint format, two "machines" on loopback, the
server, and a killed rank ending the job with one clear error instead of a hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_worker import run_case
from tiny import llamarun_state, meta_params, write_gguf, write_hf, write_meta
from tiny_llama2c import write_llama2c
from tiny_tokenizers import write_sentencepiece

import llamarun
from llamarun.config import ModelArgs
from llamarun.errors import ConfigError
from llamarun.llm import LLM
from llamarun.model import Transformer

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("dist_worker.py")
PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 4], [3, 4, 200], [17]]  # different lengths in one batch
NEW_TOKENS = 6
FORMATS = ["hf", "hf-tied", "meta-1", "meta-2", "gguf-f32", "gguf-q8_0", "gguf-q4_0", "llama2c"]
PACKED = ["gguf-q8_0", "gguf-q4_0"]  # linear weights kept in GGUF blocks, run on int8 kernels


def tiny(tie: bool = False, seed: int = 0, **fields) -> Transformer:
    # GQA: 4 heads over 2 key/value heads, so --tp 2 gives each rank one key/value head
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320)
    args = ModelArgs(**(shape | fields), max_seq_len=128, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # spread logits: greedy picks far from ties
    return model.eval()


def write_format(fmt: str, directory: Path) -> Path:
    model = tiny(tie=fmt == "hf-tied")
    state, args = llamarun_state(model), model.args
    if fmt.startswith("hf"):
        return write_hf(model, directory / fmt)
    if fmt.startswith("meta"):
        return write_meta(state, meta_params(args), directory / fmt, shards=int(fmt[-1]))
    if fmt.startswith("gguf"):
        return write_gguf(state, args, directory / f"{fmt}.gguf", qtype=fmt[5:].upper())
    return write_llama2c(directory / "model.bin", model, version=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This environment, with the llamarun this test imported first on the path."""
    src = str(Path(llamarun.__file__).resolve().parents[1])
    return os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun gives each process, for jobs the test starts itself."""
    return child_env() | {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def start_ranks(argv: list[str], world_size: int = 2, **popen) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(rank, world_size, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        for rank in range(world_size)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every format under --tp 2 and under --pp 2, run in one 2-process job, and the same cases
    in this one process."""
    directory = tmp_path_factory.mktemp("formats")
    paths = {fmt: write_format(fmt, directory) for fmt in FORMATS}
    expected = {}
    for fmt, path in paths.items():
        llm = llamarun.load(path, max_batch_size=len(PROMPTS), max_seq_len=64)
        expected[fmt] = run_case(llm, PROMPTS, NEW_TOKENS)
        # the same model decoding with its own forward (a rank's path) instead of the one-call step
        expected[fmt + " eager"] = run_case(LLM(llm.model, llm.tokenizer), PROMPTS, NEW_TOKENS)
    cases = [
        {"name": f"{fmt} {mode}", "path": str(paths[fmt]), "tp": tp, "pp": pp}
        for fmt in FORMATS
        for mode, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2))
    ]
    spec = directory / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS}))
    out = directory / "out.json"
    results = finish(start_ranks([str(WORKER), str(spec), str(out)]))
    for rc, _, err in results:
        assert rc == 0, err
    return expected, json.loads(out.read_text())


def assert_logprobs(got: dict, expected: dict, atol: float) -> None:
    for key in ("logprobs", "scores"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]), atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["tp2", "pp2"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_match_one_process(matrix, fmt, mode):
    expected, got = matrix
    one, two = expected[fmt], got[f"{fmt} {mode}"]
    assert two["tokens"] == one["tokens"]
    if fmt in PACKED:
        # The int8 kernels quantize each linear's input per 32 values (as llama.cpp does), so a
        # 1e-7 rounding difference upstream now and then flips an int8 step: one process differs
        # as much between its one-call decode step and its eager forward (6e-5 for Q8_0, 5e-4
        # for Q4_0 here). test_packed_stages_repeat_the_eager_forward pins the pipeline exactly.
        assert_logprobs(two, one, atol=2e-3)
    else:  # the all-reduce adds partial sums in another order than one matrix product does
        assert_logprobs(two, one, atol=1e-5)


@pytest.mark.parametrize("fmt", PACKED)
def test_packed_stages_repeat_the_eager_forward(matrix, fmt):
    # a pipeline stage runs the same kernels on the same inputs as one process's eager forward
    expected, got = matrix
    eager, two = expected[fmt + " eager"], got[f"{fmt} pp2"]
    assert two["tokens"] == eager["tokens"]
    assert_logprobs(two, eager, atol=1e-6)
