"""The pod and cluster launchers, without pods or clusters: their --dry-run output (the
commands they would run), the same commands when they run against stand-ins for gcloud,
sbatch and srun that only record their arguments, and their errors."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ROOT = SCRIPTS.parent


def sh(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def commands(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def fake_tools(tmp_path: Path) -> tuple[Path, Path]:
    """gcloud, sbatch and srun stand-ins: each appends its argv (one shell-quoted line) to a
    log; `describe` answers $FAKE_STATE until something was created (then READY, or ACTIVE
    for a queued resource), the worker-0 training check answers $FAKE_TRAINING."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("gcloud", "sbatch", "srun"):
        path = bin_dir / tool
        path.write_text(f"""#!/usr/bin/env bash
printf '%q ' {tool} "$@" | sed 's/ $//' >> {shlex.quote(str(log))}; echo >> {shlex.quote(str(log))}
case "$*" in
  *queued-resources\ describe*) grep -q ' create ' {shlex.quote(str(log))} && echo ACTIVE || echo "$FAKE_STATE" ;;
  *describe*) grep -q ' create ' {shlex.quote(str(log))} && echo READY || echo "$FAKE_STATE" ;;
  */proc/*) echo "${{FAKE_TRAINING:-stopped}}" ;;
esac
[[ {tool} == srun ]] && env | grep -E '^(TINYLLM_DISTRIBUTED|JAX_LOCAL_DEVICE_IDS)=' | sort >> {shlex.quote(str(log))}
exit 0
""")
        path.chmod(0o755)
    return bin_dir, log


TPU = {"TPU_NAME": "distill", "ZONE": "us-central2-b", "ACCELERATOR": "v4-32"}
TRAIN_ARGS = ["configs/tinyllm_obqa.yaml", "run_dir=/mnt/shared/runs/obqa large", "model.init=google/flan-t5-large"]
SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "distill", "--worker=all"]
ZONE = "--zone=us-central2-b"


def is_remote_train(command: list[str]) -> bool:
    """`train`'s command on every worker: in the checkout, the job detached (nohup), the job
    itself `tinyllm train` with the same arguments, TINYLLM_DISTRIBUTED=1, and its exit status kept."""
    assert command[:7] == SSH_ALL and command[-1] == ZONE, command
    remote = shlex.split(command[7][len("--command="):])
    assert remote[:11] == ["cd", "tinyllm-jax", "&&", "rm", "-f", "train.exit", "&&", "{", "nohup", "bash", "-c"]
    assert remote[12:] == ["<", "/dev/null", ">", "/dev/null", "2>&1", "&", "}"], remote
    job = shlex.split(remote[11])
    assert job == ["echo", "$$", ">", "train.pid;", "TINYLLM_DISTRIBUTED=1", "$HOME/.local/bin/tinyllm", "train", *TRAIN_ARGS,
                   ">", "train.log", "2>&1;", "echo", "$?", ">", "train.exit"], job
    return True


@pytest.mark.parametrize("extra, create", [
    ({}, ["gcloud", "compute", "tpus", "tpu-vm", "create", "distill", "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base", ZONE]),
    ({"SPOT": "1"}, ["gcloud", "compute", "tpus", "tpu-vm", "create", "distill", "--accelerator-type=v4-32",
                     "--version=tpu-ubuntu2204-base", "--spot", ZONE]),
    ({"QUEUED": "1", "SPOT": "1"}, ["gcloud", "compute", "tpus", "queued-resources", "create", "distill-qr",
                                    "--node-id=distill", ZONE, "--accelerator-type=v4-32",
                                    "--runtime-version=tpu-ubuntu2204-base", "--spot"]),
], ids=["on-demand", "spot", "queued-spot"])
def test_tpu_pod_dry_run_prints_create_setup_and_train(tmp_path, extra, create):
    env = {**TPU, **extra, "STATE_DIR": str(tmp_path / "state"), "TARBALL": str(tmp_path / "src.tgz")}
    out = sh("tpu_pod.sh", "--dry-run", "create", env=env)
    assert out.returncode == 0, out.stderr
    assert commands(out.stdout) == [create]

    out = sh("tpu_pod.sh", "--dry-run", "setup", env=env)
    tar, scp, install = commands(out.stdout)
    assert tar[:3] == ["tar", "-C", str(ROOT)] and "--exclude=.git" in tar
    assert not (tmp_path / "src.tgz").exists()  # a dry run only prints
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tmp_path / "src.tgz"),
                   "distill:/tmp/tinyllm-jax.tgz", "--worker=all", ZONE]
    assert install[:7] == SSH_ALL and "pip install -q -e '.[tpu]'" in install[7]

    out = sh("tpu_pod.sh", "--dry-run", "train", *TRAIN_ARGS, env=env)
    [train] = commands(out.stdout)
    assert is_remote_train(train)


