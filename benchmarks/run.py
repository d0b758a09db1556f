"""The benchmark suite: one entry point, a table on stdout, a JSON file of every figure.

    python -m benchmarks.run --suite cpu            # a small T5, on this CPU, in minutes
    python -m benchmarks.run --suite gpu            # t5-base and t5-large sized students, bf16
    python -m benchmarks.run --suite gpu --tiny     # the gpu suite's code path at toy size

Writes benchmarks/results/<suite>-<device>-<date>.json (`--tiny` adds "-tiny"). Sections:
training (ours vs the reference-style PyTorch trainer: real tokens/s, step time, ratio),
packing (real-token fractions), decoding (ours vs transformers `generate`), MFU (model
FLOPs per step by the trainer's formula over step time and the device's peak).

Data: the TinyLLM OpenBookQA training split from ../shared/data/tinyllm.tar.xz, converted by
`tinyllm_jax.data.formats`, when that archive is there; otherwise the generated demo data
(its two teachers standing in for TinyLLM's two). Only records with both teachers' rationales
are used, so that both trainers see exactly the same examples. Tokenizer: a SentencePiece
model trained on those texts (nothing is downloaded). The students are random
transformers T5 models saved with `save_pretrained`, loaded by both sides.
On a TPU VM the PyTorch baselines are skipped (no CUDA for torch there) and said so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
TEACHERS = ("flan-t5", "llama")  # TinyLLM's two teachers, in stream order
SECTIONS = ("training", "packing", "decoding", "mfu")

# T5 v1.1 architectures (gated-GELU, untied lm_head); vocab_size None: the tokenizer's, rounded up
ARCHS = {
    "t5-cpu-small": dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "t5-tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}


@dataclasses.dataclass
class Suite:
    """What one suite runs. `train` and `decode` are keyword arguments of the benchmark
    functions; `mfu` lists our trainer's larger batch settings per model (accelerators)."""

    models: dict[str, dict[str, Any]]
    vocab_size: int | None
    tokenizer_vocab: int
    max_records: int | None
    train: dict[str, Any]
    decode: list[dict[str, Any]]
    mfu: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    packing_rows: int = 16


SUITES = {
    "cpu": Suite(
        models={"t5-cpu-small": ARCHS["t5-cpu-small"]}, vocab_size=None, tokenizer_vocab=8000, max_records=None,
        # rows of 192 encoder tokens (decoder: the data's ratio, 136 on OBQA) beat 384 and 256
        # here: attention grows with the square of the row length; the 4 OBQA examples with
        # longer targets go to long batches (PackedIterator)
        train=dict(records_per_step=16, micro_batch=8, encoder_length=192, long_batches=True, dtype="float32",
                   rounds=3, steps_per_round=3, warmup=1),
        decode=[dict(batch_size=64, max_new_tokens=64, repeats=5, dtype="float32"),
                dict(batch_size=8, max_new_tokens=64, repeats=5, dtype="float32")],
    ),
    "gpu": Suite(
        models={"t5-base": ARCHS["t5-base"], "t5-large": ARCHS["t5-large"]}, vocab_size=32128,
        tokenizer_vocab=16000, max_records=None,
        # TinyLLM's batch: 8 records a device, 8 accumulation steps
        train=dict(records_per_step=64, micro_batch=8, encoder_length=512, dtype="bfloat16",
                   rounds=3, steps_per_round=3, warmup=2),
        decode=[dict(batch_size=64, max_new_tokens=64, repeats=3, dtype="bfloat16"),
                dict(batch_size=256, max_new_tokens=64, repeats=3, dtype="bfloat16")],
        # about 1.5 GB (base) / 3 GB (large) of activations a 512-token row without remat
        mfu={"t5-base": [dict(rows=32), dict(rows=64), dict(rows=128, remat="dots"), dict(rows=256, remat="full")],
             "t5-large": [dict(rows=16), dict(rows=32), dict(rows=64, remat="dots"), dict(rows=128, remat="full")]},
        packing_rows=64,
    ),
}


