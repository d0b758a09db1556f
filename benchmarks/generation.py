"""Generation at scale: the engine (continuous batching, `tinyllm_jax/eval/engine.py`) against
transformers' `generate`, on the output lengths of real teacher rationales.

    flock /tmp/tinyllm-bench.lock python -m benchmarks.generation            # 13.6M T5, a few minutes
    python -m benchmarks.generation --quick                                  # toy size, seconds

Requests: OpenBookQA training records from ../shared/data/tinyllm.tar.xz (converted by
`tinyllm convert tinyllm`; the generated demo data where the archive is absent), one request
a (record, teacher): the student's input for that teacher's stream (`explain: ` for Flan-T5,
`rationale: ` for LLaMA) and, as its output length, the tokenized length of that teacher's
rationale (EOS included, cut at 256). A fixed random sample of them is decoded by both systems
with the same weights, in the same order (sorted by input length, as both batch best):

* `generate`: batches of 64 padded to their longest input; a LogitsProcessor forces EOS
  at each row's length, and the batch runs until its longest row stops;
* ours: `Engine` with a per-request max length equal to that length, at several slot counts.

The random model's EOS row of `lm_head` is zeroed (in both), so no row stops before its
length by chance; both do exactly the real distribution's decoder steps a request. Useful
tokens are the requests' lengths; their sum over the median wall time is useful tokens/s.
The two outputs are compared token for token (every token before the forced EOS).

Also measured: the fraction of decoder row-steps spent on live rows (both systems), and the
fixed-batch decoder (`decode.generate`, today's before the engine) at batch 64 and 64 new
tokens as a fraction of this CPU's matmul roofline: its executed FLOPs (counted below) over
its time, next to the peak of a jitted square matmul loop. Writes
benchmarks/results/generation-<device>-<date>[-quick].json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.run import ARCHS, DEFAULT_DATA, RESULTS, TEACHERS, load_records, write_result, make_student, \
    train_tokenizer  # noqa: E402

FULL = dict(arch="t5-cpu-small", tokenizer_vocab=8000, requests=1024, max_length=256, batch=64,
            slots=(32, 64, 128, 256), repeats=2, fixed_new_tokens=64, matmul_n=2048)
QUICK = dict(arch="t5-tiny", tokenizer_vocab=300, requests=24, max_length=32, batch=8,
             slots=(4, 8), repeats=1, fixed_new_tokens=8, matmul_n=256)
BUSY = 0.25  # cores used by other processes during a round above which it is repeated


# --------------------------------------------------------------------------- requests


def make_requests(records: Sequence[dict], tokenizer, n: int, max_length: int, seed: int = 0) -> dict[str, Any]:
    """A seeded sample of `n` (record, teacher) requests: input ids and output lengths."""
    from tinyllm_jax.data.streams import format_input, tinyllm_streams

    prefixes = {s.teacher: s.prefix for s in tinyllm_streams(teachers=TEACHERS) if s.teacher}
    inputs, lengths, teachers = [], [], []
    for t in TEACHERS:
        enc = tokenizer([prefixes[t] + format_input(r) for r in records])["input_ids"]
        out = tokenizer([r["rationales"][t][0] for r in records])["input_ids"]  # EOS included
        inputs += enc
        lengths += [min(len(o), max_length) for o in out]
        teachers += [t] * len(records)
    pick = np.random.default_rng(seed).choice(len(inputs), size=min(n, len(inputs)), replace=False)

    def describe(x):
        x = np.asarray(x)
        return {"n": int(len(x)), "mean": round(float(x.mean()), 2),
                **{f"p{q}": float(np.percentile(x, q)) for q in (10, 50, 90, 99)}, "max": int(x.max())}

    return {"inputs": [inputs[i] for i in pick], "lengths": [lengths[i] for i in pick],
            "teachers": [teachers[i] for i in pick],
            "population": {t: describe([l for l, tt in zip(lengths, teachers) if tt == t]) for t in TEACHERS},
            "sample": describe([lengths[i] for i in pick]),
            "sample_inputs": describe([len(inputs[i]) for i in pick])}


def make_model(work: Path, arch: dict, vocab: int) -> Path:
    """The random T5 v1.1 both systems load, with EOS's lm_head row zeroed: its logit is 0
    while the largest of the others is far above, so no row stops before its forced end."""
    import torch
    from transformers import T5ForConditionalGeneration

    path, _ = make_student(work / "student", arch, vocab)
    model = T5ForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0.0
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- the two systems


def length_order(token_lists: Sequence[Sequence[int]]) -> list[int]:
    return sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))


def hf_generate(model, token_lists, lengths, batch: int, eos: int) -> tuple[list[list[int]], int]:
    """transformers' greedy generate over length-sorted batches of `batch`, each row forced to
    EOS at its length. Returns the outputs (EOS cut) in input order and the decoder
    row-steps computed (rows x the batch's longest length)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceEosAt(LogitsProcessor):
        def __init__(self, lengths_B):
            self.last = torch.as_tensor(lengths_B) - 1  # the position that must be EOS

        def __call__(self, input_ids, scores):
            at = self.last == input_ids.shape[1] - 1  # input_ids holds the start token too
            if at.any():
                scores[at] = -float("inf")
                scores[at, eos] = 0.0
            return scores

    order = length_order(token_lists)
    outs: list[list[int]] = [[] for _ in token_lists]
    row_steps = 0
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        width = max(len(token_lists[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(token_lists[i])] = torch.as_tensor(token_lists[i])
        longest = max(lengths[i] for i in idx)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False, num_beams=1,
                                 max_new_tokens=longest, min_new_tokens=0,
                                 logits_processor=LogitsProcessorList([ForceEosAt([lengths[i] for i in idx])]))
        row_steps += len(idx) * (gen.shape[1] - 1)
        for r, i in enumerate(idx):
            row = gen[r, 1:].tolist()
            outs[i] = row[:row.index(eos)] if eos in row else row
    return outs, row_steps


def ours(engine, params, token_lists, lengths) -> tuple[list[list[int]], dict[str, Any]]:
    out = engine.generate(params, token_lists, lengths)
    return out, dict(engine.stats)


# --------------------------------------------------------------------------- FLOPs and the roofline


def decode_flops(cfg, rows: int, enc_len: int, steps: int, cache_len: int) -> dict[str, float]:
    """FLOPs the fixed-batch decoder executes for `rows` inputs padded to `enc_len` and
    `steps` steps: encoder, cross-attention projections, and each step's decoder over the
    whole `cache_len` cache (masked positions are computed too), lm_head included. 2 FLOPs a
    multiply-add."""
    D, HK, F, V = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.is_gated else 2) * D * F
    enc_tokens = rows * enc_len
    encoder = cfg.num_layers * enc_tokens * 2 * (4 * D * HK + mlp + 2 * enc_len * HK)
    cross_kv = cfg.decoder_layers * enc_tokens * 2 * (2 * D * HK)
    per_row_step = cfg.decoder_layers * 2 * (6 * D * HK + mlp + 2 * cache_len * HK + 2 * enc_len * HK) + 2 * D * V
    decoder = rows * steps * per_row_step
    return {"encoder": float(encoder), "cross_kv": float(cross_kv), "decoder": float(decoder),
            "total": float(encoder + cross_kv + decoder)}


def matmul_peak(n: int, m: int | None = None, k: int | None = None, iters: int = 20, repeats: int = 3) -> float:
    """FLOP/s of a jitted loop of [m, k] @ [k, n] fp32 matmuls (m = k = n: the square peak)."""
    import jax
    import jax.numpy as jnp

    m, k = m or n, k or n
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) / np.sqrt(k)
    # each iteration feeds its output back in (so XLA cannot hoist the matmul out of the loop)
    back = jax.random.normal(jax.random.key(2), (n, k), jnp.float32) / np.sqrt(n)

    @jax.jit
    def loop(a):
        return jax.lax.fori_loop(0, iters, lambda i, x: ((x @ w) @ back) * 0.5, a)

    loop(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return iters * 2 * (2 * m * k * n) / best


def fixed_batch_decode(cfg, params, token_lists, rows: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Today's fixed-batch decoder (`decode.generate`) on `rows` inputs for `new_tokens`
    steps (no row stops: EOS is never chosen), timed after a compiling call."""
    import jax

    from tinyllm_jax.eval.decode import bucket_length, generate

    picked = [token_lists[i] for i in length_order(token_lists)[:rows]]
    L = bucket_length(max(len(t) for t in picked))
    arr = np.zeros((rows, L), np.int32)
    for r, t in enumerate(picked):
        arr[r, :len(t)] = t
    out = generate(cfg, params, arr, new_tokens)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(cfg, params, arr, new_tokens)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    stopped = int((np.asarray(out) == cfg.eos_token_id).any(axis=1).sum())
    flops = decode_flops(cfg, rows, L, new_tokens, new_tokens)
    sec = statistics.median(times)
    return {"rows": rows, "new_tokens": new_tokens, "encoder_length": L, "rows_stopped_early": stopped,
            "times_s": [round(t, 4) for t in times], "seconds": sec, "tokens_per_s": rows * new_tokens / sec,
            "flops": flops, "flops_per_s": flops["total"] / sec}


# --------------------------------------------------------------------------- the benchmark


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_seconds() -> tuple[float | None, float]:
    """(CPU seconds every process has used, from /proc/stat; this process's own)."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None, own
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), own  # all but idle and iowait


def _timed(fn, repeats: int) -> dict[str, Any]:
    """Runs `fn` `repeats` times, and once more (at most `repeats` more) for each run during
    which other processes kept more than BUSY cores busy; the median wall time is over the
    quiet runs when there are any. Returns the times, the load seen and the last result."""
    times, others, loads, result, extra = [], [], [], None, 0
    while len(times) < repeats + extra:
        loads.append(_load())
        (busy0, own0), t0 = _cpu_seconds(), time.perf_counter()
        result = fn()
        (busy1, own1), wall = _cpu_seconds(), time.perf_counter() - t0
        times.append(wall)
        other = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
        others.append(None if other is None else round(other, 2))
        if other is not None and other > BUSY and extra < repeats:
            extra += 1
    quiet = [t for t, o in zip(times, others) if o is None or o <= BUSY]
    return {"times_s": [round(t, 3) for t in times], "other_processes_cores": others, "load_average": loads,
            "seconds": statistics.median(quiet or times), "quiet_runs": len(quiet), "result": result}


def benchmark(quick: bool = False, data_dir: Path = DEFAULT_DATA, out_dir: Path | None = RESULTS,
              requests: int | None = None, slots: Sequence[int] | None = None, log=print) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring); returns the results and, with
    `out_dir`, writes them as JSON (its path under "path")."""
    import jax
    import torch
    import transformers
    from transformers import T5ForConditionalGeneration

    from tinyllm_jax.eval.engine import Engine
    from tinyllm_jax.model.hf import load_pretrained

    s = dict(QUICK if quick else FULL)
    if requests:
        s["requests"] = requests
    if slots:
        s["slots"] = tuple(slots)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    started = time.time()
    res: dict[str, Any] = {
        "benchmark": "generation", "quick": quick, "date": datetime.date.today().isoformat(),
        "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind, "cpu_cores": cores,
                   "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                   "torch_threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                   "load_average_at_start": _load()},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "notes": ["useful tokens: the requests' lengths (EOS included); tokens/s over the median wall time "
                  "of the runs during which other processes used at most %.2f cores (/proc/stat), when there "
                  "are any (quiet_runs)" % BUSY,
                  "live fraction: decoder row-steps on rows still generating over all row-steps computed",
                  "both systems decode the same length-sorted requests with the same weights; compile "
                  "(ours) and the first call (both) are excluded by a warm-up run"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log("[generation] data")
        train, _, info = load_records(Path(data_dir), work, 200 if quick else None)
        res["data"] = info
        tok = train_tokenizer(train, work / "tokenizer", s["tokenizer_vocab"])
        req = make_requests(train, tok, s["requests"], s["max_length"])
        res["lengths"] = {"population": req["population"], "sample": req["sample"],
                          "sample_inputs": req["sample_inputs"],
                          "sample_by_teacher": {t: req["teachers"].count(t) for t in TEACHERS}}
        vocab = -(-len(tok) // 128) * 128
        path = make_model(work, ARCHS[s["arch"]], vocab)
        _, params, _, cfg = load_pretrained(str(path), tokenizer=False)
        params = jax.device_put(params)
        res["model"] = {"arch": s["arch"], **ARCHS[s["arch"]], "vocab_size": vocab,
                        "params": int(sum(x.size for x in jax.tree.leaves(params)))}
        hf = T5ForConditionalGeneration.from_pretrained(path).eval()
        inputs, lengths, eos = req["inputs"], req["lengths"], cfg.eos_token_id
        useful = int(sum(lengths))

        log(f"[generation] transformers generate, batch {s['batch']}, {len(inputs)} requests")
        hf_generate(hf, inputs[:s["batch"]], lengths[:s["batch"]], s["batch"], eos)  # warm-up
        run = _timed(lambda: hf_generate(hf, inputs, lengths, s["batch"], eos), s["repeats"])
        ref_out, ref_row_steps = run.pop("result")
        res["generate"] = {"batch": s["batch"], **run, "useful_tokens": useful,
                           "useful_tokens_per_s": useful / run["seconds"],
                           "row_steps": ref_row_steps, "live_fraction": useful / ref_row_steps}

        res["ours"] = []
        for S in s["slots"]:
            log(f"[generation] ours, {S} slots")
            engine = Engine(cfg, S)
            ours(engine, params, inputs, lengths)  # compiles every shape this request set needs
            run = _timed(lambda: ours(engine, params, inputs, lengths), s["repeats"])
            out, stats = run.pop("result")
            # ours stops at the length; generate's last token is the forced EOS: compare the rest
            same = sum(int(o[:n - 1] == r) for o, r, n in zip(out, ref_out, lengths))
            full_length = sum(int(len(o) == n) for o, n in zip(out, lengths))
            res["ours"].append({"slots": S, "admit_rows": stats["admit_rows"], **run,
                                "useful_tokens_per_s": useful / run["seconds"],
                                "ratio_vs_generate": res["generate"]["seconds"] / run["seconds"],
                                "steps": stats["steps"], "generated_tokens": stats["generated_tokens"],
                                "live_fraction": stats["live_fraction"], "calls": stats["calls"],
                                "pages": [int(x) for x in stats["pages"]],
                                "identical_to_generate": same, "rows_at_full_length": full_length})
        best = max(res["ours"], key=lambda r: r["useful_tokens_per_s"])
        at_batch = next((r for r in res["ours"] if r["slots"] == s["batch"]), None)
        res["summary"] = {"ratio_at_batch": at_batch and at_batch["ratio_vs_generate"], "batch": s["batch"],
                          "best_slots": best["slots"], "ratio_at_best_slots": best["ratio_vs_generate"],
                          "live_fraction_ours_at_batch": at_batch and at_batch["live_fraction"],
                          "live_fraction_generate": res["generate"]["live_fraction"],
                          "identical_rows_at_batch": at_batch and at_batch["identical_to_generate"],
                          "requests": len(inputs)}

        log("[generation] roofline: fixed-batch decode and the matmul peak")
        fixed = fixed_batch_decode(cfg, params, inputs, s["batch"], s["fixed_new_tokens"], max(3, s["repeats"]))
        peak = matmul_peak(s["matmul_n"])
        d = ARCHS[s["arch"]]
        shaped = matmul_peak(d["d_ff"], s["batch"], d["d_model"])
        res["roofline"] = {"fixed_batch_decode": fixed, "matmul_peak_flops_per_s": peak,
                           "matmul_peak_shape": [s["matmul_n"]] * 3,
                           "decode_shaped_matmul_flops_per_s": shaped,
                           "decode_shaped_matmul": [s["batch"], d["d_model"], d["d_ff"]],
                           "fraction_of_peak": fixed["flops_per_s"] / peak}
    res["device"]["load_average_at_end"] = _load()
    res["seconds"] = round(time.time() - started, 1)
    if out_dir is not None:
        write_result(res, out_dir, "generation", quick)
    return res


def table(res: dict[str, Any]) -> str:
    g, sm, rf = res["generate"], res["summary"], res["roofline"]
    ln = res["lengths"]["sample"]
    lines = [f"generation{' (quick)' if res['quick'] else ''}: {sm['requests']} requests from {res['data']['source']}, "
             f"output lengths mean {ln['mean']}, p50 {ln['p50']:.0f}, p90 {ln['p90']:.0f}, max {ln['max']}; "
             f"model {res['model']['arch']} ({res['model']['params'] / 1e6:.1f}M), {res['date']}",
             f"  {'':24} {'useful tok/s':>12} {'seconds':>8} {'live frac':>9} {'vs generate':>11} {'identical':>9}",
             f"  {'generate, batch ' + str(g['batch']):24} {g['useful_tokens_per_s']:12.0f} {g['seconds']:8.2f} "
             f"{g['live_fraction']:9.3f} {'1.00x':>11} {'-':>9}"]
    for r in res["ours"]:
        lines.append(f"  {'ours, ' + str(r['slots']) + ' slots':24} {r['useful_tokens_per_s']:12.0f} {r['seconds']:8.2f} "
                     f"{r['live_fraction']:9.3f} {r['ratio_vs_generate']:10.2f}x "
                     f"{r['identical_to_generate']:>4}/{sm['requests']}")
    f = rf["fixed_batch_decode"]
    lines.append(f"\nratio at batch {sm['batch']}: {_x(sm['ratio_at_batch'])}; best: {sm['best_slots']} slots, "
                 f"{_x(sm['ratio_at_best_slots'])}")
    lines.append(f"fixed-batch decode, batch {f['rows']}, {f['new_tokens']} new tokens: {f['tokens_per_s']:.0f} tok/s, "
                 f"{f['flops_per_s'] / 1e9:.1f} GFLOP/s = {rf['fraction_of_peak']:.3f} of the matmul peak "
                 f"({rf['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s at {rf['matmul_peak_shape'][0]}^3; "
                 f"{rf['decode_shaped_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s at "
                 f"{'x'.join(map(str, rf['decode_shaped_matmul']))})")
    return "\n".join(lines)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy model and a few requests: a smoke test")
    ap.add_argument("--requests", type=int, help="requests sampled (default 1024; quick 24)")
    ap.add_argument("--slots", type=int, nargs="+", help="engine slot counts to measure")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding tinyllm.tar.xz (else: demo data)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    res = benchmark(args.quick, Path(args.data), Path(args.out), args.requests, args.slots,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(res))
    print(f"\nwrote {res['path']} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    from tinyllm_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages("benchmarks.generation", sys.argv[1:])  # as `tinyllm` and benchmarks.run do
    sys.exit(main())
