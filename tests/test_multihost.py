"""Several JAX processes on one mesh, on localhost: 2 processes x 4 simulated CPU devices
against 1 process x 8 (the same losses, predictions and accuracy); SIGTERM to one process
(all save the same step), then both SIGKILLed and restarted (bitwise the uninterrupted
run); checkpoints moving between 1 and 2 processes (including a mesh whose tensor axis
spans both processes, so that each builds the whole batch); `tinyllm eval` in 2 processes.

Each run uses a free loopback port for its coordinator. The runs share a persistent JAX
compilation cache (process 0 writes it), which halves their time. The tests skip, saying
why, where this platform cannot start several JAX processes that talk to each other (a
quick probe)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_train_run import final_params, tok_dir, write_config  # noqa: F401  (tok_dir: a fixture)

pytestmark = pytest.mark.multihost

MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # data across the 2 processes, fsdp and tensor within each
STEPS = 10
RUN = {"train": {"steps": STEPS}, "optim": {"grad_accum_steps": 2}, "mesh": MESH,
       "eval": {"every_steps": STEPS, "max_new_tokens": 6, "batch_size": 8},
       "checkpoint": {"every_steps": 5, "keep": 3, "async_save": True}}

PROBE = r"""
import sys
import jax, numpy as np
from jax.experimental import multihost_utils
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), initialization_timeout=20)
x = multihost_utils.process_allgather(np.asarray([jax.process_index() + 1]))
assert jax.process_count() == 2 and jax.device_count() == 4 and x.sum() == 3, (jax.devices(), x)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CACHE: dict[str, str] = {}  # the module's compilation cache settings, once the probe passed


def env_for(n: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n}",
            **CACHE}


@pytest.fixture(scope="module", autouse=True)
def several_processes_work(tmp_path_factory):
    """Skips the module where two JAX processes cannot join over 127.0.0.1 (no loopback
    networking, no CPU collectives in this jaxlib, a sandbox that forbids it)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, f"127.0.0.1:{port}", str(i)], env=env_for(4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.skip("this platform cannot run several JAX processes: a 2-process probe did not finish in 90 s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        tail = " | ".join(o.strip().splitlines()[-1] if o.strip() else "" for o in outs)
        pytest.skip(f"this platform cannot run several JAX processes (2-process probe failed: {tail[-300:]})")
    CACHE.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    yield
    CACHE.clear()


STARTED: list["Run"] = []


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failing test must not leave its processes running (they would hold the machine)."""
    yield
    for run in STARTED:
        run.kill()
    STARTED.clear()


class Run:
    """One training command started as n processes on a fresh port; logs go to files."""

    def __init__(self, config: Path, n: int, *args: str, command: str = "train"):
        self.n, self.logs = n, [config.with_name(f"{config.stem}-{command}-{n}p-{time.time_ns()}-{i}.log")
                                for i in range(n)]
        base = [sys.executable, "-m", "tinyllm_jax.cli", command, str(config), *args]
        if n > 1:
            base += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(n),
                     "--distributed-timeout", "120"]
        self.procs = []
        STARTED.append(self)
        for i in range(n):
            extra = ["--process-id", str(i)] if n > 1 else []
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(base + extra, env=env_for(n), stdout=log, stderr=subprocess.STDOUT))

    def output(self, i: int = 0) -> str:
        return self.logs[i].read_text()

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def kill(self, sig=signal.SIGKILL, which=None) -> None:
        for i, p in enumerate(self.procs):
            if (which is None or i in which) and p.poll() is None:
                p.send_signal(sig)

    def finish(self, timeout: float = 400, status: int = 0) -> "Run":
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
        codes = [p.wait() for p in self.procs]
        assert codes == [status] * self.n, "\n".join(f"--- process {i} (exit {c}):\n{self.output(i)[-2500:]}"
                                                 for i, c in enumerate(codes))
        return self


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in lines(run_dir) if "loss" in r]


