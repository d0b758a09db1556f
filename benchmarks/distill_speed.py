"""Distillation cost: the fused KD train step (student step plus the frozen teacher's forward
pass, one jit, same packed batch) against its parts measured alone, and the step's memory
with and without the teacher (fp32 and bf16 teacher).

    python -m benchmarks.distill_speed            # the CPU student (t5-cpu-small), a few minutes
    python -m benchmarks.distill_speed --quick    # the same code path at toy size (the smoke test)
    python -m benchmarks.distill_speed --arch t5-base --dtype bfloat16 --vocab 32128 --rows 64   # a GPU

Writes benchmarks/results/distill-<device>-<date>[-quick].json. The teacher is the student's
architecture with more layers, as many as bring its parameter count nearest 2x the student's.
Both models are randomly initialised (timings depend on shapes only); the data is the
embedded demo set in Mentor-KD's form: one rationale stream, `{rationale} --> {answer}`,
stream weight 0.7, distill weight 0.3, T = 2, forward KL. Timed sides alternate in rounds
(compile excluded) so that outside load falls on all alike; figures are medians over steps.
Memory is XLA's buffer assignment of each compiled step (`memory_analysis()`): arguments
(state, batch, teacher) + outputs - donated + temporaries, the same figure on every backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# records, tokenizer vocabulary, the models' vocabulary (the softmaxes KD compares; the
# cpu suite's size, T5's is 32128), rows a step, encoder row length, rounds, steps a round
SIZES = {
    "full": dict(records=400, vocab=2000, model_vocab=8192, rows=8, encoder_length=192, rounds=3, steps=3, warmup=1),
    "quick": dict(records=48, vocab=300, model_vocab=256, rows=4, encoder_length=128, rounds=1, steps=2, warmup=1),
}


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
    examples: Any
    stream: Any
    s_cfg: Any
    s_params: Any
    teachers: dict[str, Any]  # dtype -> Teacher on the mesh
    arch: dict[str, Any]
    teacher_arch: dict[str, Any]
    params: tuple[int, int]  # student, teacher


def prepare(size: dict[str, Any], arch_name: str, dtype: str, vocab: int | None, rows: int | None) -> Setup:
    """Demo records in Mentor-KD's form, a tokenizer, a random student and a random teacher
    about twice its size (fp32 and bf16 copies on the mesh)."""
    import jax
    from flax import linen as nn

    from benchmarks.run import ARCHS, train_tokenizer
    from tinyllm_jax.config import Config, DataConfig, DistillConfig, MeshConfig, ModelConfig, OptimConfig, StreamConfig, TrainConfig
    from tinyllm_jax.data.demo import make_demo_records
    from tinyllm_jax.data.packing import suggest_lengths
    from tinyllm_jax.data.streams import build_examples
    from tinyllm_jax.model.t5 import init_params
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.distill import place_teacher

    records = make_demo_records(size["records"], 0, "train")
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(records, Path(tmp) / "tok", size["vocab"])
    vocab = max(vocab or size["model_vocab"], -(-len(tok) // 128) * 128)
    stream = StreamConfig("chain", "explain: ", 0.7, teacher="careful", target="{rationale} --> {answer}")
    examples = build_examples(records, [stream], tok, 256, 256)
    enc_len, dec_len = suggest_lengths(examples, size["encoder_length"])
    s_arch = ARCHS[arch_name]
    t_arch, n_student, n_teacher = teacher_arch(s_arch, vocab)
    s_cfg, t_cfg = _t5cfg(s_arch, vocab, dtype), _t5cfg(t_arch, vocab, dtype)
    mesh = sharding.make_mesh(MeshConfig())
    divisor = sharding.batch_divisor(mesh)
    rows = -(-(rows or size["rows"]) // divisor) * divisor  # rows split over the data axes
    cfg = Config(model=ModelConfig(dtype=dtype, dropout_rate=0.1),
                 data=DataConfig(streams=[stream], encoder_length=enc_len, decoder_length=dec_len),
                 mesh=MeshConfig(), optim=OptimConfig(learning_rate=5e-5, clip_norm=1.0),
                 train=TrainConfig(steps=10000, batch_size=rows, progress=False),
                 distill=DistillConfig(teacher="random", weight=0.3, temperature=2.0))
    rules = sharding.logical_rules(cfg.mesh)
    s_params = jax.device_get(nn.unbox(init_params(s_cfg, jax.random.key(0))))
    t_host = jax.device_get(nn.unbox(init_params(t_cfg, jax.random.key(1))))
    teachers = {d: place_teacher(t_cfg, t_host, mesh, rules, d, "random") for d in ("float32", "bfloat16")}
    return Setup(cfg, mesh, tok, records, examples, stream, s_cfg, s_params, teachers, s_arch, t_arch,
                 (n_student, n_teacher))


def make_sides(su: Setup) -> dict[str, dict[str, Any]]:
    """name -> {fn: batch -> outputs, batches, memory}: the student's step alone, the KD step
    with each teacher copy, each teacher's forward pass alone; all on the same batches."""
    import jax

    from tinyllm_jax.config import DistillConfig
    from tinyllm_jax.data.packing import PackedIterator
    from tinyllm_jax.data.streams import stream_weights
    from tinyllm_jax.model.t5 import T5
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.loop import MODEL_INPUTS, Trainer

    cfg, weights = su.cfg, stream_weights([su.stream])

    def trainer(teacher):
        distill = DistillConfig() if teacher is None else dataclasses.replace(cfg.distill, dtype=teacher.arch.dtype)
        return Trainer.create(dataclasses.replace(cfg, distill=distill), su.s_cfg, su.mesh, [su.stream.name],
                              weights, su.s_params, teacher)

    def step_side(tr):
        def step(b):
            tr.state, metrics = tr.step_fn(tr.state, b)
            return metrics

        extra = () if tr.teacher is None else (tr.teacher.params,)
        return {"fn": step, "compiled": tr.jitted_step.lower(tr.state, first, *extra).compile()}

    def forward_side(teacher):
        model = T5(teacher.arch, deterministic=True)
        fwd = jax.jit(lambda p, b: model.apply({"params": p}, *(b[k] for k in MODEL_INPUTS)),
                      in_shardings=(teacher.shardings, sharding.put_batch_shardings(su.mesh)))
        return {"fn": lambda b: fwd(teacher.params, b), "compiled": fwd.lower(teacher.params, first).compile()}

    plain = trainer(None)

    def batches():
        it = PackedIterator(su.examples, cfg.train.batch_size, cfg.data.encoder_length, cfg.data.decoder_length,
                            seed=0, process_index=0, process_count=1)
        return (plain.put(b) for b in it)

    first = next(batches())
    sides = {"student_step": step_side(plain)}
    for d, teacher in su.teachers.items():
        sides[f"kd_step_{d}_teacher"] = step_side(trainer(teacher))
    for d, teacher in su.teachers.items():
        sides[f"teacher_forward_{d}"] = forward_side(teacher)
    for side in sides.values():
        side["memory"] = _memory(side.pop("compiled"))
        side["batches"] = batches()
        side["times"] = []
    return sides


