"""Issue 23, "no tracebacks": a run_dir that is a file or cannot be written, an output path
under a file, an unreadable data file, a full disk during a checkpoint and paths with
spaces, in every subcommand: one line naming the key or option and the path, exit 2, and
the previous checkpoint kept."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tinyllm_jax.cli import main
from tinyllm_jax.data.demo import make_demo_records
from tinyllm_jax.data.records import write_jsonl

from test_first_hour import files_config
from test_train_run import tok_dir  # noqa: F401  (a fixture)


def one_line_error(capsys, command: str) -> str:
    """The command's stderr: exactly one `tinyllm COMMAND: error: ...` line at the end, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tinyllm {command}: error: "), err
    return last


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a file"
    path.write_text("not a folder\n")
    return path


def deny_writes_under(monkeypatch, folder: Path) -> None:
    """As if `folder` were not writable (the tests run as root, which no chmod stops)."""
    real = os.access

    def access(path, mode, *a, **k):
        if mode & os.W_OK and Path(path).resolve() == folder.resolve():
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


# ------------------------------------------------------------------ train, eval, recipe, rationales


def test_train_and_eval_name_run_dir_when_it_is_a_file_or_cannot_be_written(tmp_path, tok_dir, capsys, a_file,  # noqa: F811
                                                                             monkeypatch):
    config = files_config(tmp_path, tok_dir)
    assert main(["train", str(config), f"run_dir={a_file}"]) == 2
    assert one_line_error(capsys, "train").endswith(f"run_dir: {a_file} is a file, not a folder")
    assert main(["train", str(config), f"run_dir={a_file / 'run'}"]) == 2
    assert one_line_error(capsys, "train").endswith(
        f"run_dir: {a_file / 'run'} cannot be created: {a_file} is a file, not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes_under(monkeypatch, locked)
    assert main(["train", str(config), f"run_dir={locked / 'run'}"]) == 2
    assert one_line_error(capsys, "train").endswith(
        f"run_dir: {locked / 'run'} cannot be created: {locked} is not writable")
    assert not (locked / "run").exists()

    assert main(["eval", str(config), f"run_dir={a_file}"]) == 2
    assert one_line_error(capsys, "eval").endswith(f"run_dir: {a_file} is a file, not a training run directory")


def test_recipe_and_rationales_name_their_folders(tmp_path, capsys, a_file):
    from test_recipes import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", a_file)
    assert main(["recipe", str(recipe)]) == 2
    assert one_line_error(capsys, "recipe").endswith(f"run_dir: {a_file} is a file, not a folder")
    assert main(["recipe", str(recipe), "--dry-run"]) == 2
    assert one_line_error(capsys, "recipe").endswith(f"run_dir: {a_file} is a file, not a folder")

    records = tmp_path / "records.jsonl"
    write_jsonl(records, [{**r, "rationales": {}} for r in make_demo_records(4, 0, "train")])
    config = tmp_path / "rationales.yaml"
    config.write_text(yaml.safe_dump({"eval": {"task": "choice"}, "rationales": {
        "input": [str(records)], "output": str(a_file), "num_examples": 0, "progress": False,
        "teachers": [{"name": "careful", "backend": "demo", "model": "careful"}]}}))
    assert main(["rationales", str(config)]) == 2
    assert one_line_error(capsys, "rationales").endswith(f"rationales.output: {a_file} is a file, not a folder")


def test_an_unreadable_data_file_is_one_line(tmp_path, tok_dir, capsys, monkeypatch):  # noqa: F811
    config = files_config(tmp_path, tok_dir)
    train = tmp_path / "train.jsonl"
    real = Path.read_bytes

    def read_bytes(self):
        if self == train:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert main(["train", str(config)]) == 2
    assert one_line_error(capsys, "train").endswith(f"{train}: cannot read: Permission denied")


DISK_FULL_AFTER_FIRST_SAVE = textwrap.dedent("""
    # the file system refuses writes from the second checkpoint on: RLIMIT_FSIZE makes every write
    # past 64 KiB fail with EFBIG ("File too large"), a real failing write as a full disk gives
    import resource, signal, sys
    from tinyllm_jax.cli import main
    from tinyllm_jax.runtime import checkpoint

    save = checkpoint.Checkpointer.save

    def save_then_fill_the_disk(self, step, *a, **k):
        if step > 3:
            self.wait()  # step 3 complete first
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
        return save(self, step, *a, **k)

    checkpoint.Checkpointer.save = save_then_fill_the_disk
    sys.exit(main(["train", *sys.argv[1:]]))
""")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, tok_dir):  # noqa: F811
    from tinyllm_jax.config import CheckpointConfig
    from tinyllm_jax.runtime.checkpoint import Checkpointer

    config = files_config(tmp_path, tok_dir)
    run = tmp_path / "run"
    overrides = ["train.steps=12", "checkpoint.every_steps=3", "eval.every_steps=0"]
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_AFTER_FIRST_SAVE, str(config), *overrides],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"tinyllm train: error: run_dir: cannot save checkpoint step 6 in {run / 'checkpoints'}: "
                    f"File too large; the last complete checkpoint, step 3, is kept (free space, then rerun the "
                    f"same command to resume)"), proc.stderr[-3000:]
    ckpt = Checkpointer(run / "checkpoints", CheckpointConfig(), read_only=True)
    assert ckpt.latest_step() == 3 and ckpt.restore_params(3)
    ckpt.close()
    # space again: the rerun resumes from the kept step and finishes
    again = subprocess.run([sys.executable, "-m", "tinyllm_jax.cli", "train", str(config), *overrides],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert again.returncode == 0 and "resumed from step 3" in again.stderr, again.stderr[-3000:]


# ------------------------------------------------------------------ predict, export, convert, plot


def test_output_options_under_a_file_are_one_line(tmp_path, capsys, a_file):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "x"}\n')
    assert main(["predict", "--model", "m", "--input", str(inputs), "--output", str(a_file / "out.jsonl")]) == 2
    assert one_line_error(capsys, "predict").endswith(
        f"--output: {a_file / 'out.jsonl'} cannot be written: {a_file} is a file, not a folder")
    assert main(["predict", "--model", "m", "--input", str(inputs), "--output", str(tmp_path)]) == 2
    assert one_line_error(capsys, "predict").endswith(f"--output: {tmp_path} is a folder, expected a file name")
    assert main(["export", "some/run", str(a_file)]) == 2
    assert one_line_error(capsys, "export").endswith(f"OUT_DIR: {a_file} is a file, not a folder")
    assert main(["convert", "dss", "--src", str(tmp_path), "--out", str(a_file)]) == 2
    assert one_line_error(capsys, "convert").endswith(f"--out: {a_file} is a file, not a folder")
    assert main(["plot", str(tmp_path), "--out", str(a_file / "plot.png")]) == 2
    assert one_line_error(capsys, "plot").endswith(
        f"--out: {a_file / 'plot.png'} cannot be written: {a_file} is a file, not a folder")


