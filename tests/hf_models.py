"""Tiny random Hugging Face checkpoints, made with transformers PyTorch (no downloads)."""

import numpy as np
import torch
import transformers

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# distillation examples: short texts and one-word answers in save_tokenizer's tiny BPE vocab
PROMPTS = ["the fed holds rates", "markets rally", "the quick brown fox", "the lazy dog jumps"]
ANSWERS = ["rates", "markets", "fox", "dog"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# One entry per family/variant the issue names; head_dim differs from hidden/heads on purpose.
VARIANTS = {
    "llama3": ("LlamaConfig", dict(rope_theta=5000.0, rope_scaling=LLAMA3_ROPE)),
    "llama_mqa": ("LlamaConfig", dict(num_key_value_heads=1, rope_theta=10000.0)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(rms_norm_eps=1e-5)),
}


def make_hf_model(variant: str, seed: int = 0, **overrides):
    cls_name, extra = VARIANTS[variant]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so every path moves the logits
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def save_hf_model(variant: str, path, seed: int = 0, **save_kwargs):
    model = make_hf_model(variant, seed)
    model.save_pretrained(path, **save_kwargs)
    return model


def padded_batch(seed: int = 0, batch: int = 3, length: int = 10):
    """Token ids and a mask with one left-padded and one right-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :3] = 0
    mask[2, 7:] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    """transformers logits with positions counted over real tokens (as generate does)."""
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def save_tokenizer(path, vocab: int = VOCAB):
    """A small BPE tokenizer.json (vocab ids < `vocab`) trained on finance-flavoured text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 +
                            ["markets rally as the fed holds rates"] * 50,
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]"]))
    tok.save(str(path / "tokenizer.json"))
