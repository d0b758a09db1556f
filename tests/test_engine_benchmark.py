"""Smoke test of the generation benchmark (benchmarks/generation.py) at toy size: the engine
against transformers' generate on forced per-request lengths, the JSON it writes and the
table. Timings are printed, never asserted."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_quick_run_writes_every_figure(tmp_path, capsys):
    from benchmarks.generation import main
    from benchmarks.run import device_slug

    assert main(["--quick", "--data", str(tmp_path / "no-data-here"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / f"generation-{device_slug()}-{datetime.date.today().isoformat()}-quick.json"
    res = json.loads(path.read_text())
    assert res["data"]["source"] == "demo" and res["quick"]
    n = res["summary"]["requests"]
    lengths = res["lengths"]["sample"]
    assert lengths["n"] == n and 1 <= lengths["max"] <= res["settings"]["max_length"]
    g = res["generate"]
    assert g["useful_tokens"] > 0 and 0 < g["live_fraction"] <= 1 and g["row_steps"] >= g["useful_tokens"]
    assert [r["slots"] for r in res["ours"]] == res["settings"]["slots"]
    for r in res["ours"]:
        # both stopped every request exactly at its length and agreed on every token before it
        assert r["rows_at_full_length"] == n and r["identical_to_generate"] == n
        assert r["generated_tokens"] == g["useful_tokens"] and 0 < r["live_fraction"] <= 1
        assert r["useful_tokens_per_s"] > 0 and r["ratio_vs_generate"] > 0
        assert all(len(x) == 3 for x in r["load_average"]) and len(r["other_processes_cores"]) == len(r["times_s"])
        assert 1 <= len(r["times_s"]) <= 2 and r["quiet_runs"] <= len(r["times_s"])
    assert res["summary"]["best_slots"] in res["settings"]["slots"] and res["summary"]["ratio_at_batch"] > 0
    rf = res["roofline"]
    assert rf["fixed_batch_decode"]["rows_stopped_early"] == 0
    assert rf["matmul_peak_flops_per_s"] > 0 and 0 < rf["fraction_of_peak"]
    for needle in ("generate, batch 8", "ours, 4 slots", "ours, 8 slots", "of the matmul peak"):
        assert needle in printed, needle


def test_decode_flops_count_the_cache_and_the_encoder():
    from benchmarks.generation import decode_flops
    from tinyllm_jax.model.t5 import T5Config

    cfg = T5Config(vocab_size=100, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    f = decode_flops(cfg, rows=1, enc_len=4, steps=1, cache_len=3)
    # one encoder layer a token: q, k, v, o (4 x 8 x 4), gated MLP (3 x 8 x 16), attention over 4 (2 x 4 x 4)
    assert f["encoder"] == 4 * 2 * (4 * 8 * 4 + 3 * 8 * 16 + 2 * 4 * 4)
    assert f["cross_kv"] == 4 * 2 * (2 * 8 * 4)
    # a decoder step: self q, k, v, o + cross q, o; MLP; attention over the 3-position cache and the 4 inputs; lm_head
    assert f["decoder"] == 2 * (6 * 8 * 4 + 3 * 8 * 16 + 2 * 3 * 4 + 2 * 4 * 4) + 2 * 8 * 100
    assert f["total"] == f["encoder"] + f["cross_kv"] + f["decoder"]
