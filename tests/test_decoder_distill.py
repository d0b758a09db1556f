"""Logit distillation into a decoder-only student: an online decoder teacher's KD term and
its gradient over packed causal rows against transformers run on each example alone (the
divergence over the target tokens only, the tokenizer's ids only: the models keep padding
rows past it), chunked or not; and a decoder run trained on its stored top-k soft labels
(k = every token) gives the online run's losses."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decoder_fixtures import EOS, bpe_tokenizer, decoder_dir, load_hf, make_hf_decoder  # noqa: F401 (fixtures)
from test_decoder_student import DECODER_MODEL, RECORDS, STREAMS, tok_dir  # noqa: F401 (tok_dir: fixture)
from tinyllm_jax.config import KDTeacherConfig
from tinyllm_jax.data.packing import CAUSAL, PackedIterator
from tinyllm_jax.data.streams import Prompt, build_examples, stream_weights
from tinyllm_jax.model.decoder_hf import load_pretrained
from tinyllm_jax.model.decoder_hf import params_to_hf  # noqa: E402
from tinyllm_jax.train.distill import check_vocabulary, kd_spec
from tinyllm_jax.train.loss import stream_token_counts
from tinyllm_jax.train.objective import make_loss_fn


@pytest.mark.parametrize("chunk", [0, 7])
def test_decoder_teachers_kd_term_and_gradient_equal_transformers(decoder_dir, bpe_tokenizer, chunk):
    s_path, t_path = decoder_dir("qwen2_bias_tied"), decoder_dir("llama_gqa")
    s_params, s_cfg, _ = load_pretrained(str(s_path), tokenizer=False)
    t_params, t_cfg, _ = load_pretrained(str(t_path), tokenizer=False)
    vocab = check_vocabulary(t_cfg, bpe_tokenizer, s_cfg, bpe_tokenizer, str(t_path))
    assert vocab == len(bpe_tokenizer) < s_cfg.vocab_size  # padding rows past the tokenizer: left out
    names = [s.name for s in STREAMS]
    spec = kd_spec(KDTeacherConfig(name="llama", model="x", weight=0.4, temperature=2.0, divergence="jsd",
                                   jsd_beta=0.3, streams=["why"]), t_cfg, names, vocab)
    ex = build_examples(RECORDS, STREAMS, bpe_tokenizer, 64, 32, prompt=Prompt(causal=True, suffix="\n"))
    batch = next(iter(PackedIterator(ex, 6, 128, 128, seed=0, num_epochs=1, process_index=0, process_count=1,
                                     layout=CAUSAL)))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    counts = stream_token_counts(b, 2)
    loss_fn = make_loss_fn(s_cfg, jnp.asarray(stream_weights(STREAMS)), 0.0, 0.0, [spec], chunk)
    (loss, (_, kd_sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        s_params, b, counts, jax.random.key(0), t_params)

    student, teacher = load_hf(s_path), load_hf(t_path)
    sums, n, divs = [0.0, 0.0], [0, 0], []
    for i in range(len(ex)):
        seq = torch.tensor(np.concatenate([ex.enc(i), ex.dec(i)])[None].astype(np.int64))
        start = len(ex.enc(i)) - 1
        logits = student(input_ids=seq).logits[0, start:-1]
        s = int(ex.stream_ids[i])
        sums[s] = sums[s] + F.cross_entropy(logits, seq[0, start + 1:], reduction="sum")
        n[s] += len(ex.dec(i))
        if names[s] == "why":
            with torch.no_grad():
                t_logits = teacher(input_ids=seq).logits[0, start:-1, :vocab]
            log_s, log_t = F.log_softmax(logits[:, :vocab] / 2.0, -1), F.log_softmax(t_logits / 2.0, -1)
            m = (0.3 * log_t.exp() + 0.7 * log_s.exp()).log()
            divs.append(0.3 * (log_t.exp() * (log_t - m)).sum(-1) + 0.7 * (log_s.exp() * (log_s - m)).sum(-1))
    kd = torch.cat(divs).mean()
    total = sum(w * s / c for w, s, c in zip(stream_weights(STREAMS).tolist(), sums, n)) + 0.4 * kd
    total.backward()
    assert float(kd) > 1e-3
    assert abs(float(kd_sums[0, 1] / counts[1]) - float(kd.detach())) <= 1e-5
    assert abs(float(loss) - float(total.detach())) <= 1e-4
    theirs = dict(student.named_parameters())
    for key, g in params_to_hf(jax.tree.map(np.asarray, grads), s_cfg).items():
        assert np.abs(g - theirs[key].grad.numpy()).max() <= 1e-4, key


def test_decoder_run_on_stored_labels_at_k_every_token_gives_the_online_losses(tmp_path, tok_dir):
    import test_train_run as h
    from tinyllm_jax.cli import main
    from tinyllm_jax.model.tokenizer import load_tokenizer

    teacher = make_hf_decoder(tmp_path / "teacher", "llama_gqa", load_tokenizer(str(tok_dir)), seed=3)
    n = len(load_tokenizer(str(tok_dir)))
    online = {"name": "llama", "model": str(teacher), "temperature": 2.0, "weight": 0.5, "streams": ["careful"]}
    stored = tmp_path / "stored"

    def config(name, teachers):
        return h.write_config(tmp_path / f"{name}.yaml", tmp_path / name, tok_dir, model=dict(DECODER_MODEL, dropout_rate=0.0),
                              data={"sequence_length": 168}, train={"steps": 3}, checkpoint={"every_steps": 100},
                              optim={"learning_rate": 1e-3, "loss_chunk_length": 16}, distill={"teachers": teachers})

    assert main(["logits", str(config("s", [{**online, "logits": str(stored), "top_k": n}]))]) == 0
    assert json.loads((stored / "index.json").read_text())["settings"]["family"] == "decoder"
    assert main(["train", str(config("s", [{**online, "model": None, "logits": str(stored)}]))]) == 0
    assert main(["train", str(config("o", [online]))]) == 0
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for d in ("s", "o")}
    assert len(rows["s"]) == 3 and all(r["loss/kd"] > 0.01 for r in rows["o"])
    for key in ("loss", "loss/kd", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows["s"]], [r[key] for r in rows["o"]], rtol=1e-5, err_msg=key)
