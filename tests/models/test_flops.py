"""Model FLOPs and MFU: the count equals XLA's own count of the compiled forward."""

import jax
import jax.numpy as jnp
import pytest

import jdistill
from jdistill.models import flops
from jdistill.models.config import ModelConfig

CONFIG = ModelConfig(family="llama", vocab_size=4096, hidden_size=256, intermediate_size=1024,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                     tie_word_embeddings=True, max_position_embeddings=512)


def test_forward_count_equals_xla_cost_analysis():
    """XLA counts the [T, S] attention whole (2 FLOPs per multiply-add, like us) where we
    count its causal half, and a few elementwise FLOPs we do not count. The layers run
    unrolled (the activation-recording path): XLA counts a scanned body once."""
    b, t = 2, 128
    model = jdistill.init_model(CONFIG)
    tokens = jnp.zeros((b, t), jnp.int32)

    def logits(tok):
        hidden, _ = model.forward(tok, activations=[])
        return model.unembed(hidden)

    compiled = jax.jit(logits).lower(tokens).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = flops.forward_flops(CONFIG, batch=b, seq_len=t)
    full_attention = ours + b * t * 2 * CONFIG.num_layers * CONFIG.num_heads * CONFIG.head_dim * t
    assert xla == pytest.approx(full_attention, rel=0.02)


def test_step_counts_backward_twice_and_lm_head_where_formed():
    kw = dict(batch=4, seq_len=64)
    fwd = flops.forward_flops(CONFIG, **kw)
    assert flops.step_flops(CONFIG, None, **kw) == 3 * fwd
    assert flops.step_flops(CONFIG, CONFIG, **kw) == 4 * fwd
    assert flops.step_flops(CONFIG, None, lora=True, **kw) == 2 * fwd
    lm_every = 2 * 4 * 64 * CONFIG.hidden_size * CONFIG.vocab_size
    at_16 = flops.forward_flops(CONFIG, lm_positions=4 * 16, **kw)
    assert fwd - at_16 == pytest.approx(lm_every * (1 - 16 / 64))


def test_peak_per_device_kind():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert flops.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
    assert flops.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert flops.peak_tflops("TPU v5p", "bfloat16") == 459.0
    assert flops.peak_tflops("cpu", "float32") is None
    u = flops.utilisation(989e12 * 0.5, 1.0, devices=2, device_kind="NVIDIA H200",
                          dtype="bfloat16")
    assert u["model_tflops_per_s"] == pytest.approx(494.5) and u["mfu"] == pytest.approx(0.25)
    assert flops.utilisation(1e12, 1.0, devices=1, device_kind="cpu", dtype="float32")["mfu"] is None
