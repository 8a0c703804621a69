"""Flax NNX decoder-only transformer: Llama / Mistral / Qwen2 / Qwen3.

Layout choices (why): projection kernels keep heads as their own axis (`q_proj` is
[embed, heads, head_dim], `o_proj` is [heads, head_dim, embed]) so head pruning, head
sharding and GQA grouping are index operations on one axis, never reshapes of a fused dim.

Structural masks (for pruning) are a dict with any of
  heads  [L, H]  query heads, applied to the attention output before o_proj
  mlp    [L, F]  MLP neurons, applied to silu(gate) * up
  hidden [D]     residual channels, applied inside every RMSNorm and to every residual write
  layers [L]     whole layers, a skipped layer passes its input through
Every mask multiplies by 1 or selects, so all-ones masks change nothing (up to XLA
reassociating a masked reduction: ~1 ulp).
"""

from __future__ import annotations

import functools
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jdistill import sharding as sharding_lib
from jdistill.models import splash
from jdistill.models.config import ModelConfig
from jdistill.models.rope import apply_rope, rope_inv_freq

MASK_SHAPES = {
    "heads": lambda c: (c.num_layers, c.num_heads),
    "mlp": lambda c: (c.num_layers, c.intermediate_size),
    "hidden": lambda c: (c.hidden_size,),
    "layers": lambda c: (c.num_layers,),
}


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer [L, B, S, KV, hd] in fixed slots; `valid` [B, S] marks
    filled, non-padding slots; `index` is the next slot to write."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        zeros = jnp.zeros(shape, dtype)
        return cls(k=zeros, v=zeros, valid=jnp.zeros((batch, max_len), bool),
                   index=jnp.zeros((), jnp.int32))


