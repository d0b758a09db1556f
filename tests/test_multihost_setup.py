"""Multi-host without several processes: how settings are read and checked (flags, variables,
clusters), the one-line errors before JAX is involved, and the batch rows each process builds
(every global batch exactly once, per microbatch, resumable with another process count)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tinyllm_jax.cli import main
from tinyllm_jax.data.packing import BATCH_KEYS, PackedIterator, RowShare
from tinyllm_jax.errors import UserError
from tinyllm_jax.runtime.distributed import DEFAULT_TIMEOUT_S, Settings, settings_from

from test_packing import synthetic, with_long_examples

NONE = {"coordinator": None, "num_processes": None, "process_id": None, "timeout_s": None}
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}


def flags(**kw):
    return {**NONE, **kw}


def test_settings_from_flags_environment_and_clusters():
    assert settings_from(NONE, {}) is None
    assert settings_from(flags(coordinator="10.0.0.2:8476", num_processes=4, process_id=1), {}) == \
        Settings("10.0.0.2:8476", 4, 1, DEFAULT_TIMEOUT_S)
    env = {"TINYLLM_COORDINATOR": "h0:1234", "TINYLLM_NUM_PROCESSES": "2", "TINYLLM_PROCESS_ID": "1",
           "TINYLLM_DISTRIBUTED_TIMEOUT": "12.5"}
    assert settings_from(NONE, env) == Settings("h0:1234", 2, 1, 12.5)
    assert settings_from(flags(num_processes=2, process_id=1), env) == Settings("h0:1234", 2, 1, 12.5)  # same values
    assert settings_from(NONE, {**SLURM, "TINYLLM_DISTRIBUTED": "1"}) == Settings(cluster="slurm")
    assert settings_from(NONE, SLURM) is None  # inside SLURM but not asked to join: one process


@pytest.mark.parametrize("given, env, message", [
    (flags(num_processes=2), {"TINYLLM_NUM_PROCESSES": "4"},
     "--num-processes 2 disagrees with TINYLLM_NUM_PROCESSES=4"),
    (flags(process_id=1), {}, "incomplete: --process-id 1 given, missing --coordinator (or TINYLLM_COORDINATOR), "
                              "--num-processes (or TINYLLM_NUM_PROCESSES)"),
    (flags(coordinator="h0", num_processes=2, process_id=0), {}, "--coordinator 'h0': expected HOST:PORT"),
    (flags(coordinator="h0:1", num_processes=2, process_id=2), {}, "--process-id 2 with --num-processes 2"),
    (NONE, {"TINYLLM_PROCESS_ID": "one"}, "TINYLLM_PROCESS_ID='one': expected an integer"),
    (flags(timeout_s=0.0), {}, "--distributed-timeout: expected a positive number"),
    (NONE, {"TINYLLM_DISTRIBUTED": "1"}, "TINYLLM_DISTRIBUTED=1 but this is neither a Cloud TPU VM nor a SLURM job"),
])
def test_settings_that_disagree_or_are_incomplete_are_one_line_errors(given, env, message, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)  # not a TPU VM
    with pytest.raises(UserError) as e:
        settings_from(given, env)
    assert message in str(e.value) and "\n" not in str(e.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_and_busy_port_exit_2_naming_them(capsys):
    port = free_port()  # nobody listens there
    assert main(["train", "never-read.yaml", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", "1", "--distributed-timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert f"process 1 of 2 could not reach the coordinator 127.0.0.1:{port}" in err and "within 1 s" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert main(["eval", "never-read.yaml", "--coordinator", f"127.0.0.1:{taken}", "--num-processes", "2",
                     "--process-id", "0"]) == 2
    assert f"port {taken} is in use on this host" in capsys.readouterr().err
    assert main(["train", "never-read.yaml", "--num-processes", "2"]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_only_process_0_writes_metrics_and_tensorboard(tmp_path, monkeypatch):
    """Every process of a run calls the metrics log alike; the others must not touch the
    shared files (not even a resumed run's truncation), or process 0's lines get lost."""
    import jax

    from tinyllm_jax.train.metrics import MetricsLog

    monkeypatch.setattr(jax, "process_index", lambda *a: 1)
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 2.0})
    log.close()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 7}\n')
    MetricsLog(tmp_path, resume_step=3).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 7}\n'
    monkeypatch.setattr(jax, "process_index", lambda *a: 0)
    log = MetricsLog(tmp_path, resume_step=3)
    log.write({"step": 4, "loss": 2.0})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 4, "loss": 2.0}\n'
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------- row shares


def batches(ex, **kw):
    it = PackedIterator(ex, kw.pop("batch_size", 8), 128, 96, seed=2, num_epochs=1, **kw)
    return list(it)


@pytest.mark.parametrize("make", [synthetic, with_long_examples], ids=["ordinary", "with-long-batches"])
def test_process_shares_of_microbatches_assemble_the_one_process_batches(make):
    """2 processes x 2 microbatches: process p's local batch, reshaped to [2, rows/2], holds
    its part of each microbatch; together they make exactly the 1-process microbatches."""
    ex = make()
    whole = batches(ex, share=RowShare((0,), 1, 2))
    shares = [batches(ex, share=RowShare((p,), 2, 2)) for p in range(2)]
    assert all(len(s) == len(whole) for s in shares)
    for step, global_batch in enumerate(whole):
        for k in BATCH_KEYS:
            micro = lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:])  # noqa: E731  (what the step sees)
            assembled = np.concatenate([micro(s[step][k]) for s in shares], axis=1)
            np.testing.assert_array_equal(assembled, micro(global_batch[k]))
    assert {b["encoder_input_tokens"].shape[0] for s in shares for b in s} <= {4, 2}


def test_shares_of_several_blocks_and_replicated_shares():
    ex = synthetic()
    whole = batches(ex, process_index=0, process_count=1)
    # a process holding blocks 0 and 2 of 4 (devices interleaved across hosts)
    two_blocks = batches(ex, share=RowShare((0, 2), 4))
    # processes whose devices replicate the rows (a tensor axis spanning hosts) build all of them
    replicated = batches(ex, share=RowShare((0,), 1))
    for g, t, r in zip(whole, two_blocks, replicated):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(t[k], np.concatenate([g[k][0:2], g[k][4:6]]))
            np.testing.assert_array_equal(r[k], g[k])
    with pytest.raises(UserError, match="not distinct"):
        PackedIterator(ex, 8, 128, 96, share=RowShare((2, 0), 4))
    with pytest.raises(UserError, match=r"divisible by the 8 parts .*4 row blocks .* x 2 microbatches"):
        PackedIterator(ex, 12, 128, 96, share=RowShare((0,), 4, 2))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_iterator_state_resumes_with_another_number_of_processes(before, after):
    ex = with_long_examples()
    make = lambda n, p: PackedIterator(ex, 8, 128, 96, seed=5, share=RowShare((p,), n, 2))  # noqa: E731
    reference = make(1, 0)
    expected = [next(reference) for _ in range(40)]
    first = [make(before, p) for p in range(before)]
    for _ in range(14):  # into the second epoch (11 batches each), just before one of its long batches
        for it in first:
            next(it)
    states = [it.state() for it in first]
    assert all(s == states[0] for s in states)  # the same on every process
    second = [make(after, p) for p in range(after)]
    for it in second:
        it.restore(states[0])
    for step in range(14, 40):
        parts = [next(it) for it in second]
        for k in BATCH_KEYS:
            micro = lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:])  # noqa: E731
            np.testing.assert_array_equal(np.concatenate([micro(p[k]) for p in parts], axis=1),
                                          micro(expected[step][k]))
