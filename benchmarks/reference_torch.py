"""The baseline: a PyTorch + transformers trainer that does, step for step, what the
reference systems do (read from YikunHan42/TinyLLM and google-research/distilling-step-by-step,
not copied):

  - tokenisation once, before training (their `datasets.map`): for each stream the prefixed
    input, cut and padded to `max_input_length` (TinyLLM: padding="max_length"; step-by-step:
    no padding here), and the stream's target cut at 256 tokens, unpadded;
  - per micro-batch, one collated batch per stream (their DataCollatorForSeq2Seq subclass):
    labels padded to the micro-batch's longest with -100, decoder inputs shifted from them;
  - one forward pass per stream, loss = sum of weight x that pass's mean token loss, one
    backward (their `compute_loss`); gradients accumulated over micro-batches scaled by
    1 / accumulation steps, as Trainer does;
  - the Trainer's defaults: AdamW (fused where torch offers it), lr 5e-5, betas (0.9, 0.999),
    eps 1e-8, no weight decay, global-norm clipping at 1.0, linear decay; bf16 autocast with
    `--bf16`.

A plain loop rather than `Seq2SeqTrainer` itself: the Trainer adds callbacks, logging and a
DataLoader around the same work, so leaving them out can only flatter the baseline.

A decoder-only student (`causal=True`) trains as the usual PyTorch SFT trainers train one (TRL's
`SFTTrainer` with a completion-only loss, LLaMA-Factory's supervised stage): each example is its
prompt then its target and EOS in one sequence, the prompt's labels -100; per micro-batch and
stream the examples are padded to the longest (right padding, `DataCollatorForSeq2Seq`), one
forward pass of `AutoModelForCausalLM` each (transformers' default attention, `use_cache=False`),
loss and optimizer as above. `causal_features` gives it the exact token sequences our packer
reads, so both sides train on the same tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from tinyllm_jax.data.streams import format_input

REFERENCE_TARGET_LENGTH = 256  # both references cut targets at 256 tokens


@dataclasses.dataclass(frozen=True)
class RefStream:
    """One stream as the references build it: a prefix, a weight and where its target is."""

    name: str
    prefix: str
    weight: float
    teacher: str | None = None  # None: the gold answer


def target_text(record: dict[str, Any], stream: RefStream) -> str:
    """The stream's target; a record with no rationale trains on "" (EOS alone), as theirs do."""
    if stream.teacher is None:
        return record["answer"]
    samples = record.get("rationales", {}).get(stream.teacher) or [""]
    return samples[0]


