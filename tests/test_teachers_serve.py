"""`tinyllm rationales` against a real OpenAI-compatible server: `transformers serve` on
127.0.0.1 serving a tiny random causal LM built here (HF_HUB_OFFLINE=1, --device cpu)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from test_teachers_support import (RecordingProxy, Server, load, make_tiny_causal_lm, prompt_of, read_lines,
                                   write_config)
from tinyllm_jax.teachers.generate import generate_rationales

pytest.importorskip("fastapi", reason="transformers serve needs the extra transformers[serving]")
pytest.importorskip("uvicorn", reason="transformers serve needs the extra transformers[serving]")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    srv = Server(make_tiny_causal_lm(root / "tiny-lm"), root / "serve.log")
    srv.start()
    yield srv
    srv.kill()


def _teacher(srv: Server, base_url: str, **kw) -> dict:
    return {"base_url": base_url, "model": str(srv.model_dir), "max_tokens": 8, "concurrency": 2, "timeout_s": 60, **kw}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_real_server_gets_gold_answer_and_k_examples(tmp_path, server, endpoint):
    proxy = RecordingProxy(server.url)
    try:
        cfg = write_config(tmp_path, _teacher(server, proxy.url, endpoint=endpoint), records=4, examples=3)
        report = generate_rationales(load(cfg))
    finally:
        proxy.close()
    assert report["complete"], report
    recs = {r["id"]: r for r in read_lines(tmp_path / "out" / "train.jsonl")}
    assert len(proxy.bodies) == 4
    for body in proxy.bodies:
        prompt = prompt_of(body)
        assert ("messages" in body) == (endpoint == "chat")
        blocks = prompt.split("\n\n")
        assert len(blocks) == 3 and prompt.count("Question:") == 3  # k = 2 examples, then the query
        assert all(b.startswith("Question: ") and "Rationale: Let's think step by step. seed rationale" in b
                   for b in blocks[:2])
        rec = recs["q" + re.search(r"thing number (\d+)\?", blocks[2]).group(1)]
        gold = "abcd"[rec["choices"].index(rec["answer"])]
        assert blocks[2].endswith(f"Answer: ({gold})\nRationale: Let's think step by step.")
    for r in recs.values():
        assert len(r["rationales"]["t1"]) == 1 and r["rationales"]["t1"][0].strip()
        prov = r["provenance"]["t1"]
        assert prov["endpoint"] == endpoint and prov["samples"][0]["raw"]


def test_server_killed_mid_run_and_restarted_run_completes(tmp_path, server):
    seen = []

    def on_result(entry):
        seen.append(entry)
        if len(seen) == 3:  # mid-run: stop the server hard, start a fresh one (it takes seconds to load)
            server.kill()
            server.start(wait=False)

    starts = server.starts
    cfg = write_config(tmp_path, _teacher(server, server.url, num_samples=2, temperature=0.8, backoff_s=0.2,
                                          max_backoff_s=1.0, max_retries=120), records=6, examples=3)
    report = generate_rationales(load(cfg), on_result=on_result)
    server.wait_healthy()
    t = report["teachers"]["t1"]["train"]
    assert server.starts == starts + 1 and t["retries"] > 0, "the server was not down during the run"
    assert report["complete"] and t["new"] == 12 and t["failed"] == 0
    recs = read_lines(tmp_path / "out" / "train.jsonl")
    assert [len(r["rationales"]["t1"]) for r in recs] == [2] * 6
    keys = [(e["record_id"], e["sample"]) for e in read_lines(tmp_path / "out" / "cache.jsonl")]
    assert sorted(keys) == sorted({(r["id"], s) for r in recs for s in range(2)})


def test_pool_collection_interrupted_then_rerun_answers_every_request_once(tmp_path, server):
    """The server dies while the zero-shot in-context examples are collected and comes back
    while the run goes on: no prompt that shows examples is sent from a partial pool, the
    run ends incomplete, and the rerun sends each missing request once."""
    def on_answer(n):
        if n == 3:  # three of the four example requests answered: kill, restart (seconds to load)
            server.kill()
            server.start(wait=False)

    proxy = RecordingProxy(server.url, on_answer=on_answer)
    try:
        cfg = write_config(tmp_path, _teacher(server, proxy.url, concurrency=1, backoff_s=0.05, max_backoff_s=0.1,
                                              max_retries=2), records=6, zero_shot_pool=4)
        first = generate_rationales(load(cfg))
        server.wait_healthy()
        assert not first["complete"] and "in-context example requests failed" in first["teachers"]["t1"]["train"]["error"]
        assert len(proxy.answered) == 3  # nothing was asked with a partial pool
        second = generate_rationales(load(cfg))
    finally:
        proxy.close()
    assert second["complete"], second
    prompts = Counter(prompt_of(b) for b in proxy.answered)
    assert len(proxy.answered) == 4 + 6 and max(prompts.values()) == 1


def test_recipe_with_a_served_teacher_completes_after_a_server_kill(tmp_path, server, capsys):
    """`tinyllm recipe` with one OpenAI-compatible teacher (`transformers serve`): the server
    is killed mid-stage, the recipe stops with one error line; restarted, the rerun
    completes every stage and no request was answered twice."""
    from test_recipes import TINY_RECIPE, write_recipe
    from tinyllm_jax.cli import main

    def on_answer(n):
        if n == 8:
            server.kill()

    proxy = RecordingProxy(server.url, on_answer=on_answer)
    teacher = {**_teacher(server, proxy.url), "name": "llm", "concurrency": 2, "backoff_s": 0.05,
               "max_backoff_s": 0.1, "max_retries": 1, "max_consecutive_failures": 3}
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, source={"demo": {"n_train": 24, "n_valid": 8, "n_test": 8}},
                       rationales={"num_examples": 2, "zero_shot_pool": 4, "progress": False, "teachers": [teacher]},
                       rationale_splits=["train"],
                       data={**TINY_RECIPE["data"], "streams": [TINY_RECIPE["data"]["streams"][0],
                                                                {"name": "llm", "prefix": "explain: ", "teacher": "llm"}]})
    try:
        assert main(["recipe", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("tinyllm recipe: error: stage rationales: ") and "rerun" in err, err
        answered_before = len(proxy.answered)
        server.start()
        assert main(["recipe", str(cfg)]) == 0
        out = capsys.readouterr().out
    finally:
        proxy.close()
    assert "stage data: done, skipped" in out and "stage rationales: resuming" in out
    assert 8 <= answered_before < 4 + 24
    prompts = Counter((prompt_of(b), b.get("seed")) for b in proxy.answered)
    assert len(proxy.answered) == 4 + 24 and max(prompts.values()) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(s["status"] == "done" for s in summary["stages"].values()) and "test_accuracy" in summary


def test_transformers_serve_samples_only_when_the_generation_config_allows_it(tmp_path, server):
    """What the README says of `transformers serve`: a temperature above 0 does not make it
    sample while the model's generation config says do_sample: false (two seeds, one text);
    `extra_body: {generation_config: '{"do_sample": true}'}` does (two seeds, two texts)."""
    def samples(out: str, **kw) -> list[list[str]]:
        cfg = write_config(tmp_path / out, _teacher(server, server.url, num_samples=2, temperature=1.0,
                                                    max_tokens=12, **kw), records=3, num_examples=0)
        assert generate_rationales(load(cfg))["complete"]
        return [[p["raw"] for p in r["provenance"]["t1"]["samples"]]
                for r in read_lines(tmp_path / out / "out" / "train.jsonl")]

    greedy = samples("greedy")
    assert all(a == b for a, b in greedy), greedy
    sampled = samples("sampled", extra_body={"generation_config": json.dumps({"do_sample": True})})
    assert any(a != b for a, b in sampled), sampled
