"""LoRA adapters as pure functions on parameter state pytrees (Hu et al. 2021, "LoRA").

A frozen kernel ``W`` with input axes ``in...`` and output axes ``out...`` gets the low-rank
update ``W' = W + (alpha / r) * A @ B`` with ``A: [in..., r]`` and ``B: [r, out...]``
(``B`` starts at zero so the adapted model starts equal to the base).  Everything is
functional:

    lora = init_lora(params, r"self_attn\\.(q|v)_proj|mlp\\.", rank=8, alpha=16, rng=key)
    def loss_fn(lora, params, batch):             # grads flow to `lora` only
        merged = apply_lora(params, lora)
        return loss(nnx.merge(graphdef, merged, rest), batch)
    opt_state = optax.adam(1e-4).init(lora)        # the optimizer sees adapter arrays only

and for export ``merge_into_model(model, lora)`` (then ``save_pretrained`` as usual): the merged
model's weights are exactly the ``apply_lora`` weights the training step used.

Kernel layouts (jdistill.models.decoder): the *first* axis is the input for ``q_proj``/``k_proj``/
``v_proj`` ``[D, H, hd]`` and the MLP ``[D, F]`` / ``[F, D]`` kernels; ``o_proj`` ``[H, hd, D]``
has two input axes.  Other layouts can be given with ``in_ndim``.

Dropout: everything here is the merged-weight formulation (``x @ W'``). Classic LoRA dropout
draws a fresh mask per token on the adapter input (``dropout(x) @ A @ B``), which cannot be
merged into one weight. ``apply_lora(..., dropout=p, rng=key)`` instead draws one inverted-
dropout mask per step over each adapter's *input features* and folds it into ``A``
(``(x * m) @ A == x @ (m[:, None] * A)``): the same regulariser on the adapter path, with the
mask shared by the tokens of a step rather than drawn per token.
"""

from __future__ import annotations

import math
import re

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LoraState", "init_lora", "apply_lora", "lora_delta", "merge_into_model",
           "lora_param_count"]


@flax.struct.dataclass
class LoraState:
    """Adapters: ``adapters[path] = {"a": [in..., r], "b": [r, out...]}`` (the only leaves).

    ``scale`` (= alpha / rank) and ``in_ndim`` are static metadata, so ``optax`` and
    ``jax.grad`` see the adapter arrays only.
    """

    adapters: dict
    scale: float = flax.struct.field(pytree_node=False)
    in_ndim: tuple = flax.struct.field(pytree_node=False)  # ((path, n_in_axes), ...)


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":  # nnx Variable payload
        parts = parts[:-1]
    return ".".join(parts)


def _default_in_ndim(path: str, ndim: int) -> int:
    return 2 if path.split(".")[-1] == "o_proj" and ndim == 3 else 1


def init_lora(params, targets_regex: str, rank: int, alpha: float, rng, *, in_ndim=None,
              dtype=jnp.float32) -> LoraState:
    """Creates adapters for every kernel whose dotted path matches ``targets_regex``.

    Args:
      params: a parameter pytree, e.g. ``nnx.state(model, nnx.Param)``; paths are dotted, like
        ``layers.3.self_attn.q_proj`` (matched with ``re.search``).  Only arrays with >= 2 dims
        are eligible (norm scales and biases never match).
      targets_regex: e.g. ``r"self_attn\\.(q|k|v|o)_proj$"`` or ``r"mlp\\.(gate|up|down)_proj$"``.
      rank: r >= 1.
      alpha: the update is scaled by ``alpha / rank``.
      rng: PRNG key; ``A`` ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default), ``B = 0``.
      in_ndim: optional ``{path_regex: n}`` overriding how many leading axes are inputs.
      dtype: adapter dtype (f32 by default, also for bf16 bases).

    Returns:
      a :class:`LoraState`.  Raises ``ValueError`` if nothing matches.
    """
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be a positive int, got {rank}")
    pattern = re.compile(targets_regex)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    adapters, ndims = {}, []
    keys = jax.random.split(rng, max(len(leaves), 1))
    for key, (path, w) in zip(keys, leaves):
        name = _path_str(path)
        if w.ndim < 2 or not pattern.search(name):
            continue
        n_in = _default_in_ndim(name, w.ndim)
        for pat, n in (in_ndim or {}).items():
            if re.search(pat, name):
                n_in = n
        if not 1 <= n_in < w.ndim:
            raise ValueError(f"{name}: in_ndim {n_in} invalid for shape {w.shape}")
        in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        adapters[name] = {
            "a": jax.random.uniform(key, in_shape + (rank,), dtype, -bound, bound),
            "b": jnp.zeros((rank,) + out_shape, dtype),
        }
        ndims.append((name, n_in))
    if not adapters:
        raise ValueError(f"no parameter path matches {targets_regex!r}")
    return LoraState(adapters=adapters, scale=float(alpha) / rank, in_ndim=tuple(ndims))


def lora_delta(lora: LoraState, name: str, input_mask=None):
    """The dense update ``scale * A @ B`` for one kernel, shaped like the kernel (f32).
    ``input_mask`` (shaped like A's input axes) scales A's input rows (dropout)."""
    a, b = lora.adapters[name]["a"], lora.adapters[name]["b"]
    if input_mask is not None:
        a = a * input_mask[..., None].astype(a.dtype)
    r = a.shape[-1]
    in_shape, out_shape = a.shape[:-1], b.shape[1:]
    delta = jnp.dot(a.reshape(-1, r).astype(jnp.float32), b.reshape(r, -1).astype(jnp.float32))
    return (lora.scale * delta).reshape(in_shape + out_shape)


def apply_lora(params, lora: LoraState, *, dropout: float = 0.0, rng=None):
    """Returns ``params`` with ``W + scale * A @ B`` at every adapted path (a new pytree).

    Pure: ``params`` is not modified.  Differentiable in ``lora`` (and ``params``; take the
    gradient w.r.t. ``lora`` only to keep the base frozen).  The merged kernel keeps the base
    dtype (the add is done in f32 then cast).  With ``dropout > 0`` (needs ``rng``), each
    adapter's input features are dropped with probability ``dropout`` (one mask per call,
    kept ones scaled by 1 / (1 - dropout); see the module docstring).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout > 0 and rng is None:
        raise ValueError("dropout > 0 needs an rng key")
    seen = set()
    names = sorted(lora.adapters)

    def input_mask(name):
        if dropout == 0:
            return None
        key = jax.random.fold_in(rng, names.index(name))
        shape = lora.adapters[name]["a"].shape[:-1]
        return jax.random.bernoulli(key, 1.0 - dropout, shape) / (1.0 - dropout)

    def merge(path, w):
        name = _path_str(path)
        if name not in lora.adapters:
            return w
        seen.add(name)
        delta = lora_delta(lora, name, input_mask(name))
        if delta.shape != w.shape:
            raise ValueError(f"{name}: adapter shape {delta.shape} != kernel {w.shape}")
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    out = jax.tree_util.tree_map_with_path(merge, params)
    missing = set(lora.adapters) - seen
    if missing:
        raise ValueError(f"adapters without a base kernel: {sorted(missing)}")
    return out


def merge_into_model(model: nnx.Module, lora: LoraState) -> nnx.Module:
    """A new model with the adapters merged into its ``nnx.Param`` kernels (for export).

    The input model is left unchanged; save the result with ``save_pretrained``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, apply_lora(params, lora), rest)


def lora_param_count(lora: LoraState) -> int:
    """Number of trainable adapter parameters."""
    return sum(x.size for x in jax.tree_util.tree_leaves(lora))