def assert_params(a, b, **tol):
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if tol:
            np.testing.assert_allclose(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok_dir):
    """The same run (eval at the end) as 1 process x 8 devices and 2 processes x 4, side by
    side (the 1-process run fills the time the 2 processes wait for each other)."""
    tmp = tmp_path_factory.mktemp("multihost")
    runs = {n: tmp / f"ref{n}" for n in (1, 2)}
    started = [Run(write_config(tmp / f"ref{n}.yaml", runs[n], tok_dir, **RUN), n) for n in (1, 2)]
    try:
        for run in started:
            run.finish()
    finally:  # a module fixture: the per-test clean-up does not cover a failure here
        for run in started:
            run.kill()
    return runs


def test_two_processes_train_and_evaluate_like_one(reference):
    one, two = reference[1], reference[2]
    assert len(train_losses(one)) == STEPS
    np.testing.assert_allclose(train_losses(two), train_losses(one), rtol=1e-4)
    # one line a step and evaluation, nothing twice (that only process 0 writes: test_multihost_setup)
    assert [r["step"] for r in lines(two)] == [*range(1, STEPS + 1), STEPS, STEPS]
    for split in ("validation", "test"):
        s1, s2 = (json.loads((d / "eval" / f"summary-{split}-step{STEPS}.json").read_text()) for d in (one, two))
        assert s2["n"] == s1["n"] == 16 and s2["accuracy"] == s1["accuracy"]
        p1, p2 = ((d / "eval" / f"predictions-{split}-step{STEPS}.jsonl").read_text().splitlines() for d in (one, two))
        assert p1 == p2  # every example, in order, with the same prediction
    assert json.loads((two / "summary.json").read_text())["test"] == json.loads((one / "summary.json").read_text())["test"]
    assert_params(final_params(two, STEPS), final_params(one, STEPS), rtol=2e-4, atol=2e-5)
    # one checkpoint, written by both: each process its own shards, one commit
    state = two / "checkpoints" / str(STEPS) / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert (state / "commit_success.txt").is_file() and (state.parent / "data" / "commit_success.txt").is_file()


def wait_for(condition, run: Run, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert run.alive(), f"the run ended before {what}:\n{run.output()[-2500:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_preempted_then_sigkilled_two_process_run_ends_bitwise_equal(reference, tmp_path, tok_dir):
    """SIGTERM to one process (a maintenance event on one host): both save the same step and
    exit cleanly. Restarted, then both SIGKILLed at a random moment after the next
    checkpoint, restarted again: bitwise the uninterrupted 2-process run."""
    run_dir = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", run_dir, tok_dir, **RUN)
    first = Run(cfg, 2)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip(),
             first, "the first logged step")
    first.kill(signal.SIGTERM, which={1})
    first.finish(status=128 + signal.SIGTERM)  # saved, and non-zero: `train && export` stops there
    said = [o.split("SIGTERM: saved step ")[1].split(",")[0] for o in (first.output(0), first.output(1))]
    # The step both saved is the last checkpoint; on a slow machine the signal can land after the
    # periodic save at step 5, which stays beside it.
    assert said[0] == said[1] and max(saved_steps(run_dir)) == int(said[0]), (said, saved_steps(run_dir))
    assert set(saved_steps(run_dir)) <= {5, int(said[0])}, (said, saved_steps(run_dir))

    second = Run(cfg, 2)
    wait_for(lambda: max(saved_steps(run_dir)) > int(said[0]), second, "a checkpoint after the restart")
    time.sleep(random.uniform(0.0, 1.0))  # maybe in the middle of a step or the next save
    second.kill(signal.SIGKILL)
    for p in second.procs:
        p.wait()
    finished_before_the_kill = (run_dir / "summary.json").is_file()  # steps 6-10 can end within the 1 s
    third = Run(cfg, 2).finish()
    assert ("already finished" if finished_before_the_kill else "resumed from step") in third.output()
    assert_params(final_params(run_dir, STEPS), final_params(reference[2], STEPS))
    assert train_losses(run_dir) == train_losses(reference[2])


