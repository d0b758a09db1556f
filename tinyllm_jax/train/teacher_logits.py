"""`tinyllm logits CONFIG [key=value ...]`: each distillation teacher that names both a
`model` and a `logits` directory runs ONCE over the training examples of its streams,
teacher-forced on their targets and sharded on the mesh, and its top-k soft labels are
stored there (data/soft_labels.py); training then reads them instead of running the model
in every step of every epoch.

The examples are the trainer's own (the same config, tokenizer and lengths), cut in
shards of `distill.logits_shard_examples`; each shard is packed into rows, run in batches
of `train.batch_size` rows (longer examples in rows `long_factor` times longer, as in
training) and written whole, so a killed run finishes only the shards it lacks, and its
shards are byte for byte those of an uninterrupted run (a shard depends on its examples
alone). `plan.json` records the settings and the examples: a rerun with other settings or
data is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tinyllm_jax.config import Config, ConfigError, KDTeacherConfig
from tinyllm_jax.data import soft_labels as store
from tinyllm_jax.data.packing import CAUSAL, Layout, RowShare, layout_of, long_factor, pack_rows, row_lengths
from tinyllm_jax.data.streams import Examples
from tinyllm_jax.errors import UserError
from tinyllm_jax.model.family import family_of
from tinyllm_jax.runtime import sharding
from tinyllm_jax.train import loss as loss_lib
from tinyllm_jax.train.distill import (
    Teacher, check_distill, load_online_teacher, teacher_configs, teacher_key, tokenizer_digest,
)

log = logging.getLogger("tinyllm.logits")

TOKEN = "kd.token"  # a batch's target tokens, numbered from 1 within their shard (0: none)


def logits_command(cfg: Config) -> list[dict[str, Any]]:
    """Stores every teacher's soft labels that `cfg` asks for; returns one report a teacher."""
    from tinyllm_jax.data.streams import examples_for_split
    from tinyllm_jax.runtime import distributed
    from tinyllm_jax.train.loop import setup_logging
    from tinyllm_jax.train.student import build_student, prepare_demo_data

    primary = distributed.is_primary()
    setup_logging(None if primary else logging.WARNING)
    teachers = teacher_configs(cfg.distill)
    check_distill(cfg.distill, [s.name for s in cfg.data.streams])
    todo = [(i, t) for i, t in enumerate(teachers) if t.model and t.logits]
    if not todo:
        raise ConfigError("distill: no teacher names both `model` (the teacher to run) and `logits` (the directory "
                          "its soft labels go to), e.g. distill.teachers=[{model: runs/mentor, logits: runs/mentor-top64}]")
    run_dir = Path(cfg.run_dir)
    if primary:
        cfg = prepare_demo_data(cfg, run_dir)
        arch, tokenizer, _ = build_student(cfg, run_dir)  # the trainer's tokenizer, so its examples
    distributed.barrier("student tokenizer written")
    if not primary:
        cfg = prepare_demo_data(cfg, run_dir, write=False)
        arch, tokenizer, _ = build_student(cfg, run_dir, write=False)
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.train.batch_size % sharding.batch_divisor(mesh):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by data x fsdp "
                          f"({sharding.batch_divisor(mesh)})")
    layout = layout_of(family_of(arch).layout)
    examples = examples_for_split(cfg.data, "train", tokenizer, causal=layout is CAUSAL)
    reports = []
    for i, t in todo:
        key = teacher_key(cfg.distill, i)
        teacher = load_online_teacher(t, key, cfg, arch, tokenizer, mesh)
        reports.append(store_soft_labels(cfg, t, key, teacher, tokenizer, examples, mesh, layout, primary))
        del teacher
    for r in reports:
        print(f"logits: teacher {r['teacher']} -> {r['logits']}: {r['examples']} examples, {r['tokens']} target "
              f"tokens, top {r['top_k']}; {r['shards']} shards ({r['reused']} already stored), "
              f"{r['bytes'] / 2**20:.1f} MiB = {r['bytes_per_token']:.0f} bytes a token", flush=True)
    return reports