def summarise(su: Setup, sides: dict[str, dict[str, Any]], arch_name: str, quick: bool) -> dict[str, Any]:
    """Median step times, memory, and the ratios the README quotes."""
    from benchmarks.run import device_info
    from tinyllm_jax.train.metrics import train_flops_per_step

    rows, enc_len, dec_len = su.cfg.train.batch_size, su.cfg.data.encoder_length, su.cfg.data.decoder_length
    (n_student, n_teacher), vocab = su.params, su.s_cfg.vocab_size
    med = {name: statistics.median(side["times"]) for name, side in sides.items()}
    results: dict[str, Any] = {
        "benchmark": "distill", "quick": quick, "date": datetime.date.today().isoformat(),
        "device": device_info(len(os.sched_getaffinity(0))),
        "data": {"source": "demo", "records": len(su.records), "examples": len(su.examples),
                 "stream": dataclasses.asdict(su.stream), "tokenizer_vocab": len(su.tokenizer)},
        "distill": dataclasses.asdict(su.cfg.distill) | {"teacher": "random init, about 2x the student"},
        "student": {"arch": arch_name, **su.arch, "vocab_size": vocab, "params": n_student, "dtype": su.s_cfg.dtype},
        "teacher": {**su.teacher_arch, "vocab_size": vocab, "params": n_teacher, "params_ratio": n_teacher / n_student},
        "batch": {"rows": rows, "encoder_length": enc_len, "decoder_length": dec_len,
                  "student_train_flops_per_step": train_flops_per_step(su.s_cfg, rows, enc_len, dec_len),
                  "teacher_forward_flops_per_step": train_flops_per_step(
                      su.teachers["float32"].arch, rows, enc_len, dec_len) / 3},
        "step_time_s": {name: round(t, 5) for name, t in med.items()},
        "step_times_s": {name: [round(t, 4) for t in side["times"]] for name, side in sides.items()},
        "memory": {name: side["memory"] for name, side in sides.items()},
    }
    for d in su.teachers:
        parts = med["student_step"] + med[f"teacher_forward_{d}"]
        results[f"ratio_kd_step_to_parts_{d}"] = med[f"kd_step_{d}_teacher"] / parts
        results[f"kd_step_over_student_step_{d}"] = med[f"kd_step_{d}_teacher"] / med["student_step"]
        results[f"peak_memory_ratio_{d}_teacher"] = (results["memory"][f"kd_step_{d}_teacher"]["peak_bytes"]
                                                     / results["memory"]["student_step"]["peak_bytes"])
    return results