def tiny_suite(suite: Suite) -> Suite:
    """The same code path at toy size (CPU-runnable in well under a minute): used by --tiny
    and the smoke test."""
    return dataclasses.replace(
        suite, models={"t5-tiny": ARCHS["t5-tiny"]}, vocab_size=None, tokenizer_vocab=300, max_records=48,
        train={**suite.train, "records_per_step": 8, "micro_batch": 4, "encoder_length": 256,
               "rounds": 1, "steps_per_round": 1, "warmup": 1},
        decode=[{**d, "batch_size": 4, "max_new_tokens": 4, "repeats": 1} for d in suite.decode[:1]],
        mfu={"t5-tiny": [dict(rows=2), dict(rows=2, remat="dots")]} if suite.mfu else {}, packing_rows=4,
    )


# --------------------------------------------------------------------------- preparation


def load_records(data_dir: Path, work: Path, max_records: int | None = None) -> tuple[list, list, dict[str, Any]]:
    """(train records, test records, description): TinyLLM OBQA if its archive is in
    `data_dir`, else the demo data. Records keep one rationale of each of TEACHERS and only
    records with both are kept."""
    archive = Path(data_dir) / "tinyllm.tar.xz"
    if archive.is_file():
        from tinyllm_jax.data.formats import convert
        from tinyllm_jax.data.records import read_jsonl

        with tarfile.open(archive) as tar:
            tar.extractall(work / "raw", members=[m for m in tar if m.name.startswith("tinyllm/obqa/")], filter="data")
        convert("tinyllm", work / "raw" / "tinyllm", work / "converted")
        train, _ = read_jsonl(work / "converted" / "obqa" / "train.jsonl")
        test, _ = read_jsonl(work / "converted" / "obqa" / "test.jsonl")
        info = {"source": "tinyllm-obqa", "archive": str(archive),
                "note": "TinyLLM OpenBookQA (Flan-T5 and LLaMA-2 rationales), converted by tinyllm_jax.data.formats"}
    else:
        from tinyllm_jax.data.demo import make_demo_records

        n = max_records or 2000
        rename = dict(zip(("careful", "terse"), TEACHERS))
        train, test = ([dict(r, rationales={rename[k]: v for k, v in r["rationales"].items()})
                        for r in make_demo_records(k, 0, split)] for k, split in ((n, "train"), (128, "test")))
        info = {"source": "demo", "note": f"{archive} not found: generated demo data, its careful and terse "
                                          f"teachers in TinyLLM's {TEACHERS[0]} and {TEACHERS[1]} streams"}
    kept = [dict(r, rationales={t: r["rationales"][t][:1] for t in TEACHERS}) for r in train
            if all(r.get("rationales", {}).get(t) for t in TEACHERS)]
    info["records_without_both_rationales"] = len(train) - len(kept)
    train = kept[:max_records] if max_records else kept
    info.update(records=len(train), test_records=len(test))
    return train, test, info


def train_tokenizer(records, out_dir: Path, vocab_size: int):
    """A unigram SentencePiece tokenizer (T5 special ids) on the records' texts and prefixes."""
    from tinyllm_jax.data.streams import format_input, tinyllm_streams
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    texts = [format_input(r) for r in records] + [r["answer"] for r in records]
    texts += [t for r in records for ts in r["rationales"].values() for t in ts]
    texts += [s.prefix for s in tinyllm_streams()]
    return train_sentencepiece(texts, out_dir, vocab_size=vocab_size)


def make_student(out_dir: Path, arch: dict[str, Any], vocab_size: int, seed: int = 0) -> tuple[Path, int]:
    """A randomly initialised T5 (v1.1 layout) in Hugging Face format: the one set of weights
    both trainers and both decoders start from. Made by transformers (with torch); where torch
    is not installed (a TPU VM) by our own initialiser and `save_pretrained`. Returns (folder,
    parameters)."""
    try:
        import torch
        from transformers import T5Config, T5ForConditionalGeneration
    except ImportError:
        return _make_student_without_torch(out_dir, arch, vocab_size, seed)
    cfg = T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **arch)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    # transformers 5 ties lm_head to the embedding in a new model; v1.1 has its own (init
    # std 1, as T5's own initialiser gives it); saved separately, it loads untied on both sides
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(out_dir)
    return out_dir, sum(p.numel() for p in model.parameters())


