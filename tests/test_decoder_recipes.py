"""Every recipe runs with a decoder-only student (Qwen2-shaped, from scratch), as with T5:
TinyLLM, distilling step-by-step, Mentor-KD (a decoder mentor's samples and soft labels) and
FAIR (mining through the decoder's rationales), each end to end on the demo data."""

from __future__ import annotations

import json

import pytest

from test_fair import FAIR
from test_mentor_kd import MENTOR_KD
from test_recipes import TINY_RECIPE, write_recipe
from tinyllm_jax.cli import main

DECODER = {"family": "qwen2", "num_kv_heads": 2, "num_layers": 2, "tie_word_embeddings": True,
           "max_position_embeddings": 512}


def _decoder(recipe: dict) -> dict:
    out = json.loads(json.dumps(recipe))
    out["model"] = {**out["model"], **DECODER}
    out["data"] = {**out["data"], "sequence_length": out["data"]["encoder_length"] + out["data"]["decoder_length"]}
    if "mentor" in out:
        out["mentor"]["model"] = {**out["mentor"]["model"], **DECODER}
    return out


@pytest.mark.parametrize("name, recipe", [
    ("tinyllm", TINY_RECIPE),
    ("step_by_step", {**TINY_RECIPE, "method": "step_by_step", "rationales": {
        **TINY_RECIPE["rationales"], "teachers": [{"name": "careful", "backend": "demo", "model": "careful",
                                                   "template": "few_shot_cot"}]},
        "data": {**TINY_RECIPE["data"], "streams": [{"name": "answer", "prefix": "predict: ", "weight": 0.5},
                                                    {"name": "careful", "prefix": "explain: ", "weight": 0.5,
                                                     "teacher": "careful"}]}}),
    ("mentor_kd", MENTOR_KD),
    ("fair", {**FAIR, "fair": {**FAIR["fair"], "rounds": 1, "replay": 0.5}}),
])
def test_recipe_with_a_decoder_student(name, recipe, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", run_dir, **{k: v for k, v in _decoder(recipe).items()})
    assert main(["recipe", str(cfg)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "test_accuracy" in summary, summary
    train = {"mentor_kd": "train", "fair": "round1/train/student"}.get(name, "train")
    saved = json.loads((run_dir / train / "model_config.json").read_text())
    assert saved["family"] == "decoder" and saved["model_type"] == "qwen2"
    assert (run_dir / "export" / "config.json").is_file()
    assert json.loads((run_dir / "export" / "config.json").read_text())["model_type"] == "qwen2"
