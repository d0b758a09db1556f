"""Recipes from the reference systems' published data (../shared/data, skipped when absent):
the data stage converts it and training reads the teachers' published rationales."""

from __future__ import annotations

import json
import subprocess

from conftest import shared_data_or_skip
from test_recipes import TINY_RECIPE, write_recipe
from tinyllm_jax.cli import main


def _unpack(archive: str, dest):
    subprocess.run(["tar", "xJf", str(shared_data_or_skip(archive)), "-C", str(dest)], check=True)
    return dest


def test_tinyllm_recipe_from_published_obqa_rationales(tmp_path, capsys):
    src = _unpack("tinyllm.tar.xz", tmp_path) / "tinyllm"
    run_dir = tmp_path / "run"
    streams = [{"name": "answer", "prefix": "predict: "},
               {"name": "flan-t5", "prefix": "explain: ", "teacher": "flan-t5"},
               {"name": "llama", "prefix": "rationale: ", "teacher": "llama"}]
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, source={"demo": None, "convert": {"format": "tinyllm", "src": str(src),
                                                                         "dataset": "obqa"}},
                       rationales={"teachers": []}, export={"enabled": False},
                       data={**TINY_RECIPE["data"], "streams": streams, "max_input_length": 512,
                             "max_target_length": 256, "encoder_length": 512, "decoder_length": 256},
                       model={**TINY_RECIPE["model"], "train_tokenizer_vocab": 512, "vocab_size": 512},
                       train={**TINY_RECIPE["train"], "steps": 2}, eval={**TINY_RECIPE["eval"], "every_steps": 2,
                                                                         "max_examples": 16})
    assert main(["recipe", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "stage rationales" not in out.out  # the records carry the teachers' rationales
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["data", "train", "evaluate"]
    assert json.loads((run_dir / "data" / "stage.json").read_text())["result"]["records"] == \
        {"train": 4957, "validation": 500, "test": 500}
    assert "stream flan-t5: 4955 examples" in out.err and "test_accuracy" in summary
    assert json.loads((run_dir / "evaluate" / "summary.json").read_text())["test_n"] == 500