def rms_norm(x, weight, eps, channel_mask=None):
    """HF RMSNorm: statistics in f32, scale applied in the input dtype.

    With `channel_mask`, the statistic is the mean over kept channels only (what the sliced
    model computes). mean(x²·m)·(D/Σm) is written so that an all-ones mask multiplies by
    exactly 1.0 (XLA may still sum the masked squares in another order: ~1 ulp).
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if channel_mask is None:
        var = jnp.mean(x * x, axis=-1, keepdims=True)
    else:
        m = channel_mask.astype(jnp.float32)
        var = jnp.mean(x * x * m, axis=-1, keepdims=True) * (m.shape[-1] / jnp.sum(m))
    y = weight * (x * jax.lax.rsqrt(var + eps)).astype(dtype)
    return y if channel_mask is None else y * channel_mask.astype(y.dtype)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")
ATTENTION_ENV = "JDISTILL_ATTENTION"  # forces one implementation (benchmarks, debugging)


def attention_implementation(dtype, head_dim: int) -> str:
    """The attention kernel, chosen per backend: on a GPU cuDNN's fused flash attention
    (through `jax.nn.dot_product_attention`) where it applies (bf16/f16, head_dim a multiple
    of 8 up to 128); on a TPU JAX's Pallas splash kernel (`models.splash`); neither forms
    the [B, H, T, S] scores. XLA elsewhere: on CPU it is the fastest there is. Where the
    kernel cannot run a call (splash: a KV cache, a length not a multiple of 128),
    `attend` uses XLA for it. `JDISTILL_ATTENTION` overrides."""
    forced = os.environ.get(ATTENTION_ENV)
    if forced:
        if forced not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"{ATTENTION_ENV}={forced!r}: use one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)} (or unset it)")
        return forced
    if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    if jax.default_backend() == "tpu":
        return "splash"
    return "xla"


def allowed_keys(q_slots, k_slots, k_valid, sliding_window=None):
    """[B, T, S] bool: which keys each query may attend to (causal, window, padding and,
    for packed rows, its own document)."""
    allowed = k_slots[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        allowed &= (q_slots[:, None] - k_slots[None, :]) < sliding_window
    return allowed[None, :, :] & (k_valid[:, None, :] if k_valid.ndim == 2 else k_valid)


def attention_args(q_slots, k_slots, k_valid, sliding_window=None, *, aligned: bool,
                   fused: bool) -> dict:
    """Mask arguments of `jax.nn.dot_product_attention`. A fused kernel (cuDNN) takes the
    causal and window structure as flags, so it skips the masked blocks and never forms
    the scores; only padding / document structure goes in as a [B, 1, T, S] mask. That
    needs query i at key slot i (`aligned`: self-attention without a cache); otherwise,
    and for XLA, the whole mask [B, 1, T, S]."""
    if not (fused and aligned):
        return {"mask": allowed_keys(q_slots, k_slots, k_valid, sliding_window)[:, None]}
    t = q_slots.shape[0]
    docs = k_valid[:, None, :] if k_valid.ndim == 2 else k_valid
    return {"mask": jnp.broadcast_to(docs, (docs.shape[0], t, k_slots.shape[0]))[:, None],
            "is_causal": True,
            "local_window_size": None if sliding_window is None else (sliding_window - 1, 0)}


CAUSAL_BLOCK = 128  # queries per block of XLA's causal attention (measured best at T 512)


def attend(q, k, v, q_slots, k_slots, k_valid, sliding_window=None, *, aligned=False,
           segments=None, block=CAUSAL_BLOCK):
    """Causal GQA attention through `jax.nn.dot_product_attention`. q [B,T,H,hd], k/v
    [B,S,KV,hd], q_slots [T], k_slots [S], k_valid [B,S] (or [B,T,S] when queries differ in
    which keys they may see: packing). Scores and softmax in f32; masked with a large
    finite negative, so rows with no valid key (padding queries) give a harmless uniform
    average instead of NaN. `aligned`: q_slots == k_slots (self-attention, no cache).
    `segments` [B, T]: `splash.segment_ids` of the same mask (what the splash kernel takes).

    XLA materialises the scores, so aligned attention runs in blocks of `block` queries,
    each against the keys up to its last query only: the masked upper triangle is never
    computed (at T 512, blocks of 128: forward 2.0x, forward + backward 1.8x faster on
    this CPU). Exact, but in rows with no valid key (their uniform average is over fewer
    keys; nothing reads those rows)."""
    impl = attention_implementation(q.dtype, q.shape[-1])
    if impl == "splash":
        if aligned and segments is not None and splash.fits(q.shape[1]) and splash.usable():
            return splash.attention(q, k, v, segments, sliding_window)
        impl = "xla"
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if impl != "xla" or not aligned or q.shape[1] <= block:
        args = attention_args(q_slots, k_slots, k_valid, sliding_window, aligned=aligned,
                              fused=impl != "xla")
        return jax.nn.dot_product_attention(q, k, v, **args, implementation=impl)
    allowed = allowed_keys(q_slots, k_slots, k_valid, sliding_window)[:, None]
    outs = []
    for start in range(0, q.shape[1], block):
        stop = min(start + block, q.shape[1])
        outs.append(jax.nn.dot_product_attention(
            q[:, start:stop], k[:, :stop], v[:, :stop], mask=allowed[..., start:stop, :stop],
            implementation="xla"))
    return jnp.concatenate(outs, axis=1)


# What the backward pass of a scanned layer keeps from its forward (`jax.checkpoint`):
# none = everything (most memory: the [B, H, T, S] attention probabilities of every layer
# on XLA's path); dots = the projections' outputs, attention and elementwise work
# recomputed (batched dots, i.e. attention's, are not saved); full = only each layer's
# input, the whole layer recomputed (least memory, ~1/3 more FLOPs). On XLA:CPU writing
# the saved residuals costs more than recomputing them: at 8 x 512 the student's forward +
# backward takes 15.3 s (none), 8.3 s (dots), 8.8 s (full), so the trainer's default is dots.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def dense(x, w, contract: int = 1):
    """x [..., *w.shape[:contract]] · w -> [..., *w.shape[contract:]] as one 2-D GEMM
    [rows, K] @ [K, N]. XLA:CPU lays out the backward of a dot whose rows span several
    dims (batch and time) by transposing the [tokens, N] gradient: the MLP's forward +
    backward in the layer scan is 1.7x slower that way than as a 2-D product (measured)."""
    k = math.prod(w.shape[:contract])
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*x.shape[:x.ndim - contract], *w.shape[contract:])


def _param(rngs, shape, dtype, std=0.02):
    """A N(0, std) weight, or zeros when rngs is None (see `abstract_model`)."""
    if rngs is None:
        return nnx.Param(jnp.zeros(shape, dtype))
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class Attention(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs | None):
        self.config = c
        d, h, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = _param(rngs, (d, h, hd), dtype)
        self.k_proj = _param(rngs, (d, kv, hd), dtype)
        self.v_proj = _param(rngs, (d, kv, hd), dtype)
        self.o_proj = _param(rngs, (h, hd, d), dtype)
        if c.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), dtype)
            self.k_bias = _param(rngs, (kv, hd), dtype)
            self.v_bias = _param(rngs, (kv, hd), dtype)
        if c.qk_norm:
            self.q_norm = nnx.Param(jnp.ones((hd,), dtype))
            self.k_norm = nnx.Param(jnp.ones((hd,), dtype))

    def __call__(self, x, cos, sin, q_slots, k_valid, cache_kv=None, cache_index=None,
                 head_mask=None, acts=None, segments=None):
        c = self.config
        q, k, v = (dense(x, w[...]) for w in (self.q_proj, self.k_proj, self.v_proj))
        if c.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if c.qk_norm:
            q = rms_norm(q, self.q_norm[...], c.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], c.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_kv is None:
            keys, values, k_slots = k, v, q_slots
        else:  # a local copy of this layer's cache with this call's tokens written in
            keys = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype),
                                                (0, cache_index, 0, 0))
            values = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype),
                                                  (0, cache_index, 0, 0))
            k_slots = jnp.arange(keys.shape[1])
        out = attend(q, keys, values, q_slots, k_slots, k_valid, c.sliding_window,
                     aligned=cache_kv is None, segments=segments)
        if head_mask is not None:
            out = out * head_mask.astype(out.dtype)[:, None]
        if acts is not None:
            acts["heads"] = out
        # this call's keys/values only: the caller writes all layers' into its cache at once
        # (returning each layer's whole updated cache copied the cache every decode step)
        return dense(out, self.o_proj[...], contract=2), (k, v)


class MLP(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs | None):
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = _param(rngs, (d, f), dtype)
        self.up_proj = _param(rngs, (d, f), dtype)
        self.down_proj = _param(rngs, (f, d), dtype)

    def __call__(self, x, neuron_mask=None, acts=None):
        act = jax.nn.silu(dense(x, self.gate_proj[...])) * dense(x, self.up_proj[...])
        if neuron_mask is not None:
            act = act * neuron_mask.astype(act.dtype)
        if acts is not None:
            acts["mlp_act"] = act
        return dense(act, self.down_proj[...])


class Block(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs | None):
        self.config = c
        self.input_layernorm = nnx.Param(jnp.ones((c.hidden_size,), dtype))
        self.self_attn = Attention(c, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = nnx.Param(jnp.ones((c.hidden_size,), dtype))
        self.mlp = MLP(c, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, q_slots, k_valid, cache_kv=None, cache_index=None,
                 head_mask=None, neuron_mask=None, hidden_mask=None, acts=None, segments=None):
        """`acts`, when a dict, receives this layer's activations (see Decoder.forward)."""
        eps = self.config.rms_norm_eps
        h = rms_norm(x, self.input_layernorm[...], eps, hidden_mask)
        attn, kv = self.self_attn(h, cos, sin, q_slots, k_valid, cache_kv, cache_index, head_mask,
                                  acts, segments)
        if acts is not None:
            acts["attn_norm"] = h
        x = x + _mask_channels(attn, hidden_mask)
        h = rms_norm(x, self.post_attention_layernorm[...], eps, hidden_mask)
        x = x + _mask_channels(self.mlp(h, neuron_mask, acts), hidden_mask)
        if acts is not None:
            acts["mlp_norm"] = h
        return x, kv


