"""How far stored top-k soft labels are from the online teacher: the KD term and its
gradient at k = 8, 32, 64 and k = the vocabulary, against the term with the teacher's whole
distribution, on the tests' tiny random models and on the demo (a teacher trained on it to
the end, the student an early checkpoint of the same run).

    python -m benchmarks.topk_fidelity            # trains the demo (configs/demo.yaml) first: a few minutes
    python -m benchmarks.topk_fidelity --quick    # the tiny random models only

Writes benchmarks/results/topk-fidelity-<device>-<date>[-quick].json. Three treatments of
the mass outside the top k, forward KL (the one the others define):

    ours        k + 1 outcomes (each top-k id, "any other"): sum_S p_t log(p_t / p_s)
                + tail_t log(tail_t / tail_s), student softmax over the whole vocabulary
    renormalise (MaxText's offline distillation) both distributions renormalised over S:
                KL(p_t|S || p_s|S); the tail is gone from both
    drop tail   (DistillKit's default, missing = zero) sum_S p_t log(p_t / p_s), the
                student's log-probabilities over the whole vocabulary, no tail term

and for reverse KL and JSD, ours (the others define no such term). Figures: the mean
per-token term's relative difference from online, and the cosine between the gradient
(with respect to every student parameter) of the token-mean term and the online one's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KS = (8, 32, 64)


def _renormalised(s_logits, ids, log_probs, temperature):
    """MaxText's offline term: KL between the two distributions renormalised over the top k."""
    import jax
    import jax.numpy as jnp

    log_t = log_probs - jax.nn.logsumexp(log_probs, axis=-1, keepdims=True)
    log_s = jax.nn.log_softmax(jnp.take_along_axis(s_logits / temperature, ids, axis=-1), axis=-1)
    return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def _drop_tail(s_logits, ids, log_probs, temperature):
    """DistillKit's default sparse term: the top k's part of KL(p_t || p_s), no tail term."""
    import jax
    import jax.numpy as jnp

    log_s = jnp.take_along_axis(jax.nn.log_softmax(s_logits / temperature, axis=-1), ids, axis=-1)
    return jnp.sum(jnp.exp(log_probs) * (log_probs - log_s), axis=-1)


def measure(arch_s, params_s, arch_t, params_t, batches, temperatures=(1.0, 2.0)) -> list[dict[str, Any]]:
    """One row per (divergence, temperature, k, treatment): the relative difference of the
    mean KD term from online and the cosine of its student gradient with online's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tinyllm_jax.model.family import family_of
    from tinyllm_jax.train import loss as loss_lib

    family = family_of(arch_s)
    student, teacher = family.module(arch_s, True), family_of(arch_t).module(arch_t, True)
    vocab = arch_s.vocab_size
    inputs = [[b[k] for k in family.model_inputs] for b in batches]
    masks = [(b["decoder_segment_ids"] > 0).astype(jnp.float32) for b in batches]
    forward = jax.jit(lambda p, x: teacher.apply({"params": p}, *x))
    teacher_logits = [forward(params_t, x) for x in inputs]

    def kd_of(term, labels):
        """The token-mean term and its gradient; `labels` (per batch: the teacher's logits or
        its top k) are arguments, so that nothing is folded into the compiled program."""
        def mean_kd(p, labels):
            total, n = 0.0, 0.0
            for x, mask, lab in zip(inputs, masks, labels):
                s_logits = student.apply({"params": p}, *x)
                total = total + jnp.sum(term(s_logits, *lab) * mask)
                n = n + jnp.sum(mask)
            return total / n

        value, grad = jax.jit(jax.value_and_grad(mean_kd))(params_s, labels)
        return float(value), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)])

    rows = []
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        for T in temperatures if divergence == "forward_kl" else (2.0,):
            online, g_online = kd_of(lambda s, t: loss_lib.token_divergences(s, t, divergence, T),
                                     [(t,) for t in teacher_logits])
            for k in (*KS, vocab):
                top = jax.jit(lambda t, k=k: loss_lib.topk_soft_labels(t, k, T))
                stored = [top(t) for t in teacher_logits]
                mass = float(np.mean([float(jnp.exp(lp).sum(-1).mean()) for _, lp, _ in stored]))  # all positions
                treatments = {"ours": lambda s, ids, lp, tail: loss_lib.topk_divergences(s, ids, lp, tail, divergence, T)}
                if divergence == "forward_kl":
                    treatments["renormalise"] = lambda s, ids, lp, tail: _renormalised(s, ids, lp, T)
                    treatments["drop_tail"] = lambda s, ids, lp, tail: _drop_tail(s, ids, lp, T)
                for name, fn in treatments.items():
                    value, g = kd_of(fn, stored)
                    rows.append({"divergence": divergence, "temperature": T, "k": k, "treatment": name,
                                 "online": online, "stored": value, "relative_difference": (value - online) / online,
                                 "gradient_cosine": float(g @ g_online / (np.linalg.norm(g) * np.linalg.norm(g_online))),
                                 "top_k_mass": mass})
    return rows


def tiny_case(work: Path, n_batches: int = 4) -> dict[str, Any]:
    """Random T5s of the tests' size (vocabulary 128) on packed batches of the demo data."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from tinyllm_jax.config import StreamConfig
    from tinyllm_jax.data.demo import demo_texts, make_demo_records
    from tinyllm_jax.data.packing import PackedIterator
    from tinyllm_jax.data.streams import build_examples
    from tinyllm_jax.model.t5 import T5Config, init_params
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    records = make_demo_records(200, 0, "train")
    streams = [StreamConfig("answer", "predict: ", 1.0), StreamConfig("careful", "explain: ", 0.5, teacher="careful")]
    tok = train_sentencepiece(demo_texts(records, extra=["predict: ", "explain: "]), work / "tok", vocab_size=128,
                              model_type="bpe")
    examples = build_examples(records, streams, tok, 96, 64)
    common = dict(vocab_size=128, num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8,
                  relative_attention_max_distance=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  scale_decoder_outputs=False)
    student = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, **common)
    teacher = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, **common)
    s = jax.device_get(nn.unbox(init_params(student, jax.random.key(0))))
    t = jax.device_get(nn.unbox(init_params(teacher, jax.random.key(1))))
    it = PackedIterator(examples, 8, 128, 48, seed=0, process_index=0, process_count=1)
    batches = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n_batches)]
    return {"what": "random T5s the size of the tests' (student d_model 32, teacher 64), vocabulary 128, on "
                    f"{n_batches} packed batches of the demo data", "rows": measure(student, s, teacher, t, batches)}


def demo_case(work: Path, steps: int = 400, early: int = 40, n_batches: int = 4) -> dict[str, Any]:
    """configs/demo.yaml trained `steps` steps: the final checkpoint teaches its own early
    checkpoint (step `early`), on the demo's training batches."""
    import jax.numpy as jnp

    from tinyllm_jax.config import load_config
    from tinyllm_jax.data.packing import train_iterator
    from tinyllm_jax.data.streams import examples_for_split
    from tinyllm_jax.runs import load_run
    from tinyllm_jax.train.student import prepare_demo_data

    run_dir = work / "demo"
    overrides = [f"run_dir={run_dir}", f"train.steps={steps}", f"checkpoint.every_steps={early}",
                 f"checkpoint.keep={steps // early + 1}", "eval.every_steps=0", "train.progress=false"]
    started = time.time()
    subprocess.run([sys.executable, "-m", "tinyllm_jax.cli", "train", str(ROOT / "configs" / "demo.yaml"), *overrides],
                   check=True, env={**os.environ, "TINYLLM_LOG_LEVEL": "WARNING"}, stdout=subprocess.DEVNULL)
    trained = time.time() - started
    teacher, student = load_run(run_dir, steps), load_run(run_dir, early)
    cfg = prepare_demo_data(load_config(run_dir / "config.yaml"), run_dir, write=False)
    examples = examples_for_split(cfg.data, "train", teacher.tokenizer)
    it = train_iterator(cfg, examples, process_index=0, process_count=1)
    batches = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n_batches)]
    return {"what": f"configs/demo.yaml: the step-{steps} checkpoint teaches the step-{early} one (vocabulary "
                    f"{teacher.arch.vocab_size}), {n_batches} training batches of {cfg.train.batch_size} rows",
            "train_seconds": round(trained, 1),
            "rows": measure(student.arch, student.params, teacher.arch, teacher.params, batches)}


def table(r: dict[str, Any]) -> str:
    lines = []
    for case, c in r["cases"].items():
        lines.append(f"{case}: {c['what']}")
        lines.append(f"  {'divergence':11} {'T':>4} {'k':>5} {'treatment':12} {'top-k mass':>10} {'rel. diff':>10} "
                     f"{'grad cos':>9}")
        for row in c["rows"]:
            lines.append(f"  {row['divergence']:11} {row['temperature']:4.1f} {row['k']:5d} {row['treatment']:12} "
                         f"{row['top_k_mass']:10.3f} {row['relative_difference']:+10.4f} {row['gradient_cosine']:9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import device_info, write_result

    ap = argparse.ArgumentParser(prog="python -m benchmarks.topk_fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny random models only")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    args = ap.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"tiny": tiny_case(Path(tmp))}
        if not args.quick:
            cases["demo"] = demo_case(Path(tmp))
    results = {"benchmark": "topk_fidelity", "quick": args.quick, "date": datetime.date.today().isoformat(),
               "device": device_info(len(os.sched_getaffinity(0))), "cases": cases,
               "seconds": round(time.time() - started, 1)}
    path = write_result(results, args.out, "topk-fidelity", args.quick)
    print(table(results))
    print(f"\nwrote {path} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
