"""Importance scores for structured pruning, as pure jitted functions over calibration batches.

Scores come back as one pytree (a dict) with the keys of the model's structural masks:
  heads [L, H], mlp [L, F], hidden [D], layers [L]  — higher means more important —
plus `block_distance` [L+1, L+1] for contiguous-block depth pruning.

Methods
- activation (Minitron; Muralidharan et al. 2024, "Compact Language Models via Pruning and
  Knowledge Distillation"): forward passes only. Each activation A[b, s, c] is aggregated as
  score_c = sqrt(Σ_batches Σ_b (mean_s |A|)²) — batch L2, sequence mean, the best combination
  in their ablation. MLP neurons: the input of down_proj; heads: the input of o_proj, L2 over
  head_dim; hidden channels: every pre-attention / pre-MLP RMSNorm output, the per-norm scores
  summed over layers (one global ranking: the residual stream is shared). Depth: block
  importance BI_l = 1 − mean_tokens cos(x_in, x_out) (ShortGPT; Men et al. 2024).
- block distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers"): mean angular distance arccos(cos(h_i, h_j))/π between residual states at layer
  boundaries; the best block of n layers to drop starts where d(h_i, h_{i+n}) is smallest.
- layer skip loss: the increase of next-token loss when one layer is skipped (L+1 forwards).
- magnitude: sqrt of the summed squared weights that belong to each structure.
- taylor (LLM-Pruner; Ma et al. 2023): first-order |Σ g·W| over each structure's weights,
  gradients of the next-token loss accumulated over the calibration batches.

Padding tokens never count: every statistic is masked by the attention mask, and sequence
means divide by each row's number of real tokens.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.decoder import Decoder

F32 = jnp.float32


def _batch_l2_seq_mean(a, mask):
    """a [B, T, C] >= 0, mask [B, T] -> Σ_b (mean over real tokens of a)²  [C]."""
    m = mask.astype(F32)
    mean = jnp.einsum("btc,bt->bc", a.astype(F32), m) / jnp.maximum(m.sum(1), 1.0)[:, None]
    return jnp.sum(mean * mean, axis=0)


def _unit(x):
    x = x.astype(F32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def activation_statistics(graphdef, state, tokens, mask):
    """One calibration batch -> summable statistics (see `finalize_activation_scores`)."""
    model = nnx.merge(graphdef, state)
    acts = []
    model.forward(tokens, attention_mask=mask, activations=acts)
    m = mask.astype(F32)
    heads = jnp.stack([_batch_l2_seq_mean(jnp.linalg.norm(a["heads"].astype(F32), axis=-1), mask)
                       for a in acts])
    mlp = jnp.stack([_batch_l2_seq_mean(jnp.abs(a["mlp_act"]), mask) for a in acts])
    hidden = jnp.stack([_batch_l2_seq_mean(jnp.abs(a[k]), mask)
                        for a in acts for k in ("attn_norm", "mlp_norm")])
    cos = jnp.stack([jnp.einsum("btd,btd,bt->", _unit(a["layer_in"]), _unit(a["layer_out"]), m)
                     for a in acts])
    boundary = jnp.stack([_unit(acts[0]["layer_in"])] + [_unit(a["layer_out"]) for a in acts],
                         axis=2)  # [B, T, L+1, D]
    pair_cos = jnp.clip(jnp.einsum("btid,btjd->btij", boundary, boundary), -1.0, 1.0)
    angular = jnp.einsum("btij,bt->ij", jnp.arccos(pair_cos) / jnp.pi, m)
    return {"heads": heads, "mlp": mlp, "hidden": hidden, "cos": cos, "angular": angular,
            "tokens": m.sum()}


def finalize_activation_scores(stats) -> dict:
    """Summed statistics -> scores {heads, mlp, hidden, layers, block_distance}."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    return {
        "heads": jnp.sqrt(stats["heads"]),
        "mlp": jnp.sqrt(stats["mlp"]),
        "hidden": jnp.sqrt(stats["hidden"]).sum(0),
        "layers": 1.0 - stats["cos"] / tokens,
        "block_distance": stats["angular"] / tokens,
    }


def _add(a, b):
    return b if a is None else jax.tree_util.tree_map(jnp.add, a, b)


def activation_scores(model: Decoder, batches: Iterable) -> dict:
    """Minitron activation scores accumulated over (tokens [B,T], mask [B,T]) batches.

    Only the running sums are kept: memory does not grow with the number of batches.
    """
    graphdef, state = nnx.split(model)
    total = None
    for tokens, mask in batches:
        total = _add(total, activation_statistics(graphdef, state, tokens, mask))
    if total is None:
        raise ValueError("no calibration batches given; pass at least one (tokens, mask) batch")
    return finalize_activation_scores(total)


