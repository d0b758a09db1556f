"""Mentor-KD (arXiv:2410.09037): an intermediate "mentor" T5 learns the teacher LLM's
correct chains, samples more chains for every training question (the correct ones are
kept), and gives the student soft labels: loss = w * CE(chains) + lambda * KD(mentor).

    data -> [rationales] -> chains -> mentor -> augment -> [logits] -> train (with distill:
         the mentor) -> evaluate -> export

    chains    the teacher chains a question (`mentor.teachers`; only those whose answer is
              the gold one, `mentor.correct_only`) as one stream's rationales, `chains`
    mentor    the mentor (`mentor.model`, `.optim`, `.train`) on that stream, its target
              in the stream's form, e.g. "{rationale} --> {answer}"
    augment   `mentor.samples` chains a train question, sampled (temperature, top-k,
              top-p, seed); kept when the answer after "-->" is the gold one; provenance
              keeps every sample and its verdict
    logits    (with `mentor.soft_labels_top_k`) the mentor run once over the student's
              training examples, its top-k soft labels stored (`tinyllm logits`)
    train     the student on teacher + mentor chains, the mentor run in the same jitted
              step on the same packed batch for the KD term (`distill:`), or its stored
              soft labels read beside the targets

Where the reference code differs, and why we do not follow it: its KL mask tests
`labels != 0` after padding was set to -100 (so every pad enters the KL and dilutes it):
here the KD term is a token mean over real target tokens only; it selects the "best" epoch
on the test set and saves a shallow copy (the last epoch): here validation selects the
checkpoint, and the test split is scored once; its augmentation loads the mentor from a
folder its trainer never writes: here the stages are wired by construction.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tinyllm_jax.config import Config, ConfigError, DistillConfig, KDTeacherConfig, StreamConfig
from tinyllm_jax.data.records import read_jsonl, write_jsonl
from tinyllm_jax.recipes import common
from tinyllm_jax.recipes.config import RecipeConfig
from tinyllm_jax.recipes.stages import Stage, stage_dir

log = logging.getLogger("tinyllm.recipe")

CHAINS = "chains"  # the stream's `teacher` name in a Mentor-KD config
MENTOR = "mentor"  # where the mentor's kept samples go in a record (and the published ones are)


def stages(cfg: RecipeConfig, run_dir: Path) -> list[Stage]:
    check(cfg)
    out = [common.data_stage(cfg, run_dir)]
    records = "data"
    if cfg.rationales.teachers:
        out.append(common.rationales_stage(cfg, run_dir, records_from="data"))
        records = "rationales"
    out += [chains_stage(cfg, run_dir, records), mentor_stage(cfg, run_dir), augment_stage(cfg, run_dir)]
    if cfg.mentor.soft_labels_top_k:
        out.append(logits_stage(cfg, run_dir))
    out += [student_stage(cfg, run_dir), common.evaluate_stage(cfg, run_dir)]
    if cfg.export.enabled:
        out.append(common.export_stage(cfg, run_dir))
    return out


def check(cfg: RecipeConfig) -> None:
    if [s.teacher for s in cfg.data.streams] != [CHAINS]:
        raise ConfigError(f"data.streams: Mentor-KD trains one stream with teacher: {CHAINS} (teacher and mentor "
                          f"chains together), found teachers {[s.teacher for s in cfg.data.streams]}")
    if "{answer}" not in chains_stream(cfg).target:
        log.warning("data.streams[0].target %r has no {answer}: the student's chains will not end with an answer "
                    "to score", chains_stream(cfg).target)
    m = cfg.mentor
    if not (m.model.init or m.model.tokenizer or m.model.train_tokenizer_vocab):
        raise ConfigError("mentor.model: name the mentor: mentor.model.init (an HF T5 or a run; the reference's is "
                          "google/flan-t5-large), or its architecture with mentor.model.train_tokenizer_vocab")
    if m.augment and m.samples < 1:
        raise ConfigError(f"mentor.samples: expected >= 1, found {m.samples}")
    if m.augment and m.temperature <= 0:
        raise ConfigError(f"mentor.temperature: sampling needs a temperature > 0, found {m.temperature}")
    if cfg.distill.streams and cfg.distill.streams != [chains_stream(cfg).name]:
        raise ConfigError(f"distill.streams: Mentor-KD distils the {chains_stream(cfg).name!r} stream")


def chains_stream(cfg: Config) -> StreamConfig:
    return cfg.data.streams[0]


def _eval(cfg: RecipeConfig):
    return dataclasses.replace(cfg.eval, stream=chains_stream(cfg).name)


# --------------------------------------------------------------------------- chains


def chain_is_correct(rec: dict[str, Any], teacher: str, k: int, text: str, task: str) -> bool:
    """A teacher chain's verdict: the one its provenance recorded, else its parsed answer,
    else its text scored (a published chain file that was filtered on correctness reads
    as correct when its text states no answer)."""
    from tinyllm_jax.eval.scoring import extract, is_correct

    samples = ((rec.get("provenance") or {}).get(teacher) or {}).get("samples") or []
    if k < len(samples) and "correct" in samples[k]:
        return samples[k]["correct"] is True
    answers = (rec.get("teacher_answers") or {}).get(teacher) or []
    texts = rec["rationales"].get(teacher) or []
    if len(answers) == len(texts) and answers[k] is not None:
        return is_correct(task, answers[k], rec["answer"], rec.get("choices") or [])
    if extract(task, text, rec.get("choices") or []) is None:
        return True
    return is_correct(task, text, rec["answer"], rec.get("choices") or [])


def chains_stage(cfg: RecipeConfig, run_dir: Path, records_from: str) -> Stage:
    """Every record's teacher chains (correct ones only, by default) as `chains`."""
    out = stage_dir(run_dir, "chains")
    src = stage_dir(run_dir, records_from)
    task = cfg.rationales.task or cfg.eval.task

    def run() -> dict[str, Any]:
        splits = common.read_manifest(src)
        counts = {"kept": 0, "wrong": 0, "records_without_chain": 0}
        records = []
        for rec in read_jsonl(splits["train"])[0]:
            teachers = cfg.mentor.teachers or [t for t in rec["rationales"] if t != MENTOR]
            kept = []
            for t in teachers:
                for k, text in enumerate(rec["rationales"].get(t) or []):
                    if not cfg.mentor.correct_only or chain_is_correct(rec, t, k, text, task):
                        kept.append(text)
                    else:
                        counts["wrong"] += 1
            counts["kept"] += len(kept)
            counts["records_without_chain"] += not kept
            records.append({**rec, "rationales": {**rec["rationales"], CHAINS: kept} if kept else
                            {k: v for k, v in rec["rationales"].items() if k != CHAINS}})
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "train.jsonl", records)
        common.write_manifest(out, {**splits, "train": out / "train.jsonl"})
        log.info("chains: %d kept, %d wrong ones dropped, %d records without a chain", counts["kept"],
                 counts["wrong"], counts["records_without_chain"])
        return counts

    settings = {"teachers": cfg.mentor.teachers, "correct_only": cfg.mentor.correct_only, "task": task}
    return Stage("chains", run, settings, writes=[out / common.MANIFEST], reads=[src / common.MANIFEST])


