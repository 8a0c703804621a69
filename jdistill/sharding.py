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
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
    return [NamedSharding(mesh, spec_for(_stacked(logical_axes(p), leaf), leaf.shape, mesh,
                                         rules))
            for p, leaf in jax.tree_util.tree_leaves_with_path(state)]


def _stacked(axes: tuple, leaf) -> tuple:
    """Layers stacked on a leading axis (`train.stack_layers`) keep that axis unsharded."""
    return ("layers", *axes) if len(leaf.shape) == len(axes) + 1 else axes


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


def distributed_settings(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, env=None) -> dict | None:
    """The arguments for `jax.distributed.initialize`, or None for a single-process run.

    Explicit arguments win; then the environment: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES,
    JAX_PROCESS_ID), or `coordinator='auto'` / JDISTILL_DISTRIBUTED=1 / an `srun` job step of
    several tasks (SLURM_STEP_NUM_TASKS > 1), where JAX detects the cluster (SLURM, Open MPI,
    Cloud TPU pod slices, Kubernetes) and fills in what is missing.
    """
    env = os.environ if env is None else env
    auto = (coordinator == "auto" or env.get("JDISTILL_DISTRIBUTED") == "1"
            or int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1)
    if coordinator == "auto":
        coordinator = None
    elif coordinator is None:
        coordinator = env.get("JAX_COORDINATOR_ADDRESS")
    if coordinator is None and not auto and num_processes is None and process_id is None:
        return None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is not None and None in (num_processes, process_id):
        raise ValueError(f"coordinator {coordinator} given without the process count and index; "
                         "pass --num_processes=N --process_id=i (or set JAX_NUM_PROCESSES and "
                         "JAX_PROCESS_ID), or --coordinator=auto on a cluster JAX detects")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, heartbeat_timeout_s: int = 100,
                           initialization_timeout_s: int = 300) -> bool:
    """Joins a multi-process run; a no-op (False) for a single process.

    Every process passes the same coordinator ('host:port' of process 0) and num_processes
    and its own process_id, or lets the environment decide (`distributed_settings`). CPU
    processes use gloo collectives. A process that stops answering for `heartbeat_timeout_s`
    takes the whole run down (JAX's coordination service then ends every process), so a
    dead peer never leaves the others hanging in a collective.
    """
    settings = distributed_settings(coordinator, num_processes, process_id)
    if settings is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    jax.distributed.initialize(**settings, heartbeat_timeout_seconds=heartbeat_timeout_s,
                               initialization_timeout=initialization_timeout_s,
                               # the others wait at exit while process 0 writes the
                               # results (and imports TensorBoard: seconds under load); a
                               # dead peer ends the run by heartbeat, not by this timeout
                               shutdown_timeout_seconds=max(heartbeat_timeout_s, 120))
    return True


def is_writer() -> bool:
    """Whether this process writes shared files (results rows, plots, exports): process 0."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """The whole array as numpy on every process (collective for multi-process shardings:
    every process must call it, in the same order)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(sharding, global_shape: tuple, axis: int = 0) -> np.ndarray:
    """Sorted indices along `axis` that this process's devices hold (what it must load)."""
    n = global_shape[axis]
    rows = set()
    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        start, stop, _ = idx[axis].indices(n)
        rows.update(range(start, stop))
    return np.array(sorted(rows), np.int64)


def from_local_rows(local: np.ndarray, rows: np.ndarray, sharding, global_shape: tuple,
                    axis: int = 0):
    """A global array from this process's `rows` (along `axis`) of it, as `local_rows` gave.

    Each process passes only its own rows; nothing else of the global array exists on it.
    """
    where = {int(r): i for i, r in enumerate(rows)}

    def piece(idx):
        start, stop, _ = idx[axis].indices(global_shape[axis])
        first, last = where.get(start), where.get(stop - 1)
        if first is None or last is None or last - first != stop - 1 - start:
            raise ValueError(f"rows {start}:{stop} of axis {axis} are not in this process's "
                             "local data; build it from the rows sharding.local_rows gives")
        at = list(idx)
        at[axis] = slice(first, last + 1)
        return local[tuple(at)]

    return jax.make_array_from_callback(tuple(global_shape), sharding, piece)


def shard_batch(array, mesh: Mesh):
    """Places a batch-major host array on the mesh: split over the batch axes when they divide
    its leading dimension, replicated otherwise (e.g. a short last batch). In a multi-process
    run every process passes the same host array and transfers only its own rows."""
    array = np.asarray(array)
    sharding = batch_sharding(mesh, array.ndim)
    if array.shape[0] % math.prod(mesh.shape[a] for a in RULES["batch"] if a in mesh.shape):
        sharding = NamedSharding(mesh, P())
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])
