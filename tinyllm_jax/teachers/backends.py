"""Teacher backends: any OpenAI-compatible server, or a local JAX T5 (see local_t5.py).

A backend takes a list of `Job`s and reports each one, as soon as it is settled, through
`on_done(job, text)` or `on_fail(job, reason)`. The OpenAI-compatible backend keeps at most
`concurrency` requests in flight (asyncio workers over one httpx2 client) and retries 429,
5xx, timeouts and dropped connections with exponential backoff and jitter, honouring
Retry-After. The retry loop is written here rather than taken from the `openai` SDK so
that its count, delays and logging are ours to bound, test and keep free of the API key.

A reasoning model's hidden thinking is not its reply: `<think>...</think>` in the content
(Qwen3, DeepSeek-R1 and their distills served without a reasoning parser; the chat template
may open the block in the prompt, so the reply starts inside it) is dropped, and a reply
still thinking when it was cut off says nothing. A reasoning parser's separate
`reasoning_content`/`reasoning` field is never read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx2

from tinyllm_jax.config import ConfigError, TeacherConfig
from tinyllm_jax.errors import UserError

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx


@dataclass
class Job:
    """One request: a prompt, the seed of its sample, and the cache key it fills."""

    key: str
    prompt: str
    seed: int
    info: dict[str, Any] = field(default_factory=dict)  # copied into the cache entry
    record: dict[str, Any] | None = None  # the record asked about (the demo teacher reads it; servers never see it)


@dataclass
class RunStats:
    done: int = 0
    failed: int = 0
    retries: int = 0
    not_started: int = 0  # left when the run stopped after too many failures in a row
    aborted: str = ""  # why the run stopped early, if it did


OnDone = Callable[[Job, str], None]
OnFail = Callable[[Job, str], None]


_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)


def visible_reply(text: str | None) -> str:
    """A reply less its thinking: closed `<think>` blocks removed; everything up to a closing
    tag whose opening was in the prompt; an unclosed block to the end (cut off mid-thought)."""
    text = text or ""
    if "<think>" not in text and "</think>" not in text:
        return text
    text = _THINKING.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.lstrip()  # the reply after its thinking starts on a new paragraph


def _content(message: Any) -> str | None:
    """A chat message's content: a string, or a list of parts whose text parts are joined."""
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return content


class TeacherUnreachable(UserError):
    """Nothing listens at a teacher's base_url."""


class RequestFailed(Exception):
    """A request that will not succeed by retrying (or ran out of retries)."""


def read_api_key(teacher: TeacherConfig) -> str | None:
    """The key from the environment variable the config names (never from the config)."""
    if not teacher.api_key_env:
        return None
    key = os.environ.get(teacher.api_key_env)
    if not key:
        raise ConfigError(
            f"teacher {teacher.name!r}: api_key_env names ${teacher.api_key_env}, which is not set in the environment"
        )
    return key


