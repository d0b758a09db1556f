"""`tinyllm rationales`: every record x every teacher x `num_samples` rationales, resumable.

For each teacher and input file: find in-context examples (an examples file, or a zero-shot
pass over a seeded sample of the file's records), build one request a (record, sample),
skip those already in the result cache, send the rest, append each answer to the cache as
it arrives, and finally write each input's records with `rationales[teacher]`,
`teacher_answers[teacher]` and `provenance[teacher]` filled from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from tinyllm_jax.config import Config, ConfigError, RationalesConfig, TeacherConfig
from tinyllm_jax.data.records import read_jsonl, write_jsonl
from tinyllm_jax.errors import UserError, check_writable_dir
from tinyllm_jax.runtime.seeds import stable_seed
from tinyllm_jax.eval.scoring import extract, get_task, is_correct
from tinyllm_jax.teachers.backends import Job, OpenAICompatible, RunStats, read_api_key
from tinyllm_jax.teachers.cache import ResultCache, entry_key
from tinyllm_jax.teachers.prompts import (PromptTemplate, cut_at_stop, load_template, pick_examples, request_hash,
                                          without_answer)
from tinyllm_jax.teachers.report import format_report, new_counts, tally_answers


log = logging.getLogger("tinyllm.rationales")


class IncompleteRun(UserError):
    """Some requests failed or never ran; what succeeded is cached and written."""


@dataclass
class Dataset:
    name: str  # the input file's stem: part of every cache key
    path: Path
    records: list[dict[str, Any]]
    by_id: dict[str, dict[str, Any]] = field(init=False)

    def __post_init__(self):
        self.by_id = {}
        for r in self.records:
            if r["id"] in self.by_id:
                raise UserError(f"{self.path}: record id {r['id']!r} appears twice; ids must be unique in a file")
            self.by_id[r["id"]] = r


def generate_command(cfg: Config, what: str = "rationale") -> dict[str, Any]:
    """Runs `generate_rationales`, prints the report; raises IncompleteRun if anything is
    missing, naming the requests as `what` asks ("review requests failed ...")."""
    report = generate_rationales(cfg)
    print(format_report(report))
    if not report["complete"]:
        raise IncompleteRun(
            f"{report['missing']} {what} requests failed or did not run; the {report['new']} that succeeded "
            f"are kept in {report['cache']}: rerun the same command to finish"
        )
    return report


def generate_rationales(cfg: Config, *, on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Collects the rationales and writes the outputs; returns the report (see report.py).
    `on_result(entry)` is called after each new answer is cached (progress hooks, tests)."""
    rc = cfg.rationales
    check_writable_dir(rc.output, "rationales.output")
    check_writable_dir(_cache_path(rc).parent, "rationales.cache")
    datasets, examples, task = _prepare(cfg)
    out_dir = Path(rc.output)
    report: dict[str, Any] = {"teachers": {}, "cache": str(_cache_path(rc))}
    planned: dict[tuple[str, str, str], list[str]] = {}  # (dataset, record id, teacher) -> keys
    with ResultCache(report["cache"]) as cache:
        runs = _teacher_runs(rc, datasets, task, cache, on_result)
        for run in runs:
            counts = report["teachers"][run.teacher.name] = {}
            for ds in datasets:
                counts[ds.name] = run.dataset(ds, examples, planned)
        outputs = [_write(ds, rc, cache, planned, out_dir) for ds in datasets]
    report["outputs"] = [str(p) for p in outputs]
    all_counts = [c for per_ds in report["teachers"].values() for c in per_ds.values()]
    report["missing"] = sum(c["requests"] - c["cached"] - c["new"] for c in all_counts)
    report["new"] = sum(c["new"] for c in all_counts)
    report["complete"] = report["missing"] == 0 and not any(c["error"] for c in all_counts)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def plan_rationales(cfg: Config) -> dict[str, dict[str, dict[str, Any]]]:
    """What `generate_rationales` would still send, per teacher and input file, without
    sending anything: {teacher: {file: {"pool": n, "requests": n, "exact": bool}}}."""
    rc = cfg.rationales
    datasets, examples, task = _prepare(cfg)
    cache_path = _cache_path(rc)
    with ResultCache(cache_path, read_only=True) as cache:
        runs = _teacher_runs(rc, datasets, task, cache, None)
        return {run.teacher.name: {ds.name: run.plan(ds, examples) for ds in datasets} for run in runs}


