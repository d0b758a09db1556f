"""Decoder checkpoints in and out: export round trips through transformers, the config and the
name map, and the checkpoints that are refused in one clear line."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from decoder_fixtures import (CHAT_TEMPLATE, EOS, FIRST_PLAIN_TOKEN, IM_END, VARIANTS, bpe_tokenizer,  # noqa: F401
                              decoder_dir, load_hf, make_hf_decoder)
from tinyllm_jax.model.decoder import Decoder, DecoderConfig, init_params
from tinyllm_jax.model.decoder_hf import (NAME_MAP, config_from_hf, expand_name_map, load_pretrained, param_shapes,
                                          save_pretrained)
from tinyllm_jax.model.hf import ModelLoadError


def _load_quietly(path):
    """transformers' model, its loading info, and every warning it logged or raised."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record) if record.levelno >= logging.WARNING else None
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32,
                                                               attn_implementation="eager")
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, [r.getMessage() for r in records] + [str(w.message) for w in caught]


def _logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_round_trip(name, decoder_dir, tmp_path):
    """HF -> ours -> export: transformers loads it with no missing, unexpected or resized weight
    and no warning, and computes the original's logits exactly; we read back what we wrote."""
    src = decoder_dir(name)
    params, cfg, tok = load_pretrained(str(src))
    out = save_pretrained(params, cfg, tmp_path / "export", tok)
    hf, info, logged = _load_quietly(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert logged == [], logged
    ids = np.random.default_rng(0).integers(FIRST_PLAIN_TOKEN, 120, (2, 70))
    np.testing.assert_array_equal(_logits(hf, ids), _logits(load_hf(src), ids))
    again, cfg2, _ = load_pretrained(str(out), tokenizer=False)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_sharded_export_with_tokenizer_and_chat_template(decoder_dir, tmp_path):
    """Shards with an index when over the size; the tokenizer, its chat template and every eos
    id (config.json and generation_config.json) travel with the export."""
    from transformers import AutoTokenizer, GenerationConfig

    src = decoder_dir("qwen3_head_dim_16")
    params, cfg, tok = load_pretrained(str(src))
    cfg = cfg.replace(eos_token_ids=(EOS, IM_END))
    out = save_pretrained(params, cfg, tmp_path / "sharded", tok, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    hf, info, logged = _load_quietly(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and logged == []
    ids = np.random.default_rng(1).integers(FIRST_PLAIN_TOKEN, 120, (1, 30))
    np.testing.assert_array_equal(_logits(hf, ids), _logits(load_hf(src), ids))
    assert GenerationConfig.from_pretrained(out).eos_token_id == [EOS, IM_END]
    assert load_pretrained(str(out), tokenizer=False)[1].eos_token_ids == (EOS, IM_END)
    back = AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "user", "content": "what is two plus three?"}]
    assert back.chat_template == CHAT_TEMPLATE
    assert back.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(chat, add_generation_prompt=True)


def test_generation_config_eos_ids_join_config_json(decoder_dir, tmp_path):
    """A chat checkpoint whose generation_config.json names more eos ids than config.json stops at all."""
    path = tmp_path / "chat"
    shutil.copytree(decoder_dir("llama_gqa"), path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, EOS], "bos_token_id": 2}))
    assert load_pretrained(str(path), tokenizer=False)[1].eos_token_ids == (EOS, IM_END)


def test_checkpoint_without_lm_head_is_tied(decoder_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "no_head"
    shutil.copytree(decoder_dir("llama_gqa"), path)
    state = load_file(str(path / "model.safetensors"))
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    del state["lm_head.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    params, cfg, _ = load_pretrained(str(path), tokenizer=False)
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_weights_the_config_does_not_use_are_refused(decoder_dir, tmp_path):
    path = tmp_path / "biased"
    shutil.copytree(decoder_dir("llama_tied_llama3_bias"), path)
    hf_cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_cfg, "mlp_bias": False}))
    with pytest.raises(ModelLoadError, match=r"weights that config.json does not use, e.g. \['model.layers.0.mlp"):
        load_pretrained(str(path), tokenizer=False)


def test_weights_of_another_shape_than_the_config_says_are_refused(decoder_dir, tmp_path):
    path = tmp_path / "narrow"
    shutil.copytree(decoder_dir("llama_gqa"), path)
    hf_cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_cfg, "intermediate_size": hf_cfg["intermediate_size"] * 2}))
    with pytest.raises(ModelLoadError, match=r"model.layers.0.mlp.gate_proj.weight has the wrong shape for config.json"):
        load_pretrained(str(path), tokenizer=False)


