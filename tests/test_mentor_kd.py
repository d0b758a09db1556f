"""Mentor-KD as a recipe: the demo end to end (mentor trained, only correct samples kept,
student trained with the mentor's soft labels, test accuracy), the published-chains path,
and its config checks."""

from __future__ import annotations

import json

import pytest
import yaml

from test_recipes import TINY_RECIPE, write_recipe
from tinyllm_jax.cli import main

TINY_ARCH = {k: v for k, v in TINY_RECIPE["model"].items()}
MENTOR_KD = {
    "method": "mentor_kd",
    "source": {"demo": {"seed": 0, "n_train": 48, "n_valid": 16, "n_test": 16}},
    "rationale_splits": ["train"],
    "rationales": {"num_examples": 0, "progress": False,
                   "teachers": [{"name": "careful", "backend": "demo", "model": "careful"},
                                {"name": "terse", "backend": "demo", "model": "terse", "error_rate": 0.5}]},
    "mentor": {"model": {**TINY_ARCH, "d_model": 48, "d_ff": 96}, "train": {"steps": 8, "batch_size": 8,
                                                                            "progress": False},
               "optim": {"learning_rate": 1e-3}, "samples": 2, "temperature": 1.0, "max_new_tokens": 24},
    "distill": {"weight": 0.3, "temperature": 2.0},
    "model": {k: v for k, v in TINY_ARCH.items() if k != "train_tokenizer_vocab"},
    "data": {**TINY_RECIPE["data"], "streams": [{"name": "chains", "prefix": "solve: ", "weight": 0.7,
                                                 "teacher": "chains", "target": "{rationale} --> {answer}"}]},
    "train": {**TINY_RECIPE["train"], "steps": 6},
    "eval": {**TINY_RECIPE["eval"], "every_steps": 3, "max_new_tokens": 24},
}


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_demo_mentor_kd_recipe_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **MENTOR_KD)
    assert main(["recipe", str(cfg)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["data", "rationales", "chains", "mentor", "augment", "train", "evaluate",
                                       "export"]
    assert all(s["status"] == "done" for s in summary["stages"].values()) and "test_accuracy" in summary

    chains = {r["id"]: r for r in lines(run_dir / "chains" / "train.jsonl")}
    wrong = 0
    for r in chains.values():  # the terse teacher's wrong chains are dropped, the careful one's all kept
        terse_ok = r["teacher_answers"]["terse"][0] == r["answer"]
        wrong += not terse_ok
        assert r["rationales"]["chains"] == [r["rationales"]["careful"][0]] + ([r["rationales"]["terse"][0]]
                                                                               if terse_ok else [])
    assert wrong > 0

    from tinyllm_jax.eval.scoring import is_correct

    sampled = kept = 0
    for r in lines(run_dir / "augment" / "train.jsonl"):  # only correct mentor samples join the chains
        rows = r["provenance"]["mentor"]["samples"]
        assert len(rows) == 2
        for s in rows:
            assert s["correct"] == is_correct("choice", s["text"], r["answer"], r["choices"])
        good = [s["chain"] for s in rows if s["correct"]]
        sampled += len(rows)
        kept += len(good)
        assert r["rationales"].get("mentor", []) == good
        assert r["rationales"]["chains"] == chains[r["id"]]["rationales"]["chains"] + good
    assert sampled == 96 and json.loads((run_dir / "augment" / "stage.json").read_text())["result"]["kept"] == kept

    student = yaml.safe_load((run_dir / "train" / "config.yaml").read_text())
    assert student["distill"]["teacher"] == str(run_dir / "mentor") and student["distill"]["streams"] == ["chains"]
    assert student["model"]["tokenizer"] == str(run_dir / "mentor" / "tokenizer")
    assert student["eval"]["stream"] == "chains"
    metrics = lines(run_dir / "train" / "metrics.jsonl")
    assert all(m["loss/kd"] > 0 for m in metrics if "loss" in m)  # the KD term was in every step


def test_mentor_kd_on_the_mentors_stored_soft_labels(tmp_path):
    """mentor.soft_labels_top_k: a logits stage runs the mentor once over the student's training
    examples; the student trains on the stored top-k, never loading the mentor."""
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{**MENTOR_KD, "mentor": {**MENTOR_KD["mentor"],
                                                                               "soft_labels_top_k": 16}})
    assert main(["recipe", str(cfg)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["data", "rationales", "chains", "mentor", "augment", "logits", "train",
                                       "evaluate", "export"]
    index = json.loads((run_dir / "logits" / "mentor" / "index.json").read_text())
    assert index["settings"]["top_k"] == 16 and index["settings"]["teacher"] == str(run_dir / "mentor")
    assert index["settings"]["streams"] == ["chains"] and index["settings"]["temperature"] == 2.0
    chains = sum(len(r["rationales"].get("chains", [])) for r in lines(run_dir / "augment" / "train.jsonl"))
    assert index["examples"] == chains  # one labelled example per chain the student trains on
    student = yaml.safe_load((run_dir / "train" / "config.yaml").read_text())
    assert student["distill"]["teacher"] is None
    assert student["distill"]["teachers"] == [{**student["distill"]["teachers"][0], "name": "mentor", "model": None,
                                               "logits": str(run_dir / "logits" / "mentor")}]
    metrics = lines(run_dir / "train" / "metrics.jsonl")
    assert all(m["loss/kd"] > 0 for m in metrics if "loss" in m)


def test_published_mentor_chains_instead_of_sampling(tmp_path):
    """mentor.augment=false: no sampling; the records' published `mentor` chains join."""
    from tinyllm_jax.data.demo import make_demo_records
    from tinyllm_jax.data.records import write_jsonl

    recs = make_demo_records(40, 0, "train")
    for r in recs:
        r["rationales"] = {"teacher": r["rationales"]["careful"], "mentor": [r["rationales"]["careful"][0] + " Yes."]}
    write_jsonl(tmp_path / "train.jsonl", recs)
    write_jsonl(tmp_path / "test.jsonl", make_demo_records(8, 0, "test"))
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{
        **MENTOR_KD, "source": {"demo": None, "train": [str(tmp_path / "train.jsonl")],
                                "test": [str(tmp_path / "test.jsonl")]},
        "rationales": {"teachers": []}, "mentor": {**MENTOR_KD["mentor"], "augment": False},
        "export": {"enabled": False}})
    assert main(["recipe", str(cfg)]) == 0
    out = lines(run_dir / "augment" / "train.jsonl")
    assert all(r["rationales"]["chains"] == r["rationales"]["teacher"] + r["rationales"]["mentor"] for r in out)
    assert json.loads((run_dir / "augment" / "stage.json").read_text())["result"]["published_kept"] == 40


@pytest.mark.parametrize("override, message", [
    ("mentor.model.train_tokenizer_vocab=null", "mentor.model: name the mentor"),
    ("data.streams.0.teacher=careful", "Mentor-KD trains one stream with teacher: chains"),
    ("mentor.temperature=0", "mentor.temperature: sampling needs a temperature > 0"),
])
def test_mentor_kd_config_errors(tmp_path, capsys, override, message):
    cfg = write_recipe(tmp_path / "r.yaml", tmp_path / "run", **MENTOR_KD)
    assert main(["recipe", str(cfg), override]) == 2
    assert message in capsys.readouterr().err
