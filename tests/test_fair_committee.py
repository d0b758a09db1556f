"""FAIR's committee against OpenAI-compatible servers (issue 23, items 12-17): one review
per (rationale, reviewer) whatever the teachers' `num_samples`, every reply accounted for
(an empty one shown as "empty"), verdicts that name the rationale's own sample number,
requests counted across a failed and a resumed run, one report per author, per-stage
sampling settings, and a --dry-run whose request counts are what the run then sends."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections import Counter
from pathlib import Path


from test_fair import FAIR, check_review
from test_recipes import write_recipe
from test_teachers_support import StubServer, prompt_of
from tinyllm_jax.cli import main


def kind_of(body: dict) -> str:
    prompt = prompt_of(body)
    return "review" if "You are a reviewer" in prompt else "feedback" if "You are a teacher" in prompt else "rationale"


class Committee:
    """Three teachers behind one stub server, told apart by `model`:
        t1  its first rationale for a question is empty, its second is not; reviews "[5]"
        t2  reviews with an empty reply (a content filter, a model out of tokens)
        t3  reviews "[4]"
    With `fail_after_reviews`, every request after that many answered reviews gets HTTP 500."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: Counter = Counter()
        self.answered: list[dict] = []
        self.fail_after_reviews: int | None = None
        self.stub = StubServer(self.answer)

    def answer(self, body: dict) -> str:
        kind, model, prompt = kind_of(body), body["model"], prompt_of(body)
        with self.lock:
            self.seen[(model, prompt)] += 1
            first = self.seen[(model, prompt)] == 1
            self.answered.append(body)
            reviews = sum(kind_of(b) == "review" for b in self.answered)
            if self.fail_after_reviews is not None and reviews >= self.fail_after_reviews:
                self.stub.always = 500  # this answer still goes out; the next requests fail
        if kind == "feedback":
            return " Check each step against the question."
        if kind == "review":
            return {"m1": " Sound. Score: [5]", "m2": "", "m3": " Mostly right. [4]"}[model]
        if model == "m1" and first:
            return ""
        return " Count what is left. The answer is (a)."

    def counts(self) -> Counter:
        return Counter(kind_of(b) for b in self.answered)

    def close(self) -> None:
        self.stub.close()


def planned(out: str) -> dict[str, tuple[int, bool]]:
    """stage -> (requests the --dry-run says it will send, exact)."""
    plans, stage = {}, None
    for line in out.splitlines():
        if line.startswith("stage "):
            stage = line[len("stage "):].split(":")[0]
        m = re.match(r"\s+to do:\s+(at most )?(\d+) requests to send", line)
        if m and stage:
            plans[stage] = (int(m.group(2)), m.group(1) is None)
    return plans