def plan_of(cfg: Config, t: KDTeacherConfig, teacher: Teacher, tokenizer, examples: Examples) -> tuple[dict, list]:
    """(plan.json's content, each shard's example indices) for teacher `t` over `examples`."""
    names = [s.name for s in cfg.data.streams]
    chosen = t.streams or names
    indices = np.flatnonzero(np.isin(examples.stream_ids, [names.index(n) for n in chosen]))
    if not len(indices):
        raise UserError(f"distill: teacher {t.name}'s streams {chosen} have no training examples")
    vocab = teacher.vocab or min(teacher.arch.vocab_size, len(tokenizer))
    keys, digests = store.example_keys(examples, indices), store.example_digests(examples, indices)
    h = hashlib.sha256("\n".join(f"{k} {d}" for k, d in zip(keys, digests)).encode())
    per = cfg.distill.logits_shard_examples
    shards = [indices[j:j + per] for j in range(0, len(indices), per)]
    settings = {
        "teacher": t.model, "teacher_step": teacher.step, "top_k": t.top_k, "temperature": float(t.temperature),
        "vocab": int(vocab), "log_probs_dtype": t.logits_dtype, "ids_dtype": store.ids_dtype(vocab).name,
        "tokenizer": tokenizer_digest(tokenizer), "streams": list(chosen), "shard_examples": per,
        "family": family_of(teacher.arch).name,
    }
    plan = {"format": store.FORMAT, "settings": settings, "examples": len(indices), "examples_digest": h.hexdigest(),
            "shards": [store.shard_name(j) for j in range(len(shards))]}
    return plan, shards


def soft_label_fn(teacher: Teacher, k: int, temperature: float, vocab: int, chunk_length: int, mesh):
    """A jitted (params, batch) -> (token numbers, top-k ids, log-probs, tail log-prob), every
    output whole on every device (each process then holds the global batch's labels)."""
    family = family_of(teacher.arch)
    module = family.module(teacher.arch, True)
    mask_from = vocab if vocab < teacher.arch.vocab_size else None

    def fn(params, batch):
        hidden = module.apply({"params": params}, *(batch[name] for name in family.model_inputs), method="hidden")

        def labels(x):
            logits = module.apply({"params": params}, x, method="project")
            return loss_lib.topk_soft_labels(logits, k, temperature, mask_from)

        ids, log_probs, tail = (labels(hidden) if chunk_length <= 0 else
                                loss_lib.over_sequence_chunks(labels, chunk_length, hidden))
        return batch[TOKEN], ids, log_probs, tail

    return jax.jit(fn, in_shardings=(teacher.shardings, sharding.put_batch_shardings(mesh)),
                   out_shardings=sharding.replicated(mesh))


