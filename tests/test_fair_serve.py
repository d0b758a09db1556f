"""A FAIR round against a real `transformers serve` on 127.0.0.1 serving two tiny random
causal LMs as the committee: mine -> feedback -> rationales -> review -> train -> evaluate
completes; the accepted set is what the review scores imply; each rationale is reviewed once
by each other teacher though the teachers sample twice, and every reply (an empty one too)
is counted; the server killed during the review and restarted, the rerun completes and no
request is answered twice."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from test_fair import FAIR, check_review
from test_recipes import write_recipe
from test_teachers_support import RecordingProxy, Server, make_tiny_causal_lm, prompt_of
from tinyllm_jax.cli import main

pytest.importorskip("fastapi", reason="transformers serve needs the extra transformers[serving]")
pytest.importorskip("uvicorn", reason="transformers serve needs the extra transformers[serving]")

SCORES = " Score: [1] [2] [3] [4] [5] [4/5]"  # so that the random models write brackets now and then


def test_fair_round_with_served_teachers_survives_a_server_kill_during_review(tmp_path, capsys):
    models = [make_tiny_causal_lm(tmp_path / f"lm{i}", seed=i, text=SCORES) for i in (1, 2)]
    server = Server(None, tmp_path / "serve.log")  # no forced model: each request names its own
    server.start()
    reviews = []

    def on_answer(n):
        body = proxy.answered[n - 1]
        if "You are a reviewer" in prompt_of(body):
            reviews.append(n)
            if len(reviews) == 3:
                server.kill()

    proxy = RecordingProxy(server.url, on_answer=on_answer)
    teachers = [{"name": f"t{i}", "backend": "openai", "base_url": proxy.url, "model": str(m), "max_tokens": 10,
                 "num_samples": 2, "temperature": 0.8,
                 "concurrency": 1, "timeout_s": 60, "backoff_s": 0.05, "max_backoff_s": 0.1, "max_retries": 1,
                 "max_consecutive_failures": 2} for i, m in enumerate(models, 1)]
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{
        **FAIR, "source": {"demo": {"seed": 0, "n_train": 12, "n_valid": 8, "n_test": 8}, "keep_rationales": True},
        "rationales": {"progress": False, "teachers": teachers}, "fair": {**FAIR["fair"], "rounds": 1},
        "export": {"enabled": False}})
    try:
        assert main(["recipe", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("tinyllm recipe: error: stage round1/review: "), err
        server.start()
        assert main(["recipe", str(cfg)]) == 0
        out = capsys.readouterr().out
    finally:
        proxy.close()
        server.kill()
    assert "stage round1/feedback: done, skipped" in out and "stage round1/review: resuming" in out
    asked = Counter((b["model"], prompt_of(b), b.get("seed")) for b in proxy.answered)
    assert max(asked.values()) == 1, [k for k, v in asked.items() if v > 1][:2]
    mistakes = len((run_dir / "round1" / "mine" / "mistakes.jsonl").read_text().splitlines())
    assert mistakes > 0
    # each teacher: 2 feedback samples and 2 rationale samples a mistake; each rationale that is
    # not empty reviewed once by the other teacher (not once a sample)
    rationales = sum(len(x) for line in (run_dir / "round1" / "rationales" / "mistakes.jsonl").read_text().splitlines()
                     for x in json.loads(line)["rationales"].values())
    kinds = Counter(("review" if "You are a reviewer" in prompt_of(b) else
                     "feedback" if "You are a teacher" in prompt_of(b) else "rationale") for b in proxy.answered)
    assert kinds == {"feedback": 4 * mistakes, "rationale": 4 * mistakes, "review": rationales}
    reviewed, _ = check_review(run_dir / "round1" / "review")
    assert reviewed == rationales
    review = json.loads((run_dir / "round1" / "review" / "stage.json").read_text())["result"]
    assert review["scores"] + review["empty"] + review["unparseable"] + review["out of range"] == rationales
    assert review["requests"] == review["sent"] == rationales
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(s["status"] == "done" for s in summary["stages"].values()) and "test_accuracy" in summary
