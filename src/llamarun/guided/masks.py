"""Token masks for a batch's constrained rows: computed into one int32 bitmask, on a worker thread
while the forward pass runs where a core is free for it (the matchers release the GIL, and so do
torch's ops), then applied to the logits as -inf before penalties, temperature and the
top-k/top-p/min-p filters."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import Matcher

# bit i of a mask word, shifted to the sign bit, picks between the float32 bit patterns of +inf
# and -inf: each token gets a cap, and min(logit, cap) keeps an allowed logit and makes a
# disallowed one -inf. All vectorised integer ops: masked_fill_ is a scalar loop on CPU (0.3 ms
# for one 49k-token row here, against 0.05 ms this way).
_SIGN_BIT = -(2**31)
_NEG_INF_BITS = -8388608  # 0xFF800000; xor the sign bit in and it is +inf's 0x7F800000


def overlap_helps(device: torch.device) -> bool:
    """Whether masks computed on a worker overlap the forward pass: beside a GPU's, yes; on CPU
    only when torch leaves a core free. With every core in torch's OpenMP team (2 of 2 here) the
    worker preempts one of its threads and the whole step waits for it: on a 2-core machine
    benchmarks/guided.py measured JSON-schema decode at 0.74x of free decode with the worker and
    0.86x inline."""
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) > torch.get_num_threads()


class MaskBatch:
    """Bitmask rows for up to `max_rows` matchers. `start` begins computing the next masks,
    `apply_` waits for them and masks the logits. threaded=False computes them in `start`."""

    def __init__(self, vocab_size: int, max_rows: int, *, threaded: bool = True):
        self.vocab_size = vocab_size
        self.bits = torch.zeros(max_rows, (vocab_size + 31) // 32, dtype=torch.int32)  # (R, W)
        self.threaded = threaded
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[list[bool]] | list[bool] | None = None

    def start(self, matchers: Sequence[Matcher]) -> None:
        """Begin the masks of `matchers`; row k of the bitmask belongs to matchers[k]."""
        if not self.threaded:
            self._pending = self._fill(list(matchers))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="llamarun-masks")
        self._pending = self._pool.submit(self._fill, list(matchers))

    def _fill(self, matchers: list[Matcher]) -> list[bool]:
        accepting = []
        for k, m in enumerate(matchers):
            m.fill_mask(self.bits[k])
            accepting.append(m.is_accepting())
        return accepting

    def apply_(
        self, logits: torch.Tensor, rows: Sequence[int], stop_ids: Sequence[Collection[int]]
    ) -> None:
        """Set to -inf, in place, the logits of tokens the matchers do not allow: logits[rows[k]]
        follows matchers[k] of the last `start`. An accepting row may also end on any of its
        stop_ids[k] (a chat format's end-of-turn token besides the tokenizer's own stops)."""
        pending, self._pending = self._pending, None
        accepting = pending.result() if isinstance(pending, Future) else pending
        assert accepting is not None and len(accepting) == len(rows), "apply_ without start"
        n, vocab, device = len(rows), logits.shape[-1], logits.device
        bits = self.bits[:n].to(device, non_blocking=True)  # (n, W)
        to_sign = torch.arange(31, -1, -1, dtype=torch.int32, device=device)
        caps = ((bits.unsqueeze(-1) << to_sign) & _SIGN_BIT) ^ _NEG_INF_BITS  # (n, W, 32)
        caps = caps.view(n, -1)[:, :vocab].view(torch.float32)  # (n, V): +inf allowed, else -inf
        for k, ids in enumerate(stop_ids):
            if accepting[k] and ids:
                caps[k, [i for i in ids if i < vocab]] = float("inf")
        caps = caps.to(logits.dtype)
        for k, row in enumerate(rows):
            torch.minimum(logits[row], caps[k], out=logits[row])