def run(*, quick: bool = False, arch_name: str | None = None, dtype: str = "float32", vocab: int | None = None,
        rows: int | None = None, out_dir: Path | None = RESULTS, log=print) -> dict[str, Any]:
    """Runs the benchmark; returns the results and, with `out_dir`, writes them there."""
    from benchmarks.run import device_slug

    size = SIZES["quick" if quick else "full"]
    arch_name = arch_name or ("t5-tiny" if quick else "t5-cpu-small")
    started = time.time()
    su = prepare(size, arch_name, dtype, vocab, rows)
    sides = make_sides(su)
    for r in range(size["rounds"]):  # alternate, so that outside load falls on every side alike
        for name, side in sides.items():
            log(f"[distill] round {r + 1}/{size['rounds']}: {name}")
            side["times"] += _timed(side["fn"], side["batches"], size["warmup"] if r == 0 else 0, size["steps"])

    results = summarise(su, sides, arch_name, quick)
    results["notes"] = [
        "ratio_kd_step_to_parts = fused KD step / (student step alone + teacher forward alone): at or below 1, "
        "the fused step costs no more than its parts (it adds the divergence over the vocabulary, and the "
        "parts' separate dispatches are saved)",
        "teacher_forward_flops_per_step: a third of the trainer's forward-plus-backward formula",
        "memory: XLA's buffer assignment of each compiled function (arguments include the donated state)",
    ]
    results["seconds"] = round(time.time() - started, 1)
    results["device"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"distill-{device_slug()}-{results['date']}{'-quick' if quick else ''}.json"
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        results["path"] = str(path)
    return results


def table(r: dict[str, Any]) -> str:
    mib = 2 ** 20
    lines = [f"distill: student {r['student']['arch']} ({r['student']['params'] / 1e6:.1f}M), teacher "
             f"{r['teacher']['num_layers']} layers ({r['teacher']['params'] / 1e6:.1f}M, "
             f"{r['teacher']['params_ratio']:.2f}x); {r['batch']['rows']} rows of "
             f"{r['batch']['encoder_length']} / {r['batch']['decoder_length']}",
             f"{'':32} {'step (s)':>10} {'peak MiB':>10}"]
    for name, t in r["step_time_s"].items():
        lines.append(f"{name:32} {t:10.4f} {r['memory'][name]['peak_bytes'] / mib:10.1f}")
    for d in ("float32", "bfloat16"):
        lines.append(f"KD step / (student step + teacher forward), {d} teacher: "
                     f"{r[f'ratio_kd_step_to_parts_{d}']:.3f}; peak memory x{r[f'peak_memory_ratio_{d}_teacher']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import ARCHS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.distill_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the code path at toy size")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="the student (default t5-cpu-small; --quick: t5-tiny)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the student's compute dtype")
    ap.add_argument("--vocab", type=int, help="the models' vocabulary size (default 8192; --quick: 256)")
    ap.add_argument("--rows", type=int, help="packed rows a step (default 8; --quick: 4)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    args = ap.parse_args(argv)
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
