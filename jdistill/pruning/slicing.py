"""Masks -> a physically smaller dense model (fewer channels, neurons, heads, layers).

The sliced model computes exactly what the masked full model computes: masked RMSNorm
statistics are over kept channels, masked heads/neurons contribute zero, skipped layers pass
their input through (tested to 1e-5 in float32).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill import sharding as sharding_lib
from jdistill.models.decoder import Decoder, abstract_model, check_masks
from jdistill.pruning.masks import Dims


def _indices(mask, size):
    return np.arange(size) if mask is None else np.flatnonzero(np.asarray(mask))


def kept_indices(masks: dict, config) -> dict:
    """Index arrays of what stays: hidden [D'], layers [L'], and per kept layer heads [H'],
    kv [KV'] and mlp [F']. Raises if a per-layer count differs between layers or a KV group
    keeps a different number of query heads than another (the result must be homogeneous)."""
    check_masks(masks, config)
    layers = _indices(masks.get("layers"), config.num_layers)
    heads, kv, mlp = [], [], []
    for i in layers:
        h = _indices(None if "heads" not in masks else masks["heads"][i], config.num_heads)
        groups, counts = np.unique(h // config.num_groups, return_counts=True)
        if len(set(counts)) > 1:
            raise ValueError(f"layer {i} keeps {dict(zip(groups.tolist(), counts.tolist()))} "
                             "query heads per KV group; every kept group needs the same count")
        heads.append(h)
        kv.append(groups)
        mlp.append(_indices(None if "mlp" not in masks else masks["mlp"][i],
                            config.intermediate_size))
    for name, rows in (("heads", heads), ("mlp", mlp)):
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{name} masks keep different counts per layer "
                             f"({sorted({len(r) for r in rows})}); widths must be homogeneous")
    if len(layers) == 0 or len(heads[0]) == 0 or len(mlp[0]) == 0:
        raise ValueError("masks remove every layer, head or neuron; keep at least one of each")
    return {"hidden": _indices(masks.get("hidden"), config.hidden_size), "layers": layers,
            "heads": heads, "kv": kv, "mlp": mlp}


def sliced_dims(masks: dict, config) -> Dims:
    idx = kept_indices(masks, config)
    return Dims(hidden=len(idx["hidden"]), ffn=len(idx["mlp"][0]), heads=len(idx["heads"][0]),
                kv_heads=len(idx["kv"][0]), layers=len(idx["layers"]))


def _take(x, idx, axis):
    return jnp.take(x, jnp.asarray(idx), axis=axis)


def _slice_layer(p: dict, h, heads, kv, mlp) -> dict:
    at, ml = p["self_attn"], p["mlp"]
    out_at = {
        "q_proj": _take(_take(at["q_proj"], h, 0), heads, 1),
        "k_proj": _take(_take(at["k_proj"], h, 0), kv, 1),
        "v_proj": _take(_take(at["v_proj"], h, 0), kv, 1),
        "o_proj": _take(_take(at["o_proj"], heads, 0), h, 2),
    }
    if "q_bias" in at:
        out_at.update(q_bias=_take(at["q_bias"], heads, 0), k_bias=_take(at["k_bias"], kv, 0),
                      v_bias=_take(at["v_bias"], kv, 0))
    if "q_norm" in at:
        out_at.update(q_norm=at["q_norm"], k_norm=at["k_norm"])
    return {
        "input_layernorm": _take(p["input_layernorm"], h, 0),
        "post_attention_layernorm": _take(p["post_attention_layernorm"], h, 0),
        "self_attn": out_at,
        "mlp": {"gate_proj": _take(_take(ml["gate_proj"], h, 0), mlp, 1),
                "up_proj": _take(_take(ml["up_proj"], h, 0), mlp, 1),
                "down_proj": _take(_take(ml["down_proj"], mlp, 0), h, 1)},
    }


def slice_model(model: Decoder, masks: dict, *, mesh=None) -> Decoder:
    """The smaller dense model the masks describe (config updated, tied embeddings stay
    tied). With `mesh`, the sliced parameters are placed by the sharding rules."""
    config = model.config
    idx = kept_indices(masks, config)
    new_config = sliced_dims(masks, config).apply(config)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    h = idx["hidden"]
    out = {"embed_tokens": _take(p["embed_tokens"], h, 1), "norm": _take(p["norm"], h, 0),
           "layers": {j: _slice_layer(p["layers"][int(i)], h, idx["heads"][j], idx["kv"][j],
                                      idx["mlp"][j])
                      for j, i in enumerate(idx["layers"])}}
    if "lm_head" in p:
        out["lm_head"] = _take(p["lm_head"], h, 0)
    dtype = model.dtype
    abstract = abstract_model(new_config, dtype=dtype)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, out)
    if mesh is not None:
        state = sharding_lib.shard_state(state, mesh)
    student = nnx.merge(graphdef, state)
    source = getattr(model, "source_path", None)
    if source is not None:
        student.source_path = source  # so save_pretrained copies the tokenizer along
    return student

