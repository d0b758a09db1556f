"""Greedy decoding against transformers' generate, `tinyllm predict`, `tinyllm export`."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch

from conftest import make_hf_t5
from tinyllm_jax.cli import main
from tinyllm_jax.eval.decode import generate, generate_ids
from tinyllm_jax.model.hf import load_pretrained

# transformers cannot generate when the decoder is deeper than the encoder; logits are
# compared for that variant in test_t5_parity.py.
GENERATE_VARIANTS = {
    "v1_0_relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1_gated_gelu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "odd_heads_dkv": dict(num_heads=3, d_kv=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "deeper_encoder": dict(num_layers=3, num_decoder_layers=1),
}
INPUTS = ["what is two plus three?", "the quick brown fox", "Answer Choices: (a) red (b) blue",
          "plants use sunlight", "12 times 3 equals", "a rock is heavier than a feather because it has more mass"]


def _hf_generate(hf, tok, texts, max_new_tokens):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0)
    return [tok.decode(o, skip_special_tokens=True) for o in out], out[:, 1:].numpy()


@pytest.mark.parametrize("variant", list(GENERATE_VARIANTS))
def test_predict_equals_transformers_generate(variant, tmp_path, spm_tokenizer_dir):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    path = make_hf_t5(tmp_path / "m", spm_tokenizer_dir, seed=3, vocab_size=100, **GENERATE_VARIANTS[variant])
    hf = T5ForConditionalGeneration.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    want_text, want_ids = _hf_generate(hf, tok, INPUTS, 12)

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"input": t, "id": i}) + "\n" for i, t in enumerate(INPUTS)))
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(path), "--input", str(src), "--output", str(out),
                 "--max-new-tokens", "12", "--batch-size", "4"]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(INPUTS)))  # input order kept
    assert [r["prediction"] for r in rows] == want_text

    # token for token, not only after detokenisation
    _, params, _, cfg = load_pretrained(str(path), tokenizer=False)
    ids = generate_ids(cfg, params, tok(INPUTS)["input_ids"], 12, batch_size=4)
    for got, want in zip(ids, want_ids):
        want = want.tolist()
        want = want[:want.index(1)] if 1 in want else want
        assert got == want  # HF pads after EOS with 0, we stop there
    assert sum(len(g) for g in ids) > len(INPUTS)  # not trivially empty


def test_sampling_needs_key_and_is_reproducible(tiny_t5_dir):
    _, params, tok, cfg = load_pretrained(str(tiny_t5_dir))
    ids = np.asarray(tok(INPUTS[:2], padding=True)["input_ids"], np.int32)
    with pytest.raises(ValueError):
        generate(cfg, params, ids, 8, temperature=1.0)
    a = generate(cfg, params, ids, 8, temperature=1.0, top_k=5, top_p=0.9, rng=jax.random.key(1))
    b = generate(cfg, params, ids, 8, temperature=1.0, top_k=5, top_p=0.9, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tied", [True, False])
def test_export_reloads_in_transformers_with_identical_logits(tied, tmp_path, spm_tokenizer_dir):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    ff = "relu" if tied else "gated-gelu"
    src = make_hf_t5(tmp_path / "src", spm_tokenizer_dir, seed=5, feed_forward_proj=ff, tie_word_embeddings=tied)
    out = tmp_path / "exported"
    assert main(["export", str(src), str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    a = T5ForConditionalGeneration.from_pretrained(src).eval()
    b, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(INPUTS[:3], return_tensors="pt", padding=True)
    dec = torch.zeros((3, 4), dtype=torch.long)
    with torch.no_grad():
        la = a(**enc, decoder_input_ids=dec).logits
        lb = b.eval()(**enc, decoder_input_ids=dec).logits
    assert torch.equal(la, lb)


def test_export_shards_large_checkpoints(tmp_path, tiny_t5_dir):
    from transformers import T5ForConditionalGeneration

    from tinyllm_jax.model.hf import save_pretrained

    _, params, tok, cfg = load_pretrained(str(tiny_t5_dir))
    out = save_pretrained(params, cfg, tmp_path / "sharded", tok, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    _, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_export_over_an_earlier_export_replaces_it_whole(tmp_path, tiny_t5_dir, capsys, monkeypatch):
    """An earlier export sharded otherwise leaves no weight file behind (its index would be read
    instead of the new file); its model card stays; a crash mid-export leaves it as it was; a
    run's folder, a file and the current folder are refused."""
    import tinyllm_jax.model.hf as hf

    _, params, tok, cfg = load_pretrained(str(tiny_t5_dir))
    out = tmp_path / "hf"
    hf.save_pretrained(jax.tree.map(lambda x: x * 0, params), cfg, out, tok, max_shard_bytes=20_000)
    (out / "README.md").write_text("my model card")
    assert (out / "model.safetensors.index.json").is_file()

    def broken(*a):
        raise RuntimeError("the machine went down")
    with monkeypatch.context() as m:  # a crash after the weights were written
        m.setattr(hf, "config_to_hf", broken)
        with pytest.raises(RuntimeError):
            main(["export", str(tiny_t5_dir), str(out)])
    assert (out / "model.safetensors.index.json").is_file() and (out / "README.md").is_file()
    assert list(tmp_path.glob(".hf.export-*"))  # the crashed export's folder, hidden

    assert main(["export", str(tiny_t5_dir), str(out)]) == 0
    assert not list(tmp_path.glob(".hf.export-*")) and (out / "README.md").read_text() == "my model card"
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    for x, y in zip(jax.tree.leaves(load_pretrained(str(out))[1]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)

    link = tmp_path / "latest"  # a link to the export stays a link to it
    link.symlink_to(out)
    assert main(["export", str(tiny_t5_dir), str(link)]) == 0
    assert link.is_symlink() and (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    odd = tmp_path / "model [v2]"  # glob characters: only this folder's leftovers are cleared
    (tmp_path / ".model [v2].export-123").mkdir()
    (tmp_path / ".model v.export-9").mkdir()  # "model v"'s, which the unescaped pattern matched
    assert main(["export", str(tiny_t5_dir), str(odd)]) == 0
    assert not (tmp_path / ".model [v2].export-123").exists() and (tmp_path / ".model v.export-9").is_dir()

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: run\n")
    capsys.readouterr()
    assert main(["export", str(tiny_t5_dir), str(run)]) == 2
    assert "is a training run's folder; export into another folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    (tmp_path / "file").write_text("x")
    assert main(["export", str(tiny_t5_dir), str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.chdir(out)
    assert main(["export", str(tiny_t5_dir), "."]) == 2
    assert "is the current folder or holds it" in capsys.readouterr().err


def test_broken_weight_files_are_named_in_one_line(tmp_path, tiny_t5_dir):
    """What an interrupted download or a hand-edited folder leaves: a shard the index names but
    that is absent, a shard cut short, a malformed index, a .bin that is not a PyTorch file."""
    from tinyllm_jax.model.hf import ModelLoadError, save_pretrained

    _, params, tok, cfg = load_pretrained(str(tiny_t5_dir))
    sharded = save_pretrained(params, cfg, tmp_path / "sharded", tok, max_shard_bytes=20_000)
    first, second = sorted(sharded.glob("model-*.safetensors"))[:2]

    def broken(name, edit):
        path = tmp_path / name
        shutil.copytree(sharded, path)
        edit(path)
        with pytest.raises(ModelLoadError) as err:
            load_pretrained(str(path))
        assert "\n" not in str(err.value)
        return str(err.value)

    said = broken("missing", lambda p: (p / second.name).unlink())
    assert said.endswith(f"model.safetensors.index.json: names 1 shard(s) that are not in {tmp_path / 'missing'}, "
                         f"e.g. {second.name}"), said
    said = broken("cut", lambda p: (p / first.name).write_bytes((p / first.name).read_bytes()[:100]))
    assert f"cut/{first.name}: not a readable safetensors file (" in said and "cut short" in said, said
    said = broken("index", lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": \n'))
    assert said.endswith("index/model.safetensors.index.json:2: malformed JSON: Expecting value"), said
    said = broken("no_map", lambda p: (p / "model.safetensors.index.json").write_text('{"metadata": {}}'))
    assert 'expected an object with a "weight_map"' in said, said

    def as_bin(p):
        for f in p.glob("model*.safetensors*"):
            f.unlink()
        (p / "pytorch_model.bin").write_bytes(b"<html>404 Not Found</html>")  # a proxy's error page
    said = broken("bin", as_bin)
    assert "bin/pytorch_model.bin: not a readable PyTorch weights file (" in said, said


def test_bad_inputs_give_clear_errors_and_no_output(tmp_path, tiny_t5_dir, capsys):
    out = tmp_path / "out.jsonl"
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "hi"}\n')

    def run(model, inp):
        code = main(["predict", "--model", str(model), "--input", str(inp), "--output", str(out)])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "nope", good)
    assert code == 2 and "nope" in err and "not found" in err

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = run(other, good)
    assert code == 2 and "model_type is 'gpt2'" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "ok"}\n{"input": oops}\n')
    code, err = run(tiny_t5_dir, bad)
    assert code == 2 and f"{bad}:2" in err and "malformed JSON" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, err = run(tiny_t5_dir, empty)
    assert code == 2 and "empty input file" in err

    missing_field = tmp_path / "nofield.jsonl"
    missing_field.write_text('{"text": "hi"}\n')
    code, err = run(tiny_t5_dir, missing_field)
    assert code == 2 and f"{missing_field}:1" in err

    records = tmp_path / "records.jsonl"  # a training records file given to predict
    records.write_text('{"id": "1", "question": "q?", "answer": "3"}\n')
    code, err = run(tiny_t5_dir, records)
    assert code == 2 and "looks like a training record: `tinyllm eval CONFIG` scores records" in err

    for change, key in [({"d_ff": 48}, "DenseReluDense.wi_0.weight"),  # a shape our layout checks
                        ({"d_kv": 5}, "SelfAttention.q.weight")]:  # a reshape by heads that fails
        wrong = tmp_path / f"wrong-{next(iter(change))}"
        shutil.copytree(tiny_t5_dir, wrong)
        hf_cfg = json.loads((wrong / "config.json").read_text())
        (wrong / "config.json").write_text(json.dumps({**hf_cfg, **change}))
        code, err = run(wrong, good)  # config.json disagrees with the weights: one line, not Flax's traceback
        assert code == 2 and f"{wrong}: encoder.block.0.layer." in err and key in err, err
        assert "has the wrong shape for config.json" in err and "Traceback" not in err and not out.exists()

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"input": "ok"}\n{"input": "caf\u00e9"}\n'.encode("latin-1"))
    code, err = run(tiny_t5_dir, latin1)
    assert code == 2 and f"{latin1}:2: not valid UTF-8 (byte 0xe9)" in err

    from tinyllm_jax.eval.predict import read_inputs  # Notepad's BOM and CRLF, PowerShell's UTF-16: read

    rows = [{"input": "caf\u00e9 ok", "n": 1}, {"input": "two"}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    for encoding in ("utf-8-sig", "utf-16"):
        (tmp_path / "win.jsonl").write_bytes(text.encode(encoding))
        assert read_inputs(tmp_path / "win.jsonl") == rows, encoding
    assert not out.exists()
