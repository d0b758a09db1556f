"""Issue 23, "nothing lost": a failed start leaves a finished run as it was; resuming on other
training records is refused unless allowed; a finished run started again says so; SIGINT
saves like SIGTERM and both exit non-zero saying where the rerun resumes; a recipe stage
rerun on changed settings keeps the old output aside and takes it back when the settings
return."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tinyllm_jax.cli import main
from tinyllm_jax.data.demo import make_demo_records
from tinyllm_jax.data.records import write_jsonl

from test_first_hour import files_config
from test_recipes import write_recipe
from test_train_run import run_train, tok_dir, write_config  # noqa: F401  (tok_dir is a fixture)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ item 1 (and 11: a finished run)


def test_a_failed_start_leaves_a_finished_run_untouched_and_a_finished_run_says_it_is_done(
        tmp_path, tok_dir, capsys):  # noqa: F811
    config = files_config(tmp_path, tok_dir)
    run = tmp_path / "run"
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    before = snapshot(run)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "unfinished\n')
    assert main(["train", str(config), f"data.train=[{bad}]", "train.steps=8"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "malformed JSON" in err
    assert "changed settings" not in err  # checked before anything is said about resuming
    assert snapshot(run) == before

    # a start that fails later (the evaluation files, after the tokenizer and packing) writes nothing either
    assert main(["train", str(config), f"data.test=[{tmp_path / 'missing.jsonl'}]"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert snapshot(run) == before

    # the same command again: it is done, nothing is rerun (no test scoring, no new files)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: already finished" in out and f"summary: {run / 'summary.json'}" in out
    assert "trained 4 steps" in out
    assert snapshot(run) == before


def test_resuming_on_other_training_records_is_refused_unless_allowed(tmp_path, tok_dir, capsys):  # noqa: F811
    config = files_config(tmp_path, tok_dir)
    run = tmp_path / "run"
    assert main(["train", str(config)]) == 0
    train = tmp_path / "train.jsonl"
    original = train.read_text()

    # the same records under another name: a changed path, not a change of data (resumes, warns)
    moved = tmp_path / "elsewhere" / "records.jsonl"
    moved.parent.mkdir()
    moved.write_text(original)
    capsys.readouterr()
    assert main(["train", str(config), f"data.train=[{moved}]", "train.steps=5"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 4" in err and "changed settings" in err and "data.train" in err

    # other records at the same path: refused in one line, nothing written
    write_jsonl(train, make_demo_records(64, 7, "train"))
    before = snapshot(run)
    assert main(["train", str(config), "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "training records changed" in err and "resumes from step 5" in err and "train.allow_data_change=true" in err
    assert snapshot(run) == before

    assert main(["train", str(config), "train.steps=6", "train.allow_data_change=true"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 5" in err and "other training data" in err
    saved = json.loads((run / "train_data.json").read_text())
    assert saved["records"] == 64 and saved["sha256"] != hashlib.sha256(original.encode()).hexdigest()
    assert main(["train", str(config), "train.steps=6"]) == 0  # the new records are the run's records now


def test_a_second_command_in_a_run_directory_in_use_is_refused(tmp_path, tok_dir, capsys):  # noqa: F811
    """`tinyllm train` or `recipe` on a RUN_DIR another command holds (a second terminal, a
    requeued job whose first copy still runs) is refused, naming the holder, and writes
    nothing; the holder's exit (even SIGKILL: the kernel drops the lock) frees it."""
    from tinyllm_jax.runtime import run_lock

    config = files_config(tmp_path, tok_dir)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from tinyllm_jax.runtime import run_lock\n"
                               "with run_lock.hold(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(600)",
                               str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"run_dir = {run}: in use by another tinyllm command (pid {holder.pid} on " in err, err
        assert "wait for it to end, or stop it, then rerun this one" in err
        assert snapshot(run) == before and not (run / "config.yaml").exists()

        recipe_dir = tmp_path / "recipe"
        recipe_dir.mkdir()
        cfg = write_recipe(tmp_path / "r.yaml", recipe_dir, export={"enabled": False})
        with run_lock.hold(recipe_dir):  # another open file: refused even within one process
            assert main(["recipe", str(cfg)]) == 2
        assert f"run_dir = {recipe_dir}: in use by another tinyllm command (pid {os.getpid()}" in capsys.readouterr().err
        assert sorted(p.name for p in recipe_dir.iterdir()) == [run_lock.LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["train", str(config)]) == 0  # the killed holder's lock is gone with it


# ------------------------------------------------------------------ item 2: Ctrl-C


def test_a_second_ctrl_c_while_saving_still_leaves_a_checkpoint_the_rerun_resumes_from(tmp_path, tok_dir):  # noqa: F811
    """The first SIGINT asks for a save at the step's end; the second, a moment later, stops
    the run during that step or its save. Orbax commits a step only once it is complete, so
    whatever the second one interrupted, the rerun resumes from a whole checkpoint."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", run_dir, tok_dir, train={"steps": 100000},
                       checkpoint={"every_steps": 5})
    proc = run_train(cfg)
    deadline = time.time() + 300
    while not any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert "rerun the same command to resume from step " in last, last
    step = int(last.rsplit(" ", 1)[1])
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == step
    proc = run_train(cfg, f"train.steps={step + 2}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"resumed from step {step}" in out, out[-2000:]


# ------------------------------------------------------------------ item 3: recipe reruns keep the old output


def stage_times(run_dir: Path) -> dict[str, float]:
    return {p.parent.name: json.loads(p.read_text())["finished"] for p in sorted(run_dir.glob("*/stage.json"))}


def test_a_recipe_rerun_on_changed_settings_keeps_the_old_training_and_takes_it_back(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, export={"enabled": False})
    assert main(["recipe", str(cfg)]) == 0
    first_times, first_train = stage_times(run_dir), snapshot(run_dir / "train")
    fp_first = json.loads((run_dir / "train" / "stage.json").read_text())["fingerprint"]
    capsys.readouterr()

    assert main(["recipe", str(cfg), "data.streams.1.weight=1.0"]) == 0
    out = capsys.readouterr().out
    kept = run_dir / "previous" / "train" / fp_first
    assert f"stage train: settings changed (data.streams.1.weight: 0.5 -> 1.0); its output is kept in {kept}" in out
    assert snapshot(kept) == first_train  # the old weights and checkpoints, whole
    second_times = stage_times(run_dir)
    fp_second = json.loads((run_dir / "train" / "stage.json").read_text())["fingerprint"]

    # the settings come back: the kept output is taken back, nothing is trained again
    assert main(["recipe", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"stage train: settings as in an earlier run: its output under these settings is kept in {kept}" in out
    assert stage_times(run_dir) == first_times
    assert snapshot(run_dir / "train") == first_train
    assert (run_dir / "previous" / "train" / fp_second / "stage.json").is_file()  # the other settings', aside
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"].values()] == ["done"] * 4

    assert main(["recipe", str(cfg), "data.streams.1.weight=1.0", "--dry-run"]) == 0
    assert "stage train: to take back" in capsys.readouterr().out
    assert stage_times(run_dir) == first_times  # a dry run moves nothing
    assert main(["recipe", str(cfg), "data.streams.1.weight=1.0"]) == 0
    assert stage_times(run_dir) == second_times