def next_token_loss(model: Decoder, tokens, mask, masks=None):
    """Summed next-token cross-entropy over positions whose token and successor are real,
    and the number of such positions."""
    logits = model(tokens, attention_mask=mask, masks=masks).astype(F32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    valid = (mask[:, :-1] & mask[:, 1:]).astype(F32)
    return jnp.sum(nll * valid), valid.sum()


@functools.partial(jax.jit, static_argnums=0)
def _skip_losses(graphdef, state, tokens, mask):
    model = nnx.merge(graphdef, state)
    n = model.config.num_layers
    layer_masks = jnp.concatenate([jnp.ones((1, n), bool), ~jnp.eye(n, dtype=bool)])
    losses, counts = jax.lax.map(
        lambda lm: next_token_loss(model, tokens, mask, {"layers": lm}), layer_masks)
    return losses, counts[0]


def layer_skip_scores(model: Decoder, batches: Iterable) -> jax.Array:
    """[L] mean next-token loss with layer l skipped minus the loss of the full model."""
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0.0
    for tokens, mask in batches:
        losses, n = _skip_losses(graphdef, state, tokens, mask.astype(bool))
        total, count = total + losses, count + n
    if isinstance(total, float):
        raise ValueError("no calibration batches given; pass at least one (tokens, mask) batch")
    mean = total / jnp.maximum(count, 1.0)
    return mean[1:] - mean[0]


def group_sums(values, config) -> dict:
    """Per-weight values (a pure dict shaped like the params) summed into structures.

    heads: q_proj[:, h], o_proj[h], q_bias[h]; mlp: gate[:, f], up[:, f], down[f];
    hidden: every weight row/column that touches residual channel c; layers: all weights.
    KV projections are shared by a group of query heads and so belong to no single head.
    """
    def total(x, keep_axes=()):
        axes = tuple(i for i in range(x.ndim) if i not in keep_axes)
        return jnp.sum(x.astype(F32), axis=axes)

    heads, mlp, layers = [], [], []
    hidden = total(values["embed_tokens"], (1,)) + values["norm"].astype(F32)
    if "lm_head" in values:
        hidden = hidden + total(values["lm_head"], (0,))
    for i in range(config.num_layers):
        lay = values["layers"][i]
        at, ml = lay["self_attn"], lay["mlp"]
        h = total(at["q_proj"], (1,)) + total(at["o_proj"], (0,))
        if "q_bias" in at:
            h = h + total(at["q_bias"], (0,))
        heads.append(h)
        mlp.append(total(ml["gate_proj"], (1,)) + total(ml["up_proj"], (1,))
                   + total(ml["down_proj"], (0,)))
        hidden = hidden + lay["input_layernorm"] + lay["post_attention_layernorm"]
        for name in ("q_proj", "k_proj", "v_proj"):
            hidden = hidden + total(at[name], (0,))
        hidden = hidden + total(at["o_proj"], (2,)) + total(ml["down_proj"], (1,))
        hidden = hidden + total(ml["gate_proj"], (0,)) + total(ml["up_proj"], (0,))
        layers.append(sum(total(x) for x in jax.tree_util.tree_leaves(lay)))
    return {"heads": jnp.stack(heads), "mlp": jnp.stack(mlp), "hidden": hidden,
            "layers": jnp.stack(layers)}


def _params(model: Decoder) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def magnitude_scores(model: Decoder) -> dict:
    """sqrt(Σ W²) over each structure's weights; needs no data."""
    squares = jax.tree_util.tree_map(lambda w: jnp.square(w.astype(F32)), _params(model))
    return jax.tree_util.tree_map(jnp.sqrt, group_sums(squares, model.config))


@functools.partial(jax.jit, static_argnums=0)
def _taylor_batch(graphdef, state, tokens, mask):
    def loss(params):
        model = nnx.merge(graphdef, params)
        total, count = next_token_loss(model, tokens, mask)
        return total / jnp.maximum(count, 1.0)

    grads = jax.grad(loss)(state)
    gw = jax.tree_util.tree_map(lambda g, w: g.astype(F32) * w.astype(F32), grads, state)
    model = nnx.merge(graphdef, state)
    return group_sums(nnx.to_pure_dict(gw), model.config)


def taylor_scores(model: Decoder, batches: Iterable) -> dict:
    """First-order Taylor |Σ_batches Σ_group g·W| (one backward pass per batch)."""
    graphdef, state = nnx.split(model)
    total = None
    for tokens, mask in batches:
        total = _add(total, _taylor_batch(graphdef, state, tokens, mask.astype(bool)))
    if total is None:
        raise ValueError("no calibration batches given; pass at least one (tokens, mask) batch")
    return jax.tree_util.tree_map(jnp.abs, total)


IMPORTANCE = ("activation", "magnitude", "taylor")
DEPTH = ("block", "skip_loss", "contiguous")


def compute_scores(model: Decoder, batches, importance: str = "activation",
                   depth: str = "block") -> dict:
    """Width scores by `importance`, layer scores by `depth`.

    depth: block = 1 − cos(x_in, x_out) (ShortGPT); skip_loss = loss increase when the layer
    is skipped; contiguous = keep `layers` as block importance but also return
    `block_distance` so a contiguous block can be dropped (Gromov et al.).
    """
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; choose one of {IMPORTANCE}")
    if depth not in DEPTH:
        raise ValueError(f"unknown depth importance {depth!r}; choose one of {DEPTH}")
    batches = list(batches)
    act = activation_scores(model, batches)
    if importance == "magnitude":
        scores = magnitude_scores(model)
    elif importance == "taylor":
        scores = taylor_scores(model, batches)
    else:
        scores = dict(act)
    scores["layers"] = act["layers"]
    scores["block_distance"] = act["block_distance"]
    if depth == "skip_loss":
        scores["layers"] = layer_skip_scores(model, batches)
    return scores
