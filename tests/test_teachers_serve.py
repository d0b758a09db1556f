"""`tinyllm rationales` against a real OpenAI-compatible server: `transformers serve` on
127.0.0.1 serving a tiny random causal LM built here (HF_HUB_OFFLINE=1, --device cpu)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_teachers_support import (RecordingProxy, free_port, get_json, load, make_tiny_causal_lm, prompt_of,
                                   read_lines, wait_for, write_config)
from tinyllm_jax.teachers.generate import generate_rationales

pytest.importorskip("fastapi", reason="transformers serve needs the extra transformers[serving]")
pytest.importorskip("uvicorn", reason="transformers serve needs the extra transformers[serving]")


class Server:
    """`transformers serve MODEL_DIR` on a loopback port; `start`, `kill` and start again."""

    def __init__(self, model_dir: Path, log: Path):
        self.model_dir, self.log = model_dir, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        exe = Path(sys.executable).with_name("transformers")  # the CLI of this environment's transformers
        exe = str(exe) if exe.exists() else shutil.which("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([exe, "serve", str(self.model_dir), "--device", "cpu", "--host", "127.0.0.1",
                                          "--port", str(self.port), "--dtype", "float32"],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"transformers serve exited: {self.log.read_text()[-2000:]}"
            try:
                return get_json(f"http://127.0.0.1:{self.port}/health").get("status") == "ok"
            except OSError:
                return False

        wait_for(healthy, timeout=120, what="transformers serve to answer /health")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


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