def test_committee_one_review_per_pair_every_reply_counted_and_dry_run_exact(tmp_path, capsys):
    committee = Committee()
    teachers = [{"name": f"t{i}", "backend": "openai", "base_url": committee.stub.url, "model": f"m{i}",
                 "num_samples": 2,  # the old teacher-wide key: the default of feedback and rationales
                 "temperature": 0.3, "max_tokens": 16, "concurrency": 1, "timeout_s": 10, "max_retries": 1,
                 "backoff_s": 0.01, "max_backoff_s": 0.02, "max_consecutive_failures": 2} for i in (1, 2, 3)]
    run_dir = tmp_path / "run"
    cfg = str(write_recipe(tmp_path / "r.yaml", run_dir, **{
        **FAIR, "source": {"demo": {"seed": 0, "n_train": 12, "n_valid": 8, "n_test": 8}, "keep_rationales": True},
        "rationales": {"progress": False, "teachers": teachers},
        "fair": {**FAIR["fair"], "rounds": 1,
                 "feedback_sampling": {"num_samples": 1},  # per stage: one feedback a teacher
                 "rationale_sampling": {"temperature": 0.8}},  # review_sampling unset: one review a pair
        "export": {"enabled": False}}))

    def dry_run() -> dict[str, tuple[int, bool]]:
        capsys.readouterr()
        assert main(["recipe", cfg, "--dry-run"]) == 0
        return planned(capsys.readouterr().out)

    def sent(kind: str, since: int = 0) -> int:
        return sum(kind_of(b) == kind for b in committee.answered[since:])

    try:
        for stage in ("data", "warmup", "round1/mine"):
            assert main(["recipe", cfg, "--only", stage]) == 0
        m = len((run_dir / "round1" / "mine" / "mistakes.jsonl").read_text().splitlines())
        assert m > 0
        plan = dry_run()
        assert plan["round1/feedback"] == (3 * m, True)  # 3 teachers x 1 sample (feedback_sampling)
        assert plan["round1/rationales"] == (6 * m, True)  # 3 teachers x 2 samples (the teachers' num_samples)
        assert plan["round1/review"] == (12 * m, False)  # 6m rationales x 2 reviewers x 1, less the empty ones
        assert main(["recipe", cfg, "--only", "round1/feedback"]) == 0
        assert main(["recipe", cfg, "--only", "round1/rationales"]) == 0
        assert (sent("feedback"), sent("rationale")) == (3 * m, 6 * m)
        assert all(b["temperature"] == (0.8 if kind_of(b) == "rationale" else 0.3) for b in committee.answered)

        # t1's first samples are empty: 5m rationales to review, each by the two other teachers, once
        assert dry_run()["round1/review"] == (10 * m, True)
        committee.fail_after_reviews = 4
        assert main(["recipe", cfg]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("tinyllm recipe: error: stage round1/review: ") and "review requests failed" in err, err
        assert sent("review") == 4
        assert dry_run()["round1/review"] == (10 * m - 4, True)
        committee.stub.always, committee.fail_after_reviews = None, None
        before = len(committee.answered)
        assert main(["recipe", cfg]) == 0
        assert sent("review", before) == 10 * m - 4 and sent("review") == 10 * m
        assert committee.counts() == {"feedback": 3 * m, "rationale": 6 * m, "review": 10 * m}
    finally:
        committee.close()

    review_dir = run_dir / "round1" / "review"
    reviewed, kept = check_review(review_dir)
    assert reviewed == 5 * m and kept == 5 * m  # [5] or [4] from the one reviewer that answers
    result = json.loads((review_dir / "stage.json").read_text())["result"]
    assert result["empty"] == 3 * m  # t2's replies to t1's and t3's rationales
    assert result["scores"] + result["empty"] + result["unparseable"] + result["out of range"] == 10 * m
    for line in (review_dir / "mistakes.jsonl").read_text().splitlines():
        rec = json.loads(line)
        (v1,) = rec["provenance"]["t1"]["review"]
        assert v1["sample"] == 1  # its sample 0 was empty: the reviewed rationale is sample 1
        assert v1["status"] == {"t2": "empty", "t3": "ok"} and v1["scores"] == {"t2": None, "t3": 4.0}
        for v in rec["provenance"]["t2"]["review"]:
            assert v["status"] == {"t1": "ok", "t3": "ok"}
        assert [v["sample"] for v in rec["provenance"]["t3"]["review"]] == [0, 1]
    reports = sorted(p.parent.name for p in (review_dir / "replies").glob("*/report.json"))
    assert len(reports) == 3 and all(json.loads((review_dir / "replies" / r / "report.json").read_text())["complete"]
                                     for r in reports)
    start, rd = json.loads((run_dir / "rounds.json").read_text())["rounds"]  # round 0: the warm-up student
    assert start["round"] == 0 and rd["round"] == 1
    assert rd["requests"] == rd["sent"] == 19 * m  # every request, over both runs
    assert rd["cached"] == 4  # answered by the failed run, read from the cache by the one that finished
    assert rd["empty_reviews"] == 3 * m


def test_per_stage_sampling_as_the_readme_shows_it(tmp_path, capsys):
    """The README's `fair:` sampling block loads, and each stage asks its teachers as it says:
    unset keys keep the teacher's own (its num_samples the default of feedback and
    rationales), a review is one sample unless review_sampling says more."""
    import yaml

    from tinyllm_jax.recipes.config import load_recipe
    from tinyllm_jax.recipes.fair_committee import sampled

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("**Sampling, stage by stage.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    teacher = {"name": "t1", "backend": "openai", "model": "m", "num_samples": 3, "temperature": 0.5, "top_p": 0.9}
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "run", **{
        **FAIR, "rationales": {"teachers": [teacher, {**teacher, "name": "t2"}]},
        "fair": {**FAIR["fair"], **yaml.safe_load(block)["fair"]}})
    f = load_recipe(str(path)).fair
    t = load_recipe(str(path)).rationales.teachers[0]
    feedback, rationale, review = (sampled(t, f.feedback_sampling), sampled(t, f.rationale_sampling),
                                   sampled(t, f.review_sampling, review=True))
    assert (feedback.num_samples, feedback.temperature, feedback.top_p) == (1, 0.5, 0.9)
    assert (rationale.num_samples, rationale.temperature, rationale.top_p) == (2, 0.8, 0.9)
    assert (review.num_samples, review.temperature) == (1, 0.0)
    assert sampled(t, dataclasses.replace(f.review_sampling, num_samples=3), review=True).num_samples == 3
    assert main(["recipe", str(path), "fair.review_sampling.num_samples=0", "--dry-run"]) == 2
    assert "key 'fair.review_sampling.num_samples': expected a whole number at least 1, found 0" in capsys.readouterr().err
    assert main(["recipe", str(path), "fair.rationale_sampling.top_p=0", "--dry-run"]) == 2
    assert "key 'fair.rationale_sampling.top_p': expected a number above 0 and at most 1, found 0.0" in \
        capsys.readouterr().err
