"""Evaluation: greedy-decode the answer stream of a split (or, with `eval.stream`, a rationale
stream, scored by the answer its rationale ends with) under the training mesh, score it with
the dataset's answer type, write predictions and a summary. The same code runs
inside training (validation, then test once with the selected checkpoint) and in
`tinyllm eval`, so both report the same accuracy for the same checkpoint.

With several processes each decodes its own share of the split (every n-th example) on its
own devices, with a full copy of the parameters; the scored rows are gathered once, so every
process returns the same summary and process 0 writes the files."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tinyllm_jax.config import Config, ConfigError
from tinyllm_jax.errors import UserError, check_writable_dir
from tinyllm_jax.runtime.seeds import stable_seed
from tinyllm_jax.runtime import sharding

log = logging.getLogger("tinyllm.eval")


def answer_stream(cfg: Config):
    for s in cfg.data.streams:
        if s.teacher is None:
            return s
    raise ConfigError("data.streams: evaluation needs an answer stream (a stream without `teacher`), "
                      "or eval.stream naming the stream to answer with")


def eval_stream(cfg: Config):
    """The stream whose prefix the student answers with: `eval.stream`, else the answer stream.
    A rationale stream is decoded as an answer stream is: one input a record, with or without
    rationales, scored against the gold answer."""
    if cfg.eval.stream is None:
        return answer_stream(cfg)
    for s in cfg.data.streams:
        if s.name == cfg.eval.stream:
            return dataclasses.replace(s, teacher=None, target="{rationale}")
    raise ConfigError(f"eval.stream: no stream named {cfg.eval.stream!r}; data.streams: "
                      f"{', '.join(s.name for s in cfg.data.streams)}")


class Evaluation:
    """Holds a split's tokenised inputs, so repeated evaluations during training only decode."""

    def __init__(self, cfg: Config, arch: Any, tokenizer, mesh=None):
        self.cfg, self.arch, self.tokenizer, self.mesh = cfg, arch, tokenizer, mesh
        self._splits: dict[str, tuple[list[dict], list[np.ndarray]]] = {}
        self._local_mesh = None

    def _inputs(self, split: str):
        if split not in self._splits:
            from tinyllm_jax.data.sources import load_split
            from tinyllm_jax.data.streams import build_examples

            records, _ = load_split(self.cfg.data, split)
            if self.cfg.eval.max_examples and split == "validation":
                records = records[: self.cfg.eval.max_examples]
            from tinyllm_jax.data.streams import prompt_of
            from tinyllm_jax.model.family import family_of

            stream = eval_stream(self.cfg)
            causal = family_of(self.arch).layout == "causal"
            ex = build_examples(records, [stream], self.tokenizer, self.cfg.data.max_input_length,
                                self.cfg.data.max_target_length, "gold", self.cfg.data.lenient,
                                prompt=prompt_of(self.cfg.data, causal))
            kept = [records[int(i)] for i in ex.record_index]
            inputs = [ex.enc(i) for i in range(len(ex))]
            longest = max(len(ex.dec(i)) for i in range(len(ex)))
            if longest > self.cfg.eval.max_new_tokens:
                log.warning("%s: the longest gold answer has %d tokens but eval.max_new_tokens is %d: "
                            "long answers will be cut and scored wrong", split, longest, self.cfg.eval.max_new_tokens)
            self._splits[split] = (kept, inputs)
        return self._splits[split]

    def _decode_mesh(self):
        """The run's mesh; with several processes, this process's own devices."""
        import jax

        if self.mesh is None or jax.process_count() == 1:
            return self.mesh
        if self._local_mesh is None:
            self._local_mesh = sharding.local_mesh()
        return self._local_mesh

    def _shard(self):
        mesh = self._decode_mesh()
        if mesh is None:
            return None
        import jax

        rows = sharding.batch_sharding(mesh)
        return lambda arr: jax.device_put(arr, rows)

    def _place(self, params: Any) -> Any:
        """Parameters where decoding runs: host arrays replicated over the mesh, device
        arrays as they are; with several processes a full copy on this process's devices."""
        import jax

        mesh = self._decode_mesh()
        if mesh is None:
            return params
        if mesh is not self.mesh:
            return sharding.replicate_on(params, mesh)
        if any(not isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
            return jax.device_put(params, sharding.replicated(mesh))
        return params

    def batch_size(self) -> int:
        bs = self.cfg.eval.batch_size
        mesh = self._decode_mesh()
        if mesh is not None:
            d = sharding.batch_divisor(mesh)
            bs = -(-bs // d) * d  # round up: rows are split over the batch axes
        return bs

    def predict(self, params: Any, split: str, sampling: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One scored row a record of `split` (id, input, gold, prediction, extracted answer,
        correct), in record order: greedy, or sampled with `sampling` (temperature, top_k,
        top_p as `generate_ids` takes them, and `seed`: each record samples from its own
        seed, derived from this one and the record's id, so a row does not depend on the
        slot, the batch or the process it was decoded in). Each process decodes its share;
        every process returns every row."""
        import jax

        from tinyllm_jax.eval import scoring
        from tinyllm_jax.eval.decode import generate_ids
        from tinyllm_jax.runtime import distributed

        records, inputs = self._inputs(split)
        p, n_proc = jax.process_index(), jax.process_count()
        mine = range(p, len(inputs), n_proc)  # this process's share
        sampling = dict(sampling or {})
        if "seed" in sampling:
            seed = sampling.pop("seed")
            sampling["seeds"] = [stable_seed(seed, records[i]["id"]) for i in mine]
        ids = generate_ids(self.arch, self._place(params), [inputs[i] for i in mine], self.cfg.eval.max_new_tokens,
                           self.batch_size(), progress=self.cfg.train.progress and p == 0, shard_batch=self._shard(),
                           **sampling)
        preds = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        task = self.cfg.eval.task
        part = []
        for i, pred in zip(mine, preds):
            rec, inp = records[i], inputs[i]
            extracted = scoring.extract(task, pred, rec.get("choices", []))
            correct = scoring.is_correct(task, pred, rec["answer"], rec.get("choices", []))
            part.append({"id": rec["id"], "input": self.tokenizer.decode(inp, skip_special_tokens=True),
                         "gold": rec["answer"], "prediction": pred, "extracted": extracted, "correct": bool(correct)})
        parts = distributed.allgather_json(part)  # once: every process gets every row
        return [parts[i % n_proc][i // n_proc] for i in range(len(inputs))]

    def run(self, params: Any, split: str, run_dir: str | Path | None = None, step: int | None = None,
            sampling: dict[str, Any] | None = None) -> dict[str, Any]:
        """Decodes and scores `split` (see `predict`); with `run_dir`, process 0 writes the
        rows to RUN_DIR/eval/predictions-<split>-step<N>.jsonl and the summary beside them."""
        import jax

        rows = self.predict(params, split, sampling)
        p = jax.process_index()
        n = len(rows)
        summary = {"split": split, "step": step, "task": self.cfg.eval.task, "n": n,
                   "accuracy": sum(r["correct"] for r in rows) / max(n, 1),
                   "extracted": sum(r["extracted"] is not None for r in rows) / max(n, 1)}
        if run_dir is not None and p == 0:
            out = Path(run_dir) / "eval"
            out.mkdir(parents=True, exist_ok=True)
            tag = f"{split}-step{step}" if step is not None else split
            with open(out / f"predictions-{tag}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            (out / f"summary-{tag}.json").write_text(json.dumps(summary, indent=2))
        return summary


def evaluate_command(cfg: Config, checkpoint: str | None = None, split: str = "test") -> dict[str, Any]:
    """`tinyllm eval`: a run's checkpoint (best, else latest; or `checkpoint` = a step
    directory or a step number) on `split`; the summary is printed and written."""
    import jax

    from tinyllm_jax.runs import load_run, run_model_config

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir: {run_dir} is a file, not a training run directory")
    run_model_config(run_dir)  # a clear error before anything else when this is no run
    check_writable_dir(run_dir / "eval", "run_dir")  # predictions and the summary go there
    saved = run_dir / "config.yaml"
    if saved.is_file() and not cfg.data.train:
        from tinyllm_jax.config import load_config

        cfg = load_config(saved)
    model = load_run(run_dir, _checkpoint_step(checkpoint))
    mesh = sharding.make_mesh(cfg.mesh)
    summary = Evaluation(cfg, model.arch, model.tokenizer, mesh).run(model.params, split, run_dir, model.step)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
    return summary


def _checkpoint_step(checkpoint: str | None) -> int | None:
    """--checkpoint as a step number or a step directory (checked against the saved steps
    by `load_run`)."""
    if checkpoint is None:
        return None
    name = Path(checkpoint).name
    if name.isdigit():
        return int(name)
    raise UserError(f"--checkpoint {checkpoint}: expected a step number or a checkpoint step directory")
