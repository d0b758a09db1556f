"""Issue 23, "the README and the configs true": config headers name real keys; the CLI's help
shows what every subcommand does and its defaults; the configs' comments are current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tinyllm_jax.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ item 9: help and version


def test_version_and_every_subcommand_has_a_one_line_description_and_shows_its_defaults(capsys):
    from tinyllm_jax import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tinyllm {__version__}"

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    top = parser.format_help()
    for name, sub in commands.items():
        summary = next(a.help for a in parser._subparsers._group_actions[0]._choices_actions if a.dest == name)
        assert summary and "\n" not in summary and re.search(rf"\b{name}\s+{re.escape(summary[:20])}", top), name
        assert sub.description and sub.description.lower().startswith(summary.lower()), name
    assert "(default: 64)" in commands["predict"].format_help()  # --max-new-tokens
    assert "(default: test)" in commands["eval"].format_help()  # --split
    assert "(default: None)" not in "".join(c.format_help() for c in commands.values())

    checkpoint = next(a for a in commands["eval"]._actions if a.dest == "checkpoint")
    assert checkpoint.metavar == "STEP" and "step" in checkpoint.help
    rationales = next(a for a in commands["rationales"]._actions if a.dest == "overrides")
    assert re.search(r"e\.g\. rationales\.\S+=", rationales.help)


def test_config_comments_say_that_overrides_index_the_stream_list():
    from tinyllm_jax.config import load_config

    stale = [p.name for p in sorted((REPO / "configs").rglob("*.yaml")) if "cannot index" in p.read_text()]
    assert not stale
    cfg = load_config(REPO / "configs" / "tinyllm_obqa.yaml", ["data.streams.1.weight=2.0"])
    assert cfg.data.streams[1].weight == 2.0


# ------------------------------------------------------------------ item 10: export


def test_exported_weights_have_the_mode_of_the_other_files(tmp_path, tiny_t5_dir, capsys):
    out = tmp_path / "export"
    assert main(["export", str(tiny_t5_dir), str(out)]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes
