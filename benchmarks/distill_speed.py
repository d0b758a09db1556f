"""Distillation cost: the KD train step with an online teacher (2x and 4x the student) and
with the teacher's stored top-64 soft labels, the student's step alone, each with the
whole-sequence and the chunked vocabulary loss; tokens/s and the compiled step's memory.

    python -m benchmarks.distill_speed            # t5-cpu-small at a 32k vocabulary, ~15 minutes on 2 CPU cores
    python -m benchmarks.distill_speed --quick    # the same code path at toy size (the smoke test)
    python -m benchmarks.distill_speed --memory   # compile-only peak memory: more rows, a 152k-vocabulary decoder
    python -m benchmarks.distill_speed --arch t5-base --dtype bfloat16 --rows 64   # a GPU

Writes benchmarks/results/distill-<device>-<date>[-quick].json. A teacher is the student's
architecture with as many layers as bring its parameter count nearest 2x (4x) the
student's. Models are randomly initialised (timings depend on shapes only); the stored
labels are the 2x teacher's top-64 at T = 2, written and read through `tinyllm logits`'s
store (data/soft_labels.py). Data: the embedded demo set in Mentor-KD's form (one rationale
stream, `{rationale} --> {answer}`, stream weight 0.7, distill weight 0.3, T = 2, forward
KL). Timed sides alternate in rounds (compile excluded) so that outside load falls on all
alike; figures are medians over steps, compared as ratios within one run. Memory is XLA's
buffer assignment of each compiled step (`memory_analysis()`): arguments (state, batch,
teachers) + outputs - donated + temporaries, the same figure on every backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# records, tokenizer vocabulary, the models' vocabulary (the softmaxes KD compares), rows a
# step, encoder row length, decoder positions a loss chunk, top-k stored, rounds, steps a round
SIZES = {
    "full": dict(records=400, vocab=2000, model_vocab=32128, rows=8, encoder_length=192, chunk=16, top_k=64,
                 rounds=3, steps=3, warmup=1),
    "quick": dict(records=48, vocab=300, model_vocab=512, rows=4, encoder_length=128, chunk=16, top_k=16,
                  rounds=1, steps=2, warmup=1),
}
FACTORS = (2, 4)  # teacher parameters / student parameters


def teacher_arch(arch: dict[str, Any], vocab: int, factor: float = 2.0) -> tuple[dict[str, Any], int, int]:
    """(teacher architecture, student params, teacher params): the student's layout with the
    number of layers whose parameter count is nearest `factor` times the student's."""
    from tinyllm_jax.train.metrics import param_count

    def count(layers):
        return param_count(_abstract_params(_t5cfg({**arch, "num_layers": layers}, vocab)))

    n_student = count(arch["num_layers"])
    per_layer = count(arch["num_layers"] + 1) - n_student  # an encoder and a decoder layer
    best = max(1, round(arch["num_layers"] + (factor - 1.0) * n_student / per_layer))
    return {**arch, "num_layers": best}, n_student, count(best)


def _t5cfg(arch: dict[str, Any], vocab: int, dtype: str = "float32"):
    from tinyllm_jax.model.t5 import T5Config

    return T5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    scale_decoder_outputs=False, dropout_rate=0.1, dtype=dtype, **arch)


def _abstract_params(cfg):
    import jax
    from flax import linen as nn

    from tinyllm_jax.model.t5 import init_params

    return nn.unbox(jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0)))


def _memory(compiled) -> dict[str, int]:
    """XLA's buffer assignment of a compiled function; `peak_bytes` = arguments + outputs -
    aliased (donated) + temporaries, everything live at once. (XLA's own peak_memory_in_bytes
    is kept too; on the CPU it leaves the temporaries out, so it is not the figure used.)"""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                           "alias_size_in_bytes", "temp_size_in_bytes")}
    out["xla_peak_memory_in_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                         - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def _timed(fn, batches, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones; each call is waited for."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(next(batches)))
    times = []
    for _ in range(steps):
        b = next(batches)
        t = time.perf_counter()
        jax.block_until_ready(fn(b))
        times.append(time.perf_counter() - t)
    return times


@dataclasses.dataclass
class Setup:
    """The models, data and configs every timed side shares."""

    cfg: Any
    mesh: Any
    tokenizer: Any
    records: list
    examples: Any  # with the stored soft labels attached
    stream: Any
    s_cfg: Any
    s_params: Any
    teachers: dict[int, Any]  # factor -> Teacher on the mesh (fp32)
    arch: dict[str, Any]
    teacher_archs: dict[int, dict[str, Any]]
    params: dict[str, int]  # student, teacher2x, teacher4x
    store: dict[str, Any]  # the stored labels' index figures and the seconds `tinyllm logits` took
    top_k: int
    chunk: int


def prepare(size: dict[str, Any], arch_name: str, dtype: str, vocab: int | None, rows: int | None,
            work: Path) -> Setup:
    """Demo records in Mentor-KD's form, a tokenizer, a random student, random teachers 2x
    and 4x its size on the mesh, and the 2x teacher's top-k stored in `work`."""
    import jax
    from flax import linen as nn

    from benchmarks.run import ARCHS, train_tokenizer
    from tinyllm_jax.config import (
        Config, DataConfig, DistillConfig, KDTeacherConfig, MeshConfig, ModelConfig, OptimConfig, StreamConfig,
        TrainConfig,
    )
    from tinyllm_jax.data.demo import make_demo_records
    from tinyllm_jax.data.packing import ENCODER_DECODER, suggest_lengths
    from tinyllm_jax.data.soft_labels import SoftLabelStore
    from tinyllm_jax.data.streams import build_examples
    from tinyllm_jax.model.t5 import init_params
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.distill import place_teacher
    from tinyllm_jax.train.teacher_logits import store_soft_labels

    records = make_demo_records(size["records"], 0, "train")
    tok = train_tokenizer(records, work / "tok", size["vocab"])
    vocab = max(vocab or size["model_vocab"], -(-len(tok) // 128) * 128)
    stream = StreamConfig("chain", "explain: ", 0.7, teacher="careful", target="{rationale} --> {answer}")
    examples = build_examples(records, [stream], tok, 256, 256)
    enc_len, dec_len = suggest_lengths(examples, size["encoder_length"])
    s_arch = ARCHS[arch_name]
    s_cfg = _t5cfg(s_arch, vocab, dtype)
    t_archs, counts = {}, {}
    for f in FACTORS:
        t_archs[f], counts["student"], counts[f"teacher{f}x"] = teacher_arch(s_arch, vocab, f)
    mesh = sharding.make_mesh(MeshConfig())
    divisor = sharding.batch_divisor(mesh)
    rows = -(-(rows or size["rows"]) // divisor) * divisor  # rows split over the data axes
    k, chunk = size["top_k"], size["chunk"]
    logits_dir = work / f"top{k}"
    stored = KDTeacherConfig(name="teacher", model="random 2x", logits=str(logits_dir), top_k=k, weight=0.3,
                             temperature=2.0)
    cfg = Config(model=ModelConfig(dtype=dtype, dropout_rate=0.1),
                 data=DataConfig(streams=[stream], encoder_length=enc_len, decoder_length=dec_len),
                 mesh=MeshConfig(), optim=OptimConfig(learning_rate=5e-5, clip_norm=1.0),
                 train=TrainConfig(steps=10000, batch_size=rows, progress=False),
                 distill=DistillConfig(teachers=[stored], logits_shard_examples=256))
    rules = sharding.logical_rules(cfg.mesh)
    s_params = jax.device_get(nn.unbox(init_params(s_cfg, jax.random.key(0))))
    teachers = {}
    for i, f in enumerate(FACTORS):
        host = jax.device_get(nn.unbox(init_params(_t5cfg(t_archs[f], vocab, dtype), jax.random.key(1 + i))))
        teachers[f] = place_teacher(_t5cfg(t_archs[f], vocab, dtype), host, mesh, rules, "float32", f"random {f}x")
        teachers[f].vocab = vocab  # every row is a token here: nothing masked, as in the online sides
    report = store_soft_labels(cfg, stored, "distill.teachers[0]", teachers[2], tok, examples, mesh, ENCODER_DECODER)
    labels = SoftLabelStore.open(logits_dir)
    examples = labels.attach(examples, list(range(len(examples))), "kd.teacher", "benchmark")
    store = {"bytes_per_token": labels.index["bytes_per_token"],
             "array_bytes_per_token": labels.index["array_bytes_per_token"],
             "tokens": labels.index["tokens"], "logits_seconds": report["seconds"]}
    return Setup(cfg, mesh, tok, records, examples, stream, s_cfg, s_params, teachers, s_arch, t_archs, counts, store,
                 k, chunk)


def make_sides(su: Setup) -> dict[str, dict[str, Any]]:
    """name -> {fn: batch -> outputs, batches, memory}: the student's step alone, the KD step
    with each online teacher and with the stored labels, whole and chunked, and the 2x
    teacher's forward pass alone; all on the same batches."""
    import jax

    from tinyllm_jax.data.packing import PackedIterator
    from tinyllm_jax.data.streams import stream_weights
    from tinyllm_jax.model.family import T5_FAMILY
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.distill import Distillation, kd_spec
    from tinyllm_jax.train.loop import Trainer

    cfg, weights, names = su.cfg, stream_weights([su.stream]), [su.stream.name]
    t = su.cfg.distill.teachers[0]

    def trainer(teacher_factor, stored, chunk):
        optim = dataclasses.replace(cfg.optim, loss_chunk_length=chunk)
        if stored:
            distillation = Distillation((kd_spec(t, None, names),), (None,))
        elif teacher_factor:
            teacher = su.teachers[teacher_factor]
            distillation = Distillation((kd_spec(dataclasses.replace(t, logits=None), teacher.arch, names),), (teacher,))
        else:
            distillation = None
        return Trainer.create(dataclasses.replace(cfg, optim=optim), su.s_cfg, su.mesh, names, weights, su.s_params,
                              distillation)

    def batches(tr):
        it = PackedIterator(su.examples, cfg.train.batch_size, cfg.data.encoder_length, cfg.data.decoder_length,
                            seed=0, process_index=0, process_count=1)
        return (tr.put(b) for b in it)

    def step_side(tr):
        def step(b):
            tr.state, metrics = tr.step_fn(tr.state, b)
            return metrics

        teachers = () if tr.distillation is None else tr.distillation.params()
        compiled = tr.jitted_step.lower(tr.state, next(batches(tr)), *teachers).compile()
        return {"fn": step, "compiled": compiled, "batches": batches(tr)}

    def forward_side(teacher):
        model = T5_FAMILY.module(teacher.arch, True)
        fwd = jax.jit(lambda p, b: model.apply({"params": p}, *(b[k] for k in T5_FAMILY.model_inputs)),
                      in_shardings=(teacher.shardings, sharding.put_batch_shardings(su.mesh)))
        plain = trainer(None, False, 0)
        first = next(batches(plain))
        return {"fn": lambda b: fwd(teacher.params, b), "compiled": fwd.lower(teacher.params, first).compile(),
                "batches": batches(plain)}

    sides = {}
    for chunked in (False, True):
        chunk = su.chunk if chunked else 0
        suffix = "_chunked" if chunked else ""
        sides[f"student_step{suffix}"] = step_side(trainer(None, False, chunk))
        for f in FACTORS:
            sides[f"kd_online_{f}x{suffix}"] = step_side(trainer(f, False, chunk))
        sides[f"kd_stored_top{su.top_k}{suffix}"] = step_side(trainer(None, True, chunk))
    sides["teacher_forward_2x"] = forward_side(su.teachers[2])
    for side in sides.values():
        side["memory"] = _memory(side.pop("compiled"))
        side["times"] = []
    return sides


def host_batch_seconds(su: Setup, n: int = 20) -> dict[str, float]:
    """Median host seconds to build one packed batch, with and without reading the stored
    labels from their memory-mapped shards (the data pipeline's side of stored labels)."""
    from tinyllm_jax.data.packing import PackedIterator

    out = {}
    for name, examples in (("without_stored_labels", dataclasses.replace(su.examples, target_arrays={})),
                           ("with_stored_labels", su.examples)):
        it = PackedIterator(examples, su.cfg.train.batch_size, su.cfg.data.encoder_length, su.cfg.data.decoder_length,
                            seed=0, process_index=0, process_count=1)
        next(it)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def real_tokens_per_batch(su: Setup, n: int = 8) -> float:
    """The median real (non-padding) encoder + decoder tokens of the timed batches."""
    from tinyllm_jax.data.packing import PackedIterator

    it = PackedIterator(su.examples, su.cfg.train.batch_size, su.cfg.data.encoder_length, su.cfg.data.decoder_length,
                        seed=0, process_index=0, process_count=1)
    return float(statistics.median(int((b["encoder_segment_ids"] > 0).sum() + (b["decoder_segment_ids"] > 0).sum())
                                   for b in (next(it) for _ in range(n))))


def summarise(su: Setup, sides: dict[str, dict[str, Any]], arch_name: str, quick: bool) -> dict[str, Any]:
    """Median step times, tokens/s, memory, and the ratios the README quotes."""
    from benchmarks.run import device_info
    from tinyllm_jax.train.metrics import train_flops_per_step

    rows, enc_len, dec_len = su.cfg.train.batch_size, su.cfg.data.encoder_length, su.cfg.data.decoder_length
    vocab, k = su.s_cfg.vocab_size, su.top_k
    med = {name: statistics.median(side["times"]) for name, side in sides.items()}
    real_tokens = real_tokens_per_batch(su)
    peak = {name: side["memory"]["peak_bytes"] for name, side in sides.items()}
    results: dict[str, Any] = {
        "benchmark": "distill", "quick": quick, "date": datetime.date.today().isoformat(),
        "device": device_info(len(os.sched_getaffinity(0))),
        "data": {"source": "demo", "records": len(su.records), "examples": len(su.examples),
                 "stream": dataclasses.asdict(su.stream), "tokenizer_vocab": len(su.tokenizer)},
        "distill": {"weight": 0.3, "temperature": 2.0, "divergence": "forward_kl",
                    "stored": f"the 2x teacher's top-{k} at T = 2"},
        "student": {"arch": arch_name, **su.arch, "vocab_size": vocab, "params": su.params["student"],
                    "dtype": su.s_cfg.dtype},
        "teachers": {f"{f}x": {**su.teacher_archs[f], "params": su.params[f"teacher{f}x"],
                               "params_ratio": su.params[f"teacher{f}x"] / su.params["student"]} for f in FACTORS},
        "batch": {"rows": rows, "encoder_length": enc_len, "decoder_length": dec_len,
                  "real_tokens_median": real_tokens, "loss_chunk_length": su.chunk,
                  "student_train_flops_per_step": train_flops_per_step(su.s_cfg, rows, enc_len, dec_len)},
        "stored_labels": {**su.store, "top_k": k},
        "step_time_s": {name: round(t, 5) for name, t in med.items()},
        "step_times_s": {name: [round(t, 4) for t in side["times"]] for name, side in sides.items()},
        "tokens_per_s": {name: real_tokens / t for name, t in med.items() if name != "teacher_forward_2x"},
        "memory": {name: side["memory"] for name, side in sides.items()},
        "host_batch_s": host_batch_seconds(su),
    }
    ratios = {}
    for base in ("student_step", *(f"kd_online_{f}x" for f in FACTORS), f"kd_stored_top{k}"):
        ratios[f"peak_memory_chunked_over_whole_{base}"] = peak[f"{base}_chunked"] / peak[base]
        ratios[f"step_time_chunked_over_whole_{base}"] = med[f"{base}_chunked"] / med[base]
    for suffix in ("", "_chunked"):
        for f in FACTORS:
            ratios[f"tokens_per_s_stored_top{k}_over_online_{f}x{suffix}"] = (
                med[f"kd_online_{f}x{suffix}"] / med[f"kd_stored_top{k}{suffix}"])
        ratios[f"peak_memory_stored_top{k}_over_online_2x{suffix}"] = peak[f"kd_stored_top{k}{suffix}"] / peak[
            f"kd_online_2x{suffix}"]
    ratios["kd_online_2x_over_student_plus_teacher_forward"] = med["kd_online_2x"] / (
        med["student_step"] + med["teacher_forward_2x"])
    results["ratios"] = ratios
    results["goals"] = {
        "chunked_peak_memory_at_most_half": {
            "figure": ratios["peak_memory_chunked_over_whole_kd_online_2x"], "goal": 0.5,
            "met": ratios["peak_memory_chunked_over_whole_kd_online_2x"] <= 0.5,
            "student_alone": ratios["peak_memory_chunked_over_whole_student_step"]},
        f"stored_top{k}_at_least_1.5x_online_2x_tokens_per_s": {
            "figure": ratios[f"tokens_per_s_stored_top{k}_over_online_2x"], "goal": 1.5,
            "met": ratios[f"tokens_per_s_stored_top{k}_over_online_2x"] >= 1.5,
            "chunked": ratios[f"tokens_per_s_stored_top{k}_over_online_2x_chunked"]},
    }
    return results


def run(*, quick: bool = False, arch_name: str | None = None, dtype: str = "float32", vocab: int | None = None,
        rows: int | None = None, out_dir: Path | None = RESULTS, log=print) -> dict[str, Any]:
    """Runs the benchmark; returns the results and, with `out_dir`, writes them there."""
    from benchmarks.run import write_result

    size = SIZES["quick" if quick else "full"]
    arch_name = arch_name or ("t5-tiny" if quick else "t5-cpu-small")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        su = prepare(size, arch_name, dtype, vocab, rows, Path(tmp))
        sides = make_sides(su)
        for r in range(size["rounds"]):  # alternate, so that outside load falls on every side alike
            for name, side in sides.items():
                log(f"[distill] round {r + 1}/{size['rounds']}: {name}")
                side["times"] += _timed(side["fn"], side["batches"], size["warmup"] if r == 0 else 0, size["steps"])
        results = summarise(su, sides, arch_name, quick)
    results["notes"] = [
        "tokens/s: the median real (non-padding) encoder + decoder tokens of a batch over the median step time; "
        "every side runs on the same batches, so tokens/s ratios are step-time ratios",
        "chunked: the student's and every online teacher's vocabulary logits for loss_chunk_length decoder "
        "positions at a time, recomputed in the backward pass",
        "stored: the step reads the top-k ids, log-probabilities and tail mass from the batch; producing them "
        "(tinyllm logits, once) took stored_labels.logits_seconds",
        "memory: XLA's buffer assignment of each compiled function (arguments include the donated state)",
    ]
    results["seconds"] = round(time.time() - started, 1)
    results["device"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if out_dir is not None:
        write_result(results, out_dir, "distill", quick)
    return results


def compiled_memory(*, quick: bool = False, log=print) -> dict[str, Any]:
    """Compile-only (nothing runs): the step's peak memory, whole and chunked, where the
    vocabulary dominates: the T5 student at a 32k vocabulary with more rows a step (alone and
    with the online 2x teacher), and a decoder-only student at Qwen2's 151,936-token
    vocabulary (alone and with stored top-64 labels)."""
    import jax
    import numpy as np
    from flax import linen as nn

    from benchmarks.run import ARCHS
    from tinyllm_jax.config import Config, DataConfig, DistillConfig, KDTeacherConfig, MeshConfig, OptimConfig, StreamConfig, TrainConfig
    from tinyllm_jax.model.decoder import DecoderConfig
    from tinyllm_jax.model.family import family_of
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.distill import Distillation, kd_spec, place_teacher
    from tinyllm_jax.train.loop import Trainer

    mesh = sharding.make_mesh(MeshConfig())
    names = ["chain"]
    stream = StreamConfig("chain", "", 0.7)
    t = KDTeacherConfig(name="teacher", weight=0.3, temperature=2.0)
    vocab_t5, vocab_dec = (512, 2048) if quick else (32128, 151936)
    k, chunk = (16, 16) if quick else (64, 16)

    def zeros(arch):
        return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                            nn.unbox(jax.eval_shape(lambda key: family_of(arch).init(arch, key), jax.random.key(0))))

    def peak(arch, rows, lengths, distillation, chunk_length):
        cfg = Config(data=DataConfig(streams=[stream]), mesh=MeshConfig(),
                     optim=OptimConfig(learning_rate=5e-5, clip_norm=1.0, loss_chunk_length=chunk_length),
                     train=TrainConfig(steps=100, batch_size=rows, progress=False), distill=DistillConfig())
        tr = Trainer.create(cfg, arch, mesh, names, np.asarray([0.7], np.float32), zeros(arch), distillation)
        keys = family_of(arch).model_inputs + ("decoder_target_tokens", "decoder_stream_ids")
        batch = {key: np.ones((rows, lengths[0] if key.startswith("encoder") else lengths[1]), np.int32) for key in keys}
        batch["decoder_stream_ids"][:] = 0
        if family_of(arch).name == "decoder":
            batch["decoder_loss_weights"] = np.ones((rows, lengths[1]), np.int32)
        if distillation is not None and distillation.specs[0].stored:
            batch |= {"kd.teacher.ids": np.zeros((rows, lengths[1], k), np.int32 if vocab_dec > 65536 else np.uint16),
                      "kd.teacher.log_probs": np.zeros((rows, lengths[1], k), np.float32),
                      "kd.teacher.tail_log_prob": np.zeros((rows, lengths[1]), np.float32)}
        teachers = () if distillation is None else distillation.params()
        return _memory(tr.jitted_step.lower(tr.state, tr.put(batch), *teachers).compile())

    out: dict[str, Any] = {"loss_chunk_length": chunk}
    s_arch = ARCHS["t5-tiny" if quick else "t5-cpu-small"]
    s_cfg = _t5cfg(s_arch, vocab_t5)
    t_arch, _, _ = teacher_arch(s_arch, vocab_t5, 2.0)
    teacher = place_teacher(_t5cfg(t_arch, vocab_t5), zeros(_t5cfg(t_arch, vocab_t5)), mesh,
                            sharding.logical_rules(MeshConfig()), "float32", "zeros 2x")
    online = Distillation((kd_spec(t, teacher.arch, names),), (teacher,))
    for rows in ((4,) if quick else (8, 32)):
        for side, distillation in (("student_step", None), ("kd_online_2x", online)):
            for c in (0, chunk):
                name = f"t5_{vocab_t5}_{rows}rows_{side}{'_chunked' if c else ''}"
                log(f"[distill memory] {name}")
                out[name] = peak(s_cfg, rows, (192, 128), distillation, c)
    dec = DecoderConfig(vocab_size=vocab_dec, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, model_type="qwen2", attention_bias=True,
                        tie_word_embeddings=True)
    stored = Distillation((kd_spec(t, None, names),), (None,))
    for side, distillation in (("student_step", None), (f"kd_stored_top{k}", stored)):
        for c in (0, chunk):
            name = f"decoder_{vocab_dec}_8rows_{side}{'_chunked' if c else ''}"
            log(f"[distill memory] {name}")
            out[name] = peak(dec, 8, (256, 256), distillation, c)
    out["ratios"] = {name: out[f"{name}_chunked"]["peak_bytes"] / out[name]["peak_bytes"]
                     for name in list(out) if isinstance(out[name], dict) and f"{name}_chunked" in out}
    out["decoder"] = dataclasses.asdict(dec)
    return out


def table(r: dict[str, Any]) -> str:
    mib = 2 ** 20
    t2, t4 = r["teachers"]["2x"], r["teachers"]["4x"]
    lines = [f"distill: student {r['student']['arch']} ({r['student']['params'] / 1e6:.1f}M, vocabulary "
             f"{r['student']['vocab_size']}), teachers {t2['params'] / 1e6:.1f}M ({t2['params_ratio']:.2f}x) and "
             f"{t4['params'] / 1e6:.1f}M ({t4['params_ratio']:.2f}x); {r['batch']['rows']} rows of "
             f"{r['batch']['encoder_length']} / {r['batch']['decoder_length']}, chunks of "
             f"{r['batch']['loss_chunk_length']} positions",
             f"{'':28} {'step (s)':>10} {'tokens/s':>10} {'peak MiB':>10}"]
    for name, t in r["step_time_s"].items():
        tps = r["tokens_per_s"].get(name)
        lines.append(f"{name:28} {t:10.4f} {'' if tps is None else round(tps):>10} "
                     f"{r['memory'][name]['peak_bytes'] / mib:10.1f}")
    for name, g in r["goals"].items():
        lines.append(f"goal {name}: {g['figure']:.3f} (goal {g['goal']}) {'met' if g['met'] else 'NOT met'}")
    s = r["stored_labels"]
    lines.append(f"stored top-{s['top_k']}: {s['bytes_per_token']:.0f} bytes a token on disk, written in "
                 f"{s['logits_seconds']:.1f} s; host batch {r['host_batch_s']['with_stored_labels'] * 1e3:.1f} ms with "
                 f"them, {r['host_batch_s']['without_stored_labels'] * 1e3:.1f} ms without")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import ARCHS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.distill_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the code path at toy size")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="the student (default t5-cpu-small; --quick: t5-tiny)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the student's compute dtype")
    ap.add_argument("--vocab", type=int, help="the models' vocabulary size (default 32128; --quick: 512)")
    ap.add_argument("--rows", type=int, help="packed rows a step (default 8; --quick: 4)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    ap.add_argument("--memory", action="store_true",
                    help="only the compile-only memory section (more rows, a 152k-vocabulary decoder student)")
    args = ap.parse_args(argv)
    if args.memory:
        from benchmarks.run import write_result

        mem = compiled_memory(quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
        mem.setdefault("date", datetime.date.today().isoformat())
        path = write_result(mem, args.out, "distill-memory", args.quick)
        for name, ratio in mem["ratios"].items():
            print(f"{name:44} peak {mem[name]['peak_bytes'] / 2**20:9.1f} MiB, chunked "
                  f"{mem[name + '_chunked']['peak_bytes'] / 2**20:9.1f} MiB: x{ratio:.3f}")
        print(f"\nwrote {path}")
        return 0
    results = run(quick=args.quick, arch_name=args.arch, dtype=args.dtype, vocab=args.vocab, rows=args.rows,
                  out_dir=Path(args.out),
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(results))
    print(f"\nwrote {results['path']} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    from tinyllm_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages("benchmarks.distill_speed", sys.argv[1:])  # as `tinyllm` and benchmarks.run do
    sys.exit(main())
