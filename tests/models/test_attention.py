"""Attention through jax.nn.dot_product_attention equals the einsum attention it replaced,
for every mask kind, and the fused-kernel (cuDNN) arguments describe the same mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.models import decoder

B, T, H, KV, HD = 3, 12, 4, 2, 8


def einsum_attention(q, k, v, q_slots, k_slots, k_valid, sliding_window=None):
    """The attention of the first version (scores materialised, f32 softmax): the reference."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    allowed = k_slots[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        allowed &= (q_slots[:, None] - k_slots[None, :]) < sliding_window
    allowed = allowed[None, :, :] & (k_valid[:, None, :] if k_valid.ndim == 2 else k_valid)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def _qkv(dtype, s=T, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.normal(size=(B, T, H, HD)) * 2, dtype),
            jnp.asarray(r.normal(size=(B, s, KV, HD)) * 2, dtype),
            jnp.asarray(r.normal(size=(B, s, KV, HD)), dtype))


def _cases():
    slots = jnp.arange(T)
    full = jnp.ones((B, T), bool)
    right = jnp.asarray(np.arange(T)[None] < np.array([[T], [7], [3]]))
    left = right[:, ::-1]
    docs = jnp.asarray(np.repeat([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]], B, axis=0))
    packed = right[:, None, :] & (docs[:, :, None] == docs[:, None, :])
    return {
        "causal": (slots, slots, full, None),
        "right padding": (slots, slots, right, None),
        "left padding": (slots, slots, left, None),
        "sliding window": (slots, slots, right, 4),
        "packed documents": (slots, slots, packed, None),
        "packed + window": (slots, slots, packed, 2),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(_cases()))
def test_equals_the_einsum_attention(case, dtype):
    q, k, v = _qkv(dtype)
    q_slots, k_slots, k_valid, window = _cases()[case]
    want = einsum_attention(q, k, v, q_slots, k_slots, k_valid, window)
    got = decoder.attend(q, k, v, q_slots, k_slots, k_valid, window, aligned=True)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("case", list(_cases()))
