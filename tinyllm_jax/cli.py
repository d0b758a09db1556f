"""The `tinyllm` command: parse arguments, call one function, report. Nothing else lives here.

Heavy modules (JAX, transformers) are imported inside each subcommand so that
`tinyllm --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from tinyllm_jax.errors import Interrupted, UserError, check_writable_dir, check_writable_file
from tinyllm_jax.runtime import distributed


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required or not action.option_strings:
            return action.help or ""
        return super()._get_help_string(action)


def _command(sub, name: str, summary: str, details: str = ""):
    """A subcommand whose one-line `summary` shows in `tinyllm --help` and heads its own."""
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}." + (
        f" {details}" if details else ""), formatter_class=_HelpFormatter)


def _config_args(p: argparse.ArgumentParser, example: str = "optim.learning_rate=1e-4") -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=f"dotted overrides, e.g. {example}")


def _train(a: argparse.Namespace) -> None:
    from tinyllm_jax.config import load_config
    from tinyllm_jax.train.loop import train

    train(load_config(a.config, a.overrides))


def _eval(a: argparse.Namespace) -> None:
    from tinyllm_jax.config import load_config
    from tinyllm_jax.eval.evaluate import evaluate_command

    evaluate_command(load_config(a.config, a.overrides), checkpoint=a.checkpoint, split=a.split)


def _predict(a: argparse.Namespace) -> None:
    from tinyllm_jax.eval.predict import predict_file

    check_writable_file(a.output, "--output")
    predict_file(a.model, a.input, a.output, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)


def _export(a: argparse.Namespace) -> None:
    from tinyllm_jax.runs import export_command

    check_writable_dir(a.out_dir, "OUT_DIR")
    export_command(a.src, a.out_dir, step=a.step)


def _convert(a: argparse.Namespace) -> None:
    from tinyllm_jax.data.formats import convert_command

    check_writable_dir(a.out, "--out")
    convert_command(a.format, a.src, a.out)


def _rationales(a: argparse.Namespace) -> None:
    from tinyllm_jax.config import load_config
    from tinyllm_jax.teachers.generate import generate_command

    generate_command(load_config(a.config, a.overrides))


def _logits(a: argparse.Namespace) -> None:
    from tinyllm_jax.config import load_config
    from tinyllm_jax.train.teacher_logits import logits_command

    logits_command(load_config(a.config, a.overrides))


def _recipe(a: argparse.Namespace) -> None:
    from tinyllm_jax.recipes import recipe_command

    recipe_command(a.config, a.overrides, dry_run=a.dry_run, only=a.only)


def _plot(a: argparse.Namespace) -> None:
    from tinyllm_jax.train.plot import plot_run

    if a.out:
        check_writable_file(a.out, "--out")
    else:
        check_writable_dir(a.run_dir, "RUN_DIR")
    print(plot_run(a.run_dir, a.out))


def build_parser() -> argparse.ArgumentParser:
    from tinyllm_jax import __version__

    parser = argparse.ArgumentParser(prog="tinyllm", description="Multi-teacher reasoning distillation into T5 students, in JAX.")
    parser.add_argument("--version", action="version", version=f"tinyllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train", "train (or resume) a student from a YAML config",
                 "The run lives in run_dir; the same command resumes it, and says so when it is finished.")
    _config_args(p)
    distributed.add_arguments(p)
    p.set_defaults(fn=_train)

    p = _command(sub, "eval", "greedy-decode and score a run's checkpoint on a split")
    _config_args(p, "eval.max_new_tokens=128")
    p.add_argument("--checkpoint", metavar="STEP",
                   help="the checkpoint step to score, e.g. 200 (or its folder RUN_DIR/checkpoints/200); "
                        "default: the run's best on validation, else its latest")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="the split to score")
    distributed.add_arguments(p)
    p.set_defaults(fn=_eval)

    p = _command(sub, "predict", "greedy predictions for a JSONL file of inputs")
    p.add_argument("--model", required=True, help="a training run directory (its selected checkpoint), HF model directory or hub id")
    p.add_argument("--input", required=True, help='JSONL, one {"input": "..."} a line')
    p.add_argument("--output", required=True, help="JSONL with \"prediction\" added, input order")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated at most per input")
    p.add_argument("--batch-size", type=int, default=32, help="inputs decoded at once (engine slots)")
    p.set_defaults(fn=_predict)

    p = _command(sub, "export", "write a Hugging Face T5 checkpoint",
                 "Loading it in transformers needs PyTorch; `tinyllm predict --model OUT_DIR` needs none.")
    p.add_argument("src", help="HF model directory, hub id, or a training run directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write")
    p.add_argument("--step", type=int, help="checkpoint step of a run (default: best, else latest)")
    p.set_defaults(fn=_export)

    p = _command(sub, "convert", "convert a reference system's data to tinyllm records")
    p.add_argument("format", choices=["tinyllm", "dss", "mentor-kd", "fair"], help="the reference system")
    p.add_argument("--src", required=True, help="the unpacked reference data folder")
    p.add_argument("--out", required=True, help="output folder, one JSONL a split")
    p.set_defaults(fn=_convert)

    p = _command(sub, "rationales", "collect teacher rationales for records",
                 "Resumable: answers are cached as they arrive, and a rerun sends only what is missing.")
    _config_args(p, "rationales.teachers.0.temperature=0.7")
    p.set_defaults(fn=_rationales)

    p = _command(sub, "logits", "run distillation teachers once and store their top-k soft labels",
                 "Resumable: finished shards are kept, a rerun writes only what is missing.")
    _config_args(p)
    distributed.add_arguments(p)
    p.set_defaults(fn=_logits)

    p = _command(sub, "recipe", "run a method end to end: data, teachers, training, test, export",
                 "Resumable: done stages are skipped, a changed setting reruns what it touches.")
    _config_args(p, "data.streams.1.weight=2.0")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stages, what each reads and writes, which are done, and the teacher requests left")
    p.add_argument("--only", metavar="STAGE", help="run this one stage (the stages before it must be done)")
    p.set_defaults(fn=_recipe)

    p = _command(sub, "plot", "plot a run's losses and accuracy (a recipe's: every training stage)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run, or a recipe's run folder")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/plot.png)")
    p.set_defaults(fn=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may follow options too (`recipe C.yaml --dry-run run_dir=x`)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in ("train", "eval", "logits"):  # multi-host: join the other processes first
            distributed.initialize(distributed.settings_from({k: getattr(args, k) for k in distributed.FLAGS}))
        args.fn(args)
    except UserError as e:
        print(f"tinyllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # saved; non-zero, so that `train && export` stops here
        print(f"tinyllm {args.command}: {e}", file=sys.stderr)
        return e.status
    except OSError as e:  # the file system said no (space, permission, a path): one line, no traceback
        print(f"tinyllm {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyllm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _os_error(e: OSError) -> str:
    files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{files}: {e.strerror}" if files and e.strerror else str(e)


def entry() -> int:
    """The `tinyllm` command: `main` in a process whose malloc uses transparent huge pages
    (see tinyllm_jax/hugepages.py; ~14 % faster CPU train steps)."""
    from tinyllm_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages("tinyllm_jax.cli", sys.argv[1:])
    return main()


if __name__ == "__main__":
    sys.exit(entry())