# --------------------------------------------------------------------------- the mentor


def mentor_stage(cfg: RecipeConfig, run_dir: Path) -> Stage:
    """The mentor trained on the teacher chains (a full run directory: RUN_DIR/mentor)."""
    m = cfg.mentor
    return common.train_stage(cfg, run_dir, records_from="chains", name="mentor", model=m.model, optim=m.optim,
                              train=m.train, eval=_eval(cfg), distill=dataclasses.replace(cfg.distill, teacher=None))


def augment_stage(cfg: RecipeConfig, run_dir: Path) -> Stage:
    """The mentor's sampled chains for every train question; the correct ones join `chains`."""
    out = stage_dir(run_dir, "augment")
    src = stage_dir(run_dir, "chains")
    mentor_dir = stage_dir(run_dir, "mentor")
    m = cfg.mentor

    def run() -> dict[str, Any]:
        splits = common.read_manifest(src)
        records = read_jsonl(splits["train"])[0]
        samples = _sample(cfg, mentor_dir, splits) if m.augment else {}
        counts = {"sampled": 0, "kept": 0, "published_kept": 0}
        augmented = []
        for rec in records:
            rats = dict(rec["rationales"])
            prov = dict(rec.get("provenance") or {})
            if m.augment:
                rows = samples.get(rec["id"], [])
                kept = [r["chain"] for r in rows if r["correct"]]
                counts["sampled"] += len(rows)
                counts["kept"] += len(kept)
                prov[MENTOR] = {"model": str(mentor_dir), "temperature": m.temperature, "top_k": m.top_k,
                                "top_p": m.top_p, "seed": m.seed, "samples": rows}
                rats.pop(MENTOR, None)
                if kept:
                    rats[MENTOR] = kept
            else:  # the records' own (published) mentor chains
                kept = rats.get(MENTOR) or []
                counts["published_kept"] += len(kept)
            if kept:
                rats[CHAINS] = list(rats.get(CHAINS) or []) + kept
            augmented.append({**rec, "rationales": rats, "provenance": prov})
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "train.jsonl", augmented)
        common.write_manifest(out, {**splits, "train": out / "train.jsonl"})
        if m.augment:
            log.info("augment: %d of %d mentor samples kept (correct)", counts["kept"], counts["sampled"])
        return counts

    settings = {k: v for k, v in common.settings_of(m).items() if k not in ("model", "optim", "train")}
    return Stage("augment", run, settings, writes=[out / common.MANIFEST],
                 reads=[src / common.MANIFEST, mentor_dir / "summary.json"])


