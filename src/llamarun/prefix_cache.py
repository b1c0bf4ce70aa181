"""Prefix caching: a prompt whose start an earlier prefill already wrote reuses those KV rows.

Reuse is exact by construction, not by tolerance. The rows a prefill forward writes depend on
its tokens, the rows before it and the forward's bounds: the kernels group a forward's rows in
tiles and attention reads up to its last position, so one position computed inside another
chunk differs in the last bits. So the engine cuts every prompt into chunks by a rule that only
looks back (`Engine.chunks`: a chunk ends after a turn's end token, or at the chunk size), and
two prompts sharing a start cut it the same way: a whole chunk inside the shared start is
bitwise what a cold prefill of the new prompt writes there. Only whole chunks are kept (the
prompt's unfinished last one is not), and never rows written by decode steps (the C++ step sums
in another order): the next turn of a conversation prefills the previous answer with its message.

Reusable chunks are kept in two places:
- each cache row remembers the whole chunks its last prefill wrote (slot affinity: `pick` gives
  a prompt the free row sharing the most with it, so a conversation's next turn finds its rows);
- a pool of saved chunks (`ChunkPool`) under a byte bound, least recently used evicted first,
  each chunk keyed by its tokens and the chunk before it, so a system prompt shared by many
  conversations is stored once and copied into whichever row needs it.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .model import Transformer

MAX_DEFAULT_BYTES = 256 * 10**6  # the default pool: as large as the KV cache, up to this
PAGE = 16  # tokens per pool page: a saved chunk takes ceil(length / PAGE) pages
ROOT = 0  # the serial of "no chunk before": a prompt's first chunk hangs from it
# (ids, first) -> (start, end, whole) per prefill forward from `first` on (Engine.chunks)
Chunks = Callable[[Sequence[int], int], Iterator[tuple[int, int, bool]]]


@dataclass
class PrefixStats:
    prompts: int = 0  # prompts admitted
    hits: int = 0  # prompts that reused at least one chunk
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused instead of prefilled


@dataclass
class Held:
    """What one cache row holds as a cold prefill writes it: tokens[:ends[-1]], whole chunks."""

    tokens: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # where its whole chunks end, ascending

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        del self.ends[bisect.bisect_right(self.ends, n) :]


@dataclass(eq=False)
class Entry:
    """One saved chunk: its key, its length and the pool pages holding its rows."""

    serial: int
    key: tuple[int, tuple[int, ...]]
    pages: list[int]


class ChunkPool:
    """Saved chunks of KV rows in pages of PAGE positions across all layers, in buffers allocated
    once (max_bytes // bytes_per_page pages). A chunk is found by (serial of the chunk before,
    its tokens): the dict compares the tokens themselves, so prompts never share a chunk by a
    hash collision. Serials are never reused, so when a chunk is evicted its followers can no
    longer be reached; they age out like any other."""

    def __init__(self, caches: list[KVCache], max_bytes: int):
        self.bytes_per_page = sum(block_bytes(c, PAGE) for c in caches)
        self.capacity = max_bytes // self.bytes_per_page  # pages
        # per layer (pages, Hkv, PAGE, D); CPU memory is only touched when a page is filled
        self.k = [_buffer(c.k, self.capacity) for c in caches]
        self.v = [_buffer(c.v, self.capacity) for c in caches]
        self.index: dict[tuple[int, tuple[int, ...]], Entry] = {}
        self.lru: OrderedDict[int, Entry] = OrderedDict()  # by serial, least recent first
        self.free = list(range(self.capacity))
        self.next_serial = ROOT + 1

    @property
    def used_bytes(self) -> int:
        return (self.capacity - len(self.free)) * self.bytes_per_page

    def match(self, ids: Sequence[int], bounds: list[tuple[int, int]]) -> list[Entry]:
        """The saved chunks of ids' first chunks `bounds` ((start, end) in order), as far as kept."""
        found, parent = [], ROOT
        for start, end in bounds:
            entry = self.index.get((parent, tuple(ids[start:end])))
            if entry is None:
                break
            found.append(entry)
            parent = entry.serial
        self._touch(found)
        return found

    def save(self, caches: list[KVCache], row: int, held: Held) -> None:
        """Keep the whole chunks cache row `row` holds that are not kept yet."""
        chain: list[Entry] = []
        parent, start = ROOT, 0
        for end in held.ends:
            key = (parent, tuple(held.tokens[start:end]))
            entry = self.index.get(key)
            if entry is None:
                pages = self._allocate(-(-(end - start) // PAGE), {e.serial for e in chain})
                if pages is None:  # the pool is full of this very prompt
                    break
                entry = Entry(self.next_serial, key, pages)
                self.next_serial += 1
                self.index[key] = self.lru[entry.serial] = entry
                self._copy_out(caches, row, start, end, pages)
            chain.append(entry)
            parent, start = entry.serial, end
        self._touch(chain)

    def load(self, caches: list[KVCache], row: int, entries: list[Entry], start: int) -> None:
        """Copy the chunks `entries` into cache row `row`, one after another from `start`."""
        for entry in entries:
            end = start + len(entry.key[1])
            pages = torch.tensor(entry.pages, device=self.k[0].device)
            for layer, cache in enumerate(caches):
                for pool, rows in ((self.k[layer], cache.k), (self.v[layer], cache.v)):
                    picked = pool[pages.to(pool.device)]  # (n, Hkv, PAGE, D)
                    rows[row, :, start:end] = picked.transpose(0, 1).flatten(1, 2)[:, : end - start]
            start = end

    def clear(self) -> None:
        self.index.clear()
        self.lru.clear()
        self.free = list(range(self.capacity))

    def _copy_out(self, caches: list[KVCache], row: int, start: int, end: int, pages) -> None:
        index = torch.tensor(pages, device=self.k[0].device)
        padded = len(pages) * PAGE
        for layer, cache in enumerate(caches):
            for pool, rows in ((self.k[layer], cache.k), (self.v[layer], cache.v)):
                part = rows[row, :, start:end]  # (Hkv, L, D)
                part = torch.nn.functional.pad(part, (0, 0, 0, padded - (end - start)))
                paged = part.unflatten(1, (len(pages), PAGE)).transpose(0, 1)  # (n, Hkv, PAGE, D)
                pool.index_copy_(0, index.to(pool.device), paged)

    def _allocate(self, n: int, keep: set[int]) -> list[int] | None:
        if n > self.capacity:
            return None
        while len(self.free) < n:
            victim = next((e for s, e in self.lru.items() if s not in keep), None)
            if victim is None:
                return None
            del self.lru[victim.serial], self.index[victim.key]
            self.free += victim.pages
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def _touch(self, chain: list[Entry]) -> None:
        # The first chunk becomes the most recent: a chain is evicted from its end, and its
        # start (the system prompt every conversation shares) stays longest.
        for entry in reversed(chain):
            self.lru.move_to_end(entry.serial)


class PrefixCache:
    """What each cache row holds as a cold prefill writes it, and the pool of saved chunks.
    The Engine calls `reuse` before a prefill, `wrote` for each chunk it writes and `save` after;
    `chunks` is the engine's rule for cutting a prompt into prefill forwards."""

    def __init__(self, model: Transformer, chunks: Chunks, max_bytes: int):
        self.model = model
        self.chunks = chunks
        self.max_bytes = max_bytes
        self.stats = PrefixStats()
        self._build()

    def _build(self) -> None:
        self.caches = _caches(self.model)
        self.rows = [Held() for _ in range(self.model.max_batch_size)]
        self.last_used = [0] * len(self.rows)  # when each row last took a prompt
        self.clock = 0
        self.pool = ChunkPool(self.caches, self.max_bytes)

    def _check_caches(self) -> None:
        if any(a is not b for a, b in zip(_caches(self.model), self.caches, strict=True)):
            self._build()  # setup_caches made new buffers: nothing saved matches them any more

    def shared(self, row: int, ids: Sequence[int], limit: int | None = None) -> int:
        """How many of ids' first tokens cache row `row` holds, in whole chunks (up to `limit`)."""
        held = self.rows[row]
        n = 0
        for n, (a, b) in enumerate(zip(held.tokens, ids)):  # noqa: B007  (n is the common length)
            if a != b:
                break
        else:
            n = min(len(held.tokens), len(ids))
        if limit is not None:
            n = min(n, limit)
        i = bisect.bisect_right(held.ends, n)
        return held.ends[i - 1] if i else 0

    def pick(self, free: list[int], ids: Sequence[int]) -> int:
        """The free row to prefill `ids` in: the one holding most of it, else the longest idle."""
        return max(free, key=lambda row: (self.shared(row, ids), -self.last_used[row]))

    def reuse(self, row: int, ids: Sequence[int]) -> int:
        """Make cache row `row` hold as much of ids' start as is kept (in the row itself or the
        pool), leaving at least one token to prefill for the logits; returns how many tokens."""
        self._check_caches()
        whole = [(s, e) for s, e, is_whole in self.chunks(ids, 0) if is_whole and e < len(ids)]
        own = self.shared(row, ids, len(ids) - 1)
        found = self.pool.match(ids, whole) if self.pool.capacity else []
        pooled = whole[len(found) - 1][1] if found else 0
        start = max(own, pooled)
        if pooled > own:
            first = next(i for i, (s, _) in enumerate(whole) if s == own)
            self.pool.load(self.caches, row, found[first:], own)
        self.rows[row] = Held(list(ids[:start]), [e for _, e in whole if e <= start])
        self.clock += 1
        self.last_used[row] = self.clock
        stats = self.stats
        stats.prompts, stats.prompt_tokens = stats.prompts + 1, stats.prompt_tokens + len(ids)
        stats.hits += start > 0
        stats.cached_tokens += start
        return start

    def wrote(self, row: int, start: int, chunk: Sequence[int], whole: bool) -> None:
        """A prefill wrote `chunk` at positions start.. of cache row `row`; whatever the row held
        from `start` on is gone, and the chunk is kept only when whole."""
        held = self.rows[row]
        held.truncate(start)
        if whole and len(held.tokens) == start:
            held.tokens.extend(chunk)
            held.ends.append(start + len(chunk))

    def save(self, row: int) -> None:
        """Put the whole chunks cache row `row` holds into the pool."""
        if self.pool.capacity:
            self.pool.save(self.caches, row, self.rows[row])

    def forget(self, rows: Sequence[int] | None = None) -> None:
        """The rows (default: all, and the pool) were written outside the engine or must be cold."""
        for row in range(len(self.rows)) if rows is None else rows:
            self.rows[row] = Held()
        if rows is None:
            self.pool.clear()


def default_bytes(kv_cache_bytes: int) -> int:
    """The pool's bound when none is given: as many positions as the cache rows hold (all rows'
    prompts can be saved once), at most MAX_DEFAULT_BYTES."""
    return min(kv_cache_bytes, MAX_DEFAULT_BYTES)


def block_bytes(cache: KVCache, length: int) -> int:
    """Bytes of `length` positions of one layer's keys and values."""
    _, n_kv_heads, _, head_dim = cache.k.shape
    return 2 * n_kv_heads * length * head_dim * cache.k.element_size()


def _caches(model: Transformer) -> list[KVCache]:
    return [layer.attention.kv_cache for layer in model.layers]


def _buffer(like: torch.Tensor, pages: int) -> torch.Tensor:
    _, n_kv_heads, _, head_dim = like.shape
    return torch.empty((pages, n_kv_heads, PAGE, head_dim), dtype=like.dtype, device=like.device)