@pytest.mark.parametrize("before, after, mesh", [
    (2, 1, MESH),
    (1, 2, {"data": 1, "fsdp": 1, "tensor": 8}),  # the tensor axis spans both processes
], ids=["2-to-1", "1-to-2-tensor-across-processes"])
def test_a_run_resumes_with_another_number_of_processes(reference, tmp_path, tok_dir, before, after, mesh):
    """The checkpoint at step 5 of the `before`-process run, resumed by `after` processes,
    ends where the uninterrupted `before`-process run ended."""
    run_dir = tmp_path / "moved"
    shutil.copytree(reference[before], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))  # as if the run had stopped after step 5
    cfg = write_config(tmp_path / "moved.yaml", run_dir, tok_dir, **{**RUN, "mesh": mesh})
    out = Run(cfg, after).finish().output()
    assert "resumed from step 5" in out
    np.testing.assert_allclose(train_losses(run_dir), train_losses(reference[before]), rtol=1e-4)
    assert_params(final_params(run_dir, STEPS), final_params(reference[before], STEPS), rtol=2e-4, atol=2e-5)


def test_eval_command_in_two_processes_matches_training(reference, tmp_path):
    """`tinyllm eval` of the 1-process run's checkpoint by 2 processes: the figure the run
    logged, and process 0 alone prints the summary."""
    run_dir = tmp_path / "evaluated"
    shutil.copytree(reference[1], run_dir)
    logged = [r for r in lines(run_dir) if "eval_accuracy" in r][-1]
    cfg = tmp_path / "eval.yaml"
    cfg.write_text((run_dir / "config.yaml").read_text().replace(str(reference[1]), str(run_dir)))
    run = Run(cfg, 2, "--split", "validation", command="eval").finish()
    out = run.output(0)
    summary = json.loads(out[out.index("{\n"):out.index("\n}") + 2])
    assert summary["accuracy"] == logged["eval_accuracy"] and summary["n"] == 16 and summary["step"] == STEPS
    assert '"accuracy"' not in run.output(1)


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_peers_that_never_arrive_or_disagree_stop_with_one_line(tmp_path):
    """Process 0 alone: after --distributed-timeout it says so and exits 2 (JAX would abort
    later with a C++ stack trace). Processes started for different numbers of processes: both
    say which was started how."""
    cli = ["-m", "tinyllm_jax.cli", "train", str(tmp_path / "never-read.yaml")]
    alone = start([*cli, "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "0",
                   "--distributed-timeout", "2"], env_for(2))
    out = alone.communicate(timeout=120)[0]
    assert alone.returncode == 2, out[-2000:]
    assert "tinyllm: error: process 0 of 2: not all processes joined 127.0.0.1:" in out and "within 2 s" in out

    coordinator = ["--coordinator", f"127.0.0.1:{free_port()}", "--distributed-timeout", "60"]
    procs = [start([*cli, *coordinator, "--num-processes", n, "--process-id", i], env_for(2))
             for i, n in (("0", "2"), ("1", "3"))]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    for o in outs:
        assert "process 1 was started with --num-processes 3 but 2 processes joined" in o, o[-2000:]


SLURM_SCRIPT = r"""
import jax
from tinyllm_jax.runtime import distributed
settings = distributed.settings_from({})
distributed.initialize(settings)
print("joined", settings.cluster, jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
"""


def test_a_slurm_job_step_joins_without_settings():
    """TINYLLM_DISTRIBUTED=1 inside what looks like `srun -n 2` on one node: JAX's SLURM
    detection finds the coordinator and the process ids (JAX_COORDINATOR_PORT: a free port
    instead of the one derived from the job id)."""
    base = {**env_for(2), "TINYLLM_DISTRIBUTED": "1", "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1",
            "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(free_port()),
            "TINYLLM_DISTRIBUTED_TIMEOUT": "60"}
    procs = [start(["-c", SLURM_SCRIPT], {**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.split("joined ")[1].split()[:4] for o in outs] == [["slurm", "0", "2", "8"], ["slurm", "1", "2", "8"]]