def _mask_channels(x, hidden_mask):
    return x if hidden_mask is None else x * hidden_mask.astype(x.dtype)


class Decoder(nnx.Module):
    """Decoder-only LM. Parameter names follow HF's module names (see checkpoint.py)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None):
        self.config = config
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), dtype)
        self.layers = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), dtype)

    @property
    def dtype(self):
        return self.embed_tokens[...].dtype

    def unembed_weight(self):
        """The lm-head matrix [D, V] (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def unembed(self, hidden):
        """hidden [..., D] -> logits [..., V]."""
        return hidden @ self.unembed_weight()

    def forward(self, tokens, *, attention_mask=None, positions=None, masks=None, cache=None,
                activations=None, documents=None, layers=None, remat="none"):
        """Final normed hidden states [B, T, D] (and the updated cache, or None).

        tokens [B, T] int; attention_mask [B, T] (1 = real token; left or right padding);
        positions [B, T], by default counted over real tokens so left padding is harmless.
        With `cache`, tokens are written at slots cache.index .. cache.index + T.
        documents [B, T] int (packed rows): a token attends only to earlier tokens of its
        own document, and default positions restart at 0 in every document, so each packed
        example computes exactly what it would alone. With a cache, the slots filled before
        this call are a prefix shared by every document (several continuations of one
        context in one row); give `positions` then.
        `activations`, when a list, receives one dict per layer: layer_in / layer_out [B,T,D]
        (residual stream around the layer), attn_norm / mlp_norm [B,T,D] (RMSNorm outputs),
        heads [B,T,H,hd] (input of o_proj), mlp_act [B,T,F] (input of down_proj).
        `layers`: `self.stacked_layers()`, computed once by a caller that runs many
        forwards of one model inside one jitted function (the decode loop of `generate`);
        by default every call stacks them.
        `remat`: what the backward pass recomputes of each scanned layer (`REMAT_POLICIES`).
        """
        c = self.config
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if documents is not None and cache is not None and positions is None:
            raise ValueError("documents with a KV cache need explicit positions (the "
                             "shared prefix length plus each token's offset in its document)")
        if positions is None and documents is not None:
            positions = document_positions(documents)
        elif positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        masks = check_masks(masks, c)
        freqs = positions[..., None].astype(jnp.float32) * rope_inv_freq(c)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)

        if cache is None:
            q_slots, k_valid, index = jnp.arange(t), attention_mask, None
            segments = splash.segment_ids(attention_mask, documents)
            if documents is not None:
                same = documents[:, :, None] == documents[:, None, :]
                k_valid = attention_mask[:, None, :] & same  # [B, T, S]
        else:
            index, segments = cache.index, None
            q_slots = index + jnp.arange(t)
            k_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
            cache_valid = k_valid
            if documents is not None:
                slot_doc = jax.lax.dynamic_update_slice(
                    jnp.full(cache.valid.shape, -1, documents.dtype), documents, (0, index))
                shared = jnp.arange(cache.valid.shape[1]) < index
                same = slot_doc[:, None, :] == documents[:, :, None]
                k_valid = k_valid[:, None, :] & (shared[None, None, :] | same)  # [B, T, S]

        x = _mask_channels(self.embed_tokens[...][tokens], masks.get("hidden"))
        attn = (cos, sin, q_slots, k_valid, segments)  # what every layer's attention needs
        if activations is None:
            x, new_k, new_v = self._scan_layers(x, attn, index, masks, cache, layers, remat)
        else:
            x, new_k, new_v = self._loop_layers(x, attn, index, masks, cache, activations)
        x = rms_norm(x, self.norm[...], c.rms_norm_eps, masks.get("hidden"))
        if cache is not None:
            at = (0, 0, index, 0, 0)  # [L, B, S, KV, hd]: this call's slots, every layer
            k = jax.lax.dynamic_update_slice(cache.k, new_k.astype(cache.k.dtype), at)
            v = jax.lax.dynamic_update_slice(cache.v, new_v.astype(cache.v.dtype), at)
            cache = KVCache(k=k, v=v, valid=cache_valid, index=index + t)
        return x, cache

    def stacked_layers(self):
        """The layers' states stacked on a new axis 0 (what the scanned forward runs on).

        Stacking copies every layer weight: a one-token forward of the 135M teacher (16
        rows, this CPU) takes 0.45 s stacking inside and 0.14 s given the layers stacked
        once. A train step's weights arrive stacked, and stack(unstack(x)) folds away."""
        return stack_trees([nnx.state(layer) for layer in self.layers])

    def _scan_layers(self, x, attn, index, masks, cache, layers=None, remat="none"):
        """The layers as one `lax.scan` over their stacked parameters: XLA compiles one
        layer instead of num_layers copies (a 30-layer step compiles ~10x faster on a CPU).
        Every layer has the config's shapes, so the states stack."""
        graphdef, _ = nnx.split(self.layers[0])
        stacked = self.stacked_layers() if layers is None else layers
        hidden_mask = masks.get("hidden")
        xs = (stacked, masks.get("heads"), masks.get("mlp"), masks.get("layers"),
              None if cache is None else (cache.k, cache.v))

        cos, sin, q_slots, k_valid, segments = attn

        def body(x, xs):
            state, head_mask, neuron_mask, keep, kv = xs
            y, kv = nnx.merge(graphdef, state)(x, cos, sin, q_slots, k_valid, kv, index,
                                               head_mask=head_mask, neuron_mask=neuron_mask,
                                               hidden_mask=hidden_mask, segments=segments)
            return (y if keep is None else jnp.where(keep, y, x)), \
                (None if cache is None else kv)  # without a cache nothing is kept

        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: use one of {', '.join(REMAT_POLICIES)}")
        if REMAT_POLICIES[remat] is not None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        x, kv = jax.lax.scan(body, x, xs)
        return (x, None, None) if cache is None else (x, *kv)

    def _loop_layers(self, x, attn, index, masks, cache, activations):
        """The layers one by one, recording each one's activations (importance scoring)."""
        new_k, new_v = [], []
        cos, sin, q_slots, k_valid, segments = attn
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            acts = {"layer_in": x}
            y, (k, v) = layer(x, cos, sin, q_slots, k_valid, kv, index,
                              head_mask=_row(masks, "heads", i),
                              neuron_mask=_row(masks, "mlp", i),
                              hidden_mask=masks.get("hidden"), acts=acts, segments=segments)
            x = y if "layers" not in masks else jnp.where(masks["layers"][i], y, x)
            activations.append({**acts, "layer_out": x})
            new_k.append(k)
            new_v.append(v)
        if cache is None:
            return x, None, None
        return x, jnp.stack(new_k), jnp.stack(new_v)

    def __call__(self, tokens, *, attention_mask=None, positions=None, masks=None,
                 documents=None):
        """Logits [B, T, V] in the parameter dtype."""
        hidden, _ = self.forward(tokens, attention_mask=attention_mask, positions=positions,
                                 masks=masks, documents=documents)
        return self.unembed(hidden)


