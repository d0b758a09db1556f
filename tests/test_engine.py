"""The generation engine (continuous batching over slots) against the fixed-batch decoder, and
the promises of its sampling: a request's output depends on its input, settings and seed only."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_hf_t5
from tinyllm_jax.eval.decode import bucket_length, generate, generate_ids, strip_after_eos
from tinyllm_jax.eval.engine import Engine, Sampling
from tinyllm_jax.model.hf import load_pretrained


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, spm_tokenizer_dir):
    """A tiny T5 with a larger init: its greedy outputs differ by input and stop (EOS) at
    varied lengths, so that slots finish at different steps."""
    path = make_hf_t5(tmp_path_factory.mktemp("sharp"), spm_tokenizer_dir, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, initializer_factor=5.0)
    _, params, _, cfg = load_pretrained(str(path), tokenizer=False)
    return cfg, params


def _inputs(n: int, seed: int, longest: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, int(rng.integers(1, longest))).tolist() for _ in range(n)]


def _fixed_batch(cfg, params, token_lists, limits):
    """Today's fixed-batch decoder on all inputs as one batch (one compile), each row cut at
    its own limit (greedy decoding for m steps gives the first m of more) and EOS: the oracle."""
    arr = np.zeros((len(token_lists), bucket_length(max(map(len, token_lists)))), np.int32)
    for r, t in enumerate(token_lists):
        arr[r, :len(t)] = t
    out = np.asarray(generate(cfg, params, arr, max(limits)))
    return [strip_after_eos(row[:m].tolist(), cfg.eos_token_id) for row, m in zip(out, limits)]


def test_greedy_equals_the_fixed_batch_decoder_at_any_slot_count(sharp):
    cfg, params = sharp
    inputs = _inputs(19, seed=0)
    limits = [int(x) for x in np.random.default_rng(1).choice([1, 5, 40, 40, 40, 40], len(inputs))]
    want = _fixed_batch(cfg, params, inputs, limits)
    stopped_by_eos = sum(len(w) < m for w, m in zip(want, limits))
    assert stopped_by_eos >= 3 and len({len(w) for w in want}) >= 5, "lengths do not vary: the test would prove little"
    for slots in (1, 3, 8):
        assert generate_ids(cfg, params, inputs, limits, batch_size=slots) == want, slots


def test_page_pool_and_cross_length_grow_mid_run(sharp):
    """Outputs over several pages from a pool too small for them (rows wait, the pool
    grows) and an input past the first cross-attention length (64): results stay those of
    the fixed-batch decoder."""
    cfg, params = sharp
    inputs = _inputs(6, seed=2, longest=30) + [list(range(3, 80))] + _inputs(5, seed=3, longest=20)
    limits = [90, 8, 70, 12, 100, 3, 90, 20, 6, 75, 9, 4]
    want = _fixed_batch(cfg, params, inputs, limits)
    assert max(len(w) for w in want) > 64
    engine = Engine(cfg, 3, pages=2)
    assert engine.generate(params, inputs, limits) == want
    assert engine.stats["pages"][0] == 2 and len(engine.stats["pages"]) >= 2  # grew
    assert engine.stats["calls"]["resize"] >= 2  # the pool and the cross-attention length


def test_pool_grows_when_rows_wait_and_shrinks_when_its_top_is_free():
    from tinyllm_jax.eval.engine import Pool

    pool = Pool(64, 256)
    assert pool.size == 128 and pool.largest == 512
    assert pool.wanted(stalled=0, owners=None) == 128
    pool.size = pool.wanted(stalled=3, owners=None)
    assert pool.size == 192
    owners = np.full(192, 64)  # all free
    owners[:40] = 7  # 40 in use, all below the smaller size
    assert pool.wanted(stalled=0, owners=owners) == 128
    owners[150] = 3  # one in use past it: no cut
    assert pool.wanted(stalled=0, owners=owners) == 192


@pytest.fixture(scope="module")
def flat(tmp_path_factory, spm_tokenizer_dir):
    """A tiny T5 with a small init: flat next-token distributions, so samples vary."""
    path = make_hf_t5(tmp_path_factory.mktemp("flat"), spm_tokenizer_dir, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, initializer_factor=0.1)
    _, params, _, cfg = load_pretrained(str(path), tokenizer=False)
    return cfg, params


def test_sampling_depends_on_the_request_and_its_seed_only(flat):
    cfg, params = flat
    inputs = _inputs(9, seed=4)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18, 11]
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    base = generate_ids(cfg, params, inputs, 24, batch_size=4, seeds=seeds, **kw)
    assert len({tuple(b) for b in base}) == len(set(seeds)), "samples repeat: the test would prove little"
    assert generate_ids(cfg, params, inputs, 24, batch_size=1, seeds=seeds, **kw) == base
    assert generate_ids(cfg, params, inputs, 24, batch_size=7, seeds=seeds, **kw) == base
    order = [8, 3, 0, 5, 1, 7, 2, 6, 4]
    shuffled = generate_ids(cfg, params, [inputs[i] for i in order], 24, batch_size=4,
                            seeds=[seeds[i] for i in order], **kw)
    assert [shuffled[order.index(i)] for i in range(len(inputs))] == base
    # the seed matters: the same input with another seed samples otherwise
    again = generate_ids(cfg, params, [inputs[0]] * 4, 24, batch_size=2, seeds=[11, 21, 31, 41], **kw)
    assert again[0] == base[0] and len({tuple(a) for a in again}) > 1


def test_sampling_needs_one_seed_a_request(flat):
    cfg, params = flat
    with pytest.raises(ValueError, match="seed"):
        generate_ids(cfg, params, _inputs(2, 0), 4, temperature=0.7)
    with pytest.raises(ValueError, match="seeds"):
        generate_ids(cfg, params, _inputs(2, 0), 4, temperature=0.7, seeds=[1])


def test_per_request_limits_and_the_work_accounting(sharp):
    cfg, params = sharp
    inputs = _inputs(10, seed=5)
    limits = [3, 30, 1, 12, 30, 7, 2, 30, 16, 5]
    engine = Engine(cfg, 4, admit_rows=2)
    got = engine.generate(params, inputs, limits)
    assert all(len(g) <= m for g, m in zip(got, limits))
    assert any(len(g) == m for g, m in zip(got, limits))
    generated = sum(len(g) + (len(g) < m) for g, m in zip(got, limits))  # plus the EOS of rows that stopped
    st = engine.stats
    assert st["generated_tokens"] == generated
    assert st["steps"] * st["slots"] >= generated and st["live_fraction"] == generated / (st["steps"] * st["slots"])


def test_results_are_reported_as_each_request_finishes(sharp):
    cfg, params = sharp
    inputs = _inputs(7, seed=6)
    limits = [30, 2, 30, 2, 30, 2, 30]
    seen = []
    got = generate_ids(cfg, params, inputs, limits, batch_size=2, on_result=lambda i, ids: seen.append((i, ids)))
    assert sorted(seen) == sorted(enumerate(got))
    assert [i for i, _ in seen] != sorted(i for i, _ in seen)  # short ones come back first, not in input order


def test_progress_bar_counts_rows_and_tokens(sharp, capsys):
    cfg, params = sharp
    got = generate_ids(cfg, params, _inputs(5, seed=7), 6, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err and f"tokens={sum(len(g) + (len(g) < 6) for g in got)}" in err


def test_no_inputs_and_sampling_settings(sharp):
    cfg, params = sharp
    assert generate_ids(cfg, params, [], 8) == []
    assert Sampling().greedy and not Sampling(temperature=0.5).greedy


def test_first_argmax_is_argmax_with_ties_and_odd_vocabularies():
    import jax.numpy as jnp

    from tinyllm_jax.eval.engine import first_argmax

    rng = np.random.default_rng(0)
    for V in (5, 128, 300, 8064):
        x = rng.integers(0, 4, (16, V)).astype(np.float32)  # many ties
        x[3] = -np.inf
        x[4, -1] = 10.0  # the maximum in the padded last chunk
        np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
