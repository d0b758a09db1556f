"""FAIR's committee stages (recipes/fair.py lists them in its rounds): each training teacher's
feedback on the student's mistakes, its own rationale for them, and the committee's review.

Each stage is a `tinyllm rationales` run over the round's mistakes, resumable through its
own cache, with per-stage sampling (`fair.feedback_sampling`, `rationale_sampling`,
`review_sampling`: unset keys keep the teacher's own settings). A review is one request a
(rationale, reviewer) unless `review_sampling.num_samples` asks for more, and every reply
is read, an empty one included. Counts are kept across runs: `sent` is every request a
teacher answered for the stage, `cached` those an earlier (failed or killed) run answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from tinyllm_jax.config import Config, TeacherConfig
from tinyllm_jax.data.records import read_jsonl, write_jsonl
from tinyllm_jax.recipes import common
from tinyllm_jax.recipes.config import RecipeConfig, Sampling
from tinyllm_jax.recipes.stages import Stage, stage_dir

log = logging.getLogger("tinyllm.recipe")

MISTAKES = "mistakes.jsonl"


def train_teachers(cfg: RecipeConfig) -> list[str]:
    return cfg.fair.train_teachers or [t.name for t in cfg.rationales.teachers]


def read_records(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path)[0] if path.is_file() and path.stat().st_size else []


def count_records(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# --------------------------------------------------------------------------- sampling


def sampled(teacher: TeacherConfig, sampling: Sampling, review: bool = False) -> TeacherConfig:
    """The teacher as one stage asks it: the stage's sampling keys that are set replace its
    own; a review is one sample unless the stage says more."""
    changes = {k: v for k, v in dataclasses.asdict(sampling).items() if v is not None}
    if review:
        changes.setdefault("num_samples", 1)
    return dataclasses.replace(teacher, **changes)


def _sampling_settings(sampling: Sampling) -> dict[str, Any]:
    """For a stage's fingerprint: only the keys set, so a config that sets none keeps the
    fingerprint it had before per-stage sampling existed."""
    return {k: v for k, v in dataclasses.asdict(sampling).items() if v is not None}


def _rationales_config(cfg: RecipeConfig, inputs: list[Path], out: Path, template: str, teachers: list[str],
                       sampling: Sampling, review: bool = False, cache: Path | None = None) -> Config:
    """`tinyllm rationales` settings for one FAIR teacher stage: zero-shot, one template."""
    chosen = [sampled(dataclasses.replace(t, template=template), sampling, review)
              for t in cfg.rationales.teachers if t.name in teachers]
    rc = dataclasses.replace(cfg.rationales, input=[str(p) for p in inputs], output=str(out), teachers=chosen,
                             num_examples=0, cache=str(cache) if cache else None)
    return dataclasses.replace(Config(), eval=cfg.eval, rationales=rc)


def _collect(rcfg: Config, what: str) -> dict[str, Any]:
    """Sends what the cache lacks; the stage's counts (requests, new, cached, sent)."""
    from tinyllm_jax.teachers.generate import generate_command

    if not any(read_records(Path(p)) for p in rcfg.rationales.input):  # no mistakes: nothing to ask
        Path(rcfg.rationales.output).mkdir(parents=True, exist_ok=True)
        for p in rcfg.rationales.input:
            write_jsonl(Path(rcfg.rationales.output) / Path(p).name, [])
        return {"requests": 0, "new": 0, "cached": 0, "sent": 0}
    report = generate_command(rcfg, what)
    counts = [c for per in report["teachers"].values() for c in per.values()]
    cached = sum(c["cached"] for c in counts)
    return {"requests": sum(c["requests"] for c in counts), "new": report["new"], "cached": cached,
            "sent": cached + report["new"]}


def _to_send(rcfgs: list[Config]) -> tuple[int, int]:
    """(requests still to send, requests planned) of one-input `tinyllm rationales` runs,
    sending nothing."""
    from tinyllm_jax.teachers.generate import plan_rationales

    todo = planned = 0
    for rcfg in rcfgs:
        (path,) = rcfg.rationales.input
        n = count_records(Path(path))
        if n:
            planned += n * sum(t.num_samples for t in rcfg.rationales.teachers)
            todo += sum(p["pool"] + p["requests"] for per in plan_rationales(rcfg).values() for p in per.values())
    return todo, planned


# --------------------------------------------------------------------------- feedback and rationales


