"""The generation engine: continuous batching of many requests over a fixed number of slots.

A batch that decodes until its longest row stops spends most of its work on rows that have
finished (teacher rationales run from a few tokens to the 256-token cap). Here a fixed number
of slots decode in lockstep inside one compiled `lax.while_loop`, each slot at its own
position. The loop hands control back to the host when enough slots are free to take the
next waiting requests, when the page pool is full, or after `max_steps`; the host collects
the finished rows, encodes the newcomers (their cross-attention keys and values are written
into the free slot rows) and resumes.

Self-attention keys and values live in a pool of pages of `PAGE` positions, handed to a row
as it reaches each page and taken back when it finishes, so each step reads the positions
the rows have reached (rounded up to a page), not slots x the longest row: on a CPU the
decode step is bound by reading that cache. Queries are gathered to the pages, each page
scores its keys, and the softmax and the weighted values are summed over a row's pages in
page order (`PagedCache`). Shapes stay few, so compiles stay few: the slot count is fixed,
newcomers are encoded in groups of `admit_rows` at bucketed lengths, and the pool size and
the cross-attention length change in coarse steps.

A decoder-only model takes the same slots: its prompt, less its last token, is prefilled into
the row's context keys and values (where a T5's encoder output goes: `cross_kv`), its last
token is the row's first input, at the prompt's position; the step attends over the context
and the row's pages in one softmax (`PagedCache` with a context; grouped-query heads read their
shared key/value head). The family's own parts are `_Family` below.

Written by hand: no maintained JAX library batches an encoder-decoder this way.

Each request's result depends on the model, its input, the settings and its own seed only:
a sampled token draws from `fold_in(key(seed), position)`, never from the slot or the
batch, and a row's attention sums run over its own pages in order. (Floating-point rounding
in batched matmuls is the one channel left; a token flips only if two candidates are within
about 1e-6 of each other.) Under a mesh the slots and the pages are split over the batch
axes; on multi-host meshes every process runs the same schedule and reads every slot.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tinyllm_jax.model.family import family_of
from tinyllm_jax.model.t5 import NEG_INF, T5


def bucket_length(n: int, multiple: int = 16) -> int:
    """Pads lengths to a few shapes so that batches of similar length share one compile."""
    if n <= 64:
        return max(multiple, -(-n // multiple) * multiple)
    return 1 << (n - 1).bit_length()


PAGE = 32  # positions a page of the self-attention cache
ENCODE_ROWS = 32  # waiting requests encoded a call (ahead of free slots): the encoder's matmuls want rows


def input_bucket(n: int) -> int:
    """The padded length of inputs of up to n tokens, for the encoder and the slots'
    cross-attention: multiples of 16 up to 64, then 96, 128, 192, 256, ... Each length
    compiles once more (the decode loop: about 2 s on a CPU); a decode step reads slots x
    this length of cross-attention keys and values."""
    if n <= 64:
        return bucket_length(n)
    b = 1 << (n - 1).bit_length()
    return b * 3 // 4 if n <= b * 3 // 4 else b


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Top-k, then top-p (nucleus) filtering, each row on its own; filtered logits are -inf."""
    if top_k > 0:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)
    return logits_BxV


