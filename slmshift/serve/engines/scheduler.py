"""Continuous batching for the hf engine: a step loop that lets requests join and leave the running batch.

Each loop iteration admits waiting requests (within the KV budget), prefills one chunk of one admitted prompt,
then runs one decode step for every row that has finished its prefill. A row leaves the batch at the step that
ends it (EOS or its own max_tokens), so a short request never waits for a long one.

KV layout: one preallocated buffer per layer, `[rows, kv_heads, capacity, head_dim]`. Row i's cache is
left-aligned (positions 0..len_i-1) and its next token's K/V is written at column len_i, so joining and leaving
are one-row copies and no step concatenates the whole cache (HF's DynamicCache copies it every step). A 4-D
mask hides each row's unused columns.

Prefill runs one request at a time through a plain DynamicCache, seeded with the KV of the longest cached
prefix of its prompt: a `PrefixCache` of fixed-size token blocks keyed by a hash chain of the token ids (and
the adapter, whose LoRA changes K/V), bounded in bytes, least recently used evicted first.

Token choice is per row and batch-independent, exactly as in the static engine: greedy rows take the argmax,
sampled rows draw from their own `torch.Generator` seeded by the request; the log-prob is taken at temperature 1.
A row with an output constraint (`Row.matcher`, see constraints.py) chooses among the tokens its grammar allows:
the mask applies to its logits after every forward pass that picks a token (the prefill's last chunk and each
decode step), and rows with and without constraints share the batch. The logged log-prob stays the raw one (the
model's own confidence in the token, before the mask), so a forced token shows up as low confidence.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from slmshift.platform.errors import one_line_error
from slmshift.serve.engines.constraints import choose_tokens


class PrefixCache:
    """KV of prompt prefixes in blocks of `block` tokens, keyed by (adapter, hash of every token up to the block's
    end). At most `max_bytes`; the least recently used block goes first, and a lookup refreshes a chain deepest
    block first, so a parent is always more recent than its children and eviction never strands a reachable
    chain's tail behind a missing parent."""

    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes, self.block = max_bytes, block
        self._blocks: OrderedDict[bytes, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.bytes = 0
        self.lookups = self.hits = 0  # requests that looked up / that reused at least one block
        self.tokens_looked_up = self.tokens_hit = 0  # prompt tokens asked for / served from the cache
        self.evictions = 0

    def _keys(self, adapter: str | None, ids: list[int], n_blocks: int) -> list[bytes]:
        h = hashlib.blake2b(repr(adapter).encode(), digest_size=16)
        keys = []
        for b in range(n_blocks):
            h.update(torch.tensor(ids[b * self.block : (b + 1) * self.block], dtype=torch.int64).numpy().tobytes())
            keys.append(h.copy().digest())
        return keys

    def lookup(self, adapter: str | None, ids: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The longest cached prefix of `ids`, at most len(ids) - 1 tokens (the last prompt token is always
        computed: its logits choose the first output token). Returns (tokens, per-layer (K, V) [1, H, tokens, D])."""
        self.lookups += 1
        self.tokens_looked_up += len(ids)
        found: list[bytes] = []
        for key in self._keys(adapter, ids, (len(ids) - 1) // self.block):
            if key not in self._blocks:
                break
            found.append(key)
        if not found:
            return 0, []
        for key in reversed(found):
            self._blocks.move_to_end(key)
        self.hits += 1
        n = len(found) * self.block
        self.tokens_hit += n
        layers = zip(*(self._blocks[k] for k in found))
        return n, [(torch.cat([k for k, _ in blocks], dim=2), torch.cat([v for _, v in blocks], dim=2))
                   for blocks in layers]

    def insert(self, adapter: str | None, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store the full blocks of a prefilled prompt; `kv` holds per-layer (K, V) [1, H, >= len(ids), D]."""
        keys = self._keys(adapter, ids, len(ids) // self.block)
        for b, key in enumerate(keys):
            if key in self._blocks:
                continue
            s = slice(b * self.block, (b + 1) * self.block)
            blk = [(k[:, :, s].clone(), v[:, :, s].clone()) for k, v in kv]
            size = sum(k.nbytes + v.nbytes for k, v in blk)
            if size > self.max_bytes:
                return
            self._blocks[key] = blk
            self.bytes += size
        for key in reversed(keys):  # parents most recent (see the class doc)
            self._blocks.move_to_end(key)
        while self.bytes > self.max_bytes:
            _, blk = self._blocks.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in blk)
            self.evictions += 1

    def stats(self) -> dict[str, float]:
        return {"prefix_lookups": self.lookups, "prefix_hits": self.hits, "prefix_tokens_hit": self.tokens_hit,
                "prefix_token_hit_rate": self.tokens_hit / self.tokens_looked_up if self.tokens_looked_up else 0.0,
                "prefix_cache_mb": self.bytes / 2**20, "prefix_blocks": len(self._blocks),
                "prefix_evictions": self.evictions}


class _PoolCache(Cache):
    """The transformers Cache view of a `KVPool` for one decode step: `update` writes each row's new K/V at
    its own column and returns the pool's used width."""

    def __init__(self, pool: KVPool):
        super().__init__(layers=[DynamicLayer() for _ in range(pool.n_layers)])
        self.pool = pool

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self.pool.write(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pool.width - 1


class KVPool:
    """Per-layer K/V buffers for the decoding rows, grown on demand (rows and columns), never past `max_bytes`."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.n_layers, self.kv_heads, self.head_dim, self.dtype, self.device = n_layers, kv_heads, head_dim, dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = 0
        self.lens = torch.zeros(0, dtype=torch.long)  # cached tokens per row (its next token's position)
        self.width = 0  # columns the current step attends over: max(lens) + 1

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.k[0].shape[0], self.k[0].shape[2]) if self.k else (0, 0)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def reserve(self, rows: int, cols: int) -> None:
        """Make room for `rows` rows of `cols` tokens (buffers are copied only when they grow)."""
        cap_r, cap_c = self.capacity
        if rows <= cap_r and cols <= cap_c:
            return
        new_r, new_c = max(rows, cap_r), max(cols, cap_c)
        shape = (new_r, self.kv_heads, new_c, self.head_dim)
        for buf in (self.k, self.v):
            for i in range(self.n_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if buf and self.rows:
                    old = buf[i]
                    new[: self.rows, :, : old.shape[2]] = old[: self.rows]
                if len(buf) == self.n_layers:
                    buf[i] = new
                else:
                    buf.append(new)

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> int:
        """Copy a prefilled row in (per-layer [1, H, >= length, D]); returns its slot."""
        slot = self.rows
        for i, (k, v) in enumerate(kv):
            self.k[i][slot, :, :length] = k[0, :, :length]
            self.v[i][slot, :, :length] = v[0, :, :length]
        self.rows += 1
        self.lens = torch.cat([self.lens, torch.tensor([length])])
        return slot

    def remove(self, slot: int) -> int | None:
        """Drop a row by moving the last row into its slot; returns the slot that moved (None if none did)."""
        last = self.rows - 1
        moved = None
        if slot != last:
            n = int(self.lens[last])
            for buf in (self.k, self.v):
                for t in buf:
                    t[slot, :, :n] = t[last, :, :n]
            self.lens[slot] = self.lens[last]
            moved = last
        self.rows -= 1
        self.lens = self.lens[: self.rows].clone()
        return moved

    def mask(self, attn_impl: str, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """[rows, 1, 1, width]: row i sees its cached columns and the one its new token is written to; with a
        sliding `window`, only the last `window` of those (its new token's position minus a column index under
        `window`, as transformers' `sliding_window_overlay` has it)."""
        self.width = int(self.lens.max()) + 1
        cols = torch.arange(self.width)[None, :]
        allowed = cols <= self.lens[:, None]
        if window is not None:
            allowed &= cols > self.lens[:, None] - window
        allowed = allowed[:, None, None, :].to(self.device)
        if attn_impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(self.rows, device=self.device)
        cols = self.lens.to(self.device)
        self.k[layer][rows, :, cols] = k[:, :, 0]
        self.v[layer][rows, :, cols] = v[:, :, 0]
        return self.k[layer][: self.rows, :, : self.width], self.v[layer][: self.rows, :, : self.width]

    def clear(self) -> None:
        self.k, self.v, self.rows, self.width = [], [], 0, 0
        self.lens = torch.zeros(0, dtype=torch.long)


_WINDOWED = ("sliding_attention", "hybrid_sliding", "reference_sliding_attention")


def _mask_layout(config: Any) -> tuple[dict[str, int | None] | None, int | None]:
    """How decode masks go to the model, from its layer types as transformers' caches read them: (None, None) for
    one causal mask on every layer (most models); (None, w) for one mask with a sliding window of w on every layer
    (Mistral-style, no `layer_types`); or ({layer type: window or None}, None) for a model that indexes its masks
    by `config.layer_types` (Gemma-3: five sliding-window layers to each global one, Qwen2 with
    `use_sliding_window`). Raises ValueError for attention kinds this scheduler does not mask (chunked)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, kwargs = get_layer_types_and_kwargs(text)
    windows = {t: (kw.get("sliding_window") if t in _WINDOWED else None) for t, kw in zip(types, kwargs)}
    other = sorted(t for t in windows if t not in _WINDOWED and t not in ("full_attention", "dummy"))
    if other:
        raise ValueError(f"the continuous scheduler has no decode mask for layer types {other} "
                         f"({type(text).__name__}); set the model's hf.scheduler to 'static'")
    if not any(windows.values()):
        return None, None
    if getattr(text, "layer_types", None) is None:
        return None, next(w for w in windows.values() if w)
    return {t: w for t, w in windows.items() if t != "dummy"}, None


@dataclass(eq=False)
class Row:
    """One request in the scheduler. `done` is called once, from the scheduler thread, with a result dict
    (text fields, as the static engine's `_run_batch` returns) or an error string."""

    ids: list[int]
    max_tokens: int
    temperature: float
    seed: int
    adapter: str | None
    done: Callable[[dict[str, Any] | str], None]
    matcher: Any = None  # constraints.RowMatcher of a constrained row
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # state
    prefilled: int = 0  # prompt tokens in `cache` so far
    cached: int = 0  # of which came from the prefix cache
    cache: DynamicCache | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None
    slot: int | None = None

    @property
    def final_len(self) -> int:
        return len(self.ids) + self.max_tokens


class Scheduler:
    """The step loop, in its own thread. `forward(input_ids, cache, adapters, **kw)` runs the model and returns
    last-position logits; `prepare_adapters(names)` makes those adapters resident (False when they cannot all be
    at once). The owner serializes everything else that touches the model through `lock`."""

    def __init__(self, *, forward: Callable[..., torch.Tensor], prepare_adapters: Callable[[set[str]], bool],
                 config: Any, eos_ids: set[int], decode: Callable[[list[int]], str], device: torch.device,
                 dtype: torch.dtype, attn_impl: str, kv_bytes: int, prefix_bytes: int, max_rows: int,
                 prefill_chunk: int, lock: threading.Lock):
        self.forward, self.prepare_adapters, self.eos_ids, self.decode = forward, prepare_adapters, eos_ids, decode
        self.config, self.device, self.dtype, self.attn_impl = config, device, dtype, attn_impl
        self.kv_bytes, self.max_rows, self.prefill_chunk, self.lock = kv_bytes, max_rows, prefill_chunk, lock
        self.mask_layout = _mask_layout(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.pool = KVPool(config.num_hidden_layers, kv_heads, head_dim, dtype, device)
        self.bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.prefix = PrefixCache(prefix_bytes) if prefix_bytes > 0 else None
        self._waiting: list[Row] = []
        self._prefilling: list[Row] = []
        self._decoding: list[Row] = []  # index = pool slot
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = self.step_rows = self.prefill_chunks = self.peak_rows = self.cancelled = 0
        self.threads = torch.get_num_threads()  # the replica's setting; a new thread may not inherit it

    # --- public (any thread) --------------------------------------------------------------------

    def submit(self, row: Row) -> None:
        if row.final_len * self.bytes_per_token > self.kv_bytes:
            row.done(f"the request needs {row.final_len} tokens of KV cache ({len(row.ids)} prompt + "
                     f"{row.max_tokens} max_tokens = {row.final_len * self.bytes_per_token / 2**20:.0f} MB), more "
                     f"than hf.kv_cache_mb={self.kv_bytes / 2**20:g} allows; raise models[].hf.kv_cache_mb or lower "
                     "max_tokens")
            return
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hf-scheduler", daemon=True)
                self._thread.start()
            self._waiting.append(row)
            self._cond.notify()

    def alive(self) -> bool:
        """False once the step loop has died (an error outside a model step); its rows would wait forever."""
        return self._stop or self._thread is None or self._thread.is_alive()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def stats(self) -> dict[str, float]:
        out = {"steps": self.steps, "mean_decode_rows": self.step_rows / self.steps if self.steps else 0.0,
               "peak_rows": self.peak_rows, "cancelled": self.cancelled,
               "prefill_chunks": self.prefill_chunks, "kv_pool_mb": self.pool.nbytes() / 2**20}
        return out | (self.prefix.stats() if self.prefix else {})

    # --- the loop (scheduler thread) -----------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stop and not (self._waiting or self._prefilling or self._decoding):
                    self._cond.wait()
                if self._stop:
                    return
                with self.lock, torch.inference_mode():  # a row leaving moves another's KV cache in place
                    self._drop_cancelled()
                self._admit()
            with self.lock, torch.inference_mode():
                self._prefill_one()
                self._decode_step()

    def _drop_cancelled(self) -> None:
        """Rows whose caller gave up stop using the batch."""
        n = len(self._waiting) + len(self._prefilling) + len(self._decoding)
        self._waiting = [r for r in self._waiting if not r.cancelled]
        self._prefilling = [r for r in self._prefilling if not r.cancelled]
        for row in [r for r in self._decoding if r.cancelled]:
            self._leave(row)
        self.cancelled += n - len(self._waiting) - len(self._prefilling) - len(self._decoding)

    def _admitted(self) -> list[Row]:
        return self._prefilling + self._decoding

    def _admit(self) -> None:
        """FIFO admission while the rows, the KV budget and the adapter slots allow; a request whose adapter cannot
        be made resident right now waits without blocking those behind it."""
        still: list[Row] = []
        for row in self._waiting:
            admitted = self._admitted()
            width = max([r.final_len for r in admitted] + [row.final_len])
            fits = len(admitted) < self.max_rows and (len(admitted) + 1) * width * self.bytes_per_token <= self.kv_bytes
            if fits and row.adapter is not None:
                in_use = {r.adapter for r in admitted if r.adapter is not None} | {row.adapter}
                with self.lock:
                    fits = self.prepare_adapters(in_use)
            if fits:
                self._prefilling.append(row)
                self.peak_rows = max(self.peak_rows, len(admitted) + 1)
            else:
                still.append(row)
        self._waiting = still

    def _prefill_one(self) -> None:
        """One chunk of the prompt with the fewest tokens left (aged, so a long prompt is not starved)."""
        if not self._prefilling:
            return
        now = time.perf_counter()
        row = min(self._prefilling, key=lambda r: (len(r.ids) - r.prefilled) / (1.0 + now - r.arrived))
        try:
            if row.cache is None:
                # Every layer keeps every token (no config: no sliding layers that drop K/V outside the window), as
                # the pool and the prefix cache need; the model's own masks apply each layer's window meanwhile.
                row.cache = DynamicCache()
                if self.prefix is not None:
                    n, kv = self.prefix.lookup(row.adapter, row.ids)
                    for i, (k, v) in enumerate(kv):
                        row.cache.update(k.to(self.device), v.to(self.device), i)
                    row.prefilled = row.cached = n
                if row.temperature > 0:
                    row.generator = torch.Generator(device=self.device).manual_seed(row.seed)
            end = min(len(row.ids), row.prefilled + self.prefill_chunk)
            chunk = torch.tensor([row.ids[row.prefilled : end]], device=self.device)
            logits = self.forward(chunk, row.cache, [row.adapter])
            self.prefill_chunks += 1
            row.prefilled = end
        except Exception as exc:
            self._prefilling.remove(row)
            row.done(f"generation failed: {one_line_error(exc)}")
            return
        if row.prefilled < len(row.ids):
            return
        self._prefilling.remove(row)
        kv = [(layer.keys, layer.values) for layer in row.cache.layers]
        if self.prefix is not None:
            self.prefix.insert(row.adapter, row.ids, kv)
        if self._choose([row], logits):  # finished with its first token
            row.cache = None
            return
        self._reserve(len(self._decoding) + 1, max(r.final_len for r in self._admitted() + [row]))
        row.slot = self.pool.add(kv, len(row.ids))
        row.cache = None
        self._decoding.append(row)

    def _reserve(self, rows: int, cols: int) -> None:
        """Grow the pool for `rows` x `cols`, with headroom (rows double, columns round up to 64) as far as the
        budget and max_rows allow, so joins rarely reallocate."""
        cap_r, cap_c = self.pool.capacity
        if rows <= cap_r and cols <= cap_c:
            return
        cols = max(cap_c, -(-cols // 64) * 64)
        budget_rows = max(1, self.kv_bytes // (cols * self.bytes_per_token))
        self.pool.reserve(max(rows, min(max(2 * cap_r, 8), budget_rows, self.max_rows)), cols)

    def _decode_step(self) -> None:
        if not self._decoding:
            return
        rows = self._decoding
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        positions = self.pool.lens[:, None].to(self.device)
        mask = self._decode_mask()
        try:
            logits = self.forward(ids, _PoolCache(self.pool), [r.adapter for r in rows],
                                  position_ids=positions, attention_mask=mask)
        except Exception as exc:
            err = f"generation failed: {one_line_error(exc)}"
            for row in rows:
                row.done(err)
            self._decoding = []
            self.pool.clear()
            return
        self.pool.lens += 1
        self.steps += 1
        self.step_rows += len(rows)
        for row in [r for r, finished in zip(list(rows), self._choose_flags(rows, logits)) if finished]:
            self._leave(row)
        if not self._decoding and not self._prefilling:
            self.pool.clear()  # idle: give the memory back

    def _decode_mask(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """The decode step's attention mask: one tensor for every layer, or (a model with sliding-window layers
        among global ones, e.g. Gemma-3) one per layer type, which the model picks by `config.layer_types`."""
        by_type, window = self.mask_layout
        if by_type is None:
            return self.pool.mask(self.attn_impl, self.dtype, window)
        return {t: self.pool.mask(self.attn_impl, self.dtype, w) for t, w in by_type.items()}

    def _leave(self, row: Row) -> None:
        moved = self.pool.remove(row.slot)
        last = self._decoding.pop()
        if moved is not None:  # the last row took the leaving row's slot
            last.slot = row.slot
            self._decoding[row.slot] = last

    # --- token choice ---------------------------------------------------------------------------

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> bool:
        return self._choose_flags(rows, logits)[0]

    def _choose_flags(self, rows: list[Row], logits: torch.Tensor) -> list[bool]:
        """Pick each row's next token (`choose_tokens`, as the static engine's _RowSampler does), record it, and
        finish rows that hit EOS or their max_tokens. Returns one 'finished' flag per row."""
        chosen, logprobs = choose_tokens(logits.float(), [r.matcher for r in rows], [r.temperature for r in rows],
                                         [r.generator for r in rows], [r.max_tokens - len(r.tokens) - 1 for r in rows])
        logprobs = logprobs.tolist()
        flags = []
        for row, tok, lp in zip(rows, chosen.tolist(), logprobs):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            error = row.matcher.advance(tok) if row.matcher is not None else None
            finished = error is not None or tok in self.eos_ids or len(row.tokens) >= row.max_tokens
            if error is not None:
                row.done(f"constrained decoding failed: {error}")
            elif finished:
                row.done({"text": self.decode(row.tokens), "tokens_in": len(row.ids), "tokens_out": len(row.tokens),
                          "mean_logprob": sum(row.logprobs) / len(row.logprobs), "token_ids": list(row.tokens),
                          "cached_tokens": row.cached, "constrained": row.matcher is not None})
            flags.append(finished)
        return flags


