"""Helpers for the teacher tests (no tests here): a fault-injecting OpenAI-compatible stub,
a recording proxy, a tiny causal LM for `transformers serve`, record and config builders.
Everything listens on 127.0.0.1 only, on a free port the OS picks."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.request import Request, urlopen

from tinyllm_jax.config import load_config
from tinyllm_jax.data.records import make_record, write_jsonl

COLORS = ["red", "blue", "green", "yellow"]


def make_records(n: int, prefix: str = "q", rationale_teacher: str | None = None) -> list[dict[str, Any]]:
    """n multiple-choice records; the gold answer cycles through the choices."""
    recs = []
    for i in range(n):
        rats = {rationale_teacher: [f"seed rationale {i}. Thus, the answer is ({'abcd'[i % 4]})"]} if rationale_teacher else None
        recs.append(make_record(f"{prefix}{i}", f"Which colour is thing number {i}?", COLORS[i % 4], COLORS,
                                rationales=rats))
    return recs


def write_config(tmp: Path, teacher: dict[str, Any] | list[dict[str, Any]], records: int = 6,
                 examples: int | None = None, inputs: tuple[str, ...] = ("train",), **rationales: Any) -> Path:
    """A YAML config over `records` fresh records a file of `inputs` (and `examples` seed
    records, if given); `teacher` (or each of a list) is named t1 unless it says otherwise."""
    data = tmp / "data"
    for name in inputs:
        write_jsonl(data / f"{name}.jsonl", make_records(records))
    teachers = teacher if isinstance(teacher, list) else [teacher]
    rc: dict[str, Any] = {"input": [str(data / f"{name}.jsonl") for name in inputs], "output": str(tmp / "out"),
                          "teachers": [{"name": "t1", "max_tokens": 16, "timeout_s": 5, "backoff_s": 0.01,
                                        "max_backoff_s": 0.05, **t} for t in teachers], "progress": False}
    if examples is not None:
        write_jsonl(data / "seed.jsonl", make_records(examples, prefix="s", rationale_teacher="t1"))
        rc["examples_file"] = str(data / "seed.jsonl")
    rc.update(rationales)
    path = tmp / "cfg.yaml"
    path.write_text(json.dumps({"eval": {"task": "choice"}, "rationales": rc}), encoding="utf-8")
    return path


def load(path: Path, *overrides: str):
    return load_config(path, list(overrides))


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_of(body: dict[str, Any]) -> str:
    return body["prompt"] if "prompt" in body else body["messages"][-1]["content"]


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Polls `predicate` (bounded): the tests never wait on a clock, only on events."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- stub server


_GOLD = re.compile(r"Answer: (\(\w\))\nRationale: Let's think step by step\.$")


def echo_gold(body: dict[str, Any]) -> str:
    """A teacher that explains the gold label shown at the end of the prompt."""
    m = _GOLD.search(prompt_of(body))
    label = m.group(1) if m else "(a)"
    return f" Because it is. Thus, the answer is {label}\n\nQuestion: an invented follow-up"


class StubServer:
    """An OpenAI-compatible server in a thread. `faults` is a list of actions consumed one a
    request: an int (answer with that HTTP status), "drop" (close the connection without an
    answer) or "hang" (answer after `hang_s`). With `hold_after`, request number hold_after + 1
    and later wait until `release()`."""

    def __init__(self, answer: Callable[[dict], str] = echo_gold, hang_s: float = 1.0):
        self.answer, self.hang_s = answer, hang_s
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.faults: list[Any] = []
        self.always: int | None = None  # a status answered to every request
        self.served = 0
        self.in_flight = self.max_in_flight = 0
        self.hold_after: int | None = None
        self.refuse: Callable[[dict, str], tuple[int, dict] | None] | None = None  # (status, body) for (body, path)
        self.paths: list[str] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self._answer()
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def _answer(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.bodies.append(body)
                    stub.auth.append(self.headers.get("Authorization"))
                    fault = stub.faults.pop(0) if stub.faults else stub.always
                    hold = fault is None and stub.hold_after is not None and stub.served >= stub.hold_after
                with stub._lock:
                    stub.paths.append(self.path)
                refusal = stub.refuse(body, self.path) if stub.refuse else None
                if refusal is not None:
                    return self._send(*refusal)
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault == "hang":
                    time.sleep(stub.hang_s)
                elif isinstance(fault, int):
                    return self._send(fault, {"error": {"message": "injected"}}, {"Retry-After": "0"})
                if hold:
                    stub._release.wait(60)
                text = stub.answer(body)
                with stub._lock:
                    stub.served += 1
                choice = {"index": 0, "message": {"role": "assistant", "content": text}} if "messages" in body \
                    else {"index": 0, "text": text}
                self._send(200, {"id": "x", "object": "stub", "choices": [choice]})

            def _send(self, status, obj, headers=()):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- recording proxy


class RecordingProxy:
    """Forwards POSTs to `target` (a loopback base URL) and keeps the bodies it forwarded, and
    in `answered` those the target answered with 200; `on_answer(n)` runs after the n-th."""

    def __init__(self, target: str, on_answer: Callable[[int], None] | None = None):
        self.bodies: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.bodies.append(json.loads(raw))
                req = Request(target.rstrip("/") + self.path[len("/v1"):], data=raw,
                              headers={"Content-Type": "application/json"})
                with urlopen(req, timeout=120) as r:
                    status, data = r.status, r.read()
                if status == 200:
                    with proxy._lock:
                        proxy.answered.append(json.loads(raw))
                        n = len(proxy.answered)
                    if on_answer is not None:
                        on_answer(n)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        assert target.startswith("http://127.0.0.1:"), "the proxy forwards to loopback only"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- tiny causal LM


def make_tiny_causal_lm(out_dir: Path, seed: int = 0, text: str = "") -> Path:
    """A random 2-layer Llama (hidden 32) with a byte-level BPE tokenizer and a chat template,
    saved with save_pretrained. Its generation config has no EOS, so every answer runs to
    max_tokens and is never empty. `text` adds to what the tokenizer is trained on (pieces
    such as "[5]" then come out of the random model now and then)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Question: Which colour? Options: (a) red (b) blue Answer: (a) "
                             "Rationale: Let's think step by step." + text] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      pad_token_id=fast.pad_token_id, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(out_dir)
    return Path(out_dir)


# --------------------------------------------------------------------------- transformers serve


class Server:
    """`transformers serve MODEL_DIR` on a loopback port; `start`, `kill` and start again.
    With `model_dir` None it serves any local model a request names (loaded on demand)."""

    def __init__(self, model_dir: Path | None, log: Path):
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
            model = [str(self.model_dir)] if self.model_dir is not None else []
            self.proc = subprocess.Popen([exe, "serve", *model, "--device", "cpu", "--host", "127.0.0.1",
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


def get_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    assert url.startswith("http://127.0.0.1:")
    with urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())