@functools.partial(jax.jit, static_argnums=0)
def stacked_layers(graphdef, state):
    """`Decoder.stacked_layers()` of nnx.split(model) as its own program, for a caller that
    runs many batches of one model (evaluation, trace generation): a program that stacks the
    layers itself copies every layer weight in every batch (0.45 s a forward of the 135M
    teacher on this CPU)."""
    return nnx.merge(graphdef, state).stacked_layers()


def stack_trees(trees: list):
    """Same-structured trees (one per layer) -> one tree of arrays stacked on a new axis 0."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def document_positions(documents):
    """Position of each token within its document: [B, T] -> [B, T], 0 at each start."""
    t = documents.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), documents.shape)
    starts = jnp.concatenate([jnp.ones_like(documents[:, :1], bool),
                              documents[:, 1:] != documents[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _row(masks, name, i):
    return masks[name][i] if name in masks else None


def check_masks(masks, config: ModelConfig) -> dict:
    """Validates a structural-mask dict against the config; returns it (or {})."""
    if not masks:
        return {}
    unknown = set(masks) - set(MASK_SHAPES)
    if unknown:
        raise ValueError(f"unknown mask names {sorted(unknown)}; known: {sorted(MASK_SHAPES)}")
    for name, m in masks.items():
        want = MASK_SHAPES[name](config)
        if tuple(m.shape) != want:
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, expected {want}")
    return masks


def ones_masks(config: ModelConfig) -> dict:
    """All-keep masks: the identity for the masked forward."""
    return {name: jnp.ones(shape(config), bool) for name, shape in MASK_SHAPES.items()}


def abstract_model(config: ModelConfig, *, dtype=jnp.float32) -> Decoder:
    """The model's structure with ShapeDtypeStruct leaves, for filling with loaded weights.
    Built without random draws: tracing 270 of them cost ~1.7 s per load of a 30-layer model
    (zeros trace in ~0.1 s)."""
    return nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=None))


def init_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0) -> Decoder:
    """A randomly initialised model (std 0.02 weights, unit norms)."""
    return Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed))


def jit_forward(model: Decoder, mesh=None):
    """(f, state): f(state, tokens, attention_mask) -> logits, jitted as a pure function.

    With a mesh, params go to their rule-table shardings, batches and logits are split over
    the batch mesh axes, and the returned state is already placed.
    """
    graphdef, state = nnx.split(model)

    def forward(state, tokens, attention_mask):
        return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask)

    if mesh is None:
        return jax.jit(forward), state
    state_sh = sharding_lib.state_shardings(state, mesh)
    batch = sharding_lib.batch_sharding(mesh)
    f = jax.jit(forward, in_shardings=(state_sh, batch, batch),
                out_shardings=sharding_lib.batch_sharding(mesh, ndim=3))
    return f, jax.device_put(state, state_sh)


def describe(model: Decoder) -> str:
    """A few lines a user reads first: family, dims, parameter count, dtype, placement."""
    c = model.config
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves(state)
    n = sum(x.size for x in leaves)
    devices = {d for x in leaves for d in x.sharding.device_set}
    return "\n".join([
        f"family {c.family}: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"ffn {c.intermediate_size}, heads {c.num_heads} (kv {c.num_kv_heads}, "
        f"head_dim {c.head_dim}), vocab {c.vocab_size}, tied embeddings "
        f"{c.tie_word_embeddings}",
        f"parameters {n:,} ({model.dtype.name}, {sum(x.nbytes for x in leaves) / 2**20:.1f} MiB) "
        f"on {len(devices)} device(s)",
    ])