def tokenize_records(records: Sequence[dict[str, Any]], streams: Sequence[RefStream], tokenizer,
                     max_input_length: int, pad_inputs_to_max: bool = True) -> list[dict[str, dict[str, list[int]]]]:
    """Per record, per stream: input_ids, attention_mask (padded to `max_input_length` when
    `pad_inputs_to_max`, TinyLLM's way) and labels (cut at 256, unpadded)."""
    inputs = [format_input(r) for r in records]
    per_stream = {}
    for s in streams:
        enc = tokenizer([s.prefix + x for x in inputs], max_length=max_input_length, truncation=True,
                        padding="max_length" if pad_inputs_to_max else False)
        lab = tokenizer([target_text(r, s) for r in records], max_length=REFERENCE_TARGET_LENGTH, truncation=True)
        per_stream[s.name] = (enc["input_ids"], enc["attention_mask"], lab["input_ids"])
    return [{name: {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
             for name, (ids, mask, labels) in per_stream.items()} for i in range(len(records))]


def causal_features(examples, streams: Sequence[RefStream]) -> list[dict[str, dict[str, list[int]]]]:
    """Per record, per stream: a decoder-only example as SFT trainers feed it, from our
    `Examples` (built with a causal `Prompt`): input_ids = prompt + target (EOS included), labels
    -100 over the prompt. Records missing a stream's example are left out."""
    by_record: dict[int, dict[str, dict[str, list[int]]]] = {}
    names = examples.stream_names
    for i in range(len(examples)):
        prompt, target = examples.enc(i).tolist(), examples.dec(i).tolist()
        by_record.setdefault(int(examples.record_index[i]), {})[names[int(examples.stream_ids[i])]] = {
            "input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
            "labels": [-100] * len(prompt) + target}
    wanted = {s.name for s in streams}
    return [f for _, f in sorted(by_record.items()) if wanted <= set(f)]


class ReferenceTrainer:
    """One optimizer step = `accum_steps` micro-batches of `micro_batch` records, each with
    one padded forward pass per stream. `causal`: a decoder-only student (features from
    `causal_features`), else a T5 (features from `tokenize_records`)."""

    def __init__(self, model_dir: str, tokenizer, streams: Sequence[RefStream], micro_batch: int,
                 accum_steps: int, *, learning_rate: float = 5e-5, total_steps: int = 10000, bf16: bool = False,
                 device: str = "cpu", max_grad_norm: float = 1.0, seed: int = 0, causal: bool = False):
        import torch
        from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, T5ForConditionalGeneration,
                                  get_linear_schedule_with_warmup)

        torch.manual_seed(seed)
        self.torch = torch
        self.device = torch.device(device)
        self.causal = causal
        if causal:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        else:
            self.model = T5ForConditionalGeneration.from_pretrained(model_dir).to(self.device)
        self.model.train()
        self.streams = list(streams)
        self.micro_batch, self.accum_steps = micro_batch, accum_steps
        self.bf16, self.max_grad_norm = bf16, max_grad_norm
        # a causal model makes no decoder inputs from the labels: the collator only pads
        self.collator = DataCollatorForSeq2Seq(tokenizer=tokenizer, model=None if causal else self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            self.optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                               weight_decay=0.0, fused=True)
            self.fused = True
        except (RuntimeError, TypeError):  # fused AdamW unsupported on this device
            self.optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            self.fused = False
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 0, total_steps)

    @property
    def records_per_step(self) -> int:
        return self.micro_batch * self.accum_steps

    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, features: Sequence[dict[str, dict[str, list[int]]]]) -> dict[str, Any]:
        """One optimizer step over `records_per_step` tokenized records. Returns the loss, the
        real (non-pad) and padded token counts it processed, the target (labelled) tokens,
        and the padded shapes of every forward pass (T5: (inputs, labels); causal: (inputs,))."""
        torch = self.torch
        if len(features) != self.records_per_step:
            raise ValueError(f"expected {self.records_per_step} records, got {len(features)}")
        real = slots = targets = 0
        extra = {"use_cache": False} if self.causal else {}
        shapes, total = [], 0.0  # the loss stays on the device until the step ends
        for m in range(self.accum_steps):
            micro = features[m * self.micro_batch:(m + 1) * self.micro_batch]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = 0.0
                for s in self.streams:
                    batch = self.collator([f[s.name] for f in micro])
                    labelled = int((batch["labels"] != -100).sum())
                    targets += labelled
                    if self.causal:  # labels lie on the input sequence
                        real += int(batch["attention_mask"].sum())
                        slots += batch["input_ids"].numel()
                        shapes.append((tuple(batch["input_ids"].shape),))
                    else:
                        real += int(batch["attention_mask"].sum()) + labelled
                        slots += batch["input_ids"].numel() + batch["labels"].numel()
                        shapes.append((tuple(batch["input_ids"].shape), tuple(batch["labels"].shape)))
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    loss = loss + s.weight * self.model(**batch, **extra).loss
            (loss / self.accum_steps).backward()
            total = total + loss.detach() / self.accum_steps
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(total), "real_tokens": real, "slot_tokens": slots, "target_tokens": targets,
                "shapes": shapes}

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def time_steps(trainer: ReferenceTrainer, features: Sequence[dict], warmup: int, steps: int,
               start: int = 0) -> tuple[list[float], list[dict[str, Any]], int]:
    """Runs `warmup` untimed then `steps` timed optimizer steps over consecutive records
    (wrapping around) from record `start`; returns (seconds of each timed step, their
    results, the next record index)."""
    n, times, results = trainer.records_per_step, [], []
    pos = start
    for i in range(warmup + steps):
        idx = [(pos + j) % len(features) for j in range(n)]
        pos = (pos + n) % len(features)
        t0 = time.perf_counter()
        out = trainer.step([features[j] for j in idx])
        trainer.synchronize()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            results.append(out)
    return times, results, pos