class OpenAICompatible:
    """`/v1/completions` or `/v1/chat/completions` of vLLM, llama.cpp, `transformers serve`,
    or a hosted API."""

    def __init__(self, teacher: TeacherConfig, stop: list[str], *, api_key: str | None = None):
        if not teacher.model:
            raise ConfigError(f"teacher {teacher.name!r}: key 'model' is empty; name the served model")
        self.teacher = teacher
        self.stop = stop
        # a base_url pasted with its endpoint (".../v1/chat/completions") is taken as its /v1
        self.base = re.sub(r"/(chat/)?completions$", "", teacher.base_url.rstrip("/"))
        self.url = self.base + ("/chat/completions" if teacher.endpoint == "chat" else "/completions")
        self._key = api_key
        self.stats = RunStats()

    def check_reachable(self, key: str) -> None:
        """Raises TeacherUnreachable when nothing accepts a connection at `base_url` (named
        by the config `key`); any answer at all, even an HTTP error, counts as reachable."""
        url = urlsplit(self.teacher.base_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=min(self.teacher.timeout_s, 10.0)).close()
        except OSError as e:
            why = "connection refused" if isinstance(e, ConnectionRefusedError) else (e.strerror or type(e).__name__)
            raise TeacherUnreachable(
                f"teacher {self.teacher.name!r}: {key} = {self.teacher.base_url}: {why}; start the server "
                "(or fix the address) and rerun: what was collected so far is kept") from None

    def settings(self) -> dict[str, Any]:
        """What shapes an answer besides the prompt (hashed into the cache key, kept as provenance)."""
        t = self.teacher
        return {"backend": "openai", "model": t.model, "endpoint": t.endpoint, "system_prompt": t.system_prompt,
                "temperature": t.temperature, "top_k": t.top_k, "top_p": t.top_p, "max_tokens": t.max_tokens,
                "stop": list(self.stop), "extra_body": dict(t.extra_body)}

    def payload(self, job: Job) -> dict[str, Any]:
        t = self.teacher
        body: dict[str, Any] = {"model": t.model, "max_tokens": t.max_tokens, "temperature": t.temperature,
                                "top_p": t.top_p, "seed": job.seed}
        if t.top_k > 0:
            body["top_k"] = t.top_k
        if self.stop:
            body["stop"] = list(self.stop)
        if t.endpoint == "chat":
            system = [{"role": "system", "content": t.system_prompt}] if t.system_prompt else []
            body["messages"] = system + [{"role": "user", "content": job.prompt}]
        else:
            body["prompt"] = job.prompt
        body.update(t.extra_body)
        # a field set to null in extra_body is not sent: hosted reasoning models refuse
        # `max_tokens` (they take `max_completion_tokens`) and sampling settings
        return {k: v for k, v in body.items() if v is not None}

    def run(self, jobs: list[Job], on_done: OnDone, on_fail: OnFail) -> RunStats:
        self.stats = RunStats()
        if jobs:
            asyncio.run(self._run(jobs, on_done, on_fail))
        return self.stats

    async def _run(self, jobs: list[Job], on_done: OnDone, on_fail: OnFail) -> None:
        t = self.teacher
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        in_a_row = 0
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        timeout = httpx2.Timeout(t.timeout_s, connect=min(t.timeout_s, 10.0))
        limits = httpx2.Limits(max_connections=t.concurrency, max_keepalive_connections=t.concurrency)

        async def worker(client: httpx2.AsyncClient) -> None:
            nonlocal in_a_row
            while not self.stats.aborted:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    text = await self._complete(client, job)
                except RequestFailed as e:
                    self.stats.failed += 1
                    in_a_row += 1
                    on_fail(job, self._redact(str(e)))
                    if in_a_row >= t.max_consecutive_failures and not self.stats.aborted:
                        self.stats.aborted = f"{in_a_row} requests in a row failed, the last with: {self._redact(str(e))}"
                    continue
                in_a_row = 0
                self.stats.done += 1
                on_done(job, text)

        async with httpx2.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(max(1, t.concurrency))))
        self.stats.not_started = queue.qsize()

    async def _complete(self, client: httpx2.AsyncClient, job: Job) -> str:
        t = self.teacher
        body = self.payload(job)
        for attempt in range(t.max_retries + 1):
            retry_after = None
            try:
                r = await client.post(self.url, json=body)
            except (httpx2.TimeoutException, httpx2.TransportError) as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if r.status_code == 200:
                    return self._text(r)
                reason = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code not in RETRY_STATUS and r.status_code < 500:
                    if r.status_code in (401, 403):
                        reason += (f"; the key in ${t.api_key_env} was refused" if self._key else
                                   "; no key was sent: name the environment variable holding it with api_key_env")
                    if r.status_code == 404:
                        reason += _not_found_hint(r.text, self.base, self.url, t.model)
                    if r.status_code in (400, 422) and _names_a_request_field(r.text):
                        reason += ("; a field this server does not take can be left out of every request with "
                                   "`extra_body: {FIELD: null}` (and another sent in its place)")
                    raise RequestFailed(reason)
                retry_after = _seconds(r.headers.get("retry-after"))
            if attempt == t.max_retries:
                raise RequestFailed(f"gave up after {attempt + 1} attempts; last: {reason}")
            delay = backoff_delay(attempt, t.backoff_s, t.max_backoff_s, retry_after)
            self.stats.retries += 1
            log.info("%s: retry %d/%d in %.1fs after %s", job.info.get("record_id"), attempt + 1, t.max_retries,
                     delay, self._redact(reason))
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _text(self, r: httpx2.Response) -> str:
        try:
            choice = r.json()["choices"][0]
            text = _content(choice["message"]) if self.teacher.endpoint == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RequestFailed(f"unexpected response from {self.url}: {r.text[:300]}") from None
        if text is not None and not isinstance(text, str):
            raise RequestFailed(f"unexpected response from {self.url}: content is {type(text).__name__}: {r.text[:300]}")
        return visible_reply(text)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with equal jitter: a random point in [d/2, d], d = base * 2**attempt,
    at most `cap`; never sooner than a server's Retry-After (itself capped)."""
    d = min(cap, base * 2**attempt)
    delay = random.uniform(d / 2, d)
    if retry_after is not None:
        delay = max(delay, min(cap, retry_after))
    return delay


_REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def _names_a_request_field(text: str) -> bool:
    """Whether a refusal is about one of the fields we send (OpenAI's reasoning models: "Unsupported
    parameter: 'max_tokens' ...", "Unsupported value: 'temperature' ...")."""
    low = text.lower()
    return any(f"'{f}'" in low or f'"{f}"' in low or f"`{f}`" in low for f in _REQUEST_FIELDS) and (
        "unsupported" in low or "not supported" in low or "unrecognized" in low or "extra" in low
        or "not permitted" in low or "invalid" in low)


def _not_found_hint(text: str, base: str, url: str, model: str) -> str:
    """What a 404 most likely means: a model the server does not serve (vLLM, hosted APIs say
    so in the body), else a base_url without the /v1 that OpenAI-compatible servers serve under."""
    low = text.lower()
    if "model" in low and ("not exist" in low or "not found" in low or "unknown" in low or "no such" in low):
        return f"; the server does not serve model {model!r}: GET {base}/models lists what it does"
    return f"; nothing answers at {url}: base_url usually ends in /v1 (vLLM, transformers serve, llama.cpp, hosted APIs)"


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare from model servers, left to the backoff
