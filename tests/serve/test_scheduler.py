"""The continuous scheduler's parts: the prefix KV cache (exact reuse, per adapter, bounded LRU) and the KV pool."""

from __future__ import annotations

import torch

from slmshift.serve.engines.scheduler import KVPool, PrefixCache

LAYERS, HEADS, DIM = 2, 2, 4


def kv_for(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fake per-layer K/V whose values encode (layer, token id), so a returned block can be checked exactly."""
    t = torch.tensor(ids, dtype=torch.float32)
    return [(t.view(1, 1, -1, 1).expand(1, HEADS, -1, DIM) + 1000 * layer,
             -t.view(1, 1, -1, 1).expand(1, HEADS, -1, DIM) - 1000 * layer) for layer in range(LAYERS)]


def block_bytes(block: int = 16) -> int:
    return 2 * LAYERS * HEADS * block * DIM * 4


def test_lookup_returns_exact_kv_of_the_longest_cached_prefix_but_never_the_last_token():
    cache = PrefixCache(max_bytes=10**6)
    ids = list(range(100, 150))  # 50 tokens: 3 full blocks
    assert cache.lookup(None, ids) == (0, [])
    cache.insert(None, ids, kv_for(ids))
    n, kv = cache.lookup(None, ids)
    assert n == 48 and len(kv) == LAYERS
    for got, want in zip(kv, kv_for(ids[:48])):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cache.lookup(None, ids[:48])[0] == 32  # 48 tokens: the 48th must be computed, so 2 blocks
    assert cache.lookup(None, ids[:20] + [7] * 30)[0] == 16  # diverges inside block 2
    assert cache.lookup(None, [1] + ids[1:])[0] == 0  # differs at token 0
    assert cache.lookup("alpha", ids)[0] == 0  # another adapter's K/V differ
    s = cache.stats()
    assert s["prefix_lookups"] == 6 and s["prefix_hits"] == 3 and s["prefix_tokens_hit"] == 48 + 32 + 16


def test_cache_is_bounded_and_evicts_least_recently_used_chains_tail_first():
    cache = PrefixCache(max_bytes=5 * block_bytes())
    a, b, c = ([base + i for i in range(49)] for base in (0, 1000, 2000))  # 3 blocks each
    cache.insert(None, a, kv_for(a))
    cache.insert(None, b, kv_for(b))
    assert cache.bytes <= cache.max_bytes and cache.stats()["prefix_blocks"] == 5
    assert cache.lookup(None, b)[0] == 48  # b is whole; a lost its tail (deepest blocks go first)
    assert cache.lookup(None, a)[0] == 32
    cache.insert(None, c, kv_for(c))
    assert cache.bytes <= cache.max_bytes and cache.stats()["prefix_evictions"] > 0
    # every block still cached is reachable: what a lookup finds is a contiguous chain from the start
    for ids in (a, b, c):
        n, kv = cache.lookup(None, ids)
        assert all(torch.equal(k, w[0]) for (k, _), w in zip(kv, kv_for(ids[:n])))
    assert cache.lookup(None, c)[0] == 48  # the newest prompt is whole


def test_a_block_larger_than_the_budget_is_not_stored():
    cache = PrefixCache(max_bytes=block_bytes() - 1)
    ids = list(range(40))
    cache.insert(None, ids, kv_for(ids))
    assert cache.bytes == 0 and cache.lookup(None, ids)[0] == 0


def test_kv_pool_rows_join_and_leave_with_one_row_copies():
    pool = KVPool(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"))
    pool.reserve(4, 32)
    rows = {n: kv_for(list(range(10 * n, 10 * n + n))) for n in (3, 5, 2)}
    slots = {n: pool.add(kv, n) for n, kv in rows.items()}
    assert slots == {3: 0, 5: 1, 2: 2} and pool.lens.tolist() == [3, 5, 2]
    mask = pool.mask("sdpa", torch.float32)
    assert mask.shape == (3, 1, 1, 6) and mask[:, 0, 0].sum(-1).tolist() == [4, 6, 3]
    assert pool.remove(0) == 2  # the last row moves into the freed slot
    assert pool.lens.tolist() == [2, 5] and torch.equal(pool.k[1][0, :, :2], rows[2][1][0][0])
    # a decode write lands at each row's own next column
    new_k = torch.full((2, HEADS, 1, DIM), 7.0)
    pool.mask("sdpa", torch.float32)
    k, v = pool.write(0, new_k, -new_k)
    assert k.shape == (2, HEADS, 6, DIM) and k[0, :, 2].eq(7).all() and k[1, :, 5].eq(7).all()
    eager = pool.mask("eager", torch.float32)
    assert eager.dtype == torch.float32 and (eager[0, 0, 0, 3:] < -1e30).all() and (eager[0, 0, 0, :3] == 0).all()
    pool.reserve(8, 64)  # growing keeps the rows
    assert pool.capacity == (8, 64) and torch.equal(pool.k[1][1, :, :5], rows[5][1][0][0])
