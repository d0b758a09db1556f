"""Several JAX processes on one mesh: how a process finds its peers, and the few
cross-process helpers (which process writes, a barrier, gathering small results).

Settings come from one of two places:

* detected: `TINYLLM_DISTRIBUTED=1` on a Cloud TPU VM (every worker of a pod slice) or in a
  SLURM job step (`srun`): `jax.distributed.initialize()` with no arguments; JAX reads the
  TPU metadata or SLURM's variables.
* explicit (anywhere else, e.g. several processes on one machine or hosts without a
  scheduler): the coordinator address (process 0's host:port), the number of processes and
  this process's id, from `--coordinator/--num-processes/--process-id` or
  `TINYLLM_COORDINATOR/TINYLLM_NUM_PROCESSES/TINYLLM_PROCESS_ID`.

JAX's own failures here abort the process from C++ with a stack trace; this module checks
what it can first and turns the rest into one line: a flag that disagrees with its
variable, settings that are incomplete or out of range, processes that disagree about
their number, and a coordinator that cannot be reached (or peers that do not arrive)
within `--distributed-timeout` seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping

from tinyllm_jax.errors import UserError

ENV_AUTO = "TINYLLM_DISTRIBUTED"
ENV = {"coordinator": "TINYLLM_COORDINATOR", "num_processes": "TINYLLM_NUM_PROCESSES",
       "process_id": "TINYLLM_PROCESS_ID", "timeout_s": "TINYLLM_DISTRIBUTED_TIMEOUT"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id",
         "timeout_s": "--distributed-timeout"}
DEFAULT_TIMEOUT_S = 300.0
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins the others. `cluster` is "tpu" or "slurm" when JAX detects the
    rest; then coordinator, num_processes and process_id are None."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    cluster: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The explicit settings as flags of a subcommand (`settings_from` reads them back)."""
    g = parser.add_argument_group("multi-host (see README: Multi-host)")
    g.add_argument(FLAGS["coordinator"], dest="coordinator", metavar="HOST:PORT",
                   help=f"process 0's address (or ${ENV['coordinator']})")
    g.add_argument(FLAGS["num_processes"], dest="num_processes", type=int, metavar="N",
                   help=f"processes in the run (or ${ENV['num_processes']})")
    g.add_argument(FLAGS["process_id"], dest="process_id", type=int, metavar="I",
                   help=f"this process, 0..N-1 (or ${ENV['process_id']})")
    g.add_argument(FLAGS["timeout_s"], dest="timeout_s", type=float, metavar="S",
                   help=f"seconds to wait for the coordinator and the peers (default {DEFAULT_TIMEOUT_S:g}; or ${ENV['timeout_s']})")


def _typed(key: str, raw: str):
    if key == "coordinator":
        return raw
    try:
        return float(raw) if key == "timeout_s" else int(raw)
    except ValueError:
        raise UserError(f"{ENV[key]}={raw!r}: expected {'a number' if key == 'timeout_s' else 'an integer'}") from None


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """"slurm" inside a SLURM job step, "tpu" on a Cloud TPU VM (libtpu installed), else None."""
    if all(v in env for v in SLURM_VARS):
        return "slurm"
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None or env.get("TPU_WORKER_HOSTNAMES"):
        return "tpu"
    return None


