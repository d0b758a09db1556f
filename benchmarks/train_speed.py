"""Training speed: real (non-pad) tokens/s of our trainer against the reference-style
PyTorch trainer (benchmarks/reference_torch.py), same weights, same data, same records a step.

Ours runs the project's own path end to end: `build_examples` -> `PackedIterator` ->
`Trainer.create(...).step_fn` (the jitted, sharded step with the fused per-stream loss), for a
student of either family (told by the checkpoint's config.json, as the trainer tells it). Its
global batch is the number of packed rows that holds, on average, the examples of the
reference's `records_per_step` records (one example a record and stream). Both sides are
timed after warm-up (compile excluded), in alternating rounds so that load from other
processes on a shared machine falls on both alike; figures are medians over steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.reference_torch import ReferenceTrainer, RefStream, causal_features, time_steps, tokenize_records
from tinyllm_jax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, StreamConfig, TrainConfig
from tinyllm_jax.data.packing import CAUSAL, ENCODER_DECODER, Layout, PackedIterator, long_factor, pack_rows, \
    suggest_lengths
from tinyllm_jax.data.streams import ENCODER_INPUT, Examples, Prompt, build_examples, stream_weights

REFERENCE_MAX_INPUT = 100  # TinyLLM's command-line default, the length its code actually pads to


@dataclasses.dataclass
class OurRun:
    """Our trainer and its packed data, ready to step."""

    trainer: Any
    data: PackedIterator
    arch: Any
    rows: int
    encoder_length: int  # a causal row: the sequence length, here and in decoder_length
    decoder_length: int

    @property
    def causal(self) -> bool:
        return self.data.layout is CAUSAL


def rows_for_records(examples: Examples, records_per_step: int, encoder_length: int, decoder_length: int,
                     multiple: int = 1, layout: Layout = ENCODER_DECODER) -> tuple[int, float]:
    """(packed rows a step, examples a row): the rows that hold, on average, the examples of
    `records_per_step` records (measured by packing one epoch of the examples that fit a
    row), rounded to the nearest multiple of `multiple`."""
    sizes = layout.lengths(examples)
    fits = np.flatnonzero((sizes.enc_lengths <= encoder_length) & (sizes.dec_lengths <= decoder_length))
    rows = pack_rows(sizes.enc_lengths, sizes.dec_lengths, np.random.default_rng(0).permutation(fits),
                     encoder_length, decoder_length)
    per_row = len(fits) / len(rows)
    per_record = len(examples) / max(1, len(set(examples.record_index.tolist())))
    n = records_per_step * per_record / per_row
    return max(multiple, round(n / multiple) * multiple), per_row


def make_our_run(model_dir: str, examples: Examples, streams: Sequence[StreamConfig], rows: int,
                 encoder_length: int, decoder_length: int, *, dtype: str = "float32", remat: str = "none",
                 total_steps: int = 10000, seed: int = 0) -> OurRun:
    """Our trainer, initialised from the HF checkpoint `model_dir` (the same weights the
    reference loads), with the references' optimizer: AdamW 5e-5, linear decay, clip 1.0. A
    decoder-only checkpoint packs causal rows of `encoder_length` (= `decoder_length`)."""
    from tinyllm_jax.data.packing import layout_of
    from tinyllm_jax.model.family import family_of, load_pretrained
    from tinyllm_jax.runtime import sharding
    from tinyllm_jax.train.loop import Trainer

    params, arch, _ = load_pretrained(model_dir, tokenizer=False)
    arch = arch.replace(dtype=dtype, remat=remat)
    layout = layout_of(family_of(arch).layout)
    lengths = dict(sequence_length=encoder_length) if layout is CAUSAL else {}
    cfg = Config(
        model=ModelConfig(dtype=dtype, remat=remat, dropout_rate=arch.dropout_rate),
        data=DataConfig(streams=list(streams), encoder_length=encoder_length, decoder_length=decoder_length,
                        **lengths),
        mesh=MeshConfig(),
        optim=OptimConfig(name="adamw", learning_rate=5e-5, schedule="linear", clip_norm=1.0),
        train=TrainConfig(steps=total_steps, batch_size=rows, seed=seed, progress=False),
    )
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer.create(cfg, arch, mesh, [s.name for s in streams], stream_weights(streams), params)
    data = PackedIterator(examples, rows, encoder_length, decoder_length, seed=seed, process_index=0, process_count=1,
                          layout=layout)
    return OurRun(trainer, data, arch, rows, encoder_length, decoder_length)


def time_our_steps(run: OurRun, warmup: int, steps: int) -> tuple[list[float], list[dict[str, int]]]:
    """Seconds of each of `steps` timed steps after `warmup` untimed ones (the first compiles).
    Steps run as the training loop runs them: step N+1 is built and dispatched before step N's
    metrics are read, so host batch building overlaps device work; a step's time is the time
    between the completions of consecutive steps."""
    import jax

    def dispatch():
        batch = next(run.data)
        run.trainer.state, metrics = run.trainer.step_fn(run.trainer.state, run.trainer.put(batch))
        return metrics, batch_counts(batch, run.causal)

    for _ in range(warmup):
        jax.block_until_ready(dispatch()[0])
    if warmup and run.data.long_factor > 1:  # compile the long-batch shape too, untimed
        batch = run.data.batch(run.data.epoch_plan(0)[1][0], run.data.long_factor)
        run.trainer.state, metrics = run.trainer.step_fn(run.trainer.state, run.trainer.put(batch))
        jax.block_until_ready(metrics)
    jax.block_until_ready(run.trainer.state)
    times, counts = [], []
    last = time.perf_counter()
    pending = dispatch()
    for i in range(steps):
        following = dispatch() if i + 1 < steps else None
        metrics, count = pending
        count["loss"] = float(metrics["loss"])  # waits for that step, as the loop's log does
        now = time.perf_counter()
        times.append(now - last)
        counts.append(count)
        last, pending = now, following
    return times, counts


def batch_counts(batch: dict[str, np.ndarray], causal: bool) -> dict[str, int]:
    """Real (non-pad) tokens, computed places and examples of a packed batch, counted as the
    reference counts its own. A causal row computes each example's tokens but its last (the
    input of position t is token t, its target token t + 1): its real tokens are those
    positions plus one an example, the reference's attention-mask sum, while its real-token
    fraction is that of the computed positions."""
    dec = batch["decoder_segment_ids"]
    examples = int(dec.max(axis=1).sum())
    if causal:
        positions = int((dec > 0).sum())
        return {"real_tokens": positions + examples, "real_positions": positions, "slot_tokens": dec.size,
                "target_tokens": int(batch["decoder_loss_weights"].sum()), "examples": examples}
    enc = batch["encoder_segment_ids"]
    return {"real_tokens": int((enc > 0).sum() + (dec > 0).sum()), "slot_tokens": enc.size + dec.size,
            "target_tokens": int((dec > 0).sum()), "examples": examples}


def summarise(times: Sequence[float], counts: Sequence[dict[str, Any]], flops_per_step: float,
              peak: float | None) -> dict[str, Any]:
    """Median step time, real tokens/s (mean real tokens a step over the median step time),
    target tokens/s (the tokens the loss is taken on) where counted, real-token fraction,
    achieved TFLOP/s and, with a known peak, MFU."""
    med = statistics.median(times)
    real = statistics.fmean(c["real_tokens"] for c in counts)
    computed = statistics.fmean(c.get("real_positions", c["real_tokens"]) for c in counts)
    slots = statistics.fmean(c["slot_tokens"] for c in counts)
    out = {
        "step_time_s": med, "step_times_s": [round(t, 4) for t in times],
        "real_tokens_per_step": real, "real_tokens_per_s": real / med, "real_token_fraction": computed / slots,
        "flops_per_step": flops_per_step, "achieved_tflops_per_s": flops_per_step / med / 1e12,
        "mfu": (flops_per_step / med / peak) if peak else None,
        "final_loss": counts[-1].get("loss"),
    }
    if "examples" in counts[0]:
        out["examples_per_step"] = statistics.fmean(c["examples"] for c in counts)
    if "target_tokens" in counts[0]:
        out["target_tokens_per_step"] = statistics.fmean(c["target_tokens"] for c in counts)
        out["target_tokens_per_s"] = out["target_tokens_per_step"] / med
    return out


def reference_flops(arch, shapes: Sequence[tuple[tuple[int, int], ...]]) -> float:
    """FLOPs of the reference's forward passes by the trainer's formula (padding computed):
    shapes (inputs, labels) of a T5's passes, (inputs,) of a decoder-only model's."""
    from tinyllm_jax.model.family import family_of

    flops = family_of(arch).flops
    return sum(flops(arch, first[0], first[1], rest[0][1] if rest else 0) for first, *rest in shapes)


def train_benchmark(model_dir: str, tokenizer, records: Sequence[dict[str, Any]], streams: Sequence[StreamConfig], *,
                    records_per_step: int, micro_batch: int, encoder_length: int | None = None,
                    decoder_length: int | None = None, max_input_length: int = REFERENCE_MAX_INPUT,
                    dtype: str = "float32", remat: str = "none", rounds: int = 3, steps_per_round: int = 2,
                    warmup: int = 1, reference: bool = True, reference_device: str = "cpu",
                    long_batches: bool = False, sequence_length: int | None = None) -> dict[str, Any]:
    """Ours against the reference on the same records (each with every stream's rationale),
    weights and records a step. Returns both sides' figures and the ratios of real tokens/s
    (and of target tokens/s). With `long_batches` our rows are sized for the data's ratio,
    not for its longest target (PackedIterator's long batches take the few longer examples).

    A decoder-only checkpoint (config.json's model_type) packs causal rows of
    `sequence_length` (prompt + target; `max_input_length` then only cuts prompts), and the
    reference trains it as SFT trainers do (reference_torch.py) on the same token sequences."""
    import jax

    from tinyllm_jax.model.family import DECODER_TYPES, family_of
    from tinyllm_jax.train.metrics import param_count, peak_flops_per_device

    if records_per_step % micro_batch:
        raise ValueError(f"records_per_step={records_per_step} is not a multiple of micro_batch={micro_batch}")
    causal = json.loads((Path(model_dir) / "config.json").read_text())["model_type"] in DECODER_TYPES
    examples = build_examples(records, streams, tokenizer, max_input_length, 256, lenient=True,
                              prompt=Prompt(causal=True) if causal else ENCODER_INPUT)
    layout = CAUSAL if causal else ENCODER_DECODER
    if causal:
        if sequence_length is None:
            raise ValueError("a decoder-only student needs sequence_length (its packed row length)")
        encoder_length = decoder_length = sequence_length
    elif encoder_length is None or decoder_length is None:
        encoder_length, decoder_length = suggest_lengths(examples, encoder_length, cover_longest=not long_batches)
    # long batches take rows / f
    multiple = jax.device_count() * long_factor(layout.lengths(examples), encoder_length, decoder_length)
    rows, per_row = rows_for_records(examples, records_per_step, encoder_length, decoder_length, multiple, layout)
    ours = make_our_run(model_dir, examples, streams, rows, encoder_length, decoder_length, dtype=dtype, remat=remat)
    peak = peak_flops_per_device()
    peak_total = peak * jax.device_count() if peak else None
    ref = None
    if reference:
        ref_streams = [RefStream(s.name, s.prefix, s.weight, s.teacher) for s in streams]
        if causal:
            features = causal_features(examples, ref_streams)
        else:
            features = tokenize_records(records, ref_streams, tokenizer, max_input_length)
        ref = ReferenceTrainer(model_dir, tokenizer, ref_streams, micro_batch, records_per_step // micro_batch,
                               bf16=dtype == "bfloat16", device=reference_device, causal=causal)
    ours_t, ours_c, ref_t, ref_c, pos, others = [], [], [], [], 0, {"ours": [], "reference": []}
    for r in range(rounds):  # alternate, so that outside load falls on both sides alike
        with _others_busy(others["ours"]):
            t, c = time_our_steps(ours, warmup if r == 0 else 0, steps_per_round)
        ours_t += t
        ours_c += c
        if ref is not None:
            with _others_busy(others["reference"]):
                t, c, pos = time_steps(ref, features, warmup if r == 0 else 0, steps_per_round, pos)
            ref_t += t
            ref_c += c
    flops = family_of(ours.arch).flops(ours.arch, rows, encoder_length, decoder_length)
    result = {
        "records_per_step": records_per_step, "dtype": dtype, "remat": remat,
        "max_input_length": max_input_length, "timed_steps": len(ours_t),
        "other_processes_cores_by_round": others,
        "ours": {**summarise(ours_t, ours_c, flops, peak_total), "rows": rows,
                 **({"sequence_length": encoder_length} if causal else
                    {"encoder_length": encoder_length, "decoder_length": decoder_length}),
                 "examples_per_row_epoch": round(per_row, 2),
                 "long_batch_examples": ours.data.long_examples, "long_batch_factor": ours.data.long_factor,
                 "params": param_count(ours.trainer.state["params"])},
    }
    if ref is not None:
        ref_flops = statistics.fmean(reference_flops(ours.arch, c["shapes"]) for c in ref_c)
        result["reference"] = {**summarise(ref_t, ref_c, ref_flops, peak_total), "micro_batch": micro_batch,
                               "accum_steps": records_per_step // micro_batch,
                               "forward_passes_per_step": len(ref_c[0]["shapes"]),
                               "fused_adamw": ref.fused, "params": ref.param_count(),
                               "device": reference_device, "bf16_autocast": ref.bf16}
        ours_rate, ref_rate = result["ours"]["real_tokens_per_s"], result["reference"]["real_tokens_per_s"]
        result["ratio_real_tokens_per_s"] = ours_rate / ref_rate
        result["ratio_target_tokens_per_s"] = (result["ours"]["target_tokens_per_s"]
                                               / result["reference"]["target_tokens_per_s"])
        result["ratio_step_time"] = result["reference"]["step_time_s"] / result["ours"]["step_time_s"]
        del ref
        _free_torch_memory()
    return result


@contextlib.contextmanager
def _others_busy(out: list):
    """Appends the cores that other processes kept busy while the block ran (/proc/stat; None
    where it cannot be read): a shared machine's load, which slows torch's threads more than XLA's."""
    from benchmarks.generation import _cpu_seconds

    (busy0, own0), t0 = _cpu_seconds(), time.perf_counter()
    yield
    (busy1, own1), wall = _cpu_seconds(), time.perf_counter() - t0
    out.append(None if busy0 is None else round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, 2))


def _free_torch_memory() -> None:
    """Hands the baseline's cached accelerator memory back before our larger batches run."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_tflops(dtype: str, n: int = 4096, repeats: int = 10) -> float:
    """The TFLOP/s one large square matmul reaches here: the practical peak, next to the datasheet's."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def mfu_sweep(model_dir: str, tokenizer, records: Sequence[dict[str, Any]], streams: Sequence[StreamConfig],
              configs: Sequence[dict[str, Any]], *, encoder_length: int | None = None,
              decoder_length: int | None = None, max_input_length: int = REFERENCE_MAX_INPUT,
              dtype: str = "bfloat16", steps: int = 5, warmup: int = 2) -> list[dict[str, Any]]:
    """Our trainer alone at the given {"rows", "remat"} settings (batches larger than the
    reference's, to fill an accelerator): step time, tokens/s, TFLOP/s, MFU. A setting that
    fails (out of memory) is reported as such and the sweep goes on."""
    import jax

    from tinyllm_jax.train.metrics import peak_flops_per_device, train_flops_per_step

    examples = build_examples(records, streams, tokenizer, max_input_length, 256, lenient=True)
    if encoder_length is None or decoder_length is None:
        encoder_length, decoder_length = suggest_lengths(examples, encoder_length)
    peak = peak_flops_per_device()
    peak_total = peak * jax.device_count() if peak else None
    out = []
    run = None
    for c in configs:
        row = {"rows": c["rows"], "remat": c.get("remat", "none"), "dtype": dtype,
               "encoder_length": encoder_length, "decoder_length": decoder_length}
        try:
            run = make_our_run(model_dir, examples, streams, c["rows"], encoder_length, decoder_length,
                               dtype=dtype, remat=row["remat"])
            t, counts = time_our_steps(run, warmup, steps)
            flops = train_flops_per_step(run.arch, c["rows"], encoder_length, decoder_length)
            s = summarise(t, counts, flops, peak_total)
            row.update({k: s[k] for k in ("step_time_s", "real_tokens_per_s", "real_token_fraction",
                                          "flops_per_step", "achieved_tflops_per_s", "mfu", "examples_per_step")})
        except Exception as e:  # noqa: BLE001 - an out-of-memory setting is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        run = None  # the next setting gets this one's memory back
        _free_torch_memory()
        out.append(row)
    return out
