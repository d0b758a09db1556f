"""FAIR: review replies read as documented, the demo recipe over two rounds (round 2 mines
round 1's student), the accepted set equal to what the review scores imply."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_recipes import TINY_RECIPE, write_recipe
from tinyllm_jax.cli import main
from tinyllm_jax.teachers.review import Score, accepted, parse_score


@pytest.mark.parametrize("reply, value, status", [
    ("[4]", 4.0, "ok"),
    ("[4/5]", 4.0, "ok"),
    ("The steps hold. Score: [5].", 5.0, "ok"),
    ("[ 3 / 5 ] overall", 3.0, "ok"),
    ("I would give it 4 out of 5.", None, "unparseable"),  # no brackets: a bare number may be the rationale's
    ("first [2], on reflection [5]", 5.0, "ok"),  # two bracketed scores: the last is the verdict
    ("[7]", None, "out of range"),
    ("[0]", None, "out of range"),
    ("[3.5]", 3.5, "ok"),
    ("see [the answer] and [a]", None, "unparseable"),
    ("", None, "empty"),  # counted and shown as empty: the reviewer stays in the verdict
    (" \n", None, "empty"),
])
def test_review_replies_are_read_as_documented(reply, value, status):
    assert parse_score(reply) == Score(value, status)


def test_a_reviewer_with_several_replies_scores_their_valid_mean():
    from tinyllm_jax.teachers.review import combine

    assert combine([Score(4.0, "ok"), Score(None, "empty"), Score(5.0, "ok")]) == Score(4.5, "ok")
    assert combine([Score(None, "empty"), Score(None, "unparseable")]) == Score(None, "empty")


def test_accepted_when_the_mean_valid_score_is_above_the_threshold():
    ok, bad = Score(4.0, "ok"), Score(None, "unparseable")
    assert accepted([ok, Score(3.0, "ok")])  # (4, 3): mean 3.5 > 3, as the reference
    assert not accepted([Score(3.0, "ok"), Score(3.0, "ok")])
    assert accepted([ok, bad])  # an unparseable reply is left out, not counted as 0
    assert not accepted([bad, bad]) and not accepted([])
    assert not accepted([ok], threshold=4.0)


FAIR = {
    "method": "fair",
    "source": {"demo": {"seed": 0, "n_train": 96, "n_valid": 16, "n_test": 16}, "keep_rationales": True},
    "rationales": {"progress": False, "teachers": [{"name": "careful", "backend": "demo", "model": "careful"},
                                                   {"name": "terse", "backend": "demo", "model": "terse"}]},
    "fair": {"rounds": 2, "warmup_steps": 6, "carry_over": "accumulate"},
    "data": {**TINY_RECIPE["data"], "streams": [
        {"name": "feedback", "prefix": "feedback: ", "weight": 0.5, "teacher": "feedback"},
        {"name": "rationale", "prefix": "explain: ", "weight": 0.5, "teacher": "rationale"}],
        "max_target_length": 96, "decoder_length": 96},
    "model": {**TINY_RECIPE["model"], "train_tokenizer_vocab": 192, "vocab_size": 192},
    "eval": {**TINY_RECIPE["eval"], "max_new_tokens": 24},
}


def check_review(review_dir: Path, threshold: float = 3.0) -> tuple[int, int]:
    """Every rationale is kept exactly when the mean of its valid scores is above the
    threshold; returns (reviewed, accepted)."""
    reviewed = kept = 0
    for rec in (json.loads(l) for l in (review_dir / "mistakes.jsonl").read_text().splitlines()):
        for author, prov in rec["provenance"].items():
            for v in prov.get("review", []):
                valid = [s for s in v["scores"].values() if s is not None]
                implied = bool(valid) and sum(valid) / len(valid) > threshold
                assert v["accepted"] == implied, (rec["id"], author, v)
                assert all(v["status"][t] == "ok" for t, s in v["scores"].items() if s is not None)
                reviewed += 1
                kept += implied
        n_kept = sum(v["accepted"] for p in rec["provenance"].values() for v in p.get("review", []))
        assert sum(len(x) for x in rec["rationales"].values()) == n_kept
    return reviewed, kept


def test_demo_fair_two_rounds_round2_mines_round1s_student(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **FAIR)
    assert main(["recipe", str(cfg)]) == 0
    out = capsys.readouterr().out
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and re.search(r"^round +mistakes", out, re.M)
    warmup = json.loads((run_dir / "warmup" / "summary.json").read_text())
    assert rounds[0]["student"] == "warmup" and rounds[0]["validation_accuracy"] == warmup["best_eval_accuracy"]

    def mistakes(rd):
        return {json.loads(l)["id"]: json.loads(l)["meta"]["student_answer"]
                for l in (run_dir / rd / "mine" / "mistakes.jsonl").read_text().splitlines()}

    m1, m2 = mistakes("round1"), mistakes("round2")
    assert m1 and m2 and m1 != m2  # another student made them
    assert json.loads((run_dir / "round2" / "mine" / "stage.json").read_text())["settings"]["student"] == "round1/train"
    saved = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "round2/train/student/config.yaml").read_text())))
    assert saved["model"]["init"] == str(run_dir / "round1" / "train" / "student")
    for rd in ("round1", "round2"):
        reviewed, kept = check_review(run_dir / rd / "review")
        assert reviewed == 2 * len(mistakes(rd)) and 0 < kept < reviewed  # the terse teacher's slips are rejected
        recs = [json.loads(l) for l in (run_dir / rd / "review" / "mistakes.jsonl").read_text().splitlines()]
        for rec in recs:  # the careful teacher is always right, so the terse one always accepts it
            assert rec["rationales"].get("careful"), rec["id"]
    train = [json.loads(l) for l in (run_dir / "round2" / "train" / "train.jsonl").read_text().splitlines()]
    assert {r["id"].split("/")[0] for r in train} == {"round1", "round2"}  # accumulated
    fb = [r for r in train if r["id"].endswith("~feedback")]
    assert fb and all("Student's answer:" in r["question"] and r["rationales"]["feedback"] for r in fb)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["export"]["status"] == "done" and "test_accuracy" in summary


def test_fair_baselines_are_separate_settings(tmp_path, capsys):
    """One teacher without review: no review stage, every rationale of that teacher kept."""
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{**FAIR, "fair": {**FAIR["fair"], "rounds": 1, "review": False,
                                                                        "train_teachers": ["terse"]}})
    assert main(["recipe", str(cfg), "--dry-run"]) == 0
    stages = [l.split(":")[0] for l in capsys.readouterr().out.splitlines() if l.startswith("stage ")]
    assert "stage round1/review" not in stages and "stage round1/feedback" in stages
    assert main(["recipe", str(cfg), "export.enabled=false"]) == 0
    recs = [json.loads(l) for l in (run_dir / "round1" / "rationales" / "mistakes.jsonl").read_text().splitlines()]
    train = [json.loads(l) for l in (run_dir / "round1" / "train" / "train.jsonl").read_text().splitlines()]
    assert all(set(r["rationales"]) == {"terse"} for r in recs)
    assert len([r for r in train if "rationale" in r["rationales"]]) == len(recs)


@pytest.mark.parametrize("override, message", [
    ("fair.train_teachers=[nobody]", "fair.train_teachers: 'nobody' is not one of rationales.teachers"),
    ("fair.warmup_steps=0", "fair: round 1 mines the mistakes of a student that can already answer"),
    ("data.streams.0.teacher=careful", "FAIR trains two streams"),
])
def test_fair_config_errors(tmp_path, capsys, override, message):
    cfg = write_recipe(tmp_path / "r.yaml", tmp_path / "run", **FAIR)
    assert main(["recipe", str(cfg), override]) == 2
    assert message in capsys.readouterr().err


def test_plot_of_a_fair_recipe_shows_accuracy_over_rounds(tmp_path):
    from tinyllm_jax.train.plot import plot_run

    rounds = [{"round": 1, "train_accuracy": 0.5, "validation_accuracy": 0.4, "test_accuracy": 0.41},
              {"round": 2, "train_accuracy": 0.6, "validation_accuracy": 0.5, "test_accuracy": None}]
    (tmp_path / "rounds.json").write_text(json.dumps({"method": "fair", "rounds": rounds}))
    path = Path(plot_run(str(tmp_path)))
    assert path.is_file() and path.stat().st_size > 10_000


def test_round1_from_the_published_fair_files(tmp_path):
    """Round 1 trains on the reference's published round 0 (its student's mistakes, the
    teachers' feedback and reviewed rationales, converted); nothing is asked of a teacher."""
    from tinyllm_jax.data.records import make_record, write_jsonl

    published = tmp_path / "fair-svamp.jsonl"
    recs = []
    for i in range(12):
        r = make_record(f"svamp-train-{i}", f"Tom has {i + 3} apples, buys 2 more and loses 1. How many apples does Tom have?",
                        str(i + 4), rationales={"gpt": [f"{i + 3} + 2 - 1 = {i + 4}. The answer is {i + 4}."]},
                        meta={"student_wrong_pred": "7"})
        r["feedback"] = {"gpt": "Add, then subtract.", "gemini": "Mind the loss."}
        recs.append(r)
    write_jsonl(published, recs)
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{**FAIR, "fair": {**FAIR["fair"], "rounds": 2,
                                                                        "round1_records": str(published),
                                                                        "pick": "all"}})
    assert main(["recipe", str(cfg), "export.enabled=false"]) == 0
    assert not (run_dir / "round1" / "mine").exists() and (run_dir / "round2" / "mine" / "mistakes.jsonl").is_file()
    train = [json.loads(l) for l in (run_dir / "round1" / "train" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 24 and sum(r["id"].endswith("~feedback") for r in train) == 12
    assert all(len(r["rationales"]["feedback"]) == 2 for r in train if r["id"].endswith("~feedback"))
    assert all("Student's answer: 7" in r["question"] for r in train if r["id"].endswith("~feedback"))
    mine = json.loads((run_dir / "round2" / "mine" / "stage.json").read_text())
    assert mine["settings"]["student"] == "round1/train"


def test_fair_for_a_student_from_scratch_warmup_format_replay_schedule(tmp_path):
    """The warm-up learns the rounds' format (the records' rationales under the rationale
    stream), a round replays the other train questions, and the rounds continue the warm-up's
    learning-rate schedule instead of warming up again."""
    run_dir = tmp_path / "run"
    fair = {**FAIR["fair"], "rounds": 1, "replay": 0.5, "warmup_teachers": ["careful"]}
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{**FAIR, "fair": fair, "train": {**TINY_RECIPE["train"], "steps": 4},
                                                        "optim": {"learning_rate": 1e-3, "warmup_steps": 2}})
    assert main(["recipe", str(cfg), "export.enabled=false"]) == 0
    material = [json.loads(l) for l in (run_dir / "warmup" / "material.jsonl").read_text().splitlines()]
    assert len(material) == 96 and all(r["rationales"]["rationale"][0].startswith(r["question"].split()[0] + " starts")
                                       for r in material)  # the careful teacher's chains
    train = [json.loads(l) for l in (run_dir / "round1" / "train" / "train.jsonl").read_text().splitlines()]
    mistakes = {json.loads(l)["id"] for l in (run_dir / "round1" / "mine" / "mistakes.jsonl").read_text().splitlines()}
    replayed = [r for r in train if "/replay/" in r["id"]]
    assert len(replayed) == round(0.5 * (96 - len(mistakes)))
    assert not {r["id"].split("/")[-1] for r in replayed} & mistakes
    lr = lambda run: [json.loads(l)["lr"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in l]
    warm, round1 = lr(run_dir / "warmup"), lr(run_dir / "round1" / "train" / "student")
    # one linear schedule of 6 + 4 steps, peak 1e-3 after 2: the round starts where the warm-up stopped
    assert warm[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and round1[0] == pytest.approx(1e-3 * 4 / 8)
    assert round1 == pytest.approx([1e-3 * (4 - k) / 8 for k in range(4)])


def test_fair_control_arm_trains_the_replay_alone(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{**FAIR, "fair": {**FAIR["fair"], "rounds": 1, "replay": 1.0,
                                                                        "control": True}})
    assert main(["recipe", str(cfg), "--dry-run"]) == 0
    stages = [l.split(":")[0] for l in capsys.readouterr().out.splitlines() if l.startswith("stage ")]
    assert not any(s.startswith(("stage round1/mine", "stage round1/feedback", "stage round1/review")) for s in stages)
    assert main(["recipe", str(cfg), "export.enabled=false"]) == 0
    train = [json.loads(l) for l in (run_dir / "round1" / "train" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 96 and all("/replay/" in r["id"] for r in train)
    assert main(["recipe", str(cfg), "fair.replay=0"]) == 2
    assert "fair.control" in capsys.readouterr().err
