"""What a step costs and how it is reported: model FLOPs from the architecture, the
device's peak, and the run's metrics log (metrics.jsonl plus TensorBoard events)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from tinyllm_jax.model.t5 import T5Config

# Dense bf16 peak FLOP/s per device by the datasheets (device_kind substring -> FLOP/s).
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
]


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in kind.lower():
            return flops
    return None


def train_flops_per_step(cfg: T5Config, rows: int, enc_len: int, dec_len: int) -> float:
    """Forward-plus-backward FLOPs (3x forward) of one step over `rows` packed rows: every
    matmul at 2 FLOPs a multiply-add, attention scores and values included, padding
    counted (it is computed)."""
    D, F, HK, V = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.vocab_size
    mlp = (3 if cfg.is_gated else 2) * D * F
    enc_tok = cfg.num_layers * (4 * D * HK + mlp) + cfg.decoder_layers * 2 * D * HK  # + cross k,v
    dec_tok = cfg.decoder_layers * (4 * D * HK + 2 * D * HK + mlp) + D * V
    attn = cfg.num_layers * 2 * enc_len * enc_len * HK + cfg.decoder_layers * 2 * (dec_len * dec_len + dec_len * enc_len) * HK
    forward = 2 * rows * (enc_len * enc_tok + dec_len * dec_tok + attn)
    return 3.0 * forward


def param_count(params: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


class MetricsLog:
    """Appends one JSON object a line to RUN_DIR/metrics.jsonl (flushed) and mirrors the
    scalars to TensorBoard under RUN_DIR/tb. Only process 0 of a multi-host run touches
    either; on the others every method does nothing."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._tb = None
        if jax.process_index() != 0:
            return
        if resume_step is not None and self.path.is_file():
            # a killed run may have logged past its last checkpoint: drop those lines
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
