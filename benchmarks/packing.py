"""Real-token fraction of packed batches against the reference systems' padded batches.

Run (CPU, about a minute):  python benchmarks/packing.py [--data ../shared/data/tinyllm.tar.xz]

Data: the published TinyLLM training data (OBQA, ARC, PubMedQA train splits: gold rows and
the Flan-T5 + LLaMA-2 teacher strings), unpacked into a temporary folder and read with
`tinyllm convert`'s converter (PubMedQA's abstract becomes the context). Tokenizer: a
T5-style unigram SentencePiece model (pad 0, eos 1, unk 2) trained here on the same texts,
since nothing can be downloaded; its token counts are close to, not equal to, T5's.

What the reference systems do (read from their code, not guessed):
  TinyLLM (tiny.py, model_utils.py): three streams (predict / explain / rationale), each its
    own padded batch of 8 (the per-device batch); inputs tokenized with padding="max_length"
    to max_input_length; targets cut at 256 and padded by DataCollatorForSeq2Seq to the
    longest in the batch. A record without a LLaMA rationale still trains on an empty target
    (EOS alone). tiny.py sets max_input_length 100 / 200 / 500 for OBQA / ARC / PubMedQA in a
    local variable that is never read, so the code as published pads to the command-line
    default, 100; both are reported.
  Distilling step-by-step (run.py): two streams (predict / explain), batch 64, inputs cut at
    1024 and targets at 256, both padded to the longest in the batch (dynamic padding).

Ours: the same examples (TinyLLM streams, same input cuts, targets cut at 256), packed into
rows of `encoder_length` with the decoder length that `suggest_decoder_length` gives, over
three epochs of training batches; the figure is real tokens / all slots of every batch.
Writes benchmarks/results/packing-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from tinyllm_jax.data.packing import Lengths, PackedIterator, check_lengths, suggest_lengths
from tinyllm_jax.data.streams import Examples, build_examples, format_input, step_by_step_streams, tinyllm_streams
from tinyllm_jax.model.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"obqa": 100, "arc": 200, "pubmedqa": 500}  # TinyLLM's intended max_input_length
ENCODER_LENGTH = 2048  # rows of several inputs; `suggest_lengths` doubles it when needed


def read_tinyllm(folder: Path) -> dict[str, list[dict]]:
    """The train split of each dataset, as records, through the project's own converter."""
    from tinyllm_jax.data.formats import tinyllm as tinyllm_format

    return {rep.dataset: records for rep, records in tinyllm_format.convert(folder)
            if rep.split == "train" and rep.dataset in DATASETS}


def fraction(real: int, slots: int) -> float:
    return real / slots if slots else 0.0


def reference_tinyllm(records, tok, max_input: int, batch: int = 8, seed: int = 0) -> dict:
    """TinyLLM: per stream, inputs padded to max_input, targets to the batch's longest."""
    rng = np.random.default_rng(seed)
    enc_real = enc_slots = dec_real = dec_slots = 0
    streams = [("predict: ", [r["answer"] for r in records]),
               ("explain: ", [r["rationales"].get("flan-t5", [""])[0] for r in records]),
               ("rationale: ", [r["rationales"].get("llama", [""])[0] for r in records])]
    inputs = [format_input(r) for r in records]
    for prefix, targets in streams:
        enc_len = np.minimum([len(x) for x in tok([prefix + t for t in inputs])["input_ids"]], max_input)
        dec_len = np.minimum([len(x) for x in tok(targets)["input_ids"]], 256)
        order = rng.permutation(len(records))
        for s in range(0, len(order), batch):
            b = order[s:s + batch]
            enc_real += int(enc_len[b].sum())
            enc_slots += len(b) * max_input
            dec_real += int(dec_len[b].sum())
            dec_slots += len(b) * int(dec_len[b].max())
    return {"encoder": fraction(enc_real, enc_slots), "decoder": fraction(dec_real, dec_slots),
            "encoder_real_tokens": enc_real, "decoder_real_tokens": dec_real}


def reference_step_by_step(records, tok, batch: int = 64, seed: int = 0) -> dict:
    """Distilling step-by-step: per stream, inputs and targets padded to the batch's longest."""
    rng = np.random.default_rng(seed)
    enc_real = enc_slots = dec_real = dec_slots = 0
    inputs = [format_input(r) for r in records]
    for prefix, targets in (("predict: ", [r["answer"] for r in records]),
                            ("explain: ", [r["rationales"].get("flan-t5", [""])[0] for r in records])):
        enc_len = np.minimum([len(x) for x in tok([prefix + t for t in inputs])["input_ids"]], 1024)
        dec_len = np.minimum([len(x) for x in tok(targets)["input_ids"]], 256)
        order = rng.permutation(len(records))
        for s in range(0, len(order), batch):
            b = order[s:s + batch]
            enc_real += int(enc_len[b].sum())
            enc_slots += len(b) * int(enc_len[b].max())
            dec_real += int(dec_len[b].sum())
            dec_slots += len(b) * int(dec_len[b].max())
    return {"encoder": fraction(enc_real, enc_slots), "decoder": fraction(dec_real, dec_slots),
            "encoder_real_tokens": enc_real, "decoder_real_tokens": dec_real}


