"""Targets (explicit dims or a compression ratio) and the masks that keep the best structures.

Compression ratio r = teacher parameters / student parameters (2.0 = half the size), counted
as `transformers` counts them (tied embeddings once). Widths stay homogeneous across layers so
the student is a standard config that exports to Hugging Face.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jdistill.models.config import ModelConfig

AXES = ("hidden", "mlp", "heads", "layers")


@dataclasses.dataclass(frozen=True)
class Dims:
    """Target sizes: hidden (residual width), ffn, query heads, KV heads, layers."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int

    @classmethod
    def of(cls, config: ModelConfig) -> "Dims":
        return cls(config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.num_layers)

    def apply(self, config: ModelConfig) -> ModelConfig:
        return config.replace(hidden_size=self.hidden, intermediate_size=self.ffn,
                              num_heads=self.heads, num_kv_heads=self.kv_heads,
                              num_layers=self.layers)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def at_most(self, other: "Dims") -> "Dims":
        """Each axis no larger than `other`'s."""
        return Dims(*(min(a, b) for a, b in zip(dataclasses.astuple(self),
                                                dataclasses.astuple(other))))


def check_dims(config: ModelConfig, dims: Dims, *, kv_groups: bool = False) -> None:
    """Raises ValueError naming what is infeasible and what would be feasible."""
    full = Dims.of(config)
    for name in ("hidden", "ffn", "layers", "kv_heads", "heads"):
        value, limit = getattr(dims, name), getattr(full, name)
        if not 1 <= value <= limit:
            raise ValueError(f"{name}={value} is infeasible: the model has {limit}; "
                             f"choose 1..{limit}")
    if dims.heads % dims.kv_heads:
        raise ValueError(f"heads={dims.heads} is not a multiple of kv_heads={dims.kv_heads}; "
                         f"feasible heads: multiples of {dims.kv_heads} up to "
                         f"{dims.kv_heads * config.num_groups}")
    if dims.heads // dims.kv_heads > config.num_groups:
        raise ValueError(f"heads={dims.heads} with kv_heads={dims.kv_heads} needs "
                         f"{dims.heads // dims.kv_heads} query heads per KV group, the model "
                         f"has {config.num_groups}; feasible heads <= "
                         f"{dims.kv_heads * config.num_groups}")
    m = hidden_multiple(config, dims.heads)
    if dims.hidden % m:
        raise ValueError(f"hidden={dims.hidden} is infeasible for {config.family}: transformers' "
                         f"config requires hidden_size to be a multiple of num_attention_heads; "
                         f"feasible hidden: multiples of {m}")
    if dims.kv_heads < full.kv_heads and not kv_groups:
        raise ValueError(f"kv_heads={dims.kv_heads} < {full.kv_heads} removes whole KV groups; "
                         "allow it with kv_groups=True (--kv_groups), or keep "
                         f"kv_heads={full.kv_heads}")


def hidden_multiple(config: ModelConfig, heads: int) -> int:
    """transformers' LlamaConfig validates hidden_size % num_attention_heads == 0 (even with an
    explicit head_dim); the other families do not."""
    return heads if config.spec.hidden_multiple_of_heads else 1


def _dims_at(config: ModelConfig, scale: float, axes, kv_groups: bool) -> Dims:
    """Every allowed axis shrunk to `scale` of its size (at least one unit)."""
    d = Dims.of(config)

    def shrink(n):
        return max(1, int(round(scale * n)))

    heads, kv = d.heads, d.kv_heads
    if "heads" in axes:
        if kv_groups:
            kv = shrink(d.kv_heads)
            heads = kv * config.num_groups
        else:
            heads = shrink(config.num_groups) * d.kv_heads
    m = hidden_multiple(config, heads)
    hidden = max(m, int(round(scale * d.hidden / m)) * m) if "hidden" in axes else d.hidden
    return Dims(hidden=hidden,
                ffn=shrink(d.ffn) if "mlp" in axes else d.ffn,
                heads=heads, kv_heads=kv,
                layers=shrink(d.layers) if "layers" in axes else d.layers)


def _with_axis(dims: Dims, config: ModelConfig, axis: str, units: int, kv_groups: bool) -> Dims:
    if axis == "hidden":  # units of the multiple transformers requires
        return dataclasses.replace(dims, hidden=units * hidden_multiple(config, dims.heads))
    if axis == "mlp":
        return dataclasses.replace(dims, ffn=units)
    if axis == "layers":
        return dataclasses.replace(dims, layers=units)
    if kv_groups:
        return dataclasses.replace(dims, kv_heads=units, heads=units * config.num_groups)
    return dataclasses.replace(dims, heads=units * dims.kv_heads)


def _axis_range(config: ModelConfig, axis: str, kv_groups: bool, dims: Dims) -> int:
    return {"hidden": config.hidden_size // hidden_multiple(config, dims.heads),
            "mlp": config.intermediate_size,
            "layers": config.num_layers,
            "heads": config.num_kv_heads if kv_groups else config.num_groups}[axis]


def params_of(config: ModelConfig, dims: Dims) -> int:
    return dims.apply(config).num_params()