def _make_student_without_torch(out_dir: Path, arch: dict[str, Any], vocab_size: int, seed: int) -> tuple[Path, int]:
    import jax
    from flax import linen as nn

    from tinyllm_jax.model.hf import save_pretrained
    from tinyllm_jax.model.t5 import T5Config, init_params
    from tinyllm_jax.train.metrics import param_count

    cfg = T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   scale_decoder_outputs=False, dropout_rate=0.1, **arch)
    params = nn.unbox(init_params(cfg, jax.random.key(seed)))
    save_pretrained(params, cfg, out_dir)
    return out_dir, param_count(params)


def device_info(threads: int) -> dict[str, Any]:
    import jax
    import transformers

    try:
        import torch
    except ImportError:
        torch = None
    d = jax.devices()[0]
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(), "host": platform.node(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "cpu_cores": len(os.sched_getaffinity(0)), "jax_threads": threads,
            "torch_threads": torch.get_num_threads() if torch else None,
            "torch_cuda": bool(torch and torch.cuda.is_available()), "jax": jax.__version__,
            "torch": torch.__version__ if torch else None, "transformers": transformers.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # huge pages: tinyllm_jax/hugepages.py


def device_slug() -> str:
    import jax

    d = jax.devices()[0]
    kind = "cpu" if d.platform == "cpu" else d.device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def write_result(res: dict[str, Any], out_dir: Path | str, name: str, quick: bool = False) -> Path:
    """Writes a benchmark's result as <out_dir>/<name>-<device>-<date>[-quick].json and notes
    its path in res["path"]."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{device_slug()}-{res['date']}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    res["path"] = str(path)
    return path


def reference_device() -> tuple[str | None, str]:
    """Where the PyTorch baselines run: the CPU when JAX runs on the CPU, CUDA when JAX runs
    on a GPU (and torch sees one), nowhere otherwise (TPU VMs, no torch)."""
    import jax

    try:
        import torch
    except ImportError:
        return None, "skipped: torch is not installed"
    platform_ = jax.devices()[0].platform
    if platform_ == "cpu":
        return "cpu", "torch on the CPU"
    if platform_ == "gpu" and torch.cuda.is_available():
        return "cuda", "torch on CUDA"
    return None, f"skipped: JAX runs on {platform_} and this torch has no device there"


# --------------------------------------------------------------------------- the suite


def run_suite(name: str, *, tiny: bool = False, data_dir: Path = DEFAULT_DATA, out_dir: Path | None = RESULTS,
              work_dir: Path | None = None, sections: tuple[str, ...] = SECTIONS, models: tuple[str, ...] | None = None,
              log=print) -> dict[str, Any]:
    """Runs suite `name` (at toy size with `tiny`; only `models` of it when given); returns
    the results and, with `out_dir`, writes them to OUT_DIR/<suite>-<device>-<date>[-<model>
    ...][-tiny].json (its path under "path")."""
    from benchmarks.decode_speed import decode_benchmark
    from benchmarks.train_speed import matmul_tflops, mfu_sweep, train_benchmark
    from tinyllm_jax.data.streams import tinyllm_streams
    from tinyllm_jax.train.metrics import peak_flops_per_device

    suite = tiny_suite(SUITES[name]) if tiny else SUITES[name]
    unknown = sorted(set(models or ()) - set(suite.models))
    if unknown:
        raise ValueError(f"suite {name!r} has no model {unknown[0]!r} (it has {', '.join(suite.models)})")
    threads = len(os.sched_getaffinity(0))  # XLA's CPU thread pool takes every core it may use
    ref_dev, ref_note = reference_device()
    if ref_dev is not None:
        import torch

        torch.set_num_threads(threads)
    started = time.time()
    results: dict[str, Any] = {
        "suite": name, "tiny": tiny, "date": datetime.date.today().isoformat(), "device": device_info(threads),
        "reference_device": ref_note,
        "notes": [f"torch.set_num_threads({threads}): the cores XLA's CPU client uses",
                  "real tokens: non-pad encoder input + decoder target tokens (EOS included); "
                  "tokens/s = mean real tokens a step / median step time",
                  "FLOPs by tinyllm_jax.train.metrics.train_flops_per_step (6 x params x tokens plus attention, "
                  "padding counted as it is computed); the reference's over its padded forward passes",
                  "both sides alternate in rounds within one process; on a CPU shared with other work, torch's "
                  "OpenMP threads slow down far more than XLA's (see load_average_*), so compare runs on an idle "
                  "machine"],
        "models": {}, "training": [], "decoding": [],
    }
    peak = peak_flops_per_device()
    results["mfu"] = {"peak_flops_per_device_datasheet": peak, "training": [], "sweep": []}
    if "mfu" in sections:
        dtype = suite.train["dtype"] if results["device"]["platform"] != "cpu" else "float32"
        n = 256 if tiny else 2048 if results["device"]["platform"] == "cpu" else 8192
        results["mfu"]["matmul_tflops_measured"] = matmul_tflops(dtype, n)
        results["mfu"]["matmul_dtype"] = dtype
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        log(f"[{name}] data")
        train, test, info = load_records(Path(data_dir), work, suite.max_records)
        results["data"] = info
        tok = train_tokenizer(train, work / "tokenizer", suite.tokenizer_vocab)
        results["tokenizer"] = {"type": "SentencePiece unigram, T5 special ids (pad 0, eos 1, unk 2)",
                                "requested_vocab": suite.tokenizer_vocab, "vocab_size": len(tok),
                                "trained_on": "the benchmark's training records (inputs, answers, rationales)"}
        streams = tinyllm_streams(teachers=TEACHERS)
        results["streams"] = [dataclasses.asdict(s) for s in streams]
        vocab = suite.vocab_size or -(-len(tok) // 128) * 128
        for model_name, arch in suite.models.items():
            if models and model_name not in models:
                continue
            model_dir, params = make_student(work / model_name, arch, vocab)
            results["models"][model_name] = {**arch, "vocab_size": vocab, "feed_forward_proj": "gated-gelu",
                                             "tie_word_embeddings": False, "params": params}
            ref_kw = dict(reference=ref_dev is not None, reference_device=ref_dev or "cpu")
            if "training" in sections:
                log(f"[{name}] training {model_name}")
                r = train_benchmark(str(model_dir), tok, train, streams, **ref_kw, **suite.train)
                r = {"model": model_name, **r}
                results["training"].append(r)
                for side in ("ours", "reference"):
                    if side in r:
                        keys = ("flops_per_step", "step_time_s", "achieved_tflops_per_s", "mfu")
                        results["mfu"]["training"].append(
                            {"model": model_name, "side": side, **{k: r[side][k] for k in keys}})
            if "decoding" in sections:
                for d in suite.decode:
                    log(f"[{name}] decoding {model_name} batch {d['batch_size']}")
                    r = decode_benchmark(str(model_dir), tok, test, **ref_kw, **d)
                    results["decoding"].append({"model": model_name, **r})
            if "mfu" in sections and suite.mfu.get(model_name):
                log(f"[{name}] mfu sweep {model_name}")
                for r in mfu_sweep(str(model_dir), tok, train, streams, suite.mfu[model_name],
                                   encoder_length=suite.train.get("encoder_length"), dtype=suite.train["dtype"]):
                    results["mfu"]["sweep"].append({"model": model_name, **r})
        if "packing" in sections:
            log(f"[{name}] packing")
            results["packing"] = packing_section(train, tok, streams, suite.train.get("encoder_length"),
                                                 suite.packing_rows, suite.train.get("long_batches", False))
    results["seconds"] = round(time.time() - started, 1)
    results["device"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        subset = "".join(f"-{m}" for m in models or ())
        path = out / f"{name}-{device_slug()}-{results['date']}{subset}{'-tiny' if tiny else ''}.json"
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        results["path"] = str(path)
    return results


def packing_section(records, tokenizer, streams, encoder_length: int | None, batch_rows: int,
                    long_batches: bool = False) -> dict[str, Any]:
    """Real-token fractions through benchmarks/packing.py's functions: TinyLLM's padding (to
    100 as its code runs, per stream batches of 8), step-by-step's dynamic padding, and our
    packed batches of the same examples."""
    from benchmarks import packing as pk
    from benchmarks.train_speed import REFERENCE_MAX_INPUT
    from tinyllm_jax.data.streams import build_examples

    examples = build_examples(records, streams, tokenizer, REFERENCE_MAX_INPUT, 256, lenient=True)
    return {
        "reference_tinyllm_max_input_100": pk.reference_tinyllm(records, tokenizer, REFERENCE_MAX_INPUT),
        "reference_step_by_step": pk.reference_step_by_step(records, tokenizer),
        "ours_packed": pk.packed(examples, encoder_length or 512, batch_rows, long_batches=long_batches),
    }


# --------------------------------------------------------------------------- the table


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def table(results: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    lines = [f"suite {results['suite']}{' (tiny)' if results['tiny'] else ''} on {results['device']['kind']} "
             f"x{results['device']['count']}, data {results['data']['source']} ({results['data']['records']} records), "
             f"tokenizer vocab {results['tokenizer']['vocab_size']}, {results['date']}"]
    for r in results["training"]:
        o, ref = r["ours"], r.get("reference")
        lines.append(f"\ntraining {r['model']} ({r['dtype']}, {r['records_per_step']} records a step, "
                     f"{results['models'][r['model']]['params'] / 1e6:.1f}M parameters)")
        lines.append(f"  {'':10} {'real tok/s':>11} {'step s':>8} {'real frac':>9} {'TFLOP/s':>8} {'MFU':>6}")
        for label, x in (("ours", o), ("reference", ref)):
            if x:
                lines.append(f"  {label:10} {x['real_tokens_per_s']:11.0f} {x['step_time_s']:8.3f} "
                             f"{x['real_token_fraction']:9.3f} {x['achieved_tflops_per_s']:8.4f} "
                             f"{_fmt(x['mfu'], '6.3f'):>6}")
        if ref:
            lines.append(f"  ratio (real tokens/s): {r['ratio_real_tokens_per_s']:.2f}x")
    if results.get("packing"):
        lines.append(f"\n{'packing (real-token fraction)':34} {'encoder':>7} {'decoder':>8}")
        for k, v in results["packing"].items():
            lines.append(f"  {k:32} {v['encoder']:7.3f} {v['decoder']:8.3f}")
    for r in results["decoding"]:
        o, ref = r["ours"], r.get("reference")
        line = (f"\ndecoding {r['model']} ({r['dtype']}) batch {r['batch_size']}, {r['max_new_tokens']} new tokens: "
                f"ours {o['tokens_per_s']:.0f} tok/s")
        if ref:
            line += (f", generate {ref['tokens_per_s']:.0f} tok/s, ratio {r['ratio_tokens_per_s']:.2f}x, "
                     f"identical rows {r['identical_rows']}/{r['batch_size']}")
        lines.append(line)
    mfu = results["mfu"]
    if "matmul_tflops_measured" in mfu:
        peak = mfu["peak_flops_per_device_datasheet"]
        lines.append(f"\npeak: datasheet {_fmt(peak and peak / 1e12)} TFLOP/s a device, one {mfu['matmul_dtype']} "
                     f"matmul measured {mfu['matmul_tflops_measured']:.3g} TFLOP/s")
    if mfu["sweep"]:
        lines.append(f"MFU sweep (ours)  {'rows':>5} {'remat':>6} {'step s':>8} {'real tok/s':>11} "
                     f"{'TFLOP/s':>8} {'MFU':>6}")
        for r in mfu["sweep"]:
            if "error" in r:
                lines.append(f"  {r['model']:15} {r['rows']:5d} {r['remat']:>6}  {r['error'][:60]}")
            else:
                lines.append(f"  {r['model']:15} {r['rows']:5d} {r['remat']:>6} {r['step_time_s']:8.3f} "
                             f"{r['real_tokens_per_s']:11.0f} {r['achieved_tflops_per_s']:8.2f} "
                             f"{_fmt(r['mfu'], '6.3f'):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="the suite's code path at toy size")
    ap.add_argument("--models", nargs="+", help="only these models of the suite")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="only these sections")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding tinyllm.tar.xz (else: demo data)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    args = ap.parse_args(argv)
    # the PyTorch baseline shares the accelerator: JAX takes memory as it needs it
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    results = run_suite(args.suite, tiny=args.tiny, data_dir=Path(args.data), out_dir=Path(args.out),
                        sections=tuple(args.only), models=tuple(args.models) if args.models else None,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(results))
    print(f"\nwrote {results['path']} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    from tinyllm_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages("benchmarks.run", sys.argv[1:])  # as `tinyllm` does; both sides share it
    sys.exit(main())