def cached_answers(cfg: Config) -> dict[tuple[str, str, str], list[dict[str, Any]] | None]:
    """Every (input file stem, record id, teacher)'s cached answers, one a sample in sample
    order, empty ones included (the outputs leave those out); None where a sample is not
    cached yet. Sends nothing."""
    rc = cfg.rationales
    datasets, examples, task = _prepare(cfg)
    out: dict[tuple[str, str, str], list[dict[str, Any]] | None] = {}
    with ResultCache(_cache_path(rc), read_only=True) as cache:
        for run in _teacher_runs(rc, datasets, task, cache, None):
            for ds in datasets:
                pool, why = run._pool(ds, examples, new_counts(len(ds.records)), send=False)
                planned: dict[tuple[str, str, str], list[str]] = {}
                if not why:
                    run._record_jobs(ds, pool, planned)
                for rec in ds.records:
                    keys = planned.get((ds.name, rec["id"], run.teacher.name))
                    entries = [cache.get(k) for k in keys] if keys else [None]
                    out[(ds.name, rec["id"], run.teacher.name)] = None if None in entries else entries
    return out


def _cache_path(rc: RationalesConfig) -> Path:
    return Path(rc.cache) if rc.cache else Path(rc.output) / "cache.jsonl"


def _prepare(cfg: Config) -> tuple[list[Dataset], list[dict] | None, str]:
    rc = cfg.rationales
    _check(rc)
    task = rc.task or cfg.eval.task
    get_task(task)  # an unknown scoring type fails before any request is sent
    datasets = _read_inputs(rc)
    examples = read_jsonl(rc.examples_file)[0] if rc.examples_file and rc.num_examples > 0 else None
    return datasets, examples, task


def _teacher_runs(rc: RationalesConfig, datasets: list[Dataset], task: str, cache: ResultCache,
                  on_result) -> list["_TeacherRun"]:
    """One run a teacher; every template, API key and gold letter is checked before the
    first request."""
    runs = [_TeacherRun(rc, t, load_template(t.template, rc.templates), task, cache, on_result) for t in rc.teachers]
    for run in runs:
        for ds in datasets:
            try:
                for rec in ds.records:
                    run.template.query(rec)
            except ConfigError as e:
                raise ConfigError(f"{ds.path}: teacher {run.teacher.name!r}: {e}") from None
    return runs