def shard_batches(cfg: Config, sub: Examples, layout: Layout, factor: int):
    """Global batches (lists of rows) of one shard's examples, and their row lengths: the
    examples that fit the data's rows, packed, then the longer ones in rows `factor` times
    longer, half as many a batch per doubling (the trainer's long batches)."""
    (La, Lb), B = row_lengths(cfg.data, layout), cfg.train.batch_size
    sizes = layout.lengths(sub)
    a, b = sizes.enc_lengths, sizes.dec_lengths
    fits = (a <= La) & (b <= Lb)
    for mask, f in ((fits, 1), (~fits, factor)):
        if not mask.any():
            continue
        rows = pack_rows(a, b, np.flatnonzero(mask), La * f, Lb * f, cfg.data.max_segments_per_row)
        per = max(1, B // f)
        for j in range(0, len(rows), per):
            yield rows[j:j + per], per, La * f, Lb * f


def store_soft_labels(cfg: Config, t: KDTeacherConfig, key: str, teacher: Teacher, tokenizer, examples: Examples,
                      mesh, layout: Layout, primary: bool = True) -> dict[str, Any]:
    """Runs teacher `t` over the shards `t.logits` lacks and writes them, then the index."""
    from tqdm.auto import tqdm

    out = Path(t.logits)
    plan, shards = plan_of(cfg, t, teacher, tokenizer, examples)
    settings = plan["settings"]
    if not 1 <= t.top_k <= settings["vocab"]:
        raise ConfigError(f"{key}.top_k: expected 1 .. {settings['vocab']} (the tokenizer's tokens), found {t.top_k}")
    old = store.read_json(out / store.PLAN)
    if old is not None and old != plan:
        changed = sorted(k for k in plan["settings"] if old.get("settings", {}).get(k) != plan["settings"][k])
        what = f"other settings ({', '.join(changed)})" if changed else "other examples"
        raise UserError(f"{key}.logits={out}: holds soft labels of {what}; remove it or give another directory")
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / store.PLAN).write_text(json.dumps(plan, indent=1) + "\n")
    started = time.time()
    done = [j for j in range(len(shards)) if (out / store.shard_name(j)).is_file()]
    total_tokens = int(sum(examples.dec_lengths[idx].sum() for idx in shards))
    done_tokens = int(sum(examples.dec_lengths[shards[j]].sum() for j in done))
    log.info("logits: teacher %s, %d examples in %d shards, %d already stored in %s", t.name, plan["examples"],
             len(shards), len(done), out)
    vocab, k = settings["vocab"], t.top_k
    fn = soft_label_fn(teacher, k, float(t.temperature), vocab, cfg.optim.loss_chunk_length, mesh)
    factor = long_factor(layout.lengths(examples.subset(np.concatenate(shards))), *row_lengths(cfg.data, layout))
    blocks, num_blocks = sharding.process_row_blocks(mesh)
    share = RowShare(blocks, num_blocks)
    bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", desc=f"logits {t.name}", dynamic_ncols=True,
               disable=not (cfg.train.progress and primary))
    try:
        for j, idx in enumerate(shards):
            if j in done:
                continue
            sub = examples.subset(idx)
            n = len(sub.dec_tokens)
            sub = sub.with_target_arrays({TOKEN: np.arange(1, n + 1, dtype=np.int32)})
            ids = np.zeros((n, k), store.ids_dtype(vocab))
            log_probs = np.zeros((n, k), np.dtype(t.logits_dtype))
            tail = np.zeros((n,), np.float32)
            for rows, per, La, Lb in shard_batches(cfg, sub, layout, factor):
                local = share.rows(rows, per)
                batch = layout.batch(sub, local, len(local), La, Lb)
                batch = {name: batch[name] for name in (*family_of(teacher.arch).model_inputs, TOKEN)}
                token, top_ids, top_lp, top_tail = jax.device_get(
                    fn(teacher.params, sharding.put_batch(batch, mesh)))
                at = token > 0
                pos = token[at] - 1
                ids[pos], log_probs[pos], tail[pos] = top_ids[at], top_lp[at], top_tail[at]
                bar.update(int(at.sum()))
            if primary:
                offsets = np.concatenate([[0], np.cumsum(sub.dec_lengths)])
                store.write_shard(out / store.shard_name(j), store.example_keys(examples, idx),
                                  store.example_digests(examples, idx), offsets,
                                  {"ids": ids, "log_probs": log_probs, "tail_log_prob": tail})
    finally:
        bar.close()
    sizes = [(out / name).stat().st_size if primary else 0 for name in plan["shards"]]
    index = {**plan, "shards": [{"file": name, "examples": int(len(idx)), "tokens": int(examples.dec_lengths[idx].sum()),
                                 "bytes": size} for name, idx, size in zip(plan["shards"], shards, sizes)],
             "tokens": total_tokens, "bytes": int(sum(sizes)),
             "bytes_per_token": sum(sizes) / max(total_tokens, 1),
             "array_bytes_per_token": store.bytes_per_token(k, vocab, t.logits_dtype)}
    if primary:
        tmp = out / (store.INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, out / store.INDEX)
    return {"teacher": t.name, "model": t.model, "logits": str(out), "examples": plan["examples"],
            "tokens": total_tokens, "top_k": k, "shards": len(shards), "reused": len(done),
            "bytes": index["bytes"], "bytes_per_token": index["bytes_per_token"],
            "seconds": round(time.time() - started, 2)}
