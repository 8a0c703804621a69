"""Rotary position embeddings, by rope type: the one registry of inverse-frequency functions.

As transformers' ``ROPE_INIT_FUNCTIONS``: a config's ``rope_scaling`` names its
``rope_type`` ("default" when absent) and the function of that name turns (head_dim, theta,
scaling parameters) into the inverse frequencies. A new rope type is one function added to
``ROPE_INIT_FUNCTIONS``; configs accept exactly the types listed there.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def default_inv_freq(head_dim: int, theta: float, params: dict):
    """theta^(-2i/d) for i < d/2 (Su et al. 2021)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def llama3_inv_freq(head_dim: int, theta: float, params: dict):
    """Llama 3.1 frequency scaling (transformers' _compute_llama3_parameters): long
    wavelengths scaled by `factor`, the middle band interpolated."""
    inv_freq = default_inv_freq(head_dim, theta, params)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


ROPE_INIT_FUNCTIONS = {"default": default_inv_freq, "llama3": llama3_inv_freq}


def rope_type(rope_scaling) -> str:
    """The rope type a config's `rope_scaling` (dict, sorted pairs or None) names."""
    return dict(rope_scaling or {}).get("rope_type", "default")


def check_rope_type(name: str) -> None:
    if name not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {name!r}; supported: {tuple(ROPE_INIT_FUNCTIONS)}")


def rope_inv_freq(config):
    """Inverse frequencies [head_dim/2] of `config` (a ModelConfig), by its rope type."""
    params = dict(config.rope_scaling or {})
    return ROPE_INIT_FUNCTIONS[rope_type(params)](config.head_dim, config.rope_theta, params)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x [B, T, H, hd]; cos/sin [B, T, hd] in f32, cast to x's dtype as HF does."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
