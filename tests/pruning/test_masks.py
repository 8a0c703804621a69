"""Structural masks: exact no-ops when all ones, and equal to physically removing structure."""

import jax.numpy as jnp
import numpy as np
import pytest

import jdistill
from jdistill.models.decoder import init_model, ones_masks
from tests.hf_models import padded_batch


@pytest.mark.parametrize("variant", ["llama3", "qwen2_untied", "qwen3"])
def test_all_ones_masks_are_no_ops(variant, tiny_checkpoint):
    """Exact in arithmetic; XLA may reassociate a masked reduction differently (~1 ulp)."""
    ckpt = tiny_checkpoint(variant)
    model = jdistill.load_pretrained(ckpt.path)
    ids, mask = padded_batch()
    plain = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for name, m in ones_masks(model.config).items():
        masked = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                  masks={name: m}))
        np.testing.assert_allclose(masked, plain, rtol=0, atol=1e-6, err_msg=name)
    masked = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                              masks=ones_masks(model.config)))
    np.testing.assert_allclose(masked, plain, rtol=0, atol=1e-6)


def test_masks_equal_removing_the_structure():
    """Masked full model == a hand-sliced smaller model (hidden channels, neurons, heads, layer)."""
    config = jdistill.ModelConfig(family="qwen3", vocab_size=50, hidden_size=16,
                                  intermediate_size=24, num_layers=3, num_heads=4,
                                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)
    full = init_model(config, seed=1)
    rng = np.random.default_rng(0)
    keep_hidden = np.sort(rng.choice(16, 11, replace=False))
    keep_mlp = np.sort(rng.choice(24, 10, replace=False))
    keep_heads = np.array([0, 3])  # one query head in each KV group
    keep_layers = np.array([0, 2])
    masks = {
        "hidden": jnp.zeros(16, bool).at[keep_hidden].set(True),
        "mlp": jnp.zeros((3, 24), bool).at[:, keep_mlp].set(True),
        "heads": jnp.zeros((3, 4), bool).at[:, keep_heads].set(True),
        "layers": jnp.array([True, False, True]),
    }
    small_cfg = config.replace(hidden_size=11, intermediate_size=10, num_layers=2, num_heads=2)
    small = init_model(small_cfg)
    h, m = keep_hidden, keep_mlp
    small.embed_tokens[...] = full.embed_tokens[...][:, h]
    small.norm[...] = full.norm[...][h]
    small.lm_head[...] = full.lm_head[...][h]
    for i, src in enumerate(keep_layers):
        a, b = full.layers[int(src)], small.layers[i]
        b.input_layernorm[...] = a.input_layernorm[...][h]
        b.post_attention_layernorm[...] = a.post_attention_layernorm[...][h]
        sa, sb = a.self_attn, b.self_attn
        sb.q_proj[...] = sa.q_proj[...][h][:, keep_heads]
        sb.k_proj[...] = sa.k_proj[...][h]
        sb.v_proj[...] = sa.v_proj[...][h]
        sb.o_proj[...] = sa.o_proj[...][keep_heads][:, :, h]
        sb.q_norm[...], sb.k_norm[...] = sa.q_norm[...], sa.k_norm[...]
        b.mlp.gate_proj[...] = a.mlp.gate_proj[...][h][:, m]
        b.mlp.up_proj[...] = a.mlp.up_proj[...][h][:, m]
        b.mlp.down_proj[...] = a.mlp.down_proj[...][m][:, h]
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 7)))
    np.testing.assert_allclose(np.asarray(full(ids, masks=masks)), np.asarray(small(ids)),
                               atol=1e-5, rtol=0)


def test_bad_masks_are_rejected():
    config = jdistill.ModelConfig(family="llama", vocab_size=20, hidden_size=8,
                                  intermediate_size=12, num_layers=2, num_heads=2,
                                  num_kv_heads=1, head_dim=4)
    model = init_model(config)
    ids = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"mask 'mlp' has shape \(12,\), expected \(2, 12\)"):
        model(ids, masks={"mlp": jnp.ones(12)})
    with pytest.raises(ValueError, match="unknown mask names"):
        model(ids, masks={"neurons": jnp.ones((2, 12))})
