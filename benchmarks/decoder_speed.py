"""The decoder-only student's speed: training tokens/s against transformers + PyTorch, and the
generation engine against transformers' `generate`, on this machine (issue 22, item 7).

    flock /tmp/tinyllm-heavy.lock python -m benchmarks.decoder_speed        # 40.6M Qwen2, ~15 min
    python -m benchmarks.decoder_speed --quick                              # toy size, a minute
    python -m benchmarks.decoder_speed --only training                      # one section

The student is Qwen2-shaped and made from scratch: transformers' own random initialisation
(`Qwen2ForCausalLM`, fp32), saved with `save_pretrained` and loaded by both sides. Hidden 512,
8 layers, 8 query and 2 key/value heads of 64, SwiGLU 1536, Qwen2's q/k/v biases, rope_theta
1e6, 32,000 embedding rows tied to the LM head: 40.6M parameters. Its tokenizer is a byte-level
BPE (Qwen's kind: no BOS, `<|endoftext|>` its EOS and pad) trained to 32,000 tokens on the
records' texts. Data: TinyLLM's OpenBookQA records with both teachers' rationales
(../shared/data/tinyllm.tar.xz, as benchmarks/run.py loads it), else the generated demo data.

Training (`train_speed.train_benchmark`): the three TinyLLM streams (answer, Flan-T5 and
LLaMA-2 rationales), a prompt (stream prefix, question, choices, newline) then its target and
EOS, 16 records a step. Ours packs every stream's examples into causal rows, one jitted step;
the reference trains the same token sequences as a PyTorch SFT trainer does (reference_torch.py:
per micro-batch of 8 records and per stream, one forward pass padded to the longest, prompt
labels -100, weighted stream losses, fused AdamW, clipping). Both fp32, both timed after
warm-up in alternating rounds in one process; real (non-pad) and target (labelled) tokens/s.

Generation (as benchmarks/generation.py for T5): one request a (record, teacher), the
student's prompt for that teacher's stream and, as its output length, the token length of
the teacher's real rationale (EOS included, cut at 256). EOS is forced at that length in both
systems (a logits processor for `generate`, a per-request limit for the engine) and its
embedding row is zeroed (tied: its logit is 0, far below the largest), so that no row stops
early by chance. `generate` decodes length-sorted batches of 64 left-padded prompts; the
engine takes the same requests at several slot counts. Useful tokens (the requests' lengths)
over the median wall time, live fractions, and token-identical outputs.

Writes benchmarks/results/decoder-<device>-<date>[-quick].json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.generation import BUSY, _load, _timed, length_order  # noqa: E402
from benchmarks.run import DEFAULT_DATA, RESULTS, TEACHERS, load_records, write_result  # noqa: E402

SECTIONS = ("training", "generation")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen's; the first is EOS and pad
QWEN2_CPU = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2)
QWEN2_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)

FULL = dict(arch=QWEN2_CPU, tokenizer_vocab=32000, vocab_rows=32000, max_records=None,
            train=dict(records_per_step=16, micro_batch=8, sequence_length=256, max_input_length=256,
                       rounds=3, steps_per_round=3, warmup=1),
            requests=1024, max_length=256, batch=64, slots=(32, 64, 128, 256), repeats=2)
QUICK = dict(arch=QWEN2_TINY, tokenizer_vocab=400, vocab_rows=None, max_records=48,
             train=dict(records_per_step=8, micro_batch=4, sequence_length=128, max_input_length=128,
                        rounds=1, steps_per_round=1, warmup=1),
             requests=24, max_length=32, batch=8, slots=(4, 8), repeats=1)


# --------------------------------------------------------------------------- the student


def train_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int):
    """A byte-level BPE tokenizer as Qwen's are (no BOS; `<|endoftext|>` is EOS and pad),
    trained on `texts` by the tokenizers library and saved in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   additional_special_tokens=list(SPECIALS[1:]))
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def make_student(out_dir: Path, arch: dict[str, Any], vocab_rows: int, eos: int, seed: int = 0) -> tuple[Path, int]:
    """A randomly initialised Qwen2ForCausalLM (transformers' own init), fp32, tied, saved
    with save_pretrained. Returns (folder, parameters)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_rows, max_position_embeddings=1024, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=None,
                      eos_token_id=eos, pad_token_id=eos, **arch)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- generation


def make_requests(records: Sequence[dict], tokenizer, n: int, max_length: int, seed: int = 0) -> dict[str, Any]:
    """A seeded sample of `n` (record, teacher) requests: the student's prompt for that
    teacher's stream, as the trainer builds it, and the teacher rationale's token length
    (EOS included, at most `max_length`)."""
    from tinyllm_jax.data.streams import Prompt, build_examples, tinyllm_streams

    streams = [s for s in tinyllm_streams(teachers=TEACHERS) if s.teacher]
    ex = build_examples(records, streams, tokenizer, 512, 256, lenient=True, prompt=Prompt(causal=True))
    pick = np.random.default_rng(seed).choice(len(ex), size=min(n, len(ex)), replace=False)
    lengths = np.minimum(ex.dec_lengths, max_length)

    def describe(x):
        x = np.asarray(x)
        return {"n": int(len(x)), "mean": round(float(x.mean()), 2),
                **{f"p{q}": float(np.percentile(x, q)) for q in (10, 50, 90, 99)}, "max": int(x.max())}

    teachers = [streams[s].teacher for s in ex.stream_ids]
    return {"inputs": [ex.enc(i).tolist() for i in pick], "lengths": [int(lengths[i]) for i in pick],
            "teachers": [teachers[i] for i in pick],
            "population": {t: describe(lengths[ex.stream_ids == k]) for k, t in enumerate(TEACHERS)},
            "sample": describe(lengths[pick]), "sample_inputs": describe(ex.enc_lengths[pick])}


def hf_generate(model, prompts, lengths, batch: int, eos: int) -> tuple[list[list[int]], int]:
    """transformers' greedy generate over length-sorted batches of `batch` left-padded prompts
    (a decoder-only model's padding side), each row forced to EOS at its length. Returns the
    outputs (EOS cut) in input order and the row-steps computed (rows x the batch's longest)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceEosAt(LogitsProcessor):
        def __init__(self, lengths_B, width):
            self.last, self.width = torch.as_tensor(lengths_B) - 1, width  # the step that must be EOS

        def __call__(self, input_ids, scores):
            at = self.last == input_ids.shape[1] - self.width
            if at.any():
                scores[at] = -float("inf")
                scores[at, eos] = 0.0
            return scores

    order = length_order(prompts)
    outs: list[list[int]] = [[] for _ in prompts]
    row_steps = 0
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=max(lengths[i] for i in idx), min_new_tokens=0, eos_token_id=eos,
                                 pad_token_id=eos, logits_processor=LogitsProcessorList(
                                     [ForceEosAt([lengths[i] for i in idx], width)]))
        row_steps += len(idx) * (gen.shape[1] - width)
        for r, i in enumerate(idx):
            row = gen[r, width:].tolist()
            outs[i] = row[:row.index(eos)] if eos in row else row
    return outs, row_steps


def generation_section(model_dir: Path, tokenizer, records, s: dict[str, Any], log) -> dict[str, Any]:
    """The engine against `generate` on the real rationale lengths (see the module docstring)."""
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from tinyllm_jax.eval.engine import Engine
    from tinyllm_jax.model.decoder_hf import load_pretrained

    req = make_requests(records, tokenizer, s["requests"], s["max_length"])
    inputs, lengths, eos = req["inputs"], req["lengths"], tokenizer.eos_token_id
    params, cfg, _ = load_pretrained(str(model_dir), tokenizer=False)
    params = dict(params, embed_tokens=np.array(params["embed_tokens"]))
    params["embed_tokens"][eos] = 0.0  # tied: EOS's logit is 0, never the largest
    params = jax.device_put(params)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.get_input_embeddings().weight[eos] = 0.0
    useful = int(sum(lengths))
    res: dict[str, Any] = {"lengths": {"population": req["population"], "sample": req["sample"],
                                       "sample_inputs": req["sample_inputs"],
                                       "sample_by_teacher": {t: req["teachers"].count(t) for t in TEACHERS}}}

    log(f"[decoder] generation: transformers generate, batch {s['batch']}, {len(inputs)} requests")
    hf_generate(hf, inputs[:s["batch"]], lengths[:s["batch"]], s["batch"], eos)  # warm-up
    run = _timed(lambda: hf_generate(hf, inputs, lengths, s["batch"], eos), s["repeats"])
    ref_out, ref_row_steps = run.pop("result")
    res["generate"] = {"batch": s["batch"], "attention": hf.config._attn_implementation, **run,
                       "useful_tokens": useful, "useful_tokens_per_s": useful / run["seconds"],
                       "row_steps": ref_row_steps, "live_fraction": useful / ref_row_steps}
    res["ours"] = []
    for S in s["slots"]:
        log(f"[decoder] generation: ours, {S} slots")
        engine = Engine(cfg, S)
        engine.generate(params, inputs, lengths)  # compiles every shape this request set needs
        run = _timed(lambda: (engine.generate(params, inputs, lengths), dict(engine.stats)), s["repeats"])
        out, stats = run.pop("result")
        # ours stops at the length; generate's last token is the forced EOS: compare the rest
        same = sum(int(o[:n - 1] == r) for o, r, n in zip(out, ref_out, lengths))
        res["ours"].append({"slots": S, "admit_rows": stats["admit_rows"], **run,
                            "useful_tokens_per_s": useful / run["seconds"],
                            "ratio_vs_generate": res["generate"]["seconds"] / run["seconds"],
                            "steps": stats["steps"], "generated_tokens": stats["generated_tokens"],
                            "live_fraction": stats["live_fraction"], "calls": stats["calls"],
                            "pages": [int(x) for x in stats["pages"]], "identical_to_generate": same,
                            "rows_at_full_length": sum(int(len(o) == n) for o, n in zip(out, lengths))})
    best = max(res["ours"], key=lambda r: r["useful_tokens_per_s"])
    at_batch = next((r for r in res["ours"] if r["slots"] == s["batch"]), None)
    res["summary"] = {"requests": len(inputs), "batch": s["batch"],
                      "ratio_at_batch": at_batch and at_batch["ratio_vs_generate"],
                      "best_slots": best["slots"], "ratio_at_best_slots": best["ratio_vs_generate"],
                      "live_fraction_ours_at_batch": at_batch and at_batch["live_fraction"],
                      "live_fraction_generate": res["generate"]["live_fraction"],
                      "identical_rows_at_batch": at_batch and at_batch["identical_to_generate"]}
    return res


# --------------------------------------------------------------------------- the benchmark


def benchmark(quick: bool = False, data_dir: Path = DEFAULT_DATA, out_dir: Path | None = RESULTS,
              sections: Sequence[str] = SECTIONS, sequence_length: int | None = None, log=print,
              requests: int | None = None, slots: Sequence[int] | None = None,
              repeats: int | None = None) -> dict[str, Any]:
    """Runs the sections asked for (see the module docstring); returns the results and, with
    `out_dir`, writes them as JSON (its path under "path")."""
    import jax
    import torch
    import transformers

    from benchmarks.train_speed import _others_busy, train_benchmark
    from tinyllm_jax.data.streams import tinyllm_streams, tokenizer_corpus

    s = {**(QUICK if quick else FULL)}
    s["train"] = {**s["train"], **({"sequence_length": sequence_length} if sequence_length else {})}
    s.update({k: v for k, v in (("requests", requests), ("slots", tuple(slots or ())), ("repeats", repeats)) if v})
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)  # the cores XLA's CPU client uses
    started = time.time()
    res: dict[str, Any] = {
        "benchmark": "decoder", "quick": quick, "date": datetime.date.today().isoformat(),
        "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind, "cpu_cores": cores,
                   "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                   "torch_threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                   "load_average_at_start": _load()},
        "settings": json.loads(json.dumps(s)),
        "notes": ["training: real tokens are the examples' tokens (prompt + target + EOS; ours computes each but "
                  "its last), target tokens those the loss is taken on; tokens/s = mean a step / median step time",
                  "generation: useful tokens are the requests' lengths (EOS included); tokens/s over the median "
                  "wall time of the runs during which other processes used at most %.2f cores (/proc/stat)" % BUSY,
                  "other_processes_cores: the cores other processes kept busy during a section (/proc/stat); "
                  "on a shared machine torch's threads lose more to them than XLA's"],
    }
    streams = tinyllm_streams(teachers=TEACHERS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log("[decoder] data, tokenizer and student")
        train, _, info = load_records(Path(data_dir), work, s["max_records"])
        res["data"] = info
        tok = train_tokenizer(tokenizer_corpus(train, streams), work / "tokenizer", s["tokenizer_vocab"])
        rows = s["vocab_rows"] or -(-len(tok) // 128) * 128
        res["tokenizer"] = {"type": "byte-level BPE (tokenizers), Qwen's kind: no BOS, <|endoftext|> EOS and pad",
                            "requested_vocab": s["tokenizer_vocab"], "vocab_size": len(tok),
                            "trained_on": "the benchmark's records: inputs with each stream's prefix, answers, "
                                          "rationales"}
        model_dir, n_params = make_student(work / "student", s["arch"], rows, tok.eos_token_id)
        res["model"] = {"class": "Qwen2ForCausalLM", **s["arch"], "vocab_size": rows, "tie_word_embeddings": True,
                        "attention_bias": True, "rope_theta": 1e6, "params": n_params,
                        "init": "transformers' random initialisation (std 0.02), fp32"}
        res["streams"] = [dataclasses.asdict(x) for x in streams]
        if "training" in sections:
            log("[decoder] training: ours against the PyTorch SFT-style reference")
            load0, others = _load(), []
            with _others_busy(others):
                r = train_benchmark(str(model_dir), tok, train, streams, dtype="float32", **s["train"])
            r["load_average"] = [load0, _load()]
            r["other_processes_cores"] = others[0]
            res["training"] = r
        if "generation" in sections:
            res["generation"] = generation_section(model_dir, tok, train, s, log)
    res["device"]["load_average_at_end"] = _load()
    res["seconds"] = round(time.time() - started, 1)
    if out_dir is not None:
        write_result(res, out_dir, "decoder", quick)
    return res


def table(res: dict[str, Any]) -> str:
    m = res["model"]
    lines = [f"decoder-only student{' (quick)' if res['quick'] else ''}: Qwen2 {m['hidden_size']}x"
             f"{m['num_hidden_layers']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, vocab "
             f"{m['vocab_size']} tied, {m['params'] / 1e6:.1f}M parameters; data {res['data']['source']} "
             f"({res['data']['records']} records), {res['date']}"]
    r = res.get("training")
    if r:
        by_round = r["other_processes_cores_by_round"]
        lines.append(f"\ntraining ({r['dtype']}, {r['records_per_step']} records a step; other processes "
                     f"{r['other_processes_cores']} cores (by round: ours {by_round['ours']}, reference "
                     f"{by_round['reference']}), load {r['load_average'][0]} -> {r['load_average'][1]})")
        lines.append(f"  {'':10} {'real tok/s':>11} {'target tok/s':>12} {'step s':>8} {'real frac':>9} {'TFLOP/s':>8}")
        for label in ("ours", "reference"):
            x = r.get(label)
            if x:
                lines.append(f"  {label:10} {x['real_tokens_per_s']:11.0f} {x['target_tokens_per_s']:12.0f} "
                             f"{x['step_time_s']:8.3f} {x['real_token_fraction']:9.3f} "
                             f"{x['achieved_tflops_per_s']:8.4f}")
        if "ratio_real_tokens_per_s" in r:
            lines.append(f"  ratio: {r['ratio_real_tokens_per_s']:.2f}x real tokens/s, "
                         f"{r['ratio_target_tokens_per_s']:.2f}x target tokens/s")
    g = res.get("generation")
    if g:
        gen, sm, ln = g["generate"], g["summary"], g["lengths"]["sample"]
        lines.append(f"\ngeneration: {sm['requests']} requests, output lengths mean {ln['mean']}, p50 {ln['p50']:.0f}, "
                     f"p90 {ln['p90']:.0f}, max {ln['max']}")
        lines.append(f"  {'':24} {'useful tok/s':>12} {'seconds':>8} {'live frac':>9} {'vs generate':>11} "
                     f"{'identical':>9}")
        lines.append(f"  {'generate, batch ' + str(gen['batch']):24} {gen['useful_tokens_per_s']:12.0f} "
                     f"{gen['seconds']:8.2f} {gen['live_fraction']:9.3f} {'1.00x':>11} {'-':>9}")
        for o in g["ours"]:
            lines.append(f"  {'ours, ' + str(o['slots']) + ' slots':24} {o['useful_tokens_per_s']:12.0f} "
                         f"{o['seconds']:8.2f} {o['live_fraction']:9.3f} {o['ratio_vs_generate']:10.2f}x "
                         f"{o['identical_to_generate']:>4}/{sm['requests']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decoder_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy model and a few records: a smoke test")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="only these sections")
    ap.add_argument("--sequence-length", type=int, help="our packed row length (default 256; quick 128)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding tinyllm.tar.xz (else: demo data)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    ap.add_argument("--requests", type=int, help="generation requests (default 1024; a shorter run on a busy machine)")
    ap.add_argument("--slots", type=int, nargs="+", help="the engine's slot counts (default 32 64 128 256)")
    ap.add_argument("--repeats", type=int, help="timed repeats of each generation side (default 2)")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    res = benchmark(args.quick, Path(args.data), Path(args.out), tuple(args.only), args.sequence_length,
                    log=lambda m: print(m, file=sys.stderr, flush=True), requests=args.requests, slots=args.slots,
                    repeats=args.repeats)
    print(table(res))
    print(f"\nwrote {res['path']} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    from tinyllm_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages("benchmarks.decoder_speed", sys.argv[1:])  # as `tinyllm` and benchmarks.run do
    sys.exit(main())
