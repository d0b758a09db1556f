"""`tinyllm predict`: greedy predictions for a JSONL file of inputs, in input order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinyllm_jax.errors import UserError


def read_inputs(path: str | Path) -> list[dict[str, Any]]:
    """Rows of `{"input": "text", ...}`; any problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    from tinyllm_jax.data.records import decode_text, undecodable

    rows = []
    for lineno, line in enumerate(decode_text(path.read_bytes(), path).split("\n"), 1):  # a BOM, UTF-16, CRLF: read
        bad = undecodable(line)
        if bad:
            raise UserError(f"{path}:{lineno}: {bad}")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
            hint = ("; this looks like a training record: `tinyllm eval CONFIG` scores records, and predict takes "
                    'the text the model reads, e.g. {"input": "predict: <question>"}'
                    if isinstance(obj, dict) and "question" in obj and "input" not in obj else "")
            raise UserError(f'{path}:{lineno}: expected an object with a string field "input", '
                            f'found {line.strip()[:80]!r}{hint}')
        rows.append(obj)
    if not rows:
        raise UserError(f"{path}: empty input file: no rows to predict")
    return rows


def predict_file(model: str, input_path: str, output_path: str, max_new_tokens: int = 64,
                 batch_size: int = 32) -> int:
    """Writes OUTPUT with each input row plus "prediction"; nothing is written on error.
    `model`: a training run directory (its selected checkpoint), an HF directory or a hub id."""
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    rows = read_inputs(input_path)  # validate input before loading any weights
    from tinyllm_jax.eval.decode import generate_texts
    from tinyllm_jax.runs import load_model

    loaded = load_model(model)
    preds = generate_texts(loaded.arch, loaded.params, loaded.tokenizer, [r["input"] for r in rows], max_new_tokens,
                           batch_size=min(batch_size, len(rows)), progress=True)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row, pred in zip(rows, preds):
            f.write(json.dumps({**row, "prediction": pred}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    what = f"{model} step {loaded.step}" if loaded.step is not None else model
    print(f"wrote {len(rows)} predictions of {what} to {out}")
    return len(rows)