def test_causal_blocks_equal_the_einsum_attention(case):
    """XLA's blocked causal attention (here blocks of 5 queries: 3 blocks, the last short)
    equals the whole attention in every row that has a valid key."""
    q, k, v = _qkv(jnp.float32, seed=2)
    q_slots, k_slots, k_valid, window = _cases()[case]
    want = einsum_attention(q, k, v, q_slots, k_slots, k_valid, window)
    got = decoder.attend(q, k, v, q_slots, k_slots, k_valid, window, aligned=True, block=5)
    some = np.asarray(decoder.allowed_keys(q_slots, k_slots, k_valid, window).any(-1))
    np.testing.assert_allclose(np.asarray(got)[some], np.asarray(want)[some], atol=1e-5,
                               rtol=1e-5)
    grad = jax.grad(lambda q, k, v, **kw: jnp.sum(jnp.where(
        some[..., None, None], decoder.attend(q, k, v, q_slots, k_slots, k_valid, window,
                                              aligned=True, **kw), 0) ** 2), argnums=(0, 1, 2))
    for a, b in zip(grad(q, k, v, block=5), grad(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(_cases()))
def test_fused_kernel_arguments_describe_the_same_mask(case):
    """What the cuDNN path passes (causal / window as flags, the rest as a mask), run by
    XLA here: equal to the full mask. Rows with no valid key are compared only where some
    key is valid (a kernel may return anything there; the loss masks them)."""
    q, k, v = _qkv(jnp.float32)
    q_slots, k_slots, k_valid, window = _cases()[case]
    fused = decoder.attention_args(q_slots, k_slots, k_valid, window, aligned=True, fused=True)
    assert fused["is_causal"] and fused["mask"].shape == (B, 1, T, T)
    got = jax.nn.dot_product_attention(q, k, v, **fused, implementation="xla")
    want = einsum_attention(q, k, v, q_slots, k_slots, k_valid, window)
    some = np.asarray(decoder.allowed_keys(q_slots, k_slots, k_valid, window).any(-1))
    np.testing.assert_allclose(np.asarray(got)[some], np.asarray(want)[some], atol=1e-5, rtol=1e-5)


def test_cache_slots_equal_the_einsum_attention():
    """Decoding: queries at slots index.. of a cache longer than the call; not aligned, so
    every implementation gets the full mask."""
    s = 16
    q, k, v = _qkv(jnp.float32, s=s, seed=1)
    q_slots, k_slots = 4 + jnp.arange(T), jnp.arange(s)
    k_valid = jnp.asarray(np.arange(s)[None] < np.array([[16], [10], [6]]))
    args = decoder.attention_args(q_slots, k_slots, k_valid, aligned=False, fused=True)
    assert set(args) == {"mask"}
    got = decoder.attend(q, k, v, q_slots, k_slots, k_valid, aligned=False)
    want = einsum_attention(q, k, v, q_slots, k_slots, k_valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_implementation_per_backend_and_override(monkeypatch):
    monkeypatch.delenv(decoder.ATTENTION_ENV, raising=False)
    assert decoder.attention_implementation(jnp.bfloat16, 64) == (
        "cudnn" if jax.default_backend() == "gpu" else "xla")
    assert decoder.attention_implementation(jnp.float32, 64) == "xla"  # cuDNN: bf16/f16 only
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert decoder.attention_implementation(jnp.bfloat16, 64) == "cudnn"
    assert decoder.attention_implementation(jnp.bfloat16, 72 + 1) == "xla"
    monkeypatch.setenv(decoder.ATTENTION_ENV, "xla")
    assert decoder.attention_implementation(jnp.bfloat16, 64) == "xla"
    monkeypatch.delenv(decoder.ATTENTION_ENV)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert decoder.attention_implementation(jnp.float32, 64) == "splash"
    monkeypatch.setenv(decoder.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="JDISTILL_ATTENTION='flash': use one of xla, cudnn, "
                                         "splash"):
        decoder.attention_implementation(jnp.bfloat16, 64)


# ------------------------------------------------------------ splash (TPU; interpret mode here)

ST = 256  # two of the kernel's 128-token tiles


def _splash_cases():
    """name -> (attention_mask [B, ST], documents [B, ST] or None, sliding window)."""
    r = np.random.default_rng(3)
    right = np.arange(ST)[None] < np.array([[ST], [200], [77]])
    docs = np.cumsum(r.random((B, ST)) < 0.03, axis=1) + 1  # documents 1, 2, ... per row
    return {
        "causal": (np.ones((B, ST), bool), None, None),
        "right padding": (right, None, None),
        "left padding": (right[:, ::-1], None, None),
        "sliding window": (right, None, 100),
        "packed documents": (right, np.where(right, docs, 0), None),
        "packed + window": (right, np.where(right, docs, 0), 30),
    }


def _splash_reference(q, k, v, mask, docs, window):
    """The einsum attention of the same mask, and the rows of real tokens."""
    slots = jnp.arange(ST)
    k_valid = jnp.asarray(mask)
    if docs is not None:
        k_valid = k_valid[:, None, :] & jnp.asarray(docs[:, :, None] == docs[:, None, :])
    return einsum_attention(q, k, v, slots, slots, k_valid, window), mask


@pytest.mark.parametrize("case", list(_splash_cases()))
def test_splash_equals_the_einsum_attention(case):
    from jdistill.models import splash
    q, k, v = (jnp.asarray(np.random.default_rng(4).normal(size=(B, ST, h, HD)), jnp.float32)
               for h in (H, KV, KV))
    mask, docs, window = _splash_cases()[case]
    want, real = _splash_reference(q, k, v, mask, docs, window)
    segments = splash.segment_ids(jnp.asarray(mask), None if docs is None else jnp.asarray(docs))
    got = splash.attention(q, k, v, segments, window)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5,
                               rtol=2e-5)
    if case == "packed + window":  # and its gradients, through the kernel's backward
        def loss(f):
            return lambda q, k, v: jnp.sum(jnp.where(real[..., None, None], f(q, k, v), 0) ** 2)
        ours = jax.grad(loss(lambda q, k, v: splash.attention(q, k, v, segments, window)),
                        argnums=(0, 1, 2))(q, k, v)
        ref = jax.grad(loss(lambda q, k, v: _splash_reference(q, k, v, mask, docs, window)[0]),
                       argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_splash_decoder_on_a_mesh_equals_xla(monkeypatch):
    """The whole decoder with splash attention, under `jax.set_mesh` on 8 devices (the kernel
    in shard_map: batch over data x fsdp, heads over tensor), packed and padded rows: the
    logits of every real token equal XLA's."""
    from jdistill import sharding
    from jdistill.models.config import ModelConfig
    c = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=50)
    model = decoder.init_model(c, seed=1)
    t = 128
    r = np.random.default_rng(5)
    tokens = jnp.asarray(r.integers(1, 97, (4, t)))
    mask = np.arange(t)[None] < np.array([[t], [100], [64], [t]])
    docs = np.where(mask, np.cumsum(r.random((4, t)) < 0.05, axis=1) + 1, 0)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)

    def logits(impl):
        monkeypatch.setenv(decoder.ATTENTION_ENV, impl)
        fwd = jax.jit(lambda m, x, a, d: m(x, attention_mask=a, documents=d))
        with jax.set_mesh(mesh):
            ops = str(jax.make_jaxpr(fwd)(model, tokens, jnp.asarray(mask), None))
            assert (("pallas_call" in ops) and ("shard_map" in ops)) == (impl == "splash")
            return [np.asarray(fwd(model, tokens, jnp.asarray(mask), d))
                    for d in (None, jnp.asarray(docs))]

    for got, want in zip(logits("splash"), logits("xla")):
        np.testing.assert_allclose(got[mask], want[mask], atol=2e-5, rtol=2e-5)
