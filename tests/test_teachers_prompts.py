"""Prompts, example choice, request hashes, backoff and the result cache: no server needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyllm_jax.config import ConfigError, load_config
from tinyllm_jax.teachers.backends import backoff_delay
from tinyllm_jax.teachers.cache import ResultCache
from tinyllm_jax.teachers.prompts import cut_at_stop, load_template, pick_examples, request_hash

REC = {"id": "r1", "question": "Which is red?", "choices": ["sky", "apple", "grass"], "answer": "apple"}
EX = {"id": "r2", "question": "Which is wet?", "choices": ["water", "sand"], "answer": "water"}


def test_teacher_forcing_prompt_is_tinyllms_layout():
    t = load_template("teacher_forcing", {})
    assert t.uses_gold
    assert t.prompt(REC, [(EX, "Water is wet. Thus, the answer is (a)")]) == (
        "Question: Which is wet?\nOptions: (a) water (b) sand\nAnswer: (a)\n"
        "Rationale: Let's think step by step. Water is wet. Thus, the answer is (a)\n\n"
        "Question: Which is red?\nOptions: (a) sky (b) apple (c) grass\nAnswer: (b)\n"
        "Rationale: Let's think step by step.")


def test_free_form_records_and_context_render_without_options():
    t = load_template("teacher_forcing", {})
    rec = {"id": "n", "question": "What is 2+3?", "choices": [], "answer": "5", "context": "Arithmetic."}
    assert t.query(rec) == "Question: What is 2+3?\nContext: Arithmetic.\nAnswer: 5\nRationale: Let's think step by step."


def test_no_gold_template_keeps_the_answer_out():
    t = load_template("no_gold", {})
    assert not t.uses_gold
    q = t.query(REC)
    assert "(b)" not in q.split("Options:")[1].split("\n", 1)[1] and q.endswith("Answer: Let's think step by step.")


def test_configured_template_overrides_and_is_checked():
    custom = {"mine": {"example": "Q: {{ question }} A: {{ answer_label }} R: {{ rationale }}", "separator": " | ",
                       "header": "Explain.", "stop": "\nQ:"}}
    t = load_template("mine", custom)
    assert t.prompt(REC, [(EX, "wet")]) == "Explain. | Q: Which is wet? A: (a) R: wet | Q: Which is red? A: (b) R:"
    assert t.stop == ("\nQ:",)
    bad = {
        "late": {"example": "{{ rationale }} Q: {{ question }}"},
        "typo": {"example": "Q: {{ questoin }} {{ rationale }}"},
        "syntax": {"example": "Q: {% if %} {{ rationale }}"},
        "keys": {"example": "{{ rationale }}", "sep": "x"},
    }
    for name, needle in [("late", "must end with"), ("typo", "questoin"), ("syntax", "line 1"), ("keys", "sep")]:
        with pytest.raises(ConfigError, match=needle) as e:
            load_template(name, bad)
        assert f"rationales.templates.{name}" in str(e.value)
    with pytest.raises(ConfigError, match="not defined.*teacher_forcing"):
        load_template("nope", {})


def test_gold_letter_needs_the_answer_among_the_choices():
    t = load_template("teacher_forcing", {})
    assert t.query({**REC, "answer": " APPLE "}).endswith("Answer: (b)\nRationale: Let's think step by step.")
    with pytest.raises(ConfigError, match="'r1'.*not one of its choices"):
        t.query({**REC, "answer": "pear"})


def test_examples_are_seeded_per_record_and_never_the_record_itself():
    pool = [f"p{i}" for i in range(10)]
    picks = {r: pick_examples(pool, r, 3, seed=0, dataset="d") for r in pool}
    assert all(len(set(p)) == 3 and r not in p for r, p in picks.items())
    # the same record gets the same examples whatever the pool order or the other records
    assert pick_examples(list(reversed(pool)), "p4", 3, 0, "d") == picks["p4"]
    assert pick_examples(pool, "p4", 3, 1, "d") != picks["p4"] or pick_examples(pool, "p4", 3, 2, "d") != picks["p4"]
    assert pick_examples(pool, "x", 0, 0, "d") == []
    with pytest.raises(ValueError, match="3 in-context examples wanted, 2 available"):
        pick_examples(["a", "b", "c"], "a", 3, 0, "d")


def test_stop_strings_cut_the_rationale():
    assert cut_at_stop(" A because B.\nQuestion: next\nmore", ["\nQuestion:", "\n\n"]) == "A because B."
    assert cut_at_stop("no stop here ", ["\nQ:"]) == "no stop here"


def test_request_hash_follows_prompt_and_settings():
    s = {"model": "m", "temperature": 0.0}
    assert request_hash("p", s) == request_hash("p", dict(reversed(list(s.items()))))
    assert request_hash("p", s) != request_hash("p2", s)
    assert request_hash("p", s) != request_hash("p", {**s, "temperature": 0.7})


def test_backoff_doubles_with_jitter_up_to_the_cap():
    for attempt, hi in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 30.0)]:
        d = [backoff_delay(attempt, 1.0, 30.0) for _ in range(50)]
        assert all(hi / 2 <= x <= hi for x in d) and len(set(d)) > 1
    assert backoff_delay(0, 1.0, 30.0, retry_after=5.0) >= 5.0
    assert backoff_delay(0, 1.0, 30.0, retry_after=500.0) == 30.0


def _entry(i: int) -> dict:
    return {"dataset": "d", "record_id": f"r{i}", "teacher": "t", "sample": 0, "request_hash": "h", "rationale": f"x{i}"}


def test_cache_survives_a_torn_last_line_and_keeps_the_first_answer(tmp_path):
    path = tmp_path / "c.jsonl"
    with ResultCache(path) as c:
        c.add(_entry(0))
        c.add({**_entry(0), "rationale": "second"})  # same key: ignored
    with open(path, "a") as f:
        f.write(json.dumps(_entry(1))[:25])  # a process killed mid-write
    with ResultCache(path) as c:
        assert c.torn_lines == 1 and len(c.entries) == 1
        c.add(_entry(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["record_id"] == "r2"
    with ResultCache(path) as c:
        assert sorted(e["record_id"] for e in c.entries.values()) == ["r0", "r2"]
        assert c.get(next(iter(c.entries)))["rationale"] == "x0"


def test_example_config_loads():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "rationales_example.yaml")
    rc = cfg.rationales
    assert [t.backend for t in rc.teachers] == ["openai", "local-t5"]
    assert load_template("short", rc.templates).uses_gold