class _TeacherRun:
    """One teacher over each input file: examples, requests, the backend, the cache."""

    def __init__(self, rc: RationalesConfig, teacher: TeacherConfig, template: PromptTemplate, task: str,
                 cache: ResultCache, on_result):
        self.rc, self.teacher, self.template, self.task = rc, teacher, template, task
        self.cache, self.on_result = cache, on_result
        self.aborted = ""  # set when the backend gave up: later files of this teacher are skipped
        self.stop = list(dict.fromkeys([*template.stop, *teacher.stop]))
        if teacher.backend in ("local", "local-t5"):
            from tinyllm_jax.teachers.local_t5 import LocalT5

            self.backend = LocalT5(teacher, seed=rc.seed)
        elif teacher.backend == "demo":
            from tinyllm_jax.teachers.demo import DemoTeacher

            self.backend = DemoTeacher(teacher, seed=rc.seed)
        else:
            self.backend = OpenAICompatible(teacher, self.stop, api_key=read_api_key(teacher))
        self.settings = {**self.backend.settings(), "template": template.name, "gold_in_prompt": template.uses_gold}

        self._reachable = False

    def check_reachable(self) -> None:
        """A server that refuses connections fails here, in one line, before its first
        request (what earlier teachers and files collected is already cached)."""
        check = getattr(self.backend, "check_reachable", None)
        if check is not None and not self._reachable:
            index = [t.name for t in self.rc.teachers].index(self.teacher.name)
            check(f"rationales.teachers[{index}].base_url")
        self._reachable = True

    def dataset(self, ds: Dataset, examples: list[dict] | None, planned: dict) -> dict[str, Any]:
        counts = new_counts(len(ds.records))
        if self.aborted:  # the server is down: do not spend another round of retries on it
            return self._skip(ds, counts, f"not started: {self.aborted}")
        pool, why = self._pool(ds, examples, counts, send=True)
        if why:
            return self._skip(ds, counts, why)
        jobs = self._record_jobs(ds, pool, planned)
        self._send(ds, jobs, counts, f"{self.teacher.name} {ds.name}")
        return counts

    def plan(self, ds: Dataset, examples: list[dict] | None) -> dict[str, Any]:
        """What `dataset` would send, sending nothing: {"pool": n, "requests": n, "exact": bool}.
        Until the in-context examples are all answered the prompts are not known, so the
        record requests are counted in full (`exact` False)."""
        counts = new_counts(len(ds.records))
        pool_jobs = self._pool_jobs(ds) if self._needs_zero_shot_pool(examples) else []
        pending_pool = sum(j.key not in self.cache for j in pool_jobs)
        pool, why = self._pool(ds, examples, counts, send=False)
        if why:
            return {"pool": pending_pool, "requests": len(ds.records) * self.teacher.num_samples, "exact": False}
        jobs = self._record_jobs(ds, pool, {})
        return {"pool": pending_pool, "requests": sum(j.key not in self.cache for j in jobs), "exact": True}

    def _needs_zero_shot_pool(self, examples: list[dict] | None) -> bool:
        return self.rc.num_examples > 0 and examples is None

    def _pool(self, ds: Dataset, examples: list[dict] | None, counts: dict,
              send: bool) -> tuple[dict[str, tuple[dict, str]], str]:
        """(in-context example pool, "") or ({}, why no prompt can be built yet). Every
        zero-shot example request must be answered first: a prompt built from part of the
        pool would differ from the rerun's, and its request would be sent twice."""
        k = self.rc.num_examples
        if k == 0:
            return {}, ""
        if examples is not None:
            pool = self._pool_from(examples)
        else:
            jobs = self._pool_jobs(ds)
            if send:
                counts["pool"] = new_counts(len(jobs))
                self._send(ds, jobs, counts["pool"], f"{self.teacher.name} {ds.name} (examples)")
            missing = sum(j.key not in self.cache for j in jobs)
            if missing:
                return {}, (f"{missing} of {len(jobs)} in-context example requests failed or did not run, so "
                            "no prompt that shows examples was sent; rerun to finish")
            pool = {e["record_id"]: (ds.by_id[e["record_id"]], e["rationale"])
                    for e in self._answered(jobs) if e["rationale"] and e["correct"] is not False}
        if len(pool) < k + 1:
            return {}, f"{len(pool)} records with a usable rationale for in-context examples; {k + 1} needed (num_examples + 1)"
        return pool, ""

    def _record_jobs(self, ds: Dataset, pool: dict[str, tuple[dict, str]], planned: dict) -> list[Job]:
        k = self.rc.num_examples
        jobs = []
        for rec in ds.records:
            ids = pick_examples(list(pool), rec["id"], k, self.rc.seed, ds.name)
            prompt = self.template.prompt(rec, [pool[i] for i in ids])
            keys = []
            for s in range(self.teacher.num_samples):
                job = self._job(ds, rec, s, prompt, "few-shot" if k else "zero-shot", ids)
                keys.append(job.key)
                jobs.append(job)
            planned[(ds.name, rec["id"], self.teacher.name)] = keys
        return jobs

    def _skip(self, ds: Dataset, counts: dict[str, Any], why: str) -> dict[str, Any]:
        counts["error"] = why
        counts["requests"] = len(ds.records) * self.teacher.num_samples
        return counts

    def _answered(self, jobs: list[Job]) -> list[dict[str, Any]]:
        return [e for e in (self.cache.get(j.key) for j in jobs) if e is not None]

    def _pool_from(self, examples: list[dict]) -> dict[str, tuple[dict, str]]:
        """Example records that carry a rationale: this teacher's own if any, else the first."""
        pool = {}
        for rec in examples:
            rats = rec["rationales"]
            if rats:
                pool[rec["id"]] = (rec, (rats.get(self.teacher.name) or next(iter(rats.values())))[0])
        return pool

    def _pool_jobs(self, ds: Dataset) -> list[Job]:
        """Zero-shot requests over a seeded sample of the file; the answers that do not
        contradict the gold answer become the in-context examples."""
        ids = sorted(ds.by_id)
        rng = random.Random(hashlib.sha256(f"{self.rc.seed}\x1f{ds.name}\x1fpool".encode()).digest())
        chosen = rng.sample(ids, min(len(ids), self.rc.zero_shot_pool))
        return [self._job(ds, ds.by_id[i], 0, self.template.prompt(ds.by_id[i], []), "zero-shot-pool", [])
                for i in chosen]

    def _job(self, ds: Dataset, rec: dict, sample: int, prompt: str, stage: str, example_ids: list[str]) -> Job:
        seed = stable_seed(self.rc.seed, ds.name, rec["id"], sample)
        info = {"dataset": ds.name, "record_id": rec["id"], "teacher": self.teacher.name, "sample": sample,
                "request_hash": request_hash(prompt, {**self.settings, "seed": seed}), "stage": stage,
                "examples": example_ids, "seed": seed, "kind": self.template.kind}
        return Job(key=entry_key(info), prompt=prompt, seed=seed, info=info, record=rec)

    def _send(self, ds: Dataset, jobs: list[Job], counts: dict, desc: str) -> None:
        counts["requests"] = len(jobs)
        pending = [j for j in jobs if j.key not in self.cache]
        counts["cached"] = len(jobs) - len(pending)
        if pending:
            self.check_reachable()
        bar = tqdm(total=len(pending), desc=desc, unit="req", disable=not self.rc.progress or not pending,
                   dynamic_ncols=True)

        def _postfix() -> None:  # rate limits show up as retries while the bar runs
            retries = getattr(getattr(self.backend, "stats", None), "retries", 0)
            if counts["failed"] or retries:
                bar.set_postfix(failed=counts["failed"], retries=retries, refresh=False)

        def on_done(job: Job, raw: str) -> None:
            rec = ds.by_id[job.info["record_id"]]
            said = cut_at_stop(raw, self.stop)
            answer = extract(self.task, said, rec["choices"]) if said else None
            rationale = without_answer(said) if self.template.strip_answer else said
            entry = {**job.info, "rationale": rationale, "answer": answer,
                     "correct": None if answer is None else is_correct(self.task, said, rec["answer"], rec["choices"]),
                     "raw": raw, "settings": self.settings, "time": round(time.time(), 3)}
            self.cache.add(entry)
            counts["new"] += 1
            bar.update(1)
            _postfix()
            if self.on_result is not None:
                self.on_result(entry)

        def on_fail(job: Job, reason: str) -> None:
            counts["failed"] += 1
            if len(counts["failures"]) < 5:
                counts["failures"].append(f"{job.info['record_id']} sample {job.info['sample']}: {reason}")
            bar.update(1)
            _postfix()

        try:
            stats: RunStats = self.backend.run(pending, on_done, on_fail)
        finally:
            bar.close()
        counts["retries"] += stats.retries
        counts["error"] = self.aborted = stats.aborted
        tally_answers(counts, self._answered(jobs))