def _sample(cfg: RecipeConfig, mentor_dir: Path, splits: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """record id -> one row a sample: {sample, text, chain, answer, correct}."""
    import jax

    from tinyllm_jax.eval.evaluate import Evaluation
    from tinyllm_jax.runs import load_run
    from tinyllm_jax.runtime import sharding

    m = cfg.mentor
    mentor = load_run(mentor_dir)
    tcfg = common.train_config(cfg, mentor_dir, splits,
                               eval=dataclasses.replace(_eval(cfg), max_new_tokens=m.max_new_tokens))
    mesh = sharding.make_mesh(tcfg.mesh)
    params = jax.device_put(mentor.params, sharding.replicated(mesh))
    evaluation = Evaluation(tcfg, mentor.arch, mentor.tokenizer, mesh)
    out: dict[str, list[dict[str, Any]]] = {}
    for k in range(m.samples):
        sampling = {"temperature": m.temperature, "top_k": m.top_k, "top_p": m.top_p, "seed": f"{m.seed}/{k}"}
        for row in evaluation.predict(params, "train", sampling):
            text = row["prediction"]
            out.setdefault(row["id"], []).append({"sample": k, "text": text, "chain": text.split("-->")[0].strip(),
                                                  "answer": row["extracted"], "correct": row["correct"]})
    return out


def _student_model(cfg: RecipeConfig, run_dir: Path):
    model = cfg.model
    if not model.init and not model.tokenizer:  # the KD term compares token by token: the mentor's tokenizer
        model = dataclasses.replace(model, tokenizer=str(stage_dir(run_dir, "mentor") / "tokenizer"),
                                    train_tokenizer_vocab=None)
    return model


def _mentor_as_teacher(cfg: RecipeConfig, run_dir: Path, stored: bool) -> DistillConfig:
    """The student's `distill`: the mentor on the chains stream, run in the step or stored."""
    mentor_dir = stage_dir(run_dir, "mentor")
    if not stored:
        return dataclasses.replace(cfg.distill, teacher=str(mentor_dir), streams=[chains_stream(cfg).name])
    d = cfg.distill
    teacher = KDTeacherConfig(name=MENTOR, model=str(mentor_dir), logits=str(stage_dir(run_dir, "logits") / MENTOR),
                              top_k=cfg.mentor.soft_labels_top_k, weight=d.weight, temperature=d.temperature,
                              divergence=d.divergence, jsd_beta=d.jsd_beta, scale_by_t2=d.scale_by_t2,
                              streams=[chains_stream(cfg).name], dtype=d.dtype)
    return DistillConfig(teachers=[teacher], logits_shard_examples=d.logits_shard_examples)


def logits_stage(cfg: RecipeConfig, run_dir: Path) -> Stage:
    """The mentor run once over the student's training examples (the augmented chains): its
    top-k soft labels stored in RUN_DIR/logits/mentor (`tinyllm logits`); a killed stage
    resumes, keeping the shards it finished."""
    out = stage_dir(run_dir, "logits")
    src = stage_dir(run_dir, "augment")
    distill = _mentor_as_teacher(cfg, run_dir, stored=True)

    def run() -> dict[str, Any]:
        from tinyllm_jax.train.teacher_logits import logits_command

        # the student's tokenizer and examples; the student's own files go to this stage's folder
        tcfg = common.train_config(cfg, out, common.read_manifest(src), model=_student_model(cfg, run_dir),
                                   distill=distill)
        return logits_command(tcfg)[0]

    settings = {"distill": common.settings_of(distill.teachers[0]), "data": common.settings_of(cfg.data),
                "model": common.settings_of(_student_model(cfg, run_dir))}
    return Stage("logits", run, settings, writes=[out / MENTOR / "index.json"],
                 reads=[src / common.MANIFEST, stage_dir(run_dir, "mentor") / "summary.json"])


def student_stage(cfg: RecipeConfig, run_dir: Path) -> Stage:
    """The student on teacher + mentor chains, with the mentor's soft labels (KD): the mentor
    run in every step, or its stored top-k (`mentor.soft_labels_top_k`)."""
    stored = cfg.mentor.soft_labels_top_k > 0
    distill = _mentor_as_teacher(cfg, run_dir, stored)
    if stored:  # the labels only: the student's steps never load the mentor
        distill = dataclasses.replace(distill, teachers=[dataclasses.replace(distill.teachers[0], model=None)])
    stage = common.train_stage(cfg, run_dir, records_from="augment", name="train", model=_student_model(cfg, run_dir),
                               eval=_eval(cfg), distill=distill)
    stage.settings["distill"] = common.settings_of(distill)
    stage.reads.append(stage_dir(run_dir, "logits") / MENTOR / "index.json" if stored
                       else stage_dir(run_dir, "mentor") / "summary.json")
    return stage

