"""Decoding speed: our jitted greedy decode (`generate_ids`: one `lax.while_loop` with a KV
cache) against transformers' `generate(do_sample=False)`, same weights, same inputs, same
batch, same number of new tokens. Tokens/s counts each side's own generated tokens (up to
and including EOS); the outputs are compared token for token as a check that both decode
the same model.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from tinyllm_jax.data.streams import format_input


def _generated(ids: Sequence[int], eos: int) -> int:
    """Tokens a sequence generated: up to and including its first EOS."""
    ids = list(ids)
    return ids.index(eos) + 1 if eos in ids else len(ids)


def decode_benchmark(model_dir: str, tokenizer, records: Sequence[dict[str, Any]], *, batch_size: int = 64,
                     max_new_tokens: int = 64, prefix: str = "predict: ", repeats: int = 3, dtype: str = "float32",
                     reference: bool = True, reference_device: str = "cpu") -> dict[str, Any]:
    """Decodes the first `batch_size` records' inputs (prefixed) `repeats` times on each side,
    alternating, after one warm-up call each (ours compiles). Returns median seconds,
    tokens/s, the ratio and how many rows came out identical."""
    import jax

    from tinyllm_jax.eval.decode import generate_ids
    from tinyllm_jax.model.hf import load_pretrained

    texts = [prefix + format_input(r) for r in records[:batch_size]]
    if len(texts) < batch_size:
        texts = (texts * (batch_size // max(1, len(texts)) + 1))[:batch_size]
    token_lists = tokenizer(texts)["input_ids"]
    _, params, _, cfg = load_pretrained(model_dir, tokenizer=False)
    cfg = cfg.replace(dtype=dtype)
    params = jax.device_put(params)
    eos = cfg.eos_token_id

    def ours():
        return generate_ids(cfg, params, token_lists, max_new_tokens, batch_size=batch_size)

    theirs = _hf_generate(model_dir, tokenizer, texts, max_new_tokens, dtype, reference_device) if reference else None
    ours_out = ours()  # compiles
    ref_out = theirs() if theirs else None  # warm-up, as ours had
    ours_t, ref_t = [], []
    for _ in range(repeats):  # alternate, so that outside load falls on both sides alike
        t0 = time.perf_counter()
        ours_out = ours()
        ours_t.append(time.perf_counter() - t0)
        if theirs:
            t0 = time.perf_counter()
            ref_out = theirs()
            ref_t.append(time.perf_counter() - t0)
    # generate_ids cuts at EOS; the EOS itself was generated too
    ours_tokens = sum(min(len(o) + 1, max_new_tokens) for o in ours_out)
    result: dict[str, Any] = {
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "dtype": dtype,
        "input_tokens_max": max(len(t) for t in token_lists),
        "ours": {"seconds": statistics.median(ours_t), "times_s": [round(t, 4) for t in ours_t],
                 "generated_tokens": ours_tokens, "tokens_per_s": ours_tokens / statistics.median(ours_t)},
    }
    if not theirs:
        return result
    ref_rows = [row[1:].tolist() for row in ref_out.cpu()]  # drop the decoder start token
    ref_tokens = sum(_generated(r, eos) for r in ref_rows)
    ref_cut = [r[:r.index(eos)] if eos in r else r for r in ref_rows]
    result["reference"] = {"seconds": statistics.median(ref_t), "times_s": [round(t, 4) for t in ref_t],
                           "generated_tokens": ref_tokens, "tokens_per_s": ref_tokens / statistics.median(ref_t),
                           "device": reference_device}
    result["ratio_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
    result["identical_rows"] = sum(int(a == b) for a, b in zip(ours_out, ref_cut))
    return result


def _hf_generate(model_dir: str, tokenizer, texts: Sequence[str], max_new_tokens: int, dtype: str, device: str):
    """A callable running transformers' greedy `generate` on `texts` (padded to the longest)."""
    import torch
    from transformers import T5ForConditionalGeneration

    dev = torch.device(device)
    model = T5ForConditionalGeneration.from_pretrained(model_dir).to(dev).eval()
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    enc = tokenizer(list(texts), padding=True, return_tensors="pt").to(dev)

    def run():
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run