def settings_from(flags: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Settings | None:
    """The settings the flags (None: not given) and environment describe; None for a
    single-process run. Raises UserError when a flag and its variable disagree or the
    explicit settings are incomplete or out of range."""
    values: dict[str, Any] = {}
    for key in ENV:
        flag, var = flags.get(key), env.get(ENV[key])
        from_env = _typed(key, var) if var not in (None, "") else None
        if flag is not None and from_env is not None and flag != from_env:
            raise UserError(f"{FLAGS[key]} {flag} disagrees with {ENV[key]}={var}; give one, or the same value")
        values[key] = flag if flag is not None else from_env
    timeout = values.pop("timeout_s")
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if timeout <= 0:
        raise UserError(f"{FLAGS['timeout_s']}: expected a positive number of seconds, found {timeout:g}")
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        if env.get(ENV_AUTO) != "1":
            return None
        cluster = detect_cluster(env)
        if cluster is None:
            raise UserError(
                f"{ENV_AUTO}=1 but this is neither a Cloud TPU VM nor a SLURM job step (srun); elsewhere give "
                f"{FLAGS['coordinator']} HOST:PORT {FLAGS['num_processes']} N {FLAGS['process_id']} I "
                f"(or {ENV['coordinator']}, {ENV['num_processes']}, {ENV['process_id']})")
        return Settings(timeout_s=timeout, cluster=cluster)
    missing = [f"{FLAGS[k]} (or {ENV[k]})" for k in values if values[k] is None]
    if missing:
        raise UserError(f"multi-host settings are incomplete: {', '.join(f'{FLAGS[k]} {v}' for k, v in given.items())} "
                        f"given, missing {', '.join(missing)}")
    host, _, port = values["coordinator"].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{FLAGS['coordinator']} {values['coordinator']!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    n, pid = values["num_processes"], values["process_id"]
    if n < 1 or not 0 <= pid < n:
        raise UserError(f"{FLAGS['process_id']} {pid} with {FLAGS['num_processes']} {n}: expected 0 <= id < N")
    return Settings(values["coordinator"], n, pid, timeout)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, settings: Settings, deadline: float, who: str) -> None:
    host, port = _split(address)
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(f"{who} could not reach the coordinator {address} ({e.strerror or e}) within "
                                f"{settings.timeout_s:g} s ({FLAGS['timeout_s']}); is process 0 running, and is "
                                f"{FLAGS['coordinator']} its address?") from None
            time.sleep(0.2)


def _check_port_free(address: str) -> None:
    """Process 0 hosts the coordinator: its port must be free (JAX would abort). SO_REUSEADDR:
    a previous run's connections in TIME_WAIT do not count, a live listener does."""
    _, port = _split(address)
    try:
        s = socket.socket(socket.AF_INET6)
    except OSError:
        s = socket.socket(socket.AF_INET)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise UserError(f"{FLAGS['coordinator']} {address}: process 0 hosts the coordinator there, but port "
                            f"{port} is in use on this host ({e.strerror}); pick a free port") from None


def _watchdog(settings: Settings, deadline: float, who: str) -> threading.Event:
    """JAX aborts the process (from C++) when its peers do not arrive; this says why first."""
    done = threading.Event()

    def watch():
        if not done.wait(max(1.0, deadline - time.monotonic())):
            where = settings.coordinator or f"the {settings.cluster} cluster's coordinator"
            print(f"tinyllm: error: {who}: not all processes joined {where} within {settings.timeout_s:g} s "
                  f"({FLAGS['timeout_s']}); start every process with the same {FLAGS['coordinator']} and "
                  f"{FLAGS['num_processes']} and its own {FLAGS['process_id']}", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=watch, name="tinyllm-distributed-watchdog", daemon=True).start()
    return done


def initialize(settings: Settings | None) -> None:
    """Joins the run's other processes (nothing for None). Call before any other JAX use."""
    if settings is None:
        return
    import jax

    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes all-reduce over TCP
    deadline = time.monotonic() + settings.timeout_s
    if settings.cluster is None:
        who = f"process {settings.process_id} of {settings.num_processes}"
        if settings.process_id == 0:
            _check_port_free(settings.coordinator)
        else:
            _wait_for_coordinator(settings.coordinator, settings, deadline, who)
        kwargs = dict(coordinator_address=settings.coordinator, num_processes=settings.num_processes,
                      process_id=settings.process_id, cluster_detection_method="deactivate")
    else:
        who = f"{settings.cluster} process"
        kwargs = {}
    done = _watchdog(settings, deadline, who)
    try:
        # JAX's own deadline comes after the watchdog's, which explains itself
        jax.distributed.initialize(**kwargs, initialization_timeout=int(settings.timeout_s) + 30)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{who}: jax.distributed.initialize failed: {e}") from None
    finally:
        done.set()
    _check_agreement(settings)


def _check_agreement(settings: Settings) -> None:
    """Every process must have been started for the same number of processes (JAX takes
    process 0's number and would hang later)."""
    import jax

    wanted = settings.num_processes
    if settings.cluster == "slurm":
        wanted = int(os.environ["SLURM_NTASKS"])
    mine = {"num_processes": wanted, "process_id": settings.process_id}
    everyone = allgather_json(mine)
    for p, theirs in enumerate(everyone):
        if theirs["num_processes"] not in (None, jax.process_count()):
            raise UserError(f"process {p} was started with {FLAGS['num_processes']} {theirs['num_processes']} but "
                            f"{jax.process_count()} processes joined; start all of them with the same number")
        if theirs["process_id"] not in (None, p):
            raise UserError(f"process {p} was started as {FLAGS['process_id']} {theirs['process_id']}")


def is_primary() -> bool:
    """Process 0 writes the run's logs, metrics, config, summaries and predictions."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order, on every process: two
    small all-gathers (the lengths, then the padded UTF-8 bytes)."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(everyone, lengths)]