def test_any_other_os_error_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """What no check foresaw (here: the disk fills while an export is written) still ends in
    one line with the file and the reason, exit 2."""
    from tinyllm_jax import runs

    def disk_full(src, out_dir, step=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / "model.safetensors"))

    monkeypatch.setattr(runs, "export_command", disk_full)
    assert main(["export", "some/run", str(tmp_path / "hf")]) == 2
    assert one_line_error(capsys, "export") == (
        f"tinyllm export: error: {tmp_path / 'hf' / 'model.safetensors'}: No space left on device")


# ------------------------------------------------------------------ paths with spaces


def test_paths_with_spaces_work_in_every_subcommand(tmp_path, tok_dir, capsys):  # noqa: F811
    spaced = tmp_path / "my data"
    spaced.mkdir()
    config = files_config(spaced, tok_dir)
    run = tmp_path / "my runs" / "run one"
    assert main(["train", str(config), f"run_dir={run}"]) == 0
    assert main(["eval", str(config), f"run_dir={run}", "--split", "validation"]) == 0
    inputs = spaced / "in put.jsonl"
    inputs.write_text('{"input": "predict: what is 2 plus 3?"}\n')
    out = tmp_path / "pre dictions" / "out put.jsonl"
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0
    assert json.loads(out.read_text())["prediction"] is not None
    assert main(["export", str(run), str(tmp_path / "hf model")]) == 0
    assert main(["plot", str(run), "--out", str(tmp_path / "my plots" / "a plot.png")]) == 0
    assert (tmp_path / "my plots" / "a plot.png").is_file()


