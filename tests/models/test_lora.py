"""LoRA: merged weights = base + adapters; only adapters train; the base stays bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill.models.config import ModelConfig
from jdistill.models.decoder import MLP, init_model
from jdistill.models.lora import apply_lora, init_lora, lora_param_count, merge_into_model

CFG = ModelConfig(family="qwen2", vocab_size=48, hidden_size=16, intermediate_size=24,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
ALL = r"self_attn\.(q|k|v|o)_proj$|mlp\.(gate|up|down)_proj$"
TOKENS = (jnp.arange(2 * 9).reshape(2, 9) * 7) % CFG.vocab_size


def _randomise_b(lora, seed=1, std=0.3):
    keys = iter(jax.random.split(jax.random.key(seed), len(lora.adapters)))
    adapters = {k: {"a": v["a"], "b": std * jax.random.normal(next(keys), v["b"].shape)}
                for k, v in lora.adapters.items()}
    return lora.replace(adapters=adapters)


def test_shapes_and_zero_init_is_identity():
    model = init_model(CFG)
    params = nnx.state(model, nnx.Param)
    lora = init_lora(params, ALL, rank=3, alpha=6.0, rng=jax.random.key(0))
    assert len(lora.adapters) == 7 * CFG.num_layers
    q = lora.adapters["layers.1.self_attn.q_proj"]
    o = lora.adapters["layers.1.self_attn.o_proj"]
    assert q["a"].shape == (16, 3) and q["b"].shape == (3, 4, 4)
    assert o["a"].shape == (4, 4, 3) and o["b"].shape == (3, 16)
    assert lora.scale == 2.0
    assert "layers.0.input_layernorm" not in lora.adapters and "embed_tokens" not in lora.adapters
    base = model(TOKENS)
    assert np.array_equal(np.asarray(merge_into_model(model, lora)(TOKENS)), np.asarray(base))
    with pytest.raises(ValueError):
        init_lora(params, r"no_such_kernel", rank=2, alpha=2.0, rng=jax.random.key(0))


def test_merged_kernels_equal_base_plus_scaled_ab():
    model = init_model(CFG)
    params = nnx.state(model, nnx.Param)
    lora = _randomise_b(init_lora(params, ALL, rank=2, alpha=3.0, rng=jax.random.key(0)))
    merged = apply_lora(params, lora)
    s = 3.0 / 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    for i in range(CFG.num_layers):
        att, m_att = params["layers"][i]["self_attn"], merged["layers"][i]["self_attn"]
        for name in ("q_proj", "k_proj", "v_proj"):
            w, w2 = np.asarray(att[name][...]), np.asarray(m_att[name][...])
            ad = lora.adapters[f"layers.{i}.self_attn.{name}"]
            a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
            # unmerged adapter path: x W + s (x A) B
            ref = np.einsum("nd,dhk->nhk", x, w) + s * np.einsum("nr,rhk->nhk", x @ a, b)
            np.testing.assert_allclose(np.einsum("nd,dhk->nhk", x, w2), ref, rtol=1e-5,
                                       atol=1e-6)
        ad = lora.adapters[f"layers.{i}.self_attn.o_proj"]
        a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
        y = rng.normal(size=(5, 4, 4)).astype(np.float32)
        ref = (np.einsum("nhk,hkd->nd", y, np.asarray(att["o_proj"][...]))
               + s * np.einsum("nr,rd->nd", np.einsum("nhk,hkr->nr", y, a), b))
        np.testing.assert_allclose(np.einsum("nhk,hkd->nd", y, np.asarray(m_att["o_proj"][...])),
                                   ref, rtol=1e-5, atol=1e-6)
    # untouched params are the very same values
    assert np.array_equal(np.asarray(merged["embed_tokens"][...]),
                          np.asarray(params["embed_tokens"][...]))
    assert not np.array_equal(np.asarray(merged["layers"][0]["mlp"]["up_proj"][...]),
                              np.asarray(params["layers"][0]["mlp"]["up_proj"][...]))


class _UnmergedLoraMLP(MLP):
    """Reference MLP computing base + adapter outputs separately (x W + s (x A) B)."""

    def __init__(self, base: MLP, adapters, scale):
        self.gate_proj, self.up_proj, self.down_proj = base.gate_proj, base.up_proj, base.down_proj
        self.ad = nnx.data({k: {kk: jnp.asarray(vv) for kk, vv in v.items()}
                            for k, v in adapters.items()})
        self.scale = scale

    def _lin(self, x, name):
        w = getattr(self, name)[...]
        ad = self.ad[name]
        return x @ w + self.scale * ((x @ ad["a"]) @ ad["b"])

    def __call__(self, x, neuron_mask=None, acts=None):
        act = jax.nn.silu(self._lin(x, "gate_proj")) * self._lin(x, "up_proj")
        return self._lin(act, "down_proj")


def test_merged_model_logits_equal_unmerged_base_plus_adapter_forward():
    model = init_model(CFG)
    params = nnx.state(model, nnx.Param)
    lora = _randomise_b(init_lora(params, r"mlp\.", rank=4, alpha=4.0, rng=jax.random.key(2)))
    merged_logits = merge_into_model(model, lora)(TOKENS)
    ref_model = init_model(CFG)  # same seed -> same base weights
    for i, layer in enumerate(ref_model.layers):
        ads = {n: lora.adapters[f"layers.{i}.mlp.{n}"] for n in ("gate_proj", "up_proj",
                                                                   "down_proj")}
        layer.mlp = _UnmergedLoraMLP(layer.mlp, ads, lora.scale)
    ref_logits = ref_model(TOKENS)
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(ref_logits), rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(np.asarray(merged_logits), np.asarray(model(TOKENS)), atol=1e-4)


def test_only_adapters_train_and_base_stays_bit_identical():
    teacher = init_model(CFG, seed=7)
    target = jax.nn.softmax(teacher(TOKENS), -1)
    model = init_model(CFG)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    base_copy = jax.tree_util.tree_map(lambda x: np.array(x), params)
    lora = init_lora(params, ALL, rank=4, alpha=8.0, rng=jax.random.key(3))

    opt = optax.adam(3e-2)
    opt_state = opt.init(lora)
    n_adapter = lora_param_count(lora)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter  # adam mu + nu over the adapters only, nothing of the base
    # per layer, r (in + out) for q, k, v, o, gate, up, down
    d, f, h, kv, hd, r = 16, 24, 4, 2, 4, 4
    per_layer = r * ((d + h * hd) + 2 * (d + kv * hd) + (h * hd + d) + 2 * (d + f) + (f + d))
    assert n_adapter == CFG.num_layers * per_layer

    def loss_fn(lora, params):
        logits = nnx.merge(graphdef, apply_lora(params, lora), rest)(TOKENS)
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, -1), -1))

    @jax.jit
    def step(lora, opt_state, params):
        loss, g = jax.value_and_grad(loss_fn)(lora, params)
        updates, opt_state = opt.update(g, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for _ in range(8):
        lora, opt_state, loss = step(lora, opt_state, params)
        losses.append(float(loss))
    final = float(loss_fn(lora, params))
    assert final < losses[0] - 1e-3, (losses, final)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), b), params, base_copy)
    assert all(jax.tree_util.tree_leaves(same))
    # export: the merged model reproduces the trained (base + adapters) function exactly
    merged = merge_into_model(nnx.merge(graphdef, params, rest), lora)
    np.testing.assert_allclose(
        np.asarray(merged(TOKENS)),
        np.asarray(nnx.merge(graphdef, apply_lora(params, lora), rest)(TOKENS)), atol=1e-6)


def test_dropout_masks_adapter_input_features_once_per_call():
    """dropout folds one inverted-dropout mask over each adapter's input features into A:
    the merged kernel equals W + s * (m[:, None] * A) @ B with m in {0, 1/(1-p)}."""
    from jdistill.models import lora as lora_lib

    rng = np.random.default_rng(0)
    params = {"mlp": {"up_proj": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}}
    lora = lora_lib.init_lora(params, r"mlp\.up_proj", rank=4, alpha=8.0, rng=jax.random.key(0))
    ad = lora.adapters["mlp.up_proj"]
    lora = lora.replace(adapters={"mlp.up_proj": {"a": ad["a"],
                                                  "b": jnp.asarray(rng.normal(size=(4, 8)),
                                                                   jnp.float32)}})
    out = lora_lib.apply_lora(params, lora, dropout=0.5, rng=jax.random.key(1))
    delta = np.asarray(out["mlp"]["up_proj"] - params["mlp"]["up_proj"])
    a, b = np.asarray(lora.adapters["mlp.up_proj"]["a"]), np.asarray(lora.adapters["mlp.up_proj"]["b"])
    full = 2.0 * a @ b  # scale alpha / r = 2
    dropped = np.all(np.abs(delta) < 1e-7, axis=1)
    assert 0 < dropped.sum() < 16  # some input features dropped, not all
    np.testing.assert_allclose(delta[~dropped], 2.0 * full[~dropped], rtol=1e-5, atol=1e-6)
    same = lora_lib.apply_lora(params, lora, dropout=0.5, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(same["mlp"]["up_proj"]), np.asarray(out["mlp"]["up_proj"]))
    with pytest.raises(ValueError, match="needs an rng"):
        lora_lib.apply_lora(params, lora, dropout=0.1)