def first_argmax(logits_BxV: jax.Array, chunk: int = 128) -> jax.Array:
    """argmax over the last axis, the first of equal maxima (as jnp.argmax), in two levels:
    the chunk holding the first maximum of the chunks' maxima, then the first maximum
    inside it. XLA CPU runs this ~5x faster than argmax's (value, index) reduction over the
    vocabulary, a few percent of a decode step."""
    B, V = logits_BxV.shape
    n = -(-V // chunk)
    chunks = jnp.pad(logits_BxV, ((0, 0), (0, n * chunk - V)), constant_values=-jnp.inf).reshape(B, n, chunk)
    which = jnp.argmax(chunks.max(axis=-1), axis=-1)
    inside = jnp.take_along_axis(chunks, which[:, None, None], axis=1)[:, 0]
    return (which * chunk + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def seed_key_data(seeds: Sequence[int]) -> np.ndarray:
    """[N, 2] uint32 threefry key data of `jax.random.key(seed)` for each seed (mod 2**64)."""
    s = [int(x) % (1 << 64) for x in seeds]
    return np.array([[x >> 32, x & 0xFFFFFFFF] for x in s], np.uint32).reshape(len(s), 2)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy at temperature 0; else softmax(logits / temperature) after top-k and top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Slots(NamedTuple):
    """The device state of the slots (S rows) and the page pool (N pages); a pytree carried
    through the loop."""

    pages_kv: tuple  # per decoder layer (k, v), [N, H, PAGE, K]
    page_owner: jax.Array  # [N] the slot holding the page; S: free
    page_index: jax.Array  # [N] which of its owner's pages it is (positions index*PAGE ...)
    slot_pages: jax.Array  # [S, M] the pages of each slot in order; -1: none (M = ceil(T / PAGE))
    cross_kv: tuple  # per decoder layer (k, v), [S, H, E, K]: E the cross-attention (or prompt context) length
    enc_mask: jax.Array  # [S, E] bool
    pos: jax.Array  # [S] tokens generated so far (the next step's position)
    offset: jax.Array  # [S] the model position of step 0 (a decoder-only prompt's length less one; T5: 0)
    token: jax.Array  # [S] the last token (the decoder's next input)
    out: jax.Array  # [S, T] generated ids, T the largest per-request limit
    done: jax.Array  # [S] finished or empty
    limit: jax.Array  # [S] the request's max new tokens
    key: jax.Array  # [S, 2] uint32 key data of the request's seed
    steps: jax.Array  # () decoder steps run
    live_steps: jax.Array  # () rows that were live, summed over the steps: tokens generated
    stalled: jax.Array  # () rows that waited for a page in the last step


class PagedCache(NamedTuple):
    """One decoder layer's self-attention over the page pool, for one step: what the
    models' decode steps call as a cache that attends itself (model/t5.py DecoderBlock,
    model/decoder.py Block.step). The step's page tables are shared by all layers. A
    decoder-only model's cache also holds the row's prompt context (`ctx_*`), attended in
    the same softmax; its queries come in groups over fewer key/value heads (G = H / Hkv)."""

    k: jax.Array  # [N, Hkv, PAGE, K]
    v: jax.Array
    write_page: jax.Array  # [S] the page each row writes this step (N: none)
    write_at: jax.Array  # [S] the position in that page
    owner: jax.Array  # [N] the owning slot (clipped into range)
    valid: jax.Array  # [N, PAGE] key position <= the owner's position, on an owned page
    bias: jax.Array | None  # [N, H, PAGE] T5's relative position bias of each key for its owner's query
    slot_pages: jax.Array  # [S, M] the slots' pages in order (clipped into range)
    has_page: jax.Array  # [S, M]
    ctx_k: jax.Array | None = None  # [S, Hkv, E, K] a decoder-only row's prompt keys
    ctx_v: jax.Array | None = None
    ctx_mask: jax.Array | None = None  # [S, E]

    def write(self, k_BxHx1xK, v_BxHx1xK) -> "PagedCache":
        def put(pages, new):
            new = new[:, :, 0].astype(pages.dtype)
            new = jnp.where(jnp.isfinite(new), new, 0)  # a diverged row never leaves NaN for a page's next owner
            return pages.at[self.write_page, :, self.write_at].set(new, mode="drop")

        return self._replace(k=put(self.k, k_BxHx1xK), v=put(self.v, v_BxHx1xK))

    def attend(self, q_SxHx1xK: jax.Array) -> jax.Array:
        if self.ctx_k is not None or self.k.shape[1] != q_SxHx1xK.shape[1]:
            return self._attend_grouped(q_SxHx1xK)
        q_NxHxK = q_SxHx1xK[:, :, 0][self.owner]
        scores = jnp.einsum("nhk,nhpk->nhp", q_NxHxK, self.k).astype(jnp.float32) + self.bias
        scores = jnp.where(self.valid[:, None, :], scores, NEG_INF)
        mine = self.has_page[:, :, None]
        top_SxH = jnp.max(jnp.where(mine, scores.max(-1)[self.slot_pages], NEG_INF), axis=1)
        e_NxHxP = jnp.exp(scores - top_SxH[self.owner][:, :, None])
        total_SxH = jnp.sum(jnp.where(mine, e_NxHxP.sum(-1)[self.slot_pages], 0.0), axis=1)
        out_NxHxK = jnp.einsum("nhp,nhpk->nhk", e_NxHxP.astype(self.v.dtype), self.v).astype(jnp.float32)
        out_SxHxK = jnp.sum(jnp.where(mine[..., None], out_NxHxK[self.slot_pages], 0.0), axis=1)
        out_SxHxK = out_SxHxK / jnp.where(total_SxH > 0, total_SxH, 1.0)[..., None]
        return out_SxHxK[:, :, None, :].astype(q_SxHx1xK.dtype)

    def _attend_grouped(self, q_SxHx1xK: jax.Array) -> jax.Array:
        """A decoder-only step: the query heads in groups over the key/value heads, softmax over
        the row's prompt context and its pages together (no position bias: rotary is in q, k)."""
        S, H, _, K = q_SxHx1xK.shape
        Hkv = self.k.shape[1]
        q_SxJxGxK = q_SxHx1xK[:, :, 0].reshape(S, Hkv, H // Hkv, K)
        page = jnp.einsum("njgk,njpk->njgp", q_SxJxGxK[self.owner], self.k, preferred_element_type=jnp.float32)
        page = jnp.where(self.valid[:, None, None, :], page, NEG_INF)
        mine = self.has_page[:, :, None, None]
        top = jnp.max(jnp.where(mine, page.max(-1)[self.slot_pages], NEG_INF), axis=1)  # [S, J, G]
        if self.ctx_k is not None:
            ctx = jnp.einsum("sjgk,sjek->sjge", q_SxJxGxK, self.ctx_k, preferred_element_type=jnp.float32)
            ctx = jnp.where(self.ctx_mask[:, None, None, :], ctx, NEG_INF)
            top = jnp.maximum(top, ctx.max(-1))
        e_page = jnp.exp(page - top[self.owner][..., None])
        total = jnp.sum(jnp.where(mine, e_page.sum(-1)[self.slot_pages], 0.0), axis=1)
        out_page = jnp.einsum("njgp,njpk->njgk", e_page.astype(self.v.dtype), self.v).astype(jnp.float32)
        out = jnp.sum(jnp.where(mine[..., None], out_page[self.slot_pages], 0.0), axis=1)  # [S, J, G, K]
        if self.ctx_k is not None:
            e_ctx = jnp.where(self.ctx_mask[:, None, None, :], jnp.exp(ctx - top[..., None]), 0.0)
            total = total + e_ctx.sum(-1)
            out = out + jnp.einsum("sjge,sjek->sjgk", e_ctx.astype(self.ctx_v.dtype), self.ctx_v).astype(jnp.float32)
        out = out / jnp.where(total > 0, total, 1.0)[..., None]
        return out.reshape(S, H, 1, K).astype(q_SxHx1xK.dtype)


class _Family:
    """What the engine does differently for each model family: the key/value heads its
    caches hold, how a request's input becomes a slot's context (T5: the encoder's output
    projected for cross-attention; a decoder-only model: its prompt less the last token,
    prefilled) and first input, and the decode step's call."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.causal = family_of(cfg).name == "decoder"
        self.model = family_of(cfg).module(cfg, True)
        if self.causal:
            self.kv_heads, self.head_dim, self.layers = cfg.num_key_value_heads, cfg.head_size, cfg.num_hidden_layers
        else:
            self.kv_heads, self.head_dim, self.layers = cfg.num_heads, cfg.d_kv, cfg.decoder_layers

    def context(self, variables, tokens_RxL, lengths_R):
        """(per layer (k, v) [R, Hkv, L, K], mask [R, L], first input [R], position of step 0 [R])."""
        R, L = tokens_RxL.shape
        if self.causal:
            from tinyllm_jax.model.decoder import Decoder

            last = jnp.maximum(lengths_R, 1) - 1
            mask_RxL = jnp.arange(L)[None, :] < last[:, None]
            kv = self.model.apply(variables, tokens_RxL, mask_RxL, method=Decoder.prefill)
            start = jnp.take_along_axis(tokens_RxL, last[:, None], axis=1)[:, 0]
            return tuple(tuple(x) for x in kv), mask_RxL, start, last.astype(jnp.int32)
        mask_RxL = tokens_RxL != 0
        encoded = self.model.apply(variables, tokens_RxL, mask_RxL.astype(jnp.int32), method=T5.encode)
        kv = self.model.apply(variables, encoded, method=T5.cross_kv)
        return (tuple(tuple(x) for x in kv), mask_RxL, jnp.full((R,), self.cfg.decoder_start_token_id, jnp.int32),
                jnp.zeros((R,), jnp.int32))

    def step(self, variables, st: "Slots", tables: dict, bias_HxT):
        """(logits [S, V], the layers' caches) of one decoder step of every slot."""
        if self.causal:
            from tinyllm_jax.model.decoder import Decoder

            ctx_mask = st.enc_mask
            if self.cfg.sliding_window is not None:  # Mistral: the prompt's keys leave the window first
                query = st.offset + st.pos
                ctx_mask = ctx_mask & (jnp.arange(ctx_mask.shape[1])[None, :] > (query - self.cfg.sliding_window)[:, None])
            caches = [PagedCache(k, v, **tables, bias=None, ctx_k=ck, ctx_v=cv, ctx_mask=ctx_mask)
                      for (k, v), (ck, cv) in zip(st.pages_kv, st.cross_kv)]
            return self.model.apply(variables, st.token, st.offset + st.pos, caches, method=Decoder.decode_step)
        T = st.out.shape[1]
        key_pos = tables.pop("key_pos")
        query_pos = st.pos[tables["owner"]][:, None]
        bias = jnp.transpose(bias_HxT[:, jnp.clip(query_pos - key_pos, 0, T - 1)], (1, 0, 2))
        caches = [PagedCache(k, v, **tables, bias=bias) for k, v in st.pages_kv]
        return self.model.apply(variables, st.token, None, caches, st.cross_kv, st.enc_mask, None,
                                method=T5.decode_step)

    def bias_table(self, variables, T: int):
        return None if self.causal else self.model.apply(variables, T, method=T5.decoder_bias_by_distance)


@functools.lru_cache(maxsize=32)
def _compiled(cfg: Any, sampling: Sampling, eos_ids: tuple[int, ...], mesh: Mesh | None, row_axes: tuple | None):
    """The engine's jitted functions for one model, sampling rule and mesh."""
    fam = _Family(cfg)
    dt = cfg.compute_dtype
    H, K, n_layers = fam.kv_heads, fam.head_dim, fam.layers
    eos_E = np.asarray(eos_ids, np.int32)
    window = getattr(cfg, "sliding_window", None)  # Mistral's; T5 has none

    def rows_sharding(ndim: int):
        return NamedSharding(mesh, P(row_axes, *([None] * (ndim - 1)))) if ndim else NamedSharding(mesh, P())

    def jit(fn, donate=()):
        """jax.jit per value of the keyword (static) arguments; under a mesh the slot state
        comes out with its slots and pages over `row_axes`."""
        cache: dict = {}

        def call(*args, **static_kw):
            key = tuple(sorted(static_kw.items()))
            if key not in cache:
                part = functools.partial(fn, **static_kw)
                out = None
                if mesh is not None:
                    out = jax.tree.map(lambda x: rows_sharding(x.ndim), jax.eval_shape(part, *args))
                cache[key] = jax.jit(part, donate_argnums=donate, out_shardings=out)
            return cache[key](*args)

        return call

    def init(*, slots: int, pages: int, enc_len: int, max_len: int) -> Slots:
        kv = lambda n, L: tuple((jnp.zeros((n, H, L, K), dt), jnp.zeros((n, H, L, K), dt)) for _ in range(n_layers))
        z = jnp.zeros((slots,), jnp.int32)
        return Slots(kv(pages, PAGE), jnp.full((pages,), slots, jnp.int32), jnp.zeros((pages,), jnp.int32),
                     jnp.full((slots, -(-max_len // PAGE)), -1, jnp.int32), kv(slots, enc_len),
                     jnp.zeros((slots, enc_len), bool), z, z, z, jnp.zeros((slots, max_len), jnp.int32),
                     jnp.ones((slots,), bool), z, jnp.zeros((slots, 2), jnp.uint32), jnp.int32(0), jnp.int32(0),
                     jnp.int32(0))

    def encode(params, tokens_RxL, lengths_R):
        """Newcomers' context: per decoder layer (k, v) [R, Hkv, L, K], its mask, each row's
        first input and the position of its first step."""
        return fam.context({"params": params}, tokens_RxL, lengths_R)

    def insert(st: Slots, cross, mask_GxL, start_G, offset_G, rows_R, slots_R, limits_R, keys_Rx2) -> Slots:
        """Puts rows `rows_R` of an encoded group into slot rows `slots_R` (an index >= S: a
        padding row, dropped). Their pages come as they reach them."""
        cross = jax.tree.map(lambda x: x[rows_R], cross)
        mask_RxL = mask_GxL[rows_R]
        R, L = mask_RxL.shape
        E = st.enc_mask.shape[1]
        put = lambda buf, rows: buf.at[slots_R].set(rows.astype(buf.dtype), mode="drop")
        widen = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, E - L), (0, 0)))
        return st._replace(
            cross_kv=tuple((put(k, widen(nk)), put(v, widen(nv))) for (k, v), (nk, nv) in zip(st.cross_kv, cross)),
            enc_mask=put(st.enc_mask, jnp.pad(mask_RxL, ((0, 0), (0, E - L)))),
            slot_pages=put(st.slot_pages, jnp.full((R, st.slot_pages.shape[1]), -1, jnp.int32)),
            pos=put(st.pos, jnp.zeros((R,), jnp.int32)), offset=put(st.offset, offset_G[rows_R]),
            token=put(st.token, start_G[rows_R]),
            out=put(st.out, jnp.zeros((R, st.out.shape[1]), jnp.int32)),
            done=put(st.done, jnp.zeros((R,), bool)), limit=put(st.limit, limits_R), key=put(st.key, keys_Rx2))

    def resize(st: Slots, *, pages: int, enc_len: int) -> Slots:
        """Grows or cuts the page pool (cut only past the last page in use) and the
        cross-attention length."""
        S = st.pos.shape[0]

        def fit(x, n, axis, fill=0):
            if x.shape[axis] >= n:
                return jax.lax.slice_in_dim(x, 0, n, axis=axis)
            pad = [(0, n - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)]
            return jnp.pad(x, pad, constant_values=fill)

        return st._replace(pages_kv=jax.tree.map(lambda x: fit(x, pages, 0), st.pages_kv),
                           page_owner=fit(st.page_owner, pages, 0, fill=S), page_index=fit(st.page_index, pages, 0),
                           cross_kv=jax.tree.map(lambda x: fit(x, enc_len, 2), st.cross_kv),
                           enc_mask=fit(st.enc_mask, enc_len, 1))

    def choose(logits_SxV, st: Slots):
        if sampling.greedy:
            return first_argmax(logits_SxV)
        logits_SxV = filter_logits(logits_SxV / sampling.temperature, sampling.top_k, sampling.top_p)
        keys = jax.vmap(lambda d, p: jax.random.fold_in(jax.random.wrap_key_data(d, impl="threefry2x32"), p))(st.key, st.pos)
        return jax.vmap(jax.random.categorical)(keys, logits_SxV).astype(jnp.int32)

    def take_pages(st: Slots, live):
        """Hands a free page to each live row that has reached a new one (lowest free pages
        first, rows in slot order); rows left without one wait this step. Returns the
        updated state and the rows that step."""
        S, N = st.pos.shape[0], st.page_owner.shape[0]
        rows = jnp.arange(S)
        index = st.pos // PAGE
        current = st.slot_pages[rows, jnp.minimum(index, st.slot_pages.shape[1] - 1)]
        need = live & (st.pos % PAGE == 0) & (current < 0)
        free = st.page_owner >= S
        free_pages = jnp.argsort(~free, stable=True)
        rank = jnp.cumsum(need.astype(jnp.int32)) - 1
        got = need & (rank < jnp.sum(free.astype(jnp.int32)))
        page = jnp.where(got, free_pages[jnp.clip(rank, 0, N - 1)], N)
        st = st._replace(slot_pages=st.slot_pages.at[rows, jnp.where(got, index, st.slot_pages.shape[1])].set(page, mode="drop"),
                         page_owner=st.page_owner.at[page].set(rows, mode="drop"),
                         page_index=st.page_index.at[page].set(index, mode="drop"))
        return st, live & ~(need & ~got)

    def run(params, st: Slots, refill_at, max_steps) -> Slots:
        """Decodes until `refill_at` slots are free, no row is live, a row waits for a page,
        or `max_steps` steps."""
        variables = {"params": params}
        S, N = st.pos.shape[0], st.page_owner.shape[0]
        T = st.out.shape[1]
        bias_HxT = fam.bias_table(variables, T)
        rows = jnp.arange(S)

        def cond(carry):
            st, n = carry
            return ((n < max_steps) & jnp.any(~st.done) & (jnp.sum(st.done.astype(jnp.int32)) < refill_at)
                    & (st.stalled == 0))

        def body(carry):
            st, n = carry
            st, step = take_pages(st, ~st.done)
            owner = jnp.minimum(st.page_owner, S - 1)
            key_pos = st.page_index[:, None] * PAGE + jnp.arange(PAGE)[None, :]
            query_pos = st.pos[owner][:, None]
            valid = (st.page_owner < S)[:, None] & (key_pos <= query_pos)
            if window is not None:
                valid = valid & (query_pos - key_pos < window)
            tables = dict(write_page=jnp.where(step, st.slot_pages[rows, jnp.minimum(st.pos // PAGE, st.slot_pages.shape[1] - 1)], N),
                          write_at=st.pos % PAGE, owner=owner, valid=valid,
                          slot_pages=jnp.maximum(st.slot_pages, 0), has_page=st.slot_pages >= 0)
            logits, caches = fam.step(variables, st, {**tables, "key_pos": key_pos} if not fam.causal else tables,
                                      bias_HxT)
            nxt = jnp.where(step, choose(logits, st), st.token)
            out = st.out.at[rows, jnp.where(step, st.pos, T)].set(nxt, mode="drop")
            finished = step & ((nxt[:, None] == eos_E[None, :]).any(-1) | (st.pos + 1 >= st.limit))
            freed = (st.page_owner < S) & finished[owner]  # a finished row's pages go back to the pool
            st = st._replace(pages_kv=tuple((c.k, c.v) for c in caches), out=out, token=nxt,
                             pos=st.pos + step.astype(jnp.int32), done=st.done | finished,
                             page_owner=jnp.where(freed, S, st.page_owner),
                             slot_pages=jnp.where(finished[:, None], -1, st.slot_pages), steps=st.steps + 1,
                             live_steps=st.live_steps + jnp.sum(step.astype(jnp.int32)),
                             stalled=jnp.sum((~st.done & ~step).astype(jnp.int32)))
            return st, n + 1

        st = st._replace(stalled=jnp.int32(0))
        return jax.lax.while_loop(cond, body, (st, jnp.int32(0)))[0]

    return {"init": jit(init), "encode": jax.jit(encode), "insert": jit(insert, donate=(0,)), "resize": jit(resize),
            "run": jit(run, donate=(1,))}


class Pool:
    """The page pool's size, chosen on the host: at first two pages a slot (64 positions;
    or `initial`), half as much again each time a row had to wait for a page, back down
    when the pages past a smaller size are all free and most are unused. Sizes are multiples
    of 8 (and of the mesh's row divisor); each size compiles the loop once."""

    def __init__(self, slots: int, max_len: int, divisor: int = 1, initial: int | None = None):
        self.slots, self.divisor = slots, divisor
        self.largest = self._round(slots * -(-max_len // PAGE))
        first = initial if initial is not None else self._round(2 * slots)
        self.smallest = min(self.largest, -(-first // divisor) * divisor)
        self.size = self.smallest
        self.history = [self.size]

    def _round(self, n: int) -> int:
        unit = 8 * self.divisor // math.gcd(8, self.divisor)
        return -(-n // unit) * unit

    def wanted(self, stalled: int, owners: np.ndarray | None) -> int:
        size = self.size
        if stalled:
            size = min(self.largest, self._round(size * 3 // 2))
        elif owners is not None:
            used = int((owners < self.slots).sum())
            smaller = max(self.smallest, self._round(size * 2 // 3))
            if smaller < size and used < smaller // 2 and (owners[smaller:] >= self.slots).all():
                size = smaller
        if size != self.size:
            self.history.append(size)
        return size


def _fetch(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # multi-host: every process reads every slot
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


class Engine:
    """Generates for many requests over `slots` rows (see the module docstring).

    `mesh` splits the slots and pages over `row_axes` (the slot count is rounded up to a
    multiple of their size); waiting requests are encoded `encode_rows` a call, ahead of
    the slots; the loop returns to the host when `admit_rows` slots are free; `pages` sets
    the page pool's first size."""

    def __init__(self, cfg: Any, slots: int, *, sampling: Sampling = Sampling(),
                 eos_id: int | Sequence[int] | None = None, mesh: Mesh | None = None,
                 row_axes: tuple[str, ...] | None = None, admit_rows: int | None = None,
                 max_steps: int = 128, pages: int | None = None):
        from tinyllm_jax.runtime import sharding

        self.cfg, self.sampling = cfg, sampling
        self.eos_ids = eos_ids_of(cfg, eos_id)
        self.eos_id = self.eos_ids[0]
        self.mesh = mesh
        self.row_axes = tuple(row_axes or sharding.BATCH_AXES) if mesh is not None else None
        self.divisor = int(np.prod([mesh.shape[a] for a in self.row_axes])) if mesh is not None else 1
        self.slots = -(-max(1, slots) // self.divisor) * self.divisor
        self.admit_rows = max(1, min(self.slots, admit_rows or max(1, self.slots // 16)))
        self.encode_rows = max(self.admit_rows, min(ENCODE_ROWS, self.slots))
        self.max_steps = max_steps
        self.pages = pages
        self.fns = _compiled(cfg, sampling, self.eos_ids, mesh, self.row_axes)
        self.stats: dict[str, Any] = {}

    def _put(self, x: np.ndarray) -> jax.Array:
        """Host arrays for the compiled calls: replicated over the mesh (same on every process)."""
        if self.mesh is None:
            return jnp.asarray(x)
        sharding = NamedSharding(self.mesh, P())
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    def generate(self, params: Any, token_lists: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 seeds: Sequence[int] | None = None, progress: bool = False,
                 on_result: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """Generated ids for each request in input order, each cut before its EOS; request i
        stops at EOS or after `max_new_tokens[i]` tokens. `seeds` (one a request) drive
        sampling and are required for it. `on_result(i, ids)` is called as each request
        finishes (in finishing order)."""
        from tqdm.auto import tqdm

        seeds = self._checked_seeds(len(token_lists), max_new_tokens, seeds)
        results: list[list[int]] = [[] for _ in token_lists]
        if not token_lists:
            return results
        fns, S = self.fns, self.slots
        # host (numpy) parameters would be copied to the device at every call: place them once
        params = jax.tree.map(lambda x: self._put(x) if isinstance(x, np.ndarray) else x, params)
        lengths = [len(t) for t in token_lists]
        waiting = collections.deque(sorted(range(len(lengths)), key=lambda i: lengths[i]))  # similar lengths encode together
        group: _Group | None = None  # encoded, waiting for slots
        owner = np.full(S, -1)  # the request each slot holds
        pool = Pool(S, max(max_new_tokens), self.divisor, self.pages)
        enc_len = input_bucket(lengths[waiting[0]])
        st = fns["init"](slots=S, pages=pool.size, enc_len=enc_len, max_len=max(max_new_tokens))
        calls, started = collections.Counter(), time.perf_counter()
        bar = tqdm(total=len(lengths), desc="generate", unit="row", disable=not progress)
        pos = np.zeros(S, np.int64)
        generated = steps = stalled = 0
        while waiting or group or (owner >= 0).any():
            free = np.flatnonzero(owner < 0)
            while len(free) and (group or waiting):  # fill the free slots, encoding ahead as needed
                if not group:
                    group = self._encode(params, [waiting.popleft() for _ in range(min(self.encode_rows, len(waiting)))],
                                         token_lists, max_new_tokens, seeds)
                    calls["encode"] += 1
                take = group.take(len(free))
                if group.length > enc_len:
                    enc_len = input_bucket(group.length)
                    st, calls["resize"] = fns["resize"](st, pages=pool.size, enc_len=enc_len), calls["resize"] + 1
                for g in range(0, len(take), self.admit_rows):
                    rows = take[g:g + self.admit_rows]
                    st = group.insert(self, st, rows, free[g:g + len(rows)])
                    owner[free[g:g + len(rows)]] = [group.ids[r] for r in rows]
                    calls["insert"] += 1
                free = free[len(take):]
            # shorter once the long inputs are done (the group being admitted keeps its length)
            want_enc = input_bucket(max([lengths[i] for i in owner[owner >= 0]] + ([group.length] if group else [])))
            want_pages = pool.wanted(stalled, _fetch(st.page_owner) if pool.size > pool.smallest else None)
            if (want_enc, want_pages) != (enc_len, pool.size):
                enc_len, pool.size = want_enc, want_pages
                st, calls["resize"] = fns["resize"](st, pages=pool.size, enc_len=enc_len), calls["resize"] + 1
            waiting_n = len(waiting) + (group.left if group else 0)
            refill_at = min(self.admit_rows, waiting_n) if waiting_n else S + 1
            st = fns["run"](params, st, self._put(np.int32(refill_at)), self._put(np.int32(self.max_steps)))
            calls["run"] += 1
            done, pos, now, stalled = _fetch(st.done), _fetch(st.pos), int(_fetch(st.steps)), int(_fetch(st.stalled))
            if now == steps:  # a guard: every call must step while rows are live
                raise RuntimeError(f"generation engine: no step taken with {int((~done).sum())} live slots")
            steps = now
            finished = np.flatnonzero(done & (owner >= 0))
            if len(finished):
                out = _fetch(st.out)
                for s in finished:
                    i = int(owner[s])
                    results[i] = strip_after_eos(out[s, :pos[s]].tolist(), self.eos_ids)
                    if on_result is not None:
                        on_result(i, results[i])
                    generated += int(pos[s])
                    owner[s] = -1
                bar.update(len(finished))
            bar.set_postfix(tokens=generated + int(pos[owner >= 0].sum()), refresh=False)
        bar.close()
        live = int(_fetch(st.live_steps))
        self.stats = {"requests": len(lengths), "slots": S, "admit_rows": self.admit_rows,
                      "encode_rows": self.encode_rows, "steps": steps,
                      "generated_tokens": live, "live_fraction": live / max(1, steps * S), "calls": dict(calls),
                      "pages": pool.history, "seconds": time.perf_counter() - started}
        if self.mesh is not None:
            self.stats["row_axes"] = {"slots": list(st.pos.sharding.spec[0]), "pages": list(st.pages_kv[0][0].sharding.spec[0])}
        return results

    def _checked_seeds(self, n: int, max_new_tokens: Sequence[int], seeds: Sequence[int] | None) -> Sequence[int]:
        if len(max_new_tokens) != n:
            raise ValueError(f"max_new_tokens: {len(max_new_tokens)} limits for {n} requests")
        if min(max_new_tokens, default=1) < 1:
            raise ValueError(f"max_new_tokens: every limit must be at least 1, found {min(max_new_tokens)}")
        if seeds is None:
            if not self.sampling.greedy:
                raise ValueError("sampling (temperature > 0) needs one integer seed a request (`seeds=`)")
            return [0] * n
        if len(seeds) != n:
            raise ValueError(f"seeds: {len(seeds)} seeds for {n} requests")
        return seeds

    def _encode(self, params, ids: list[int], token_lists, max_new_tokens, seeds) -> "_Group":
        """Encodes requests `ids` (padded to a bucketed length) as one group."""
        tokens = np.zeros((self.encode_rows, input_bucket(max(len(token_lists[i]) for i in ids))), np.int32)
        lengths = np.zeros((self.encode_rows,), np.int32)
        for r, i in enumerate(ids):
            tokens[r, :len(token_lists[i])] = token_lists[i]
            lengths[r] = len(token_lists[i])
        cross, mask, start, offset = self.fns["encode"](params, self._put(tokens), self._put(lengths))
        return _Group(ids, tokens.shape[1], cross, mask, start, offset, [max_new_tokens[i] for i in ids],
                      seed_key_data([seeds[i] for i in ids]))


class _Group:
    """Requests encoded together, handed to slots as they free."""

    def __init__(self, ids, length, cross, mask, start, offset, limits, keys):
        self.ids, self.length, self.cross, self.mask = ids, length, cross, mask
        self.start, self.offset = start, offset
        self.limits, self.keys = np.asarray(limits, np.int32), keys
        self.next = 0

    @property
    def left(self) -> int:
        return len(self.ids) - self.next

    def __bool__(self) -> bool:
        return self.left > 0

    def take(self, n: int) -> list[int]:
        rows = list(range(self.next, self.next + min(n, self.left)))
        self.next += len(rows)
        return rows

    def insert(self, engine: "Engine", st: Slots, rows: list[int], slots: np.ndarray) -> Slots:
        """Puts `rows` of the group into `slots` (at most `admit_rows`, one compiled shape)."""
        A, k = engine.admit_rows, len(rows)
        pick = np.zeros(A, np.int32)
        where = np.full(A, engine.slots, np.int32)  # padding rows: an index past the slots, dropped
        limit = np.zeros(A, np.int32)
        keys = np.zeros((A, 2), np.uint32)
        pick[:k], where[:k], limit[:k], keys[:k] = rows, slots[:k], self.limits[rows], self.keys[rows]
        put = engine._put
        return engine.fns["insert"](st, self.cross, self.mask, self.start, self.offset, put(pick), put(where),
                                    put(limit), put(keys))


def eos_ids_of(cfg: Any, eos: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """The ids generation stops at: `eos` when given, else the model's (a decoder-only
    checkpoint may name several, in config.json and generation_config.json)."""
    if eos is None:
        eos = cfg.eos_token_ids if family_of(cfg).name == "decoder" else cfg.eos_token_id
    ids = tuple(int(e) for e in ((eos,) if isinstance(eos, (int, np.integer)) else eos))
    if not ids:
        raise ValueError("generation needs at least one EOS id; the model's config names none")
    return ids


def strip_after_eos(ids, eos: int | Sequence[int]) -> list[int]:
    stop = {int(eos)} if isinstance(eos, (int, np.integer)) else {int(e) for e in eos}
    res = []
    for t in ids:
        if t in stop:
            break
        res.append(int(t))
    return res
