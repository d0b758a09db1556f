"""A decoder-only student through the whole system, as T5 goes: its prompts and packed rows,
the fused multi-stream loss against transformers run one example at a time, the generation
engine (and `tinyllm predict`) against transformers' generate, training runs (exact resume
after SIGKILL, 8 simulated devices equal 1, export that transformers loads), and the recipes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from decoder_fixtures import BOS, EOS, IM_END, bpe_tokenizer, decoder_dir, load_hf  # noqa: F401
from tinyllm_jax.config import StreamConfig
from tinyllm_jax.data.packing import CAUSAL, PackedIterator
from tinyllm_jax.data.records import make_record
from tinyllm_jax.data.streams import Prompt, build_examples, stream_weights
from tinyllm_jax.model.decoder_hf import load_pretrained, params_to_hf

TOL = 1e-4

RECORDS = [make_record(f"r{i}", q, a, rationales={"t": [f"the answer is {a} because {q}"]})
           for i, (q, a) in enumerate([("what is two plus three?", "five"), ("which gas do plants take in?", "carbon dioxide"),
                                       ("the quick brown fox jumps over", "the lazy dog"), ("numbers 0 1 2 3", "4 5 6")])]
STREAMS = [StreamConfig("answer", "predict: ", 1.0), StreamConfig("why", "explain: ", 0.5, teacher="t")]


def _hf_greedy(hf, prompts, n, eos):
    out = []
    for p in prompts:
        seq = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=n, eos_token_id=list(eos), pad_token_id=0)[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(seq) if t in eos), len(seq))
        out.append(seq[:cut])
    return out


@pytest.mark.parametrize("variant", ["qwen2_bias_tied", "llama_gqa", "qwen3_head_dim_16", "mistral_window_8"])
def test_engine_greedy_equals_transformers_generate(variant, decoder_dir, bpe_tokenizer):
    """Continuous batching over fewer slots than requests (prefilled prompts of ragged length,
    each row at its own position), stopping at either EOS id: what generate gives each prompt."""
    from tinyllm_jax.eval.decode import generate_ids, input_ids

    path = decoder_dir(variant)
    params, cfg, _ = load_pretrained(str(path), tokenizer=False)
    texts = ["what is two plus three?", "a", "the quick brown fox jumps over the lazy dog and then some more",
             "Answer Choices: (a) red (b) blue", "numbers 0 1 2 3 4 5 6 7 8 9 10 11 12", "Let's think", "so"]
    prompts = input_ids(cfg, bpe_tokenizer, texts)
    assert all(p[0] == BOS and p[-1] != EOS for p in prompts)  # the tokenizer's BOS, no EOS after a prompt
    hf = load_hf(path)
    free = _hf_greedy(hf, prompts, 10, ())
    eos = (free[0][3], IM_END)
    want = _hf_greedy(hf, prompts, 10, eos)
    got = generate_ids(cfg, params, prompts, 10, batch_size=3, eos_id=eos)
    assert got == want and min(map(len, want)) < 10
    # per-request limits and the model's own eos ids (config.json + generation_config.json)
    got = generate_ids(cfg.replace(eos_token_ids=eos), params, prompts, [4, 10, 2, 10, 10, 1, 10], batch_size=2)
    assert got == [w[:n] for w, n in zip(want, [4, 10, 2, 10, 10, 1, 10])]


def test_predict_on_a_decoder_checkpoint_equals_generate(decoder_dir, tmp_path):
    from tinyllm_jax.eval.predict import predict_file
    from transformers import AutoTokenizer

    path = decoder_dir("llama_gqa")
    inputs = tmp_path / "in.jsonl"
    texts = ["what is two plus three?", "the quick brown fox", "Let's think step by step."]
    inputs.write_text("".join(json.dumps({"input": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    predict_file(str(path), str(inputs), str(tmp_path / "out.jsonl"), max_new_tokens=8, batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(path))
    want = _hf_greedy(load_hf(path), [tok(t)["input_ids"] for t in texts], 8, (EOS,))
    assert [r["prediction"] for r in rows] == tok.batch_decode(want, skip_special_tokens=True)
    assert [r["n"] for r in rows] == [0, 1, 2]


@pytest.mark.parametrize("chat", [False, True])
def test_packed_multistream_loss_and_gradients_equal_transformers(decoder_dir, bpe_tokenizer, chat):
    """The fused loss over packed causal rows (prompt + target a segment, loss weights on the
    target and its EOS only, the chat template never trained on) equals the weighted per-stream
    token means of transformers run on each example alone; so do the gradients."""
    from tinyllm_jax.train.loop import make_loss_fn
    from tinyllm_jax.train.loss import stream_token_counts

    path = decoder_dir("qwen2_bias_tied")
    params, cfg, _ = load_pretrained(str(path), tokenizer=False)
    prompt = Prompt(causal=True, suffix="\n", chat_template=chat)
    ex = build_examples(RECORDS, STREAMS, bpe_tokenizer, 64, 32, prompt=prompt)
    assert all(ex.dec(i)[-1] == EOS and EOS not in ex.enc(i) for i in range(len(ex)))
    if chat:
        assert all(bpe_tokenizer.convert_ids_to_tokens(int(ex.enc(i)[0])) == "<|im_start|>" for i in range(len(ex)))
    batch = next(iter(PackedIterator(ex, 6, 128, 128, seed=0, num_epochs=1, process_index=0, process_count=1,
                                     layout=CAUSAL)))
    assert batch["decoder_loss_weights"].sum() == ex.dec_lengths.sum()  # every target token, nothing else
    assert (batch["decoder_segment_ids"].max(axis=1) > 1).any()  # rows do hold several examples
    weights = jnp.asarray(stream_weights(STREAMS))
    loss_fn = make_loss_fn(cfg, weights, 0.0, 0.0)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    counts = stream_token_counts(b, 2)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, b, counts, jax.random.key(0))

    hf = load_hf(path)
    sums, n = [0.0, 0.0], [0, 0]
    for i in range(len(ex)):
        seq = torch.tensor(np.concatenate([ex.enc(i), ex.dec(i)])[None].astype(np.int64))
        logits = hf(input_ids=seq).logits[0, :-1]
        start = len(ex.enc(i)) - 1
        s = int(ex.stream_ids[i])
        sums[s] = sums[s] + torch.nn.functional.cross_entropy(logits[start:], seq[0, start + 1:], reduction="sum")
        n[s] += len(ex.dec(i))
    total = sum(w * s / c for w, s, c in zip(stream_weights(STREAMS).tolist(), sums, n))
    total.backward()
    assert abs(float(loss) - float(total.detach())) <= TOL
    theirs = dict(hf.named_parameters())
    for key, g in params_to_hf(jax.tree.map(np.asarray, grads), cfg).items():
        assert np.abs(g - theirs[key].grad.numpy()).max() <= TOL, key


# --------------------------------------------------------------------------- training runs

DECODER_MODEL = {"family": "qwen2", "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                 "num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def train_helpers():
    import test_train_run

    return test_train_run


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tinyllm_jax.data.demo import demo_texts, make_demo_records
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("demo_tok")
    train_sentencepiece(demo_texts(make_demo_records(200, 0, "train"), extra=["predict: ", "explain: ", "rationale: "]),
                        out, vocab_size=128, model_type="bpe")
    return out


def _decoder_config(helpers, path, run_dir, tok_dir, **sections):
    model = {**DECODER_MODEL, **sections.pop("model", {})}
    data = {"sequence_length": 168, **sections.pop("data", {})}
    return helpers.write_config(path, run_dir, tok_dir, model=model, data=data, **sections)


def test_decoder_run_resumes_bitwise_after_sigkill(tmp_path, tok_dir, train_helpers):
    h = train_helpers
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    h.finish(h.run_train(_decoder_config(h, tmp_path / "ref.yaml", ref, tok_dir)))
    cfg = _decoder_config(h, tmp_path / "kill.yaml", killed, tok_dir)
    said = h.sigkill_after_first_checkpoint(h.run_train(cfg), killed, max_delay=1.0)
    assert said in h.finish(h.run_train(cfg))
    for x, y in zip(jax.tree.leaves(h.final_params(ref, 12)), jax.tree.leaves(h.final_params(killed, 12))):
        np.testing.assert_array_equal(x, y)
    saved = json.loads((ref / "model_config.json").read_text())
    assert saved["family"] == "decoder" and saved["model_type"] == "qwen2" and saved["num_key_value_heads"] == 2


def test_decoder_one_and_eight_devices_give_the_same_losses(tmp_path, tok_dir, train_helpers):
    h = train_helpers
    losses = {}
    for name, env, overrides in [
        ("one", {}, []),
        ("eight", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    ]:
        run_dir = tmp_path / name
        cfg = _decoder_config(h, tmp_path / f"{name}.yaml", run_dir, tok_dir, train={"steps": 5},
                              model={"dropout_rate": 0.0}, checkpoint={"every_steps": 100})
        h.finish(h.run_train(cfg, *overrides, env_extra=env))
        losses[name] = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(l)]
    assert len(losses["one"]) == 5
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-4)


def test_decoder_run_evaluates_and_exports_to_transformers(tmp_path, tok_dir, train_helpers):
    """In-training evaluation decodes through the engine; the export loads in transformers with
    no missing or unexpected keys and gives our logits."""
    from transformers import AutoModelForCausalLM

    from tinyllm_jax.cli import main
    from tinyllm_jax.model.decoder import Decoder
    from tinyllm_jax.runs import load_run

    h = train_helpers
    run_dir = tmp_path / "run"
    cfg = _decoder_config(h, tmp_path / "c.yaml", run_dir, tok_dir, train={"steps": 6},
                          eval={"every_steps": 6, "max_new_tokens": 4, "batch_size": 8}, checkpoint={"every_steps": 6})
    out = h.finish(h.run_train(cfg))
    assert "step 6 validation" in out and "test accuracy" in out
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and type(hf).__name__ == "Qwen2ForCausalLM"
    model = load_run(run_dir)
    ids = np.asarray([[5, 17, 33, 9, 60, 2]])
    ours = np.asarray(Decoder(model.arch).apply({"params": model.params}, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf.eval()(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= TOL