@pytest.mark.parametrize("queued, state, training, expect", [
    ("0", "PREEMPTED", "stopped", ["delete", "create", "tar", "scp", "ssh", "ssh"]),
    ("1", "SUSPENDED", "stopped", ["delete", "create", "tar", "scp", "ssh", "ssh"]),
    ("0", "", "stopped", ["create", "tar", "scp", "ssh", "ssh"]),  # the VM is gone altogether
    ("0", "READY", "stopped", ["ssh"]),  # still there, training stopped (SIGTERM, a crash): restart it only
    ("0", "READY", "running", []),
    ("1", "ACTIVE", "finished", []),
], ids=["preempted-spot-vm", "suspended-queued-resource", "deleted", "ready-stopped", "ready-running", "finished"])
def test_tpu_pod_resume_recreates_what_a_preemption_took_and_reruns_the_same_train(
        tmp_path, queued, state, training, expect):
    bin_dir, log = fake_tools(tmp_path)
    env = {**TPU, "SPOT": "1", "QUEUED": queued, "STATE_DIR": str(tmp_path / "state"), "TARBALL": str(tmp_path / "src.tgz"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": state, "FAKE_TRAINING": training}
    assert sh("tpu_pod.sh", "train", *TRAIN_ARGS, env=env).returncode == 0
    log.write_text("")
    dry = sh("tpu_pod.sh", "--dry-run", "resume", env={**env, "DRY_RUN_STATE": state, "DRY_RUN_TRAINING": training})
    real = sh("tpu_pod.sh", "resume", env=env)
    assert dry.returncode == 0 and real.returncode == 0, (dry.stderr, real.stderr)
    ran = [c for c in commands(log.read_text()) if not any("describe" in a or "/proc/" in a for a in c)]
    printed = commands(dry.stdout)
    assert [c for c in printed if c[0] == "gcloud"] == ran  # the dry run printed what runs (tar ran for real)
    assert ("tar" in expect) == (tmp_path / "src.tgz").is_file() == any(c[0] == "tar" for c in printed)
    verbs = [c[0] if c[0] == "tar" else c[4]
             for c in printed if c[0] in ("gcloud", "tar")]
    assert verbs == expect, printed
    if expect:
        assert is_remote_train(ran[-1])  # the same train, same arguments
    if "create" in expect:
        assert "--spot" in ran[expect.index("create")]


def test_tpu_pod_errors():
    assert "set TPU_NAME" in sh("tpu_pod.sh", "create", env={"TPU_NAME": "", "ZONE": "z"}).stderr
    out = sh("tpu_pod.sh", "--dry-run", "resume", env={**TPU, "STATE_DIR": "/nonexistent/state"})
    assert out.returncode == 2 and "no earlier train for distill" in out.stderr
    out = sh("tpu_pod.sh", "--dry-run", "fly", env=TPU)
    assert out.returncode == 2 and "unknown command fly" in out.stderr


def sbatch_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("#SBATCH")]


@pytest.mark.parametrize("per, tasks, local_ids", [("gpu", 8, None), ("node", 1, "0,1,2,3,4,5,6,7")])
def test_slurm_dry_run_prints_the_batch_script_and_sbatch(tmp_path, per, tasks, local_ids):
    env = {"SLURM_DIR": str(tmp_path / "slurm")}
    (tmp_path / "cfg.yaml").write_text("{}\n")
    out = sh("slurm_gpu.sh", "--dry-run", "--nodes", "4", "--per", per, "--partition", "gpu", "--time", "24:00:00",
             "train", "cfg.yaml", "run_dir=/shared/runs/a b", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sbatch_lines(out.stdout) == [
        "#SBATCH --job-name=tinyllm-cfg", "#SBATCH --nodes=4", f"#SBATCH --ntasks-per-node={tasks}",
        "#SBATCH --gpus-per-node=8", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu",
        "#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/slurm/%x-%j.out"]
    lines = out.stdout.splitlines()
    assert f"# 4 node(s) x 8 GPUs, one process per {per}: {4 * tasks} processes" in lines
    assert "export TINYLLM_DISTRIBUTED=1" in lines
    assert (f"export JAX_LOCAL_DEVICE_IDS={local_ids}" in out.stdout) == (local_ids is not None)
    srun = [l for l in lines if l.startswith("srun ")]
    assert commands(srun[0]) == [["srun", "--kill-on-bad-exit=1", "tinyllm", "train", str(tmp_path / "cfg.yaml"),
                                  "run_dir=/shared/runs/a b"]]  # the config made absolute: the job runs elsewhere
    assert commands(lines[-1]) == [["sbatch", f"{tmp_path}/slurm/tinyllm-cfg.sbatch"]]


def test_slurm_batch_script_runs_srun_with_the_settings_and_resume_resubmits(tmp_path):
    bin_dir, log = fake_tools(tmp_path)
    env = {"SLURM_DIR": str(tmp_path / "slurm"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "TINYLLM": "/venv/bin/tinyllm"}
    out = sh("slurm_gpu.sh", "--nodes", "2", "--gpus-per-node", "4", "--per", "node", "--job-name", "obqa",
             "train", "configs/none.yaml", "optim.learning_rate=1e-4", env=env)
    assert out.returncode == 0, out.stderr
    script = tmp_path / "slurm" / "obqa.sbatch"
    assert commands(log.read_text()) == [["sbatch", str(script)]]
    log.write_text("")
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)  # as SLURM would
    assert job.returncode == 0, job.stderr
    assert log.read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 /venv/bin/tinyllm train configs/none.yaml optim.learning_rate=1e-4",
        "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "TINYLLM_DISTRIBUTED=1"]
    log.write_text("")
    assert sh("slurm_gpu.sh", "resume", "obqa", env=env).returncode == 0
    assert commands(log.read_text()) == [["sbatch", "--dependency=singleton", str(script)]]


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "train", "c.yaml"], "--nodes must be a positive integer, found '0'"),
    (["--per", "socket", "train", "c.yaml"], "--per must be gpu or node, found 'socket'"),
    (["--gpu", "8", "train", "c.yaml"], "unknown option --gpu"),
    (["train"], "train needs CONFIG"),
    (["resume", "nothing"], "no slurm/nothing.sbatch; submit with train first"),
])
def test_slurm_errors(tmp_path, args, message):
    out = sh("slurm_gpu.sh", "--dry-run", *args, cwd=tmp_path, env={"SLURM_DIR": "slurm"})
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_tpu_pod_remote_commands_work_in_a_shell(tmp_path):
    """The commands `train` and `resume` send to the workers, run here in a plain shell with
    a stand-in `tinyllm`: the arguments arrive intact, the exit status is kept, and the
    worker-0 check tells running, finished (exit 0) and stopped (a SIGTERM save) apart."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / "tinyllm-jax").mkdir()
    fake = home / ".local" / "bin" / "tinyllm"
    fake.write_text('#!/usr/bin/env bash\nprintf "[%s]" "$@"; echo " TINYLLM_DISTRIBUTED=$TINYLLM_DISTRIBUTED"\n'
                    '[[ -n ${FAKE_SLEEP:-} ]] && exec -a "tinyllm train" sleep "$FAKE_SLEEP"\nexit 0\n')
    fake.chmod(0o755)
    env = {**TPU, "STATE_DIR": str(tmp_path / "state"), "DRY_RUN_STATE": "READY"}
    train = commands(sh("tpu_pod.sh", "--dry-run", "train", *TRAIN_ARGS, env=env).stdout)[0][7]
    check = commands(sh("tpu_pod.sh", "--dry-run", "resume", env=env).stderr)[-1][-1]
    assert train.startswith("--command=") and check.startswith("--command=")
    train, check = train[len("--command="):], check[len("--command="):]
    work = home / "tinyllm-jax"

    def shell(cmd, **extra):
        return subprocess.run(["bash", "-c", cmd], cwd=home, env={**os.environ, "HOME": str(home), **extra},
                              capture_output=True, text=True, timeout=30).stdout.strip()

    assert shell(check) == "stopped"  # never started
    shell(train)
    deadline = time.time() + 20
    while not (work / "train.exit").is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert (work / "train.log").read_text().strip() == (
        "[train][configs/tinyllm_obqa.yaml][run_dir=/mnt/shared/runs/obqa large][model.init=google/flan-t5-large]"
        " TINYLLM_DISTRIBUTED=1")
    assert (work / "train.exit").read_text().strip() == "0"
    assert shell(check) == "finished"
    with open(work / "train.log", "a") as log:
        log.write("12:00:00 WARNING tinyllm.train: SIGTERM: saved step 40, exiting\n")
    assert shell(check) == "stopped"
    started = time.time()
    shell(train, FAKE_SLEEP="5")
    assert time.time() - started < 4  # the command returned while the job runs (ssh would too)
    deadline = time.time() + 3  # (the detached job writes its pid a moment later)
    while shell(check) != "running" and time.time() < deadline:
        time.sleep(0.05)
    assert shell(check) == "running"
    # train.pid naming another process (its pid reused after a reboot) is not this job, though a
    # process named `tinyllm train` runs (the job's, still asleep: a machine-wide pgrep said running)
    (work / "train.pid").write_text(str(os.getpid()) + "\n")
    assert shell(check) == "stopped"
