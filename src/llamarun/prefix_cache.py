"""Prefix caching: a prompt whose start an earlier prefill already wrote reuses those KV rows.

Reuse is exact by construction, not by tolerance. A prefill runs in chunks that start at
multiples of the chunk size (engine.py), and the rows a chunk writes depend on its tokens, the
rows before it and the chunk's bounds: the kernels group a chunk's rows in tiles and attention
reads up to the chunk's last position, so one position computed inside another chunk differs in
the last bits. A full chunk inside the shared prefix is therefore bitwise what a cold prefill of
the new prompt writes there, and only full chunks are kept. Rows written by decode steps (the C++
step sums in another order than a prefill) are never reused: the next turn of a conversation
prefills the previous answer once, with the new message.

Reusable chunks are kept in two places:
- each cache row remembers the chunks its last prefill wrote (slot affinity: `pick` gives a
  prompt the free row sharing the most with it, so a conversation's next turn finds its rows);
- a pool of saved chunks (`BlockPool`) under a byte bound, least recently used evicted first,
  each chunk keyed by its tokens and the chunk before it, so a system prompt shared by many
  conversations is stored once and copied into whichever row needs it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .model import Transformer

ROOT = 0  # the serial of "no chunk before": a prompt's first chunk hangs from it
DEFAULT_BYTES = 256 * 10**6  # the pool's bound unless load(prefix_cache_mb=...) says otherwise


@dataclass
class PrefixStats:
    prompts: int = 0  # prompts admitted
    hits: int = 0  # prompts that reused at least one chunk
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused instead of prefilled


class BlockPool:
    """Saved chunks of KV rows, one block per chunk across all layers, in buffers allocated once
    (max_bytes // bytes_per_block blocks). A chunk is found by (serial of the chunk before, its
    tokens): Python's dict compares the tokens themselves, so two prompts never share a block by
    a hash collision. Serials are never reused, so a block refilled for another chunk cannot be
    matched as the parent of its old children; those become unreachable and age out."""

    def __init__(self, caches: list[KVCache], chunk: int, max_bytes: int):
        self.chunk = chunk
        self.bytes_per_block = sum(block_bytes(c, chunk) for c in caches)
        self.capacity = max_bytes // self.bytes_per_block
        # per layer (blocks, Hkv, chunk, D); CPU pages are only touched when a block is filled
        self.k = [_buffer(c.k, self.capacity, chunk) for c in caches]
        self.v = [_buffer(c.v, self.capacity, chunk) for c in caches]
        self.index: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent serial, tokens) -> block
        self.lru: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # oldest first
        self.serials = [ROOT] * self.capacity
        self.free = list(range(self.capacity))
        self.next_serial = ROOT + 1

    @property
    def used_bytes(self) -> int:
        return len(self.lru) * self.bytes_per_block

    def match(self, ids: Sequence[int], limit: int) -> list[int]:
        """Blocks holding ids' first chunks, in order, up to `limit` tokens."""
        blocks, parent = [], ROOT
        for start in range(0, limit - self.chunk + 1, self.chunk):
            block = self.index.get((parent, tuple(ids[start : start + self.chunk])))
            if block is None:
                break
            blocks.append(block)
            parent = self.serials[block]
        self._touch(blocks)
        return blocks

    def save(self, caches: list[KVCache], row: int, ids: Sequence[int]) -> None:
        """Keep the chunks of `ids` (whole chunks, as cache row `row` holds them) not kept yet."""
        chain: list[int] = []
        new: list[tuple[int, int]] = []  # (block, start) to copy from the row
        parent = ROOT
        for start in range(0, len(ids) - self.chunk + 1, self.chunk):
            key = (parent, tuple(ids[start : start + self.chunk]))
            block = self.index.get(key)
            if block is None:
                block = self._allocate(set(chain))
                if block is None:  # the pool is full of this very prompt
                    break
                self.index[key], self.lru[block] = block, key
                self.serials[block], self.next_serial = self.next_serial, self.next_serial + 1
                new.append((block, start))
            chain.append(block)
            parent = self.serials[block]
        if new:
            blocks = torch.tensor([b for b, _ in new], device=self.k[0].device)
            starts = [s for _, s in new]
            for layer, cache in enumerate(caches):
                for pool, rows in ((self.k[layer], cache.k), (self.v[layer], cache.v)):
                    pool.index_copy_(
                        0, blocks.to(pool.device), _gather(rows[row], starts, self.chunk)
                    )
        self._touch(chain)

    def load(self, caches: list[KVCache], row: int, blocks: list[int], first: int) -> None:
        """Copy blocks[first:] into cache row `row` at their chunks' positions."""
        if first >= len(blocks):
            return
        start, end = first * self.chunk, len(blocks) * self.chunk
        for layer, cache in enumerate(caches):
            for pool, rows in ((self.k[layer], cache.k), (self.v[layer], cache.v)):
                picked = pool[torch.tensor(blocks[first:], device=pool.device)]  # (n, Hkv, C, D)
                rows[row, :, start:end] = picked.transpose(0, 1).flatten(1, 2)

    def clear(self) -> None:
        self.index.clear()
        self.lru.clear()
        self.free = list(range(self.capacity))

    def _allocate(self, keep: set[int]) -> int | None:
        if self.free:
            return self.free.pop()
        victim = next(iter(self.lru), None)
        if victim is None or victim in keep:
            return None
        del self.index[self.lru.pop(victim)]
        return victim

    def _touch(self, chain: list[int]) -> None:
        # The first chunk becomes the most recent: a chain is evicted from its end, and its
        # start (the system prompt every conversation shares) stays longest.
        for block in reversed(chain):
            self.lru.move_to_end(block)


