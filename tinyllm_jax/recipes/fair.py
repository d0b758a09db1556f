"""FAIR (Learning from a committee of teachers, arXiv:2410.03663), in rounds:

    data -> [warmup] -> round r: mine -> feedback -> rationales -> [review] -> train -> evaluate
         -> ... round R -> export

    mine        the current student answers every train question through the rationale
                stream; the ones it gets wrong, with its answer, are its mistakes
    feedback    every teacher of `fair.train_teachers` points out the mistake (gold as a hint)
    rationales  every such teacher answers the question itself (no gold in the prompt)
    review      each rationale is scored 1-5 by the OTHER teachers of the committee (all of
                `rationales.teachers`), gold as a hint; kept when the mean valid score is
                above `fair.threshold` (teachers/review.py says how replies are read)
    train       the student (the previous round's, or model.init) on a feedback stream and a
                rationale stream, weights alpha and 1 - alpha (`data.streams`)
    evaluate    validation and test accuracy of the round's student (rationale stream)

The committee's stages (feedback, rationales, review: their sampling, requests and replies)
are recipes/fair_committee.py; this module lists the stages, mines, trains and reports.

The reference code stops after round 0 (every file name says round0, and there is no
loop); here round r + 1 mines the mistakes of round r's student. Its single-teacher
baselines also drop the review; here review and teacher mix are separate settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

from tinyllm_jax.config import Config, ConfigError, StreamConfig
from tinyllm_jax.data.records import read_jsonl, write_jsonl
from tinyllm_jax.errors import UserError
from tinyllm_jax.recipes import common
from tinyllm_jax.recipes.config import RecipeConfig
from tinyllm_jax.recipes.fair_committee import MISTAKES, review_stage, teacher_stage
from tinyllm_jax.recipes.fair_committee import read_records as _read
from tinyllm_jax.recipes.fair_committee import train_teachers as _train_teachers
from tinyllm_jax.recipes.stages import Stage, read_record, stage_dir

log = logging.getLogger("tinyllm.recipe")

FEEDBACK, RATIONALE = "feedback", "rationale"  # the streams' `teacher` names in a FAIR config
TEACHER_STAGES = ("feedback", "rationales", "review")


def stages(cfg: RecipeConfig, run_dir: Path) -> list[Stage]:
    check(cfg)
    out = [common.data_stage(cfg, run_dir)]
    student = None  # the stage whose run directory holds the current student; None: model.init
    if cfg.fair.warmup_steps > 0:
        out.append(warmup_stage(cfg, run_dir))
        student = "warmup"
    for r in range(1, cfg.fair.rounds + 1):
        rd = f"round{r}"
        if r == 1 and cfg.fair.round1_records:  # the reference's published round 0: its student's mistakes
            out.append(train_stage(cfg, run_dir, rd, student, previous=[], published=Path(cfg.fair.round1_records)))
            student = f"{rd}/train"
            out.append(common.evaluate_stage(cfg, run_dir, train_from=student_run(student), name=f"{rd}/evaluate"))
            continue
        if cfg.fair.control:  # no mining, no committee: the round trains on the replay alone
            out.append(train_stage(cfg, run_dir, rd, student, previous=[f"round{k}" for k in range(1, r)]))
            student = f"{rd}/train"
            out.append(common.evaluate_stage(cfg, run_dir, train_from=student_run(student), name=f"{rd}/evaluate"))
            continue
        out.append(mine_stage(cfg, run_dir, rd, student))
        out.append(teacher_stage(cfg, run_dir, rd, "feedback", cfg.fair.feedback_template))
        out.append(teacher_stage(cfg, run_dir, rd, "rationales", cfg.fair.rationale_template))
        if cfg.fair.review:
            out.append(review_stage(cfg, run_dir, rd))
        out.append(train_stage(cfg, run_dir, rd, student, previous=[f"round{k}" for k in range(1, r)]))
        student = f"{rd}/train"
        out.append(common.evaluate_stage(cfg, run_dir, train_from=student_run(student), name=f"{rd}/evaluate"))
    if cfg.export.enabled:
        out.append(common.export_stage(cfg, run_dir, train_from=student_run(student)))
    return out


def check(cfg: RecipeConfig) -> None:
    f = cfg.fair
    kinds = {s.teacher for s in cfg.data.streams}
    if len(cfg.data.streams) != 2 or kinds != {FEEDBACK, RATIONALE}:
        raise ConfigError("data.streams: FAIR trains two streams, one with teacher: feedback and one with "
                          f"teacher: rationale, found {[s.teacher for s in cfg.data.streams]}")
    names = [t.name for t in cfg.rationales.teachers]
    if not names:
        raise ConfigError("rationales.teachers: FAIR needs its committee of teachers, found none")
    unknown = [t for t in f.train_teachers if t not in names]
    if unknown:
        raise ConfigError(f"fair.train_teachers: {unknown[0]!r} is not one of rationales.teachers ({', '.join(names)})")
    if f.review and len(names) < 2:
        raise ConfigError("fair.review: peer review needs at least two teachers in rationales.teachers "
                          "(each rationale is scored by the others); set fair.review=false for one teacher")
    # the numbers' ranges (sampling, rounds, replay) are checked as the config loads: config.RANGES
    if f.control and f.replay <= 0.0:
        raise ConfigError("fair.control: the control arm trains on the replay alone; set fair.replay > 0")
    if f.control and f.round1_records:
        raise ConfigError("fair.control: the control arm has no committee data; unset fair.round1_records")
    if not cfg.model.init and f.warmup_steps <= 0 and not (f.round1_records and f.rounds == 1):
        raise ConfigError("fair: round 1 mines the mistakes of a student that can already answer: set model.init "
                          "(a pretrained T5 or a training run) or fair.warmup_steps (train it on the gold answers first)")


def rationale_stream(cfg: Config) -> StreamConfig:
    return next(s for s in cfg.data.streams if s.teacher == RATIONALE)


def student_run(train_stage_name: str) -> str:
    """A round's train stage keeps its records beside the run: the run is `student/`."""
    return train_stage_name if train_stage_name == "warmup" else f"{train_stage_name}/student"


