"""`tinyllm rationales` against a fault-injecting OpenAI-compatible stub on 127.0.0.1:
retries, resume after failures and after SIGKILL, the API key kept out of every file."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_teachers_support import StubServer, load, prompt_of, read_lines, wait_for, write_config
from tinyllm_jax.config import ConfigError
from tinyllm_jax.teachers.generate import IncompleteRun, generate_command, generate_rationales


@pytest.fixture
def stub():
    s = StubServer()
    yield s
    s.close()


def _check_complete(out: Path, n_records: int, samples: int, teacher: str = "t1") -> list[dict]:
    recs = read_lines(out / "train.jsonl")
    assert len(recs) == n_records
    for r in recs:
        assert len(r["rationales"][teacher]) == samples, r["id"]
        assert [s["sample"] for s in r["provenance"][teacher]["samples"]] == list(range(samples))
    keys = [(e["record_id"], e["teacher"], e["sample"], e["request_hash"]) for e in read_lines(out / "cache.jsonl")]
    assert len(keys) == len(set(keys)), "a request was answered twice"
    return recs


def test_zero_shot_pool_then_few_shot_with_provenance(tmp_path, stub):
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "num_samples": 2}, records=6, zero_shot_pool=4)
    report = generate_rationales(load(cfg))
    assert report["complete"]
    zero = [b for b in stub.bodies if prompt_of(b).count("Question:") == 1]
    few = [b for b in stub.bodies if prompt_of(b).count("Question:") == 3]
    assert len(zero) == 4 and len(few) == 12 and len(stub.bodies) == 16  # k = 2 examples in every few-shot prompt
    recs = _check_complete(tmp_path / "out", 6, 2)
    pool_ids = {b["prompt"].split("number ")[1].split("?")[0] for b in zero}
    for r in recs:
        prov = r["provenance"]["t1"]
        assert prov["model"] == "m" and prov["template"] == "teacher_forcing" and prov["gold_in_prompt"]
        assert prov["temperature"] == 0.0 and prov["stage"] == "few-shot"
        assert len(prov["examples"]) == 2 and r["id"] not in prov["examples"]
        assert {e[1:] for e in prov["examples"]} <= pool_ids  # examples come from the zero-shot pass
        s = prov["samples"][0]
        assert s["raw"].startswith(" Because it is.") and "\nQuestion: an invented" in s["raw"]
        assert r["rationales"]["t1"][0] == s["raw"].split("\n\n")[0].strip()  # cut at the stop string
        assert s["correct"] is True and r["teacher_answers"]["t1"] == [r["answer"]] * 2
    t = report["teachers"]["t1"]["train"]
    assert (t["requests"], t["new"], t["agree"], t["parsed"], t["pool"]["new"]) == (12, 12, 12, 12, 4)
    assert (tmp_path / "out" / "report.json").is_file()


def test_429_5xx_timeouts_and_dropped_connections_are_retried(tmp_path, stub):
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "timeout_s": 0.3, "concurrency": 2},
                       records=4, examples=3)
    stub.faults = [429, 503, "drop", "hang", 500]
    stub.hang_s = 1.0
    report = generate_rationales(load(cfg))
    t = report["teachers"]["t1"]["train"]
    assert report["complete"] and t["retries"] == 5 and t["failed"] == 0
    assert len(stub.bodies) == 4 + 5
    _check_complete(tmp_path / "out", 4, 1)


def test_a_lone_429_is_retried_and_the_key_is_never_logged(tmp_path, stub, monkeypatch, caplog, capsys):
    secret = "sk-log-test-0123456789"
    monkeypatch.setenv("TINYLLM_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "concurrency": 1, "api_key_env": "TINYLLM_TEST_KEY"},
                       records=1, num_examples=0, progress=True)
    stub.faults = [429]
    report = generate_command(load(cfg))
    assert report["complete"] and report["teachers"]["t1"]["train"]["retries"] == 1
    assert len(stub.bodies) == 2 and stub.bodies[0] == stub.bodies[1] and stub.auth == [f"Bearer {secret}"] * 2
    assert "retry 1/6" in caplog.text and "HTTP 429" in caplog.text
    out = capsys.readouterr()
    assert secret not in caplog.text + out.out + out.err
    assert all(secret.encode() not in p.read_bytes() for p in (tmp_path / "out").rglob("*"))


def test_failures_are_reported_and_a_rerun_sends_only_what_is_missing(tmp_path, stub):
    teacher = {"base_url": stub.url, "model": "m", "max_retries": 1, "concurrency": 1}
    cfg = write_config(tmp_path, teacher, records=5, examples=3)
    stub.faults = [400, 503, 503]  # one request refused, one out of retries
    with pytest.raises(IncompleteRun, match="2 rationale requests failed"):
        generate_command(load(cfg))
    recs = read_lines(tmp_path / "out" / "train.jsonl")
    assert sorted(len(r["rationales"].get("t1", [])) for r in recs) == [0, 0, 1, 1, 1]
    assert "t1" not in recs[0]["rationales"] and "t1" not in recs[0].get("provenance", {})
    sent = len(stub.bodies)
    report = generate_command(load(cfg))
    assert report["complete"] and len(stub.bodies) == sent + 2
    assert report["teachers"]["t1"]["train"]["cached"] == 3
    _check_complete(tmp_path / "out", 5, 1)
    generate_command(load(cfg))  # all cached: nothing sent
    assert len(stub.bodies) == sent + 2
    cfg = write_config(tmp_path, {**teacher, "temperature": 0.5}, records=5, examples=3)
    generate_command(load(cfg))  # a new sampling setting is a new request
    assert len(stub.bodies) == sent + 2 + 5


def test_a_field_the_server_refuses_is_named_and_can_be_left_out(tmp_path, stub):
    """OpenAI's reasoning models refuse `max_tokens` (they take `max_completion_tokens`) with a
    400 that names it: the report says so and how to leave it out; `extra_body` with the field
    set to null sends requests without it."""
    def reasoning_model(body, path):
        if "max_tokens" in body:
            return 400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this "
                                              "model. Use 'max_completion_tokens' instead.",
                                   "type": "invalid_request_error", "param": "max_tokens",
                                   "code": "unsupported_parameter"}}
        return None

    stub.refuse = reasoning_model
    teacher = {"base_url": stub.url, "model": "o4-mini", "endpoint": "chat", "max_retries": 0, "concurrency": 1,
               "max_consecutive_failures": 2}
    report = generate_rationales(load(write_config(tmp_path, teacher, records=3, num_examples=0)))
    error = report["teachers"]["t1"]["train"]["error"]
    assert not report["complete"] and len(stub.bodies) == 2, report
    assert "Unsupported parameter: 'max_tokens'" in error and "`extra_body: {FIELD: null}`" in error, error

    stub.bodies.clear()
    teacher["extra_body"] = {"max_tokens": None, "max_completion_tokens": 64}
    report = generate_rationales(load(write_config(tmp_path, teacher, records=3, num_examples=0)))
    assert report["complete"] and len(stub.bodies) == 3
    assert all("max_tokens" not in b and b["max_completion_tokens"] == 64 for b in stub.bodies)

    stub.refuse = lambda body, path: (400, {"error": {"message": "prompt is too long"}})  # not about a field: no hint
    stub.bodies.clear()
    report = generate_rationales(load(write_config(tmp_path / "other", teacher, records=3, num_examples=0)))
    assert "prompt is too long" in report["teachers"]["t1"]["train"]["error"]
    assert "extra_body" not in report["teachers"]["t1"]["train"]["error"]


def test_a_404_says_whether_the_model_or_the_address_is_wrong(tmp_path, stub):
    """vLLM answers an unknown model with 404 and says so; a base_url without /v1 gets a bare 404.
    A base_url pasted with its endpoint is taken as its /v1."""
    def vllm(body, path):
        if not path.startswith("/v1/"):
            return 404, {"detail": "Not Found"}
        if body["model"] != "served":
            return 404, {"object": "error", "message": f"The model `{body['model']}` does not exist.",
                         "type": "NotFoundError", "code": 404}
        return None

    stub.refuse = vllm
    root = stub.url.removesuffix("/v1")
    teacher = {"endpoint": "chat", "max_retries": 0, "concurrency": 1, "max_consecutive_failures": 1}
    for i, (base_url, model, said) in enumerate([
            (stub.url, "Qwen/Qwen3-8B", f"the server does not serve model 'Qwen/Qwen3-8B': GET {stub.url}/models"),
            (root, "served", f"nothing answers at {root}/chat/completions: base_url usually ends in /v1")]):
        cfg = write_config(tmp_path / str(i), {**teacher, "base_url": base_url, "model": model}, records=2,
                           num_examples=0)
        error = generate_rationales(load(cfg))["teachers"]["t1"]["train"]["error"]
        assert "HTTP 404" in error and said in error, error
    stub.paths.clear()
    cfg = write_config(tmp_path / "pasted", {**teacher, "base_url": stub.url + "/chat/completions/", "model": "served"},
                       records=2, num_examples=0)
    assert generate_rationales(load(cfg))["complete"] and set(stub.paths) == {"/v1/chat/completions"}


def test_a_401_says_whether_a_key_was_sent(tmp_path, stub, monkeypatch):
    stub.refuse = lambda body, path: (401, {"error": {"message": "Incorrect API key provided."}})
    teacher = {"base_url": stub.url, "model": "m", "max_retries": 0, "concurrency": 1, "max_consecutive_failures": 1}
    error = generate_rationales(load(write_config(tmp_path / "a", teacher, records=2, num_examples=0)))
    assert "no key was sent: name the environment variable holding it with api_key_env" in \
        error["teachers"]["t1"]["train"]["error"]
    monkeypatch.setenv("TINYLLM_TEST_KEY", "sk-wrong-123456")
    cfg = write_config(tmp_path / "b", {**teacher, "api_key_env": "TINYLLM_TEST_KEY"}, records=2, num_examples=0)
    error = generate_rationales(load(cfg))["teachers"]["t1"]["train"]["error"]
    assert "the key in $TINYLLM_TEST_KEY was refused" in error and "sk-wrong" not in error


def test_a_dead_server_stops_the_run_early(tmp_path, stub):
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "max_retries": 0, "concurrency": 1,
                                  "max_consecutive_failures": 3}, records=8, examples=3, inputs=("train", "test"))
    stub.always = 500
    report = generate_rationales(load(cfg))
    t = report["teachers"]["t1"]
    assert not report["complete"] and t["train"]["failed"] == 3 and len(stub.bodies) == 3
    assert "3 requests in a row failed" in t["train"]["error"] and report["missing"] == 16
    assert t["test"]["error"].startswith("not started") and t["test"]["new"] == 0


def test_two_teachers_two_templates_each_fill_their_own_fields(tmp_path, stub):
    teachers = [{"name": "forced", "base_url": stub.url, "model": "m"},
                {"name": "free", "base_url": stub.url, "model": "m2", "endpoint": "chat", "template": "no_gold",
                 "system_prompt": "You are a careful teacher."}]
    cfg = write_config(tmp_path, teachers, records=3, num_examples=0)
    assert generate_rationales(load(cfg))["complete"]
    chat = [b for b in stub.bodies if "messages" in b]
    plain = [b for b in stub.bodies if "prompt" in b]
    assert len(chat) == len(plain) == 3
    assert all(b["model"] == "m2" and b["messages"][0] == {"role": "system", "content": "You are a careful teacher."}
               and "Answer: (" not in prompt_of(b) for b in chat)
    assert all(b["model"] == "m" and "Answer: (" in b["prompt"] for b in plain)
    for r in read_lines(tmp_path / "out" / "train.jsonl"):
        assert set(r["rationales"]) == set(r["provenance"]) == {"forced", "free"}
        assert r["provenance"]["free"]["gold_in_prompt"] is False and r["provenance"]["free"]["endpoint"] == "chat"


def test_bad_records_fail_before_any_request(tmp_path, stub):
    cfg = write_config(tmp_path, [{"base_url": stub.url, "model": "m"},
                                  {"name": "t2", "base_url": stub.url, "model": "m"}], records=3, num_examples=0)
    recs = read_lines(tmp_path / "data" / "train.jsonl")
    recs[2]["answer"] = "purple"
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(ConfigError, match=r"train.jsonl: teacher 't1': record 'q2': answer 'purple' is not one"):
        generate_rationales(load(cfg))
    assert stub.bodies == []


def test_missing_api_key_variable_is_a_config_error(tmp_path, stub, monkeypatch):
    monkeypatch.delenv("TINYLLM_ABSENT_KEY", raising=False)
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "api_key_env": "TINYLLM_ABSENT_KEY"})
    with pytest.raises(ConfigError, match=r"\$TINYLLM_ABSENT_KEY.*not set"):
        generate_rationales(load(cfg))
    assert stub.bodies == []


def test_sigkill_mid_run_then_rerun_and_the_key_stays_secret(tmp_path, stub):
    secret = "sk-test-9f8e7d6c5b4a-secret"
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "num_samples": 2, "concurrency": 3,
                                  "api_key_env": "TINYLLM_TEST_KEY"}, records=8, examples=3, progress=True)
    env = {**os.environ, "TINYLLM_TEST_KEY": secret, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "tinyllm_jax.cli", "rationales", str(cfg)]
    cache = tmp_path / "out" / "cache.jsonl"
    stub.hold_after = 5  # the sixth and later requests wait: the run is certainly mid-way when killed
    logs = []
    with open(tmp_path / "run1.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: cache.exists() and len(read_lines(cache)) >= 5, what="five cached answers")
            wait_for(lambda: len(stub.bodies) >= 8, what="three requests in flight")
            assert stub.max_in_flight == 3  # never more than `concurrency`
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    logs.append((tmp_path / "run1.log").read_bytes())
    assert proc.returncode == -signal.SIGKILL
    assert len(read_lines(cache)) == 5
    stub.hold_after = None
    stub.release()
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    logs.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr.decode()
    recs = _check_complete(tmp_path / "out", 8, 2)
    assert len(read_lines(cache)) == 16
    answered = collections.Counter((b["prompt"], b["seed"]) for b in stub.bodies)
    assert len(answered) == 16  # every request was sent; the killed in-flight ones were sent again
    assert set(stub.auth) == {f"Bearer {secret}"}
    for path in (tmp_path / "out").rglob("*"):
        assert secret.encode() not in path.read_bytes(), path
    for text in logs:
        assert secret.encode() not in text
    assert b"complete" in logs[-1] and all("t1" in r["rationales"] for r in recs)


def test_no_prompt_is_built_from_a_partial_example_pool(tmp_path, stub):
    """One of the four zero-shot example requests fails for good: three examples would be
    enough for k = 2, but prompts built from them would differ from the rerun's, and every
    record would be asked twice. So none is sent until the pool is complete."""
    stub.faults = [None, None, None, 500, 500, 500]  # the 4th example request fails 3 times
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "concurrency": 1, "max_retries": 2},
                       records=6, zero_shot_pool=4)
    with pytest.raises(IncompleteRun):
        generate_command(load(cfg))
    counts = json.loads((tmp_path / "out" / "report.json").read_text())["teachers"]["t1"]["train"]
    assert "1 of 4 in-context example requests failed" in counts["error"] and counts["pool"]["failed"] == 1
    assert all(prompt_of(b).count("Question:") == 1 for b in stub.bodies)  # only example requests went out
    report = generate_rationales(load(cfg))
    assert report["complete"]
    answered = collections.Counter(prompt_of(b) for b in stub.bodies[len(stub.bodies) - 7:])
    assert len(answered) == 7 and max(answered.values()) == 1  # the missing example, then each record once
    few = [b for b in stub.bodies if prompt_of(b).count("Question:") == 3]
    assert len(few) == 6
    _check_complete(tmp_path / "out", 6, 1)


def test_several_greedy_samples_warn(tmp_path, stub, caplog):
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "num_samples": 3}, records=2, examples=3)
    with caplog.at_level(logging.WARNING, logger="tinyllm.rationales"):
        generate_rationales(load(cfg))
    assert "num_samples=3 at temperature 0" in caplog.text


@pytest.mark.parametrize("shape", ["closed", "opened_in_the_prompt", "parts"])
def test_a_reasoning_models_thinking_is_not_its_rationale(tmp_path, stub, shape):
    """Qwen3 or R1 served without a reasoning parser reply "<think>...</think>" then the answer
    (or, when the chat template opens the block in the prompt, start inside it): the rationale
    and the answer read are the visible reply. A reply cut off while thinking says nothing."""
    from test_teachers_support import echo_gold

    def thinking(body):
        visible = echo_gold(body)
        hidden = "Let me think. Maybe the answer is (z)? Thus, the answer is (z)\n"
        if "number 2?" in prompt_of(body).rsplit("Question:", 1)[1]:
            return "<think>\nstill thinking when max_tokens ran out"
        if shape == "opened_in_the_prompt":
            return f"{hidden}</think>\n\n{visible.lstrip()}"
        return f"<think>\n{hidden}</think>\n\n{visible.lstrip()}"

    stub.answer = thinking
    cfg = write_config(tmp_path, {"base_url": stub.url, "model": "m", "endpoint": "chat" if shape == "parts" else "completions"},
                       records=4)
    if shape == "parts":  # content as a list of parts, as some OpenAI-compatible servers send it
        import tinyllm_jax.teachers.backends as backends
        assert backends._content({"content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"text": "b"}]}) == "ab"
    generate_rationales(load(cfg))
    recs = read_lines(tmp_path / "out" / "train.jsonl")
    kept = [r for r in recs if r.get("rationales", {}).get("t1")]
    assert len(kept) == 3, recs
    for r in kept:
        (text,) = r["rationales"]["t1"]
        assert "think" not in text and "(z)" not in text and text.startswith("Because it is."), text
        assert r["teacher_answers"]["t1"] == [r["answer"]]
    entries = read_lines(tmp_path / "out" / "cache.jsonl")
    assert sorted(e["raw"] for e in entries)[0] == ""  # the one cut off mid-thought: nothing said