def teacher_stage(cfg: RecipeConfig, run_dir: Path, rd: str, kind: str, template: str) -> Stage:
    """Every training teacher's feedback on (or own rationale for) each mistake."""
    out = stage_dir(run_dir, f"{rd}/{kind}")
    mistakes = stage_dir(run_dir, f"{rd}/mine") / MISTAKES
    teachers = train_teachers(cfg)
    sampling = cfg.fair.feedback_sampling if kind == "feedback" else cfg.fair.rationale_sampling

    def rcfg() -> Config:
        return _rationales_config(cfg, [mistakes], out, template, teachers, sampling)

    def run() -> dict[str, Any]:
        return _collect(rcfg(), "feedback" if kind == "feedback" else "rationale")

    def plan() -> str:
        asked = rcfg().rationales.teachers
        each = ", ".join(f"{t.name} x {t.num_samples}" for t in asked)
        if not mistakes.is_file():
            return (f"{sum(t.num_samples for t in asked)} requests a mistake ({each}); counted once {rd}/mine "
                    "has run")
        todo, planned = _to_send([rcfg()])
        return (f"{todo} requests to send ({count_records(mistakes)} mistakes; samples a mistake: {each}; "
                f"{planned - todo} of {planned} already answered)")

    settings = {"template": template, "teachers": teachers,
                "rationales": common.settings_of(dataclasses.replace(cfg.rationales, input=[], output=""))}
    if _sampling_settings(sampling):
        settings["sampling"] = _sampling_settings(sampling)
    return Stage(f"{rd}/{kind}", run, settings, writes=[out / MISTAKES], reads=[mistakes], fresh_on_change=False,
                 plan=plan)


# --------------------------------------------------------------------------- review


def review_stage(cfg: RecipeConfig, run_dir: Path, rd: str) -> Stage:
    """Each rationale scored by the other teachers; writes the accepted rationales, with
    every reply, score and verdict in provenance, and the counts (empty and unparseable
    replies included): every review request sent is one reply counted."""
    from tinyllm_jax.teachers.generate import cached_answers

    out = stage_dir(run_dir, f"{rd}/review")
    rationales = stage_dir(run_dir, f"{rd}/rationales") / MISTAKES
    committee = [t.name for t in cfg.rationales.teachers]
    sampling = cfg.fair.review_sampling

    def configs(requests: dict[str, tuple[Path, list[dict]]]) -> dict[str, Config]:
        """One `tinyllm rationales` run an author: its rationales, reviewed by the others;
        each author's outputs and report.json in replies/<its file>/, one cache for all."""
        return {author: _rationales_config(cfg, [path], out / "replies" / path.stem, cfg.fair.review_template,
                                           [t for t in committee if t != author], sampling, review=True,
                                           cache=out / "cache.jsonl")
                for author, (path, _) in requests.items()}

    def run() -> dict[str, Any]:
        records = read_records(rationales)
        requests = _review_inputs(records, out)
        counts = {"rationales": 0, "accepted": 0, "scores": 0, "empty": 0, "unparseable": 0, "out of range": 0,
                  "requests": 0, "new": 0, "cached": 0, "sent": 0}
        replies: dict[tuple[str, str, int], dict[str, list[str]]] = {}
        for author, rcfg in configs(requests).items():
            got = _collect(rcfg, "review")
            for k in ("requests", "new", "cached", "sent"):
                counts[k] += got[k]
            about = {r["id"]: r["meta"] for r in requests[author][1]}
            for (_, review_id, reviewer), entries in cached_answers(rcfg).items():
                meta = about[review_id]
                replies.setdefault((meta["record_id"], author, meta["sample"]), {})[reviewer] = \
                    [e["rationale"] for e in entries or []]
        kept = [_verdicts(cfg, rec, replies, counts) for rec in records]
        write_jsonl(out / MISTAKES, kept)
        log.info("%s review: %d of %d rationales accepted; %d replies: %d scores, %d empty, %d unparseable, "
                 "%d out of range", rd, counts["accepted"], counts["rationales"], counts["requests"],
                 counts["scores"], counts["empty"], counts["unparseable"], counts["out of range"])
        return counts

    def plan() -> str:
        samples = {t.name: sampled(t, cfg.fair.rationale_sampling).num_samples for t in cfg.rationales.teachers}
        reviews = sampling.num_samples or 1
        if not rationales.is_file():
            per = sum(samples[a] for a in train_teachers(cfg)) * (len(committee) - 1) * reviews
            mistakes = stage_dir(run_dir, f"{rd}/mine") / MISTAKES
            if mistakes.is_file():
                return (f"at most {per * count_records(mistakes)} requests to send ({per} a mistake: each rationale "
                        f"x {len(committee) - 1} reviewers x {reviews}; exact once {rd}/rationales has run)")
            return f"at most {per} requests a mistake; counted once {rd}/mine and {rd}/rationales have run"
        with tempfile.TemporaryDirectory() as tmp:  # the review inputs, as the run will write them
            requests = _review_inputs(read_records(rationales), Path(tmp))
            todo, planned = _to_send(list(configs(requests).values()))
        return (f"{todo} requests to send ({planned} reviews: each rationale x {len(committee) - 1} reviewers "
                f"x {reviews}; {planned - todo} already answered)")

    settings = {"template": cfg.fair.review_template, "committee": committee, "threshold": cfg.fair.threshold,
                "train_teachers": train_teachers(cfg),
                "rationales": common.settings_of(dataclasses.replace(cfg.rationales, input=[], output=""))}
    if _sampling_settings(sampling):
        settings["sampling"] = _sampling_settings(sampling)
    return Stage(f"{rd}/review", run, settings, writes=[out / MISTAKES], reads=[rationales], fresh_on_change=False,
                 plan=plan)