def _eval_config(cfg: RecipeConfig):
    return dataclasses.replace(cfg.eval, stream=rationale_stream(cfg).name)


# --------------------------------------------------------------------------- warmup and mining


def warmup_material(cfg: RecipeConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The train records as the rationale stream learns them before round 1 (and replays them
    in the rounds): each record's rationales of `fair.warmup_teachers` (all its teachers when
    empty) under the stream's teacher name. When no record has any, the gold answers stand
    in (the rounds then change the stream's format: said in the log)."""
    wanted = set(cfg.fair.warmup_teachers)
    out = []
    for r in records:
        texts = [x for t, xs in (r.get("rationales") or {}).items() if not wanted or t in wanted for x in xs]
        base = {k: v for k, v in r.items() if k not in ("rationales", "teacher_answers", "provenance")}
        out.append({**base, "rationales": {RATIONALE: texts}})
    if not any(r["rationales"][RATIONALE] for r in out):
        log.warning("fair: the train records carry no rationales%s, so the warm-up and the replay train the gold "
                    "answers under the rationale stream; the rounds then teach it rationales",
                    f" of {sorted(wanted)}" if wanted else "")
        out = [{**r, "rationales": {RATIONALE: [r["answer"]]}} for r in out]
    return [r for r in out if r["rationales"][RATIONALE]]


def schedule_of(cfg: RecipeConfig, part: int) -> Any:
    """The optimiser settings of training part `part` (0: the warm-up, r: round r): with
    `fair.continue_schedule`, one schedule over the warm-up and every round, each part taking
    up where the one before it stopped."""
    f = cfg.fair
    if not f.continue_schedule:
        return cfg.optim
    lengths = ([f.warmup_steps] if f.warmup_steps > 0 else []) + [cfg.train.steps] * f.rounds
    start = 0 if part == 0 else (f.warmup_steps if f.warmup_steps > 0 else 0) + (part - 1) * cfg.train.steps
    return dataclasses.replace(cfg.optim, schedule_offset=start, schedule_steps=sum(lengths))


def warmup_stage(cfg: RecipeConfig, run_dir: Path) -> Stage:
    """A student that answers before round 1, in the rounds' own output format: the
    rationale stream on `warmup_material`, for `fair.warmup_steps` steps."""
    run_path = stage_dir(run_dir, "warmup")
    data = stage_dir(run_dir, "data")
    stream = dataclasses.replace(rationale_stream(cfg), weight=1.0)
    sections = dict(data=dataclasses.replace(cfg.data, streams=[stream]),
                    train=dataclasses.replace(cfg.train, steps=cfg.fair.warmup_steps),
                    optim=schedule_of(cfg, 0), eval=_eval_config(cfg))

    def run() -> dict[str, Any]:
        from tinyllm_jax.train.loop import train

        splits = common.read_manifest(data)
        material = warmup_material(cfg, read_jsonl(splits["train"])[0])
        write_jsonl(run_path / "material.jsonl", material)
        result = train(common.train_config(cfg, run_path, {**splits, "train": run_path / "material.jsonl"},
                                           **sections), evaluate_test=False)
        return {"final_loss": result.get("final_loss"), "records": len(material)}

    settings = {"training": common.training_settings(common.train_config(cfg, run_path, {}, **sections)),
                "warmup_teachers": cfg.fair.warmup_teachers}
    return Stage("warmup", run, settings, writes=[run_path / "summary.json"], reads=[data / common.MANIFEST])


def mine_stage(cfg: RecipeConfig, run_dir: Path, rd: str, student: str | None) -> Stage:
    """The student's answers to every train question; the wrong ones are the mistakes."""
    out = stage_dir(run_dir, f"{rd}/mine")
    data = stage_dir(run_dir, "data")

    def run() -> dict[str, Any]:
        import jax

        from tinyllm_jax.eval.evaluate import Evaluation
        from tinyllm_jax.runs import load_model
        from tinyllm_jax.runtime import sharding

        model = load_model(str(stage_dir(run_dir, student_run(student))) if student else cfg.model.init)
        tcfg = common.train_config(cfg, out, common.read_manifest(data), eval=_eval_config(cfg))
        mesh = sharding.make_mesh(tcfg.mesh)
        params = jax.device_put(model.params, sharding.replicated(mesh))
        f = cfg.fair
        sampling = {}
        if f.mine_temperature > 0:
            sampling = {"temperature": f.mine_temperature, "top_p": f.mine_top_p,
                        "seed": f"{f.seed}/{rd}"}
        rows = Evaluation(tcfg, model.arch, model.tokenizer, mesh).predict(params, "train", sampling)
        write_jsonl(out / "predictions.jsonl", rows)
        records = {r["id"]: r for r in read_jsonl(common.read_manifest(data)["train"])[0]}
        mistakes = [{**records[row["id"]], "rationales": {},
                     "meta": {**(records[row["id"]].get("meta") or {}), "student_answer": row["prediction"],
                              "round": rd}}
                    for row in rows if not row["correct"]]
        write_jsonl(out / MISTAKES, mistakes)
        log.info("%s: the student got %d of %d train questions wrong", rd, len(mistakes), len(rows))
        return {"questions": len(rows), "mistakes": len(mistakes),
                "train_accuracy": (len(rows) - len(mistakes)) / max(len(rows), 1)}

    reads = [data / common.MANIFEST]
    if student:
        reads.append(stage_dir(run_dir, student_run(student)) / "summary.json")
    settings = {"eval": common.settings_of(_eval_config(cfg)), "student": student or cfg.model.init,
                "sampling": [cfg.fair.mine_temperature, cfg.fair.mine_top_p, cfg.fair.seed]}
    return Stage(f"{rd}/mine", run, settings, writes=[out / MISTAKES], reads=reads)


# --------------------------------------------------------------------------- training


def feedback_input(rec: dict[str, Any]) -> str:
    """The feedback stream's input: the question, the student's answer, the gold hint."""
    from tinyllm_jax.data.streams import format_input

    return (f"{format_input(rec)}\nStudent's answer: {rec['meta']['student_answer']}\n"
            f"Hint: the correct answer is {rec['answer']}.")


def training_records(cfg: RecipeConfig, rd: str, feedback: list[dict], reviewed: list[dict],
                     teachers: list[str] | None = None) -> list[dict[str, Any]]:
    """A rationale record and a feedback record per mistake, from the training teachers'
    accepted rationales and their feedback (one of each, seeded, or all: `fair.pick`)."""
    teachers = teachers or _train_teachers(cfg)
    fb = {r["id"]: r for r in feedback}
    out = []
    for rec in reviewed:
        rng = random.Random(f"{cfg.fair.seed}/{rd}/{rec['id']}")
        rationales = [t for name in teachers for t in rec["rationales"].get(name, [])]
        notes = [t for name in teachers for t in fb.get(rec["id"], {}).get("rationales", {}).get(name, [])]
        if cfg.fair.pick == "one":
            rationales = rationales and [rng.choice(rationales)]
            notes = notes and [rng.choice(notes)]
        base = {k: v for k, v in rec.items() if k not in ("rationales", "teacher_answers", "provenance")}
        if rationales:
            out.append({**base, "id": f"{rd}/{rec['id']}", "rationales": {RATIONALE: rationales}})
        if notes:
            out.append({**base, "id": f"{rd}/{rec['id']}~feedback", "question": feedback_input(rec), "choices": [],
                        "context": None, "rationales": {FEEDBACK: notes}})
    return out


def _training_fair_settings(cfg: RecipeConfig) -> dict[str, Any]:
    """fair.* as the train stage's fingerprint sees it: per-stage sampling reaches training
    through the teacher stages' outputs (their fingerprints chain to it), so it is left out,
    and runs made before it existed keep their fingerprints."""
    return {k: v for k, v in common.settings_of(cfg.fair).items() if not k.endswith("_sampling")}


def published_round(path: Path) -> tuple[list[dict], list[dict]]:
    """(feedback, reviewed) from records of published FAIR data (`tinyllm convert fair`): the
    reference student's mistakes, its teachers' feedback and their rationales that passed
    its review; the student's answer is `meta.student_wrong_pred`."""
    from tinyllm_jax.data.sources import load_records

    records, _ = load_records([str(path)], "files")
    reviewed, feedback = [], []
    for r in records:
        meta = {**(r.get("meta") or {}), "student_answer": (r.get("meta") or {}).get("student_wrong_pred", "")}
        reviewed.append({**r, "meta": meta})
        feedback.append({"id": r["id"], "rationales": {t: [x] for t, x in (r.get("feedback") or {}).items() if x}})
    if not any(f["rationales"] for f in feedback) and not any(r["rationales"] for r in reviewed):
        raise UserError(f"fair.round1_records: {path} has no feedback and no rationales (expected the output of "
                        "`tinyllm convert fair`)")
    return feedback, reviewed


def train_stage(cfg: RecipeConfig, run_dir: Path, rd: str, student: str | None, previous: list[str],
                published: Path | None = None) -> Stage:
    """This round's (or, with carry_over: accumulate, every round's) feedback and rationale
    records, and the student trained on them from the current student. With `published`,
    the round's material is the reference's published round 0 instead of our own stages."""
    out = stage_dir(run_dir, f"{rd}/train")
    run_path = stage_dir(run_dir, student_run(f"{rd}/train"))
    accepted_from = f"{rd}/review" if cfg.fair.review else f"{rd}/rationales"
    reviewed, feedback = stage_dir(run_dir, accepted_from) / MISTAKES, stage_dir(run_dir, f"{rd}/feedback") / MISTAKES
    init = str(stage_dir(run_dir, student_run(student))) if student else cfg.model.init

    def run() -> dict[str, Any]:
        from tinyllm_jax.train.loop import train

        if published:  # the published teachers' names, unless fair.train_teachers picks some
            fb, rv = published_round(published)
            names = cfg.fair.train_teachers or sorted({t for r in fb + rv for t in r["rationales"]})
        elif cfg.fair.control:
            fb, rv, names = [], [], None
        else:
            fb, rv, names = _read(feedback), _read(reviewed), None
        records = training_records(cfg, rd, fb, rv, names)
        if cfg.fair.carry_over == "accumulate":
            for k in previous:
                earlier = _read(stage_dir(run_dir, f"{k}/train") / "train.jsonl")
                records = [r for r in earlier if "/replay/" not in r["id"]] + records
        replayed = replay_records(cfg, rd, read_jsonl(common.read_manifest(stage_dir(run_dir, "data"))["train"])[0],
                                  {r["id"] for r in rv})
        records += replayed
        write_jsonl(out / "train.jsonl", records)
        counts = {s: sum(bool(r["rationales"].get(s)) for r in records) for s in (FEEDBACK, RATIONALE)}
        if not records:
            raise UserError(f"{rd}: nothing to train on: no feedback and no accepted rationale "
                            f"({len(rv)} mistakes)")
        streams = [dataclasses.replace(s, optional=True) for s in cfg.data.streams]  # a round may lack one
        splits = {**common.read_manifest(stage_dir(run_dir, "data")), "train": out / "train.jsonl"}
        tcfg = common.train_config(cfg, run_path, splits, eval=_eval_config(cfg), optim=optim,
                                   data=dataclasses.replace(cfg.data, streams=streams),
                                   model=dataclasses.replace(cfg.model, init=init), train=train_settings)
        train(tcfg, evaluate_test=False)
        return {"records": len(records), "feedback_records": counts[FEEDBACK], "rationale_records": counts[RATIONALE],
                "replay_records": len(replayed)}

    optim = schedule_of(cfg, int(rd.removeprefix("round")))
    # one schedule over the rounds goes with one optimizer: Adam's moments carry over from the
    # student the round starts from (zero moments under a continued learning rate shook the
    # demo's round 1 from 0.305 validation to 0.227)
    train_settings = dataclasses.replace(cfg.train, continue_optimizer=cfg.train.continue_optimizer or bool(
        cfg.fair.continue_schedule and student))
    settings = {"training": common.training_settings(common.train_config(cfg, run_path, {}, eval=_eval_config(cfg),
                                                                         optim=optim, train=train_settings)),
                "init": init, "fair": _training_fair_settings(cfg)}
    if published:
        return Stage(f"{rd}/train", run, settings, writes=[run_path / "summary.json"],
                     user_files={published: "fair.round1_records"})
    if cfg.fair.control:
        return Stage(f"{rd}/train", run, settings, writes=[run_path / "summary.json"],
                     reads=[stage_dir(run_dir, "data") / common.MANIFEST])
    return Stage(f"{rd}/train", run, settings, writes=[run_path / "summary.json"], reads=[reviewed, feedback])


def replay_records(cfg: RecipeConfig, rd: str, train: list[dict[str, Any]], mistakes: set[str]) -> list[dict[str, Any]]:
    """`fair.replay` of the train questions that are not among the round's mistakes, seeded,
    with the warm-up's targets (`warmup_material`) in the rationale stream."""
    if cfg.fair.replay <= 0.0:
        return []
    material = [r for r in warmup_material(cfg, train) if r["id"] not in mistakes]
    rng = random.Random(f"{cfg.fair.seed}/{rd}/replay")
    chosen = sorted(rng.sample(range(len(material)), round(cfg.fair.replay * len(material))))
    out = []
    for i in chosen:
        r = material[i]
        texts = r["rationales"][RATIONALE]
        if cfg.fair.pick == "one":
            texts = [random.Random(f"{cfg.fair.seed}/{rd}/{r['id']}").choice(texts)]
        out.append({**r, "id": f"{rd}/replay/{r['id']}", "rationales": {RATIONALE: texts}})
    return out


# --------------------------------------------------------------------------- the report


def round_zero(cfg: RecipeConfig, run_dir: Path) -> dict[str, Any]:
    """The student round 1 starts from (the warm-up student, model.init, or the reference's
    published one), with its validation accuracy when it was evaluated (the warm-up's
    selected checkpoint), so that a round that makes the student worse shows."""
    if cfg.fair.round1_records:
        return {"round": 0, "student": "published", "validation_accuracy": None, "test_accuracy": None}
    if cfg.fair.warmup_steps <= 0:
        return {"round": 0, "student": cfg.model.init, "validation_accuracy": None, "test_accuracy": None}
    summary = stage_dir(run_dir, "warmup") / "summary.json"
    best = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    return {"round": 0, "student": "warmup", "validation_accuracy": best.get(f"best_{cfg.checkpoint.best_metric}"),
            "test_accuracy": None}


def report(cfg: RecipeConfig, run_dir: Path) -> dict[str, Any]:
    """Per round: mistakes, requests, feedback and rationales collected, accepted, accuracy;
    round 0 is the student round 1 starts from."""
    rounds = [round_zero(cfg, run_dir)]
    for r in range(1, cfg.fair.rounds + 1):
        rd = f"round{r}"
        res = {name: (read_record(run_dir, f"{rd}/{name}") or {}).get("result") or {}
               for name in ("mine", "feedback", "rationales", "review", "train", "evaluate")}
        if r == 1 and cfg.fair.round1_records:
            res["mine"] = {"mistakes": "published"}
        rounds.append({
            "round": r, "mistakes": res["mine"].get("mistakes"), "train_accuracy": res["mine"].get("train_accuracy"),
            # over every run of each stage: a resumed stage counts what the failed runs sent
            "requests": sum(res[k].get("requests", 0) for k in TEACHER_STAGES),
            "sent": sum(res[k].get("sent", res[k].get("new", 0)) for k in TEACHER_STAGES),
            "cached": sum(res[k].get("cached", 0) for k in TEACHER_STAGES),
            "feedback_records": res["train"].get("feedback_records"),
            "rationale_records": res["train"].get("rationale_records"),
            "reviewed": res["review"].get("rationales"), "accepted": res["review"].get("accepted"),
            "empty_reviews": res["review"].get("empty"), "unparseable_reviews": res["review"].get("unparseable"),
            "validation_accuracy": res["evaluate"].get("validation_accuracy"),
            "test_accuracy": res["evaluate"].get("test_accuracy"),
        })
    out = {"method": "fair", "rounds": rounds}
    (Path(run_dir) / "rounds.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def format_report(rep: dict[str, Any]) -> str:
    head = ("round", "mistakes", "requests", "sent", "cached", "accepted", "empty", "unparseable", "val acc",
            "test acc")
    rows = [head]
    for r in rep["rounds"]:
        if r["round"] == 0:  # the starting student: nothing mined or asked
            rows.append((f"0 ({r['student']})", *["-"] * (len(head) - 3), _pct(r["validation_accuracy"]),
                         _pct(r["test_accuracy"])))
            continue
        acc = f"{r['accepted']}/{r['reviewed']}" if r["reviewed"] is not None else "no review"
        rows.append((r["round"], r["mistakes"], r["requests"], r["sent"], r.get("cached"), acc, r.get("empty_reviews"),
                     r["unparseable_reviews"], _pct(r["validation_accuracy"]), _pct(r["test_accuracy"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
