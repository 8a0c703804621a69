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
    monkeypatch.setenv(decoder.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="JDISTILL_ATTENTION='flash': use one of xla, cudnn"):
        decoder.attention_implementation(jnp.bfloat16, 64)