def _verdicts(cfg: RecipeConfig, orig: dict[str, Any], replies: dict, counts: dict[str, int]) -> dict[str, Any]:
    """The record with only its accepted rationales; each author's verdicts in provenance."""
    from tinyllm_jax.teachers.review import accepted, combine, parse_score

    rec = {**orig, "rationales": {}, "provenance": dict(orig.get("provenance") or {})}
    for author in train_teachers(cfg):
        texts = orig["rationales"].get(author, [])
        verdicts = []
        for text, sample in zip(texts, sample_numbers(orig, author)):
            got = replies.get((rec["id"], author, sample), {})
            per_reply = {t: [parse_score(r) for r in rs] for t, rs in got.items()}
            scores = {t: combine(s) for t, s in per_reply.items()}
            ok = accepted(list(scores.values()), cfg.fair.threshold)
            counts["rationales"] += 1
            counts["accepted"] += ok
            for s in (s for rs in per_reply.values() for s in rs):
                counts["scores" if s.status == "ok" else s.status] += 1
            verdict = {"sample": sample, "accepted": ok, "scores": {t: s.value for t, s in scores.items()},
                       "status": {t: s.status for t, s in scores.items()}, "replies": got}
            if any(len(rs) > 1 for rs in per_reply.values()):
                verdict["reply_status"] = {t: [s.status for s in rs] for t, rs in per_reply.items()}
            verdicts.append(verdict)
            if ok:
                rec["rationales"].setdefault(author, []).append(text)
        if texts:
            rec["provenance"][author] = {**(rec["provenance"].get(author) or {}), "review": verdicts,
                                         "threshold": cfg.fair.threshold}
    return rec


def sample_numbers(rec: dict[str, Any], author: str) -> list[int]:
    """The sample number of each of the author's rationales (its provenance lists them in
    the same order; an empty sample left no rationale, so position is not sample)."""
    texts = rec["rationales"].get(author, [])
    samples = ((rec.get("provenance") or {}).get(author) or {}).get("samples") or []
    if len(samples) == len(texts) and all("sample" in s for s in samples):
        return [s["sample"] for s in samples]
    return list(range(len(texts)))


def _review_inputs(records: list[dict[str, Any]], folder: Path) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """One file of review requests per author: a record per (question, rationale sample),
    carrying the rationale under review in `meta` (the review template shows it)."""
    by_author: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        for author, texts in rec["rationales"].items():
            for text, sample in zip(texts, sample_numbers(rec, author)):
                by_author.setdefault(author, []).append({
                    **rec, "id": f"{rec['id']}#{author}#{sample}", "rationales": {}, "teacher_answers": {},
                    "provenance": {}, "meta": {**(rec.get("meta") or {}), "record_id": rec["id"], "author": author,
                                               "sample": sample, "reviewed_rationale": text}})
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for author, recs in by_author.items():
        path = folder / f"by-{_safe(author)}.jsonl"
        write_jsonl(path, recs)
        out[author] = (path, recs)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) + "-" + hashlib.sha256(
        name.encode()).hexdigest()[:6]