def dims_for_ratio(config: ModelConfig, ratio: float, axes, *, kv_groups: bool = False) -> Dims:
    """Homogeneous dims whose parameter count is closest to teacher_params / ratio.

    All allowed axes shrink by one common factor (found by bisection); then the allowed axis
    with the cheapest unit is set exactly, so the result is within one structural unit of the
    target.
    """
    axes = tuple(axes)
    unknown = sorted(set(axes) - set(AXES))
    if unknown or not axes:
        raise ValueError(f"axes {list(axes)} invalid; choose a non-empty subset of {list(AXES)}")
    if not ratio > 1.0:
        raise ValueError(f"compression ratio must be > 1 (teacher params / student params), "
                         f"got {ratio}; 2.0 means half the size")
    total = config.num_params()
    target = total / ratio
    smallest = params_of(config, _dims_at(config, 0.0, axes, kv_groups))
    if smallest > target:
        raise ValueError(
            f"compression {ratio} is infeasible on axes {list(axes)}: even one unit per axis "
            f"leaves {smallest:,} of {total:,} parameters (max ratio {total / smallest:.2f}); "
            "allow more axes or lower the ratio")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if params_of(config, _dims_at(config, mid, axes, kv_groups)) > target:
            hi = mid
        else:
            lo = mid
    candidates = []
    for start in (_dims_at(config, lo, axes, kv_groups), _dims_at(config, hi, axes, kv_groups)):
        candidates += [start] + [_solve_axis(config, start, axis, target, kv_groups)
                                 for axis in axes]
    feasible = [d for d in candidates if _feasible(config, d, kv_groups)]
    return min(feasible, key=lambda d: abs(params_of(config, d) - target))


def dims_within(config: ModelConfig, ratio: float, axes, within: Dims, *,
                kv_groups: bool = False) -> Dims:
    """The one shape of `ratio` (`dims_for_ratio` of the teacher `config`), kept within
    `within` (a chain's current student, which cannot grow back).

    Where that shape does not fit (at a heads step the homogeneous shrink can widen the MLP
    to make up the parameters), the overflowing axes are cut to `within` and one allowed axis
    is re-solved to the parameter target. Shrinking the student by the remaining factor
    instead rounds the coarse axes up at every step (9 heads stay 9 along a whole chain) and
    makes the hidden width pay: another shape than one-shot's, and a worse one.
    """
    shape = dims_for_ratio(config, ratio, axes, kv_groups=kv_groups)
    if shape.at_most(within) == shape:
        return shape
    start, target = shape.at_most(within), config.num_params() / ratio
    candidates = [start] + [_solve_axis(config, start, axis, target, kv_groups) for axis in axes]
    fits = [d for d in candidates
            if d.at_most(within) == d and _feasible(config, d, kv_groups)]
    if not fits:
        raise ValueError(f"no shape of ratio {ratio} on axes {list(axes)} fits within "
                         f"{within.as_dict()}; prune along more axes")
    return min(fits, key=lambda d: abs(params_of(config, d) - target))


def _solve_axis(config, start: Dims, axis: str, target: float, kv_groups: bool) -> Dims:
    """`start` with `axis` set to the size closest to `target` parameters (params are affine
    in any single axis)."""
    one = params_of(config, _with_axis(start, config, axis, 1, kv_groups))
    unit = params_of(config, _with_axis(start, config, axis, 2, kv_groups)) - one
    units = int(round((target - one) / unit)) + 1 if unit else 1
    units = min(max(units, 1), _axis_range(config, axis, kv_groups, start))
    return _with_axis(start, config, axis, units, kv_groups)


def _feasible(config, dims, kv_groups) -> bool:
    try:
        check_dims(config, dims, kv_groups=kv_groups)
        return True
    except ValueError:
        return False


def _top(scores, k: int):
    """Boolean mask of the k largest entries of a 1-D score vector (ties: lower index)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    keep = np.zeros(len(order), bool)
    keep[order[:k]] = True
    return keep


def select_masks(scores: dict, config: ModelConfig, dims: Dims, *,
                 layer_mask=None, kv_groups: bool = False) -> dict:
    """Masks keeping the highest-scoring structures for `dims`.

    scores: {heads [L,H], mlp [L,F], hidden [D], layers [L]} (higher = more important).
    GQA: each kept KV group keeps the same number of query heads (its best ones); with
    kv_groups, whole groups are ranked by the sum of their heads' scores first.
    layer_mask: an explicit [L] keep mask (e.g. a contiguous block), instead of the
    top-`dims.layers` layers by score.
    """
    check_dims(config, dims, kv_groups=kv_groups)
    full = Dims.of(config)
    g_keep = dims.heads // dims.kv_heads
    masks = {}
    if dims.hidden < full.hidden:
        masks["hidden"] = _top(scores["hidden"], dims.hidden)
    if dims.ffn < full.ffn:
        masks["mlp"] = np.stack([_top(s, dims.ffn) for s in np.asarray(scores["mlp"])])
    if dims.heads < full.heads:
        rows = []
        for s in np.asarray(scores["heads"]).reshape(config.num_layers, full.kv_heads, -1):
            groups = _top(s.sum(1), dims.kv_heads)
            rows.append(np.concatenate([_top(g, g_keep) & keep for g, keep in zip(s, groups)]))
        masks["heads"] = np.stack(rows)
    if layer_mask is not None:
        layer_mask = np.asarray(layer_mask, bool)
        if layer_mask.sum() != dims.layers:
            raise ValueError(f"layer_mask keeps {layer_mask.sum()} layers, dims ask for "
                             f"{dims.layers}")
        masks["layers"] = layer_mask
    elif dims.layers < full.layers:
        masks["layers"] = _top(scores["layers"], dims.layers)
    return {k: jnp.asarray(v) for k, v in masks.items()}


def contiguous_block_mask(block_distance, num_layers: int, drop: int):
    """Keep mask [L] dropping the `drop` consecutive layers whose input and output residual
    states are closest in angle (Gromov et al. 2024)."""
    if not 1 <= drop < num_layers:
        raise ValueError(f"can drop 1..{num_layers - 1} contiguous layers, not {drop}")
    d = np.asarray(block_distance)
    start = int(np.argmin([d[i, i + drop] for i in range(num_layers - drop + 1)]))
    keep = np.ones(num_layers, bool)
    keep[start:start + drop] = False
    return keep