def test_the_other_failed_writes_of_a_save_are_not_logged_but_other_errors_are(tmp_path, caplog, monkeypatch):
    """A save writes in parallel; asyncio's gather raises the first failed write and logs the
    others ("Task exception was never retrieved", a traceback each) when they are collected,
    which is what the one-line report of a full disk must not be buried under (seen in CI).
    A failed write of the file system is dropped; any other unretrieved error stays."""
    import asyncio
    import gc
    import logging

    from tinyllm_jax.config import CheckpointConfig
    from tinyllm_jax.runtime.checkpoint import Checkpointer

    from tinyllm_jax.runtime import checkpoint

    monkeypatch.setattr(checkpoint, "_A_SAVE_FAILED", False)  # and back as it was after the test
    Checkpointer(tmp_path / "ckpt", CheckpointConfig()).close()  # installs the filter
    full = "OUT_OF_RANGE: Error writing ... Failed to write 252644 bytes to file 17: File too large [os_error_code='27']"

    def gather_failures(second: BaseException) -> None:
        async def fail(e):
            raise e

        async def save():  # the second write fails too, and nobody asks it why
            other = asyncio.ensure_future(fail(second))
            await asyncio.sleep(0)
            await fail(ValueError(full))
            del other

        with pytest.raises(ValueError):
            asyncio.run(save())
        gc.collect()

    def destroy_a_pending_write() -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(asyncio.sleep(60))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gather_failures(ValueError(full))
        gather_failures(OSError(28, "No space left on device"))
        assert not [r for r in caplog.records if r.name == "asyncio"]
        gather_failures(KeyError("a bug"))
        assert [r for r in caplog.records if r.name == "asyncio" and "never retrieved" in r.getMessage()]
        caplog.clear()
        destroy_a_pending_write()  # before any save failed: said
        assert [r for r in caplog.records if r.name == "asyncio" and "destroyed but it is pending" in r.getMessage()]
        caplog.clear()
        ckpt = Checkpointer(tmp_path / "ckpt2", CheckpointConfig())
        with pytest.raises(Exception, match="File too large"):
            ckpt._guarded(6, lambda: (_ for _ in ()).throw(ValueError(full)))
        destroy_a_pending_write()  # a save failed: its abandoned writes are not
        assert not [r for r in caplog.records if r.name == "asyncio"]


def test_after_a_failed_save_unawaited_writes_say_nothing_at_exit(tmp_path):
    """The failed save's other writes are coroutines that are never awaited; Python warned of
    them while exiting ("coroutine ... was never awaited", seen in CI), after the one-line
    report. Once a save has failed they are quiet; before, a stray coroutine still warns."""
    script = textwrap.dedent("""
        import gc, sys
        from tinyllm_jax.config import CheckpointConfig
        from tinyllm_jax.runtime.checkpoint import Checkpointer, CheckpointError

        async def write_fragment():
            pass

        ckpt = Checkpointer(sys.argv[1], CheckpointConfig())
        if sys.argv[2] == "failed":
            full = "Failed to write 252644 bytes to file 17: File too large [os_error_code='27']"
            try:
                ckpt._guarded(6, lambda: (_ for _ in ()).throw(ValueError(full)))
            except CheckpointError as e:
                print(e, file=sys.stderr)
        pending = write_fragment()  # dropped unawaited, as the failed save's other writes are
        if sys.argv[3] == "now":
            del pending
            gc.collect()
        # else collected while the interpreter exits ("sys:1: RuntimeWarning ...")
    """)
    for case, warned in (("failed", False), ("fine", True)):
        for when in ("now", "at_exit"):
            proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{case}-{when}"), case, when],
                                  capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert ("was never awaited" in proc.stderr) == warned, (case, when, proc.stderr[-3000:])