def _write(ds: Dataset, rc: RationalesConfig, cache: ResultCache, planned: dict, out_dir: Path) -> Path:
    """The input's records with each teacher's complete set of samples; a teacher whose
    samples are not all in the cache is left out of the record (the rerun adds it)."""
    out = []
    for rec in ds.records:
        rec = {**rec, "rationales": dict(rec["rationales"])}
        for teacher in rc.teachers:
            keys = planned.get((ds.name, rec["id"], teacher.name))
            entries = [cache.get(k) for k in keys] if keys else [None]
            _set_teacher(rec, teacher.name, None if None in entries else entries)
        out.append(rec)
    path = out_dir / ds.path.name
    write_jsonl(path, out)
    return path


def _set_teacher(rec: dict, name: str, entries: list[dict] | None) -> None:
    """Replaces the teacher's rationales, answers and provenance in `rec` by `entries`'
    (samples with no rationale left are dropped, and counted in provenance)."""
    rec["rationales"].pop(name, None)
    for field_name in ("teacher_answers", "provenance"):
        if isinstance(rec.get(field_name), dict):
            rec[field_name] = {k: v for k, v in rec[field_name].items() if k != name}
    kept = [e for e in entries or [] if e["rationale"]]
    if not kept:
        return
    rec["rationales"][name] = [e["rationale"] for e in kept]
    answers = [e["answer"] for e in kept if e["answer"]]
    if answers:
        rec.setdefault("teacher_answers", {})[name] = answers
    first = entries[0]
    rec.setdefault("provenance", {})[name] = {
        **first["settings"], "stage": first["stage"], "examples": first["examples"],
        "samples": [{k: e[k] for k in ("sample", "seed", "request_hash", "raw", "answer", "correct")} for e in kept],
        **({"empty_samples": len(entries) - len(kept)} if len(kept) < len(entries) else {}),
    }


def _read_inputs(rc: RationalesConfig) -> list[Dataset]:
    seen: dict[str, str] = {}
    datasets = []
    for p in rc.input:
        path = Path(p)
        if path.name in seen:
            raise ConfigError(f"rationales.input: {p} and {seen[path.name]} share the file name {path.name!r}, "
                              "and outputs are written by file name")
        seen[path.name] = p
        datasets.append(Dataset(path.stem, path, read_jsonl(path)[0]))
    return datasets


def _check(rc: RationalesConfig) -> None:
    if not rc.input:
        raise ConfigError("rationales.input: expected a list of record files, found none")
    if not rc.output:
        raise ConfigError("rationales.output: expected an output directory, found ''")
    if not rc.teachers:
        raise ConfigError("rationales.teachers: expected at least one teacher, found none")
    names = [t.name for t in rc.teachers]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"rationales.teachers: teacher names must be unique; repeated: {sorted(dup)}")
    # each number's own range is checked as the config loads (config.RANGES); here what ties keys together
    if rc.num_examples > 0 and not rc.examples_file and rc.zero_shot_pool < rc.num_examples + 1:
        raise ConfigError(f"rationales.zero_shot_pool: expected >= num_examples + 1 = {rc.num_examples + 1}, "
                          f"found {rc.zero_shot_pool}")
    for i, t in enumerate(rc.teachers):
        if t.num_samples > 1 and t.temperature == 0.0 and t.backend != "demo":
            log.warning("rationales.teachers[%d] (%r): num_samples=%d at temperature 0: greedy decoding gives the "
                        "same rationale every time; set a temperature > 0 for distinct samples", i, t.name,
                        t.num_samples)