BASE = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, r"config.json: model_type is 'gpt2'; decoder-only students are one of llama, mistral, qwen2, qwen3"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling.rope_type is 'yarn'; supported: default, linear, llama3"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, r"rope_parameters.rope_type is 'dynamic'"),
    ({"model_type": "mistral", "sliding_window": 0}, r"sliding_window is 0; expected a whole number of at least 1"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     r"sliding_window is 64 and active \(use_sliding_window is true\); qwen2's sliding window in some layers"),
    ({"hidden_act": "gelu"}, r"hidden_act is 'gelu'; the llama MLP here is SwiGLU \(expected 'silu'\)"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor is 0.5"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"),
    ({"vocab_size": None}, r"config.json: missing field 'vocab_size'"),
])
def test_refusals_name_the_key(change, message, tmp_path):
    """Each architecture the network would not compute exactly is refused in one line naming
    config.json and the key, before any weight is read (the directory has none)."""
    hf_cfg = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ModelLoadError) as err:
        load_pretrained(str(tmp_path))
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "config.json"))
    assert re.search(message, text), text


def test_inactive_sliding_windows_are_accepted():
    """Qwen2.5 ships sliding_window set with use_sliding_window false; Mistral v0.2+ ships null."""
    assert config_from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32768})
    assert config_from_hf({**BASE, "model_type": "qwen3", "use_sliding_window": True, "sliding_window": 64,
                           "max_window_layers": 28})  # no layer reaches max_window_layers
    assert config_from_hf({**BASE, "model_type": "mistral", "sliding_window": None}).sliding_window is None


def test_mistrals_sliding_window_is_read_and_written_back():
    """Mistral v0.1 (and transformers' MistralConfig default) slides over 4096 keys: computed
    here, so the checkpoint loads and its export says the same window."""
    from tinyllm_jax.model.decoder_hf import config_to_hf

    cfg = config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert cfg.sliding_window == 4096 and config_to_hf(cfg)["sliding_window"] == 4096
    assert config_from_hf({**BASE, "model_type": "llama", "sliding_window": 4096}).sliding_window is None


def test_old_rope_format_reads_like_the_new():
    """transformers < 5 wrote rope_theta and rope_scaling ("type" or "rope_type"); 5 writes rope_parameters."""
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    new = config_from_hf({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **llama3}})
    old = config_from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **llama3}})
    assert new == old and new.rope_theta == 5e5 and new.rope_type == "llama3"


def test_config_is_hashable_and_json_round_trips():
    cfg = config_from_hf({**BASE, "eos_token_id": [3, 5], "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    back = DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg) and back.eos_token_ids == (3, 5)
    with pytest.raises(Exception, match="unknown keys"):
        DecoderConfig.from_dict({**cfg.to_dict(), "hidden_act": "silu"})


def test_name_map_covers_every_parameter_once():
    """Every parameter of every variant has exactly one row, so import and export miss nothing."""
    for model_type, kw in [("llama", dict(attention_bias=True, mlp_bias=True)), ("qwen2", dict(attention_bias=True)),
                           ("qwen3", dict(qk_norm=True)), ("mistral", dict(tie_word_embeddings=True))]:
        cfg = DecoderConfig(model_type=model_type, vocab_size=16, hidden_size=8, intermediate_size=12,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **kw)
        rows = expand_name_map(cfg)
        assert sorted(r[0] for r in rows) == sorted(param_shapes(cfg)), model_type
        assert len({r[1] for r in rows}) == len(rows)
    assert len({row[1] for row in NAME_MAP}) == len(NAME_MAP)


def test_scratch_params_export_and_load_in_transformers(tmp_path):
    """A model initialised here (not imported) exports, and transformers computes our logits."""
    cfg = DecoderConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, eos_token_ids=(3,))
    params = init_params(cfg, jax.random.PRNGKey(0))
    out = save_pretrained(params, cfg, tmp_path / "scratch")
    hf, info, logged = _load_quietly(out)
    assert not info["missing_keys"] and logged == []
    ids = np.random.default_rng(2).integers(1, 64, (2, 12))
    ours = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    assert np.abs(_logits(hf, ids) - ours).max() <= 1e-4
