"""A local JAX teacher through our models and the generation engine (eval/engine.py): any HF
T5 (Flan-T5), a decoder-only checkpoint (Llama, Mistral, Qwen2, Qwen3), or one of our
training runs (backend `local`, or its older name `local-t5`).

`batch_size` prompts decode at once, in slots: a finished prompt's slot takes the next one,
and each answer is reported as soon as it is finished (so a killed run keeps it in the
cache). Greedy at temperature 0, else sampled with top-k / top-p, each request from its own
seed (`Job.seed`, derived from the run's seed, the record and the sample index): a rerun
that resumes reproduces any answer it redoes, whatever batch or slot it lands in. Prompts
longer than `max_input_tokens` keep their end (the query) and lose their first examples.
"""

from __future__ import annotations

from typing import Any

from tinyllm_jax.config import ConfigError, TeacherConfig
from tinyllm_jax.teachers.backends import Job, OnDone, OnFail, RunStats


class LocalT5:
    def __init__(self, teacher: TeacherConfig, seed: int = 0):
        if not teacher.model:
            raise ConfigError(f"teacher {teacher.name!r}: key 'model' is empty; name an HF T5 directory or hub id")
        self.teacher = teacher
        self.seed = seed  # already part of every Job.seed (teachers/generate.py)
        self._loaded: tuple[Any, Any, Any, Any] | None = None

    def settings(self) -> dict[str, Any]:
        t = self.teacher
        return {"backend": "local-t5", "model": t.model, "temperature": t.temperature, "top_k": t.top_k,
                "top_p": t.top_p, "max_tokens": t.max_tokens, "max_input_tokens": t.max_input_tokens}

    def run(self, jobs: list[Job], on_done: OnDone, on_fail: OnFail) -> RunStats:
        """Decodes `jobs`, reporting each one as soon as it is decoded."""
        stats = RunStats()
        if not jobs:
            return stats
        from tinyllm_jax.eval.decode import generate_ids, input_ids
        from tinyllm_jax.runs import load_model

        if self._loaded is None:
            loaded = load_model(self.teacher.model)
            if loaded.tokenizer is None:
                raise ConfigError(f"teacher {self.teacher.name!r}: {self.teacher.model} has no tokenizer files")
            self._loaded = (loaded.params, loaded.tokenizer, loaded.arch)
        params, tokenizer, cfg = self._loaded
        t = self.teacher
        token_lists = [ids[-t.max_input_tokens:] for ids in input_ids(cfg, tokenizer, [j.prompt for j in jobs])]

        def report(i: int, ids: list[int]) -> None:
            stats.done += 1
            on_done(jobs[i], tokenizer.decode(ids, skip_special_tokens=True))

        from tinyllm_jax.model.family import family_of

        eos = None if family_of(cfg).layout == "causal" else tokenizer.eos_token_id  # a decoder's: every eos id it names
        generate_ids(cfg, params, token_lists, t.max_tokens, batch_size=t.batch_size, temperature=t.temperature,
                     top_k=t.top_k, top_p=t.top_p, seeds=[j.seed for j in jobs], eos_id=eos, on_result=report)
        return stats
