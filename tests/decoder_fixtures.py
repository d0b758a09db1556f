"""Tiny random transformers decoder-only models (Llama, Mistral, Qwen2, Qwen3) and a BPE
tokenizer with a chat template, made in a second for the decoder tests; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SENTENCES

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD, UNK, BOS, EOS, IM_START, IM_END = range(6)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 128  # embedding rows; the tokenizer has fewer (rows padded past its size, as Qwen's are)
FIRST_PLAIN_TOKEN = len(SPECIAL_TOKENS)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # with head_dim 8 the four frequencies fall below, inside and above the smoothed band
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}

# name -> (model_type, config overrides). Together: GQA and MHA, tied and untied, Qwen2's q/k/v
# biases, Llama's attention and MLP biases, Qwen3's q/k norms with head_dim != hidden/heads,
# llama3 and linear rope scaling, a non-default rope_theta, Mistral's sliding window.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_tied_llama3_bias": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                             mlp_bias=True, rope_parameters=LLAMA3_ROPE)),
    "llama_linear_mha": ("llama", dict(num_key_value_heads=4,
                                       rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "mistral_one_kv_head": ("mistral", dict(num_key_value_heads=1, sliding_window=None)),
    # a window shorter than the tests' rows and generations, so that keys leave it
    "mistral_window_8": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2_bias_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_head_dim_16": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
}


def train_bpe_tokenizer(out_dir: Path, vocab_size: int = 120):
    """A BPE tokenizer (Metaspace pre-tokenizer) trained on a few sentences, adding BOS like
    Llama's, with bos/eos/pad and a chat template; saved in `out_dir` and returned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(SENTENCES * 10, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                                 show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def make_hf_decoder(out_dir: Path, variant: str, tokenizer=None, seed: int = 0, **overrides) -> Path:
    """A tiny random transformers CausalLM of one of VARIANTS, saved with save_pretrained (fp32).
    Every weight is random, norms and biases included, so that a misplaced one shows."""
    import torch
    import transformers

    model_type, kw = VARIANTS[variant]
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    args.update(kw)
    args.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**args), attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    model.eval().save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


def load_hf(path: Path):
    """The transformers oracle: fp32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


# ---- pytest fixtures (import them into a test module to use them)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory, bpe_tokenizer):
    """variant name -> the directory of that tiny model (with the tokenizer), made once a session."""
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_hf_decoder(tmp_path_factory.mktemp(variant), variant, bpe_tokenizer, seed=1)
        return made[variant]

    return get
