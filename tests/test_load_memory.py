"""Peak resident memory while loading a ~230 MB float32 checkpoint stays under 1.3x its size.

The load runs in a fresh subprocess: baseline RSS after imports, then llamarun.load() and a pass
that reads every weight byte (so memory-mapped pages are really resident), then ru_maxrss. A
loader that copies the weights once more than needed shows up as about 2x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import hf_config, meta_params, meta_to_hf, write_hf_state, write_meta

from llamarun.config import ModelArgs
from llamarun.model import Transformer

LIMIT = 1.3
pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux /proc"
)
# 58M parameters: 232 MB in float32, most of it in the untied embedding and output matrices
ARGS = ModelArgs(
    dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000, hidden_dim=1376, max_seq_len=256
)

MEASURE = r"""
import gc, json, sys
import psutil, torch
import llamarun
from llamarun.config import ModelArgs
from llamarun.loaders import hf, meta  # noqa: F401  (imports are part of the baseline)
from llamarun.model import Transformer

with torch.device("meta"):  # torch's first meta-device use imports ~80 MB of modules: baseline
    Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=16, hidden_dim=16))
gc.collect()
baseline = psutil.Process().memory_info().rss
llm = llamarun.load(sys.argv[1], max_seq_len=16)
after_load = psutil.Process().memory_info().rss
with torch.no_grad():
    checksum = sum(float(p.sum()) for p in llm.model.parameters())  # every weight byte resident
    llm.model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
# VmHWM, the peak RSS of this address space; not ru_maxrss, which keeps the forking parent's peak
# across exec (pytest holding the random weights would count against the load)
status = open("/proc/self/status").read()
peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
print(json.dumps({"baseline": baseline, "after_load": after_load, "peak": peak}))
"""


def _random_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = Transformer(ARGS)
    gen = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(p.shape, generator=gen) * 0.02 for name, p in model.state_dict().items()
    }


def _measure(path: Path) -> float:
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".pth"))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (rss["peak"] - rss["baseline"]) / size
    print(
        f"{path.name}: file {size / 1e6:.0f} MB, after load +{(rss['after_load'] - rss['baseline']) / 1e6:.0f} MB, peak +{(rss['peak'] - rss['baseline']) / 1e6:.0f} MB = {ratio:.2f}x the file size"
    )
    return ratio


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return _random_state()


def test_hf_safetensors_load_peak_rss_under_limit(state, tmp_path):
    path = write_hf_state(meta_to_hf(state, ARGS), hf_config(ARGS), tmp_path / "hf")

    assert _measure(path) < LIMIT


def test_meta_pth_load_peak_rss_under_limit(state, tmp_path):
    path = write_meta(state, meta_params(ARGS), tmp_path / "meta")

    assert _measure(path) < LIMIT


def test_meta_two_shards_merge_peak_rss(state, tmp_path):
    # Merging copies each tensor into the preallocated result and drops the shard's mapped pages
    # behind it, so the peak stays near the model's size rather than model + one shard (1.5x).
    path = write_meta(state, meta_params(ARGS), tmp_path / "meta2", shards=2)

    assert _measure(path) < LIMIT
