"""Batched generation with a KV cache: greedy, or temperature / top-p sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.models.decoder import Decoder, KVCache, stacked_layers


def sample_token(logits, rng, temperature: float, top_p: float):
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        logits = jnp.where(nucleus(logits, top_p), logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def order_key(x):
    """f32 -> uint32 whose unsigned order is the floats' order (the radix-sort trick)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def nucleus(logits, top_p: float):
    """[B, V] bool: the smallest set of most likely tokens with probability mass >= top_p
    (ties at its edge all kept; the top token always).

    Found by bisection on the logits' bit order — 32 masked sums over the vocabulary — not
    by sorting it: on a CPU a [16, 49152] sort costs ~150 ms a decode step, ten times this.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    key = order_key(logits)

    def halve(_, bounds):  # invariant: mass(key >= lo) >= top_p > mass(key >= hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(jnp.where(key >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.min(key, axis=-1), jnp.max(key, axis=-1) + 1))
    return key >= lo[:, None]


def eos_ids(eos_token_id) -> tuple[int, ...]:
    """An EOS spec as configs and callers give it (an int, a list of ints, or None) as a
    tuple of ids."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(eos_token_id)


def generate(model: Decoder, tokens, attention_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, rng=None, eos_token_id=None,
             pad_token_id: int = 0, layers=None):
    """Continues a left-padded batch. Returns new token ids [B, max_new_tokens]; after a
    row emits an EOS id, the rest of the row is `pad_token_id`.

    tokens [B, T] int; attention_mask [B, T] with padding on the left (required: every
    row's last token must be real). eos_token_id: an int, a list of ints, or None.
    layers: `decoder.stacked_layers(*nnx.split(model))`, from a caller generating many
    batches with one model (stacked once, not in every batch's program).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    attention_mask = jnp.asarray(attention_mask, bool)
    if not bool(np.all(np.asarray(attention_mask[:, -1]))):
        raise ValueError("generate needs left padding: every row's last token must be real "
                         "(pad on the left, as tokenizers do with padding_side='left')")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    eos = eos_ids(eos_token_id)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    if layers is None:
        layers = stacked_layers(graphdef, state)
    return _generate(graphdef, state, layers, tokens, attention_mask, rng, max_new_tokens,
                     float(temperature), float(top_p), eos, int(pad_token_id))


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 10))
def _generate(graphdef, state, layers, tokens, attention_mask, rng, max_new_tokens,
              temperature, top_p, eos, pad_id):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = KVCache.create(model.config, b, t + max_new_tokens, model.dtype)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    hidden, cache = model.forward(tokens, attention_mask=attention_mask, positions=positions,
                                  cache=cache, layers=layers)
    logits = model.unembed(hidden[:, -1])
    eos_ids = jnp.array(eos, jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, pos, done, rng, out = carry
        rng, sub = jax.random.split(rng)
        token = sample_token(logits, sub, temperature, top_p)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, eos_ids)
        pos = pos + 1
        hidden, cache = model.forward(token[:, None], positions=pos[:, None], cache=cache,
                                      layers=layers)
        return step + 1, cache, model.unembed(hidden[:, -1]), pos, done, rng, out

    carry = (jnp.zeros((), jnp.int32), cache, logits, positions[:, -1], jnp.zeros(b, bool),
             rng, out)
    return jax.lax.while_loop(cond, body, carry)[-1]