def packed(examples: Examples, encoder_length: int, batch_rows: int, epochs: int = 3, seed: int = 0,
           long_batches: bool = False) -> dict:
    """Our packed training batches: real tokens / slots over `epochs` epochs of batches (with
    `long_batches`, rows sized for the data's ratio, as `suggest_lengths` says)."""
    encoder_length, decoder_length = suggest_lengths(examples, encoder_length, cover_longest=not long_batches)
    fits = (examples.enc_lengths <= encoder_length) & (examples.dec_lengths <= decoder_length)
    report = check_lengths(Lengths.of(examples, fits), encoder_length, decoder_length)
    it = PackedIterator(examples, batch_rows, encoder_length, decoder_length, seed=seed,
                        process_index=0, process_count=1)
    enc_real = dec_real = enc_slots = dec_slots = batches = 0
    t0 = time.perf_counter()
    while it.epoch < epochs:
        b = next(it)
        enc_real += int((b["encoder_segment_ids"] > 0).sum())
        dec_real += int((b["decoder_segment_ids"] > 0).sum())
        enc_slots += b["encoder_segment_ids"].size
        dec_slots += b["decoder_segment_ids"].size
        batches += 1
    seconds = time.perf_counter() - t0
    one_epoch = PackedIterator(examples, batch_rows, encoder_length, decoder_length, seed=seed,
                               num_epochs=1, process_index=0, process_count=1)
    ep = [(int((b["encoder_segment_ids"] > 0).sum()), b["encoder_segment_ids"].size,
           int((b["decoder_segment_ids"] > 0).sum()), b["decoder_segment_ids"].size) for b in one_epoch]
    e_real, e_slots, d_real, d_slots = map(sum, zip(*ep))
    return {"encoder": fraction(enc_real, enc_slots), "decoder": fraction(dec_real, dec_slots),
            "encoder_one_epoch": fraction(e_real, e_slots), "decoder_one_epoch": fraction(d_real, d_slots),
            "encoder_length": encoder_length, "decoder_length": decoder_length,
            "data_ratio_dec_per_enc": round(report.ratio, 4), "batch_rows": batch_rows,
            "long_batch_examples": it.long_examples, "long_batch_factor": it.long_factor,
            "batches": batches, "examples": len(examples),
            "examples_per_row": round(len(examples) * epochs / (batches * batch_rows), 2),
            "seconds_per_batch": seconds / batches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyllm.tar.xz"))
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"{args.data}: not found (the real TinyLLM data archive)", file=sys.stderr)
        return 2
    results = {"date": datetime.date.today().isoformat(), "data": Path(args.data).name,
               "tokenizer": f"SentencePiece unigram, vocab {args.vocab_size}, trained on these texts",
               "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.data) as tar:
            tar.extractall(tmp, filter="data")
        folder = Path(tmp) / "tinyllm"
        data = read_tinyllm(folder)
        texts = [format_input(r) for rs in data.values() for r in rs]
        texts += [t for rs in data.values() for r in rs for ts in r["rationales"].values() for t in ts]
        t0 = time.perf_counter()
        tok = train_sentencepiece(texts, Path(tmp) / "tok", vocab_size=args.vocab_size)
        results["tokenizer_train_seconds"] = round(time.perf_counter() - t0, 1)
        for name in DATASETS:
            records = data[name]
            max_input = DATASETS[name]
            t0 = time.perf_counter()
            tiny = build_examples(records, tinyllm_streams(), tok, max_input, 256, lenient=True)
            dss = build_examples(records, step_by_step_streams(0.5, "flan-t5"), tok, 1024, 256)
            tok_s = time.perf_counter() - t0
            row = {
                "records": len(records),
                "tokenize_seconds": round(tok_s, 2),
                "stream_stats": {k: v.summary() for k, v in tiny.stats.items()},
                "reference_tinyllm_intended_max_input": reference_tinyllm(records, tok, max_input),
                "reference_tinyllm_as_published_max_input_100": reference_tinyllm(records, tok, 100),
                "reference_step_by_step": reference_step_by_step(records, tok),
                "packed_tinyllm_streams": packed(tiny, ENCODER_LENGTH, args.batch_rows),
                "packed_step_by_step_streams": packed(dss, ENCODER_LENGTH, args.batch_rows),
            }
            results["datasets"][name] = row
    print(f"{'dataset':10} {'system':44} {'encoder':>8} {'decoder':>8}")
    for name, row in results["datasets"].items():
        for system, r in row.items():
            if isinstance(r, dict) and "encoder" in r:
                print(f"{name:10} {system:44} {r['encoder']:8.3f} {r['decoder']:8.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"packing-cpu-{results['date']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
