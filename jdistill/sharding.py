"""Device mesh, the logical-axis rules table, and sharded placement of params and batches.

Every parameter leaf name has logical axis names (`PARAM_AXES`); one rules table (`RULES`)
maps logical axes to mesh axes. A dimension that the mesh axes do not divide is replicated
rather than failing, so one rules table serves tiny test models and 8-way meshes alike.

The mesh uses `AxisType.Auto` on purpose: we annotate parameters, batches and outputs and
let XLA propagate shardings through the forward; explicit axis types would require
sharding-in-types annotations on every intermediate.
"""

from __future__ import annotations

import math
import os

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# leaf parameter name -> logical axis per dimension
PARAM_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "input_layernorm": ("norm",),
    "post_attention_layernorm": ("norm",),
    "norm": ("norm",),
}

# logical axis -> mesh axes (FSDP shards the model dim, tensor parallelism the wide dims)
RULES = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "norm": (),
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 (the rest)."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs "
                         f"{math.prod(sizes)} devices but {len(devices)} are available; "
                         "make the product equal the device count or use -1 for one axis")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def spec_for(logical: tuple, shape: tuple, mesh: Mesh, rules: dict = RULES) -> P:
    """PartitionSpec for one array: each dim takes its rule's mesh axes if they divide it."""
    used, spec = set(), []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in rules.get(name, ()) if a in mesh.shape and a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def path_names(path) -> tuple:
    """A jax key path -> tuple of plain names, dropping the Variable's `.value` attribute."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
    return tuple(out)


def logical_axes(path) -> tuple:
    leaf = path_names(path)[-1]
    if leaf not in PARAM_AXES:
        raise KeyError(f"parameter {leaf!r} has no logical axes; add it to sharding.PARAM_AXES")
    return PARAM_AXES[leaf]


def param_shardings(state, mesh: Mesh, rules: dict = RULES) -> list[NamedSharding]:
    """NamedShardings for the leaves of an nnx.State (flattened leaf order)."""
    return [NamedSharding(mesh, spec_for(logical_axes(p), leaf.shape, mesh, rules))
            for p, leaf in jax.tree_util.tree_leaves_with_path(state)]


def state_shardings(state, mesh: Mesh, rules: dict = RULES):
    """NamedShardings with the same tree structure as `state`."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state),
                                        param_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays: the leading axis over the batch mesh axes, the rest replicated."""
    axes = tuple(a for a in RULES["batch"] if a in mesh.shape)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def shard_state(state, mesh: Mesh, rules: dict = RULES):
    return jax.device_put(state, state_shardings(state, mesh, rules))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Joins a multi-process run; a no-op (False) for a single process.

    With `coordinator` ('host:port') the run is set up explicitly (every process passes the
    same coordinator and num_processes and its own process_id). Without it, the environment
    decides: JAX_COORDINATOR_ADDRESS, or a cluster JAX auto-detects (SLURM, TPU pod, ...)
    when JDISTILL_DISTRIBUTED=1. CPU processes use gloo collectives.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator is None and os.environ.get("JDISTILL_DISTRIBUTED") != "1":
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def shard_batch(array, mesh: Mesh):
    """Places a batch-major array on the mesh: split over the batch axes when they divide its
    leading dimension, replicated otherwise (e.g. a short last batch)."""
    sharding = batch_sharding(mesh, array.ndim)
    if array.shape[0] % math.prod(mesh.shape[a] for a in RULES["batch"] if a in mesh.shape):
        sharding = NamedSharding(mesh, P())
    return jax.device_put(array, sharding)