class PrefixCache:
    """What each cache row holds as a cold prefill writes it, and the pool of saved chunks.
    The Engine calls `reuse` before a prefill, `wrote` for each chunk it writes and `save` after."""

    def __init__(self, model: Transformer, chunk: int, max_bytes: int):
        self.model = model
        self.chunk = chunk
        self.max_bytes = max_bytes
        self.stats = PrefixStats()
        self._build()

    def _build(self) -> None:
        self.caches = _caches(self.model)
        self.rows: list[list[int]] = [[] for _ in range(self.model.max_batch_size)]
        self.last_used = [0] * len(self.rows)  # when each row last took a prompt
        self.clock = 0
        self.pool = BlockPool(self.caches, self.chunk, self.max_bytes)

    def _check_caches(self) -> None:
        if any(a is not b for a, b in zip(_caches(self.model), self.caches, strict=True)):
            self._build()  # setup_caches made new buffers: nothing saved matches them any more

    def shared(self, row: int, ids: Sequence[int]) -> int:
        """How many of ids' first tokens cache row `row` holds, in whole chunks."""
        held, n, c = self.rows[row], 0, self.chunk
        while n + c <= len(held) and held[n : n + c] == list(ids[n : n + c]):
            n += c
        return n

    def pick(self, free: list[int], ids: Sequence[int]) -> int:
        """The free row to prefill `ids` in: the one holding most of it, else the longest idle."""
        return max(free, key=lambda row: (self.shared(row, ids), -self.last_used[row]))

    def reuse(self, row: int, ids: Sequence[int]) -> int:
        """Make cache row `row` hold as much of ids' start as is kept (from the row itself or the
        pool), leaving at least one token to prefill for the logits; returns how many tokens."""
        self._check_caches()
        limit = (len(ids) - 1) // self.chunk * self.chunk
        own = min(self.shared(row, ids), limit)
        blocks = self.pool.match(ids, limit) if self.pool.capacity else []
        start = max(own, len(blocks) * self.chunk)
        self.pool.load(self.caches, row, blocks, own // self.chunk)
        self.rows[row] = list(ids[:start])
        self.clock += 1
        self.last_used[row] = self.clock
        stats = self.stats
        stats.prompts, stats.prompt_tokens = stats.prompts + 1, stats.prompt_tokens + len(ids)
        stats.hits += start > 0
        stats.cached_tokens += start
        return start

    def wrote(self, row: int, start: int, chunk: Sequence[int]) -> None:
        """A prefill wrote `chunk` at positions start.. of cache row `row`; whatever the row held
        from `start` on is gone, and the chunk is kept only when whole."""
        held = self.rows[row]
        del held[start:]
        if len(chunk) == self.chunk and len(held) == start:
            held.extend(chunk)

    def save(self, row: int) -> None:
        """Put the whole chunks cache row `row` holds into the pool."""
        if self.pool.capacity:
            self.pool.save(self.caches, row, self.rows[row])

    def forget(self, rows: Sequence[int] | None = None) -> None:
        """The rows (default: all, and the pool) were written outside the engine or must be cold."""
        for row in range(len(self.rows)) if rows is None else rows:
            self.rows[row] = []
        if rows is None:
            self.pool.clear()


def block_bytes(cache: KVCache, chunk: int) -> int:
    """Bytes of one chunk of one layer's keys and values."""
    _, n_kv_heads, _, head_dim = cache.k.shape
    return 2 * n_kv_heads * chunk * head_dim * cache.k.element_size()


def _caches(model: Transformer) -> list[KVCache]:
    return [layer.attention.kv_cache for layer in model.layers]


def _buffer(like: torch.Tensor, blocks: int, chunk: int) -> torch.Tensor:
    _, n_kv_heads, _, head_dim = like.shape
    return torch.empty((blocks, n_kv_heads, chunk, head_dim), dtype=like.dtype, device=like.device)


def _gather(row: torch.Tensor, starts: list[int], chunk: int) -> torch.Tensor:
    """Chunks at `starts` of one row (Hkv, S, D) as (n, Hkv, chunk, D)."""
    parts = [row[:, s : s + chunk] for s in starts]
    return torch.stack(parts)
