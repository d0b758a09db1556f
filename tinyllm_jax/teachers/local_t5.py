"""A local JAX T5 teacher (Flan-T5 or any HF T5 checkpoint) through our model and decoder.

Batched: `batch_size` prompts a decode call, rows padded to a fixed batch and a bucketed
length so that shapes repeat and compile once. Greedy at temperature 0, else sampled with
top-k / top-p from an explicit PRNG key: the run's seed folded with each batch's first
request seed, so a rerun that resumes reproduces the batches it redoes. Prompts longer
than `max_input_tokens` keep their end (the query) and lose their first examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tinyllm_jax.config import ConfigError, TeacherConfig
from tinyllm_jax.teachers.backends import Job, OnDone, OnFail, RunStats


class LocalT5:
    def __init__(self, teacher: TeacherConfig, seed: int = 0):
        if not teacher.model:
            raise ConfigError(f"teacher {teacher.name!r}: key 'model' is empty; name an HF T5 directory or hub id")
        self.teacher = teacher
        self.seed = seed
        self._loaded: tuple[Any, Any, Any, Any] | None = None

    def settings(self) -> dict[str, Any]:
        t = self.teacher
        return {"backend": "local-t5", "model": t.model, "temperature": t.temperature, "top_k": t.top_k,
                "top_p": t.top_p, "max_tokens": t.max_tokens, "max_input_tokens": t.max_input_tokens}

    def run(self, jobs: list[Job], on_done: OnDone, on_fail: OnFail) -> RunStats:
        """Decodes `jobs` batch by batch, reporting each batch as soon as it is decoded."""
        stats = RunStats()
        if not jobs:
            return stats
        import jax

        from tinyllm_jax.eval.decode import bucket_length, generate, strip_after_eos
        from tinyllm_jax.model.hf import load_pretrained

        if self._loaded is None:
            self._loaded = load_pretrained(self.teacher.model)
        model, params, tokenizer, cfg = self._loaded
        t, eos = self.teacher, tokenizer.eos_token_id
        token_lists = [tokenizer(j.prompt)["input_ids"][-t.max_input_tokens:] for j in jobs]
        order = sorted(range(len(jobs)), key=lambda i: len(token_lists[i]))  # similar lengths share a batch
        for start in range(0, len(order), t.batch_size):
            idx = order[start:start + t.batch_size]
            tokens = np.zeros((t.batch_size, bucket_length(max(len(token_lists[i]) for i in idx))), np.int32)
            for row, i in enumerate(idx):
                tokens[row, :len(token_lists[i])] = token_lists[i]
            rng = None
            if t.temperature > 0:
                rng = jax.random.fold_in(jax.random.key(self.seed), jobs[idx[0]].seed)
            out = np.asarray(generate(model, params, tokens, t.max_tokens, rng=rng, temperature=t.temperature,
                                      top_k=t.top_k, top_p=t.top_p, eos_id=eos))
            texts = tokenizer.batch_decode([strip_after_eos(out[row].tolist(), eos) for row in range(len(idx))],
                                           skip_special_tokens=True)
            for i, text in zip(idx, texts):
                stats.done += 1
                on_done(jobs[i], text)
        return stats
