"""Flags every main on a device mesh shares: multi-process set-up and the mesh."""

import dataclasses

from absl import flags

# parameter dtypes a checkpoint loads in (checkpoints.hf.DTYPES; names here, so that defining
# the flag imports no JAX)
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def define_dtype(default=None, help: str = "parameter dtype (default: as stored)",
                 choices=PARAM_DTYPES):
    """The one --dtype flag of the mains that load a model."""
    return flags.DEFINE_enum("dtype", default, list(choices), help)


COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run, or 'auto' where JAX "
    "detects the cluster (SLURM srun, Open MPI, Cloud TPU pod slice); unset: single process "
    "unless JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), "
    "JDISTILL_DISTRIBUTED=1 or an srun step of several tasks says otherwise")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a multi-process run")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0-based")
HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "seconds a process may go silent before the run is declared "
    "dead and every process exits (multi-process only)")
LOGGERS = flags.DEFINE_list(
    "loggers", ["tensorboard"], "experiment loggers: tensorboard (needs tensorboardX; "
    "skipped without it), wandb (needs wandb; WANDB_PROJECT, WANDB_MODE=offline)")
MESH = flags.DEFINE_string(
    "mesh", "data=1,fsdp=-1,tensor=1",
    "device mesh sizes over all devices of all processes; -1 takes the remaining devices "
    "(fsdp shards params and batch, tensor shards heads/MLP/vocab, data shards only the batch)")


def setup():
    """Checks --loggers, joins a multi-process run if asked to, then builds the mesh from
    --mesh."""
    from jdistill import sharding
    from jdistill.utils import tracking

    tracking.check_backends(LOGGERS.value)

    try:
        joined = sharding.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value,
                                                 PROCESS_ID.value,
                                                 heartbeat_timeout_s=HEARTBEAT_TIMEOUT.value)
    except ValueError as e:
        raise ValueError(f"multi-process set-up: {e}") from None
    if joined:
        import jax

        # said up front because a dead peer may end this process from JAX's C++ side
        print(f"process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices. If any process "
              f"dies, the others stop within --heartbeat_timeout={HEARTBEAT_TIMEOUT.value}s; "
              "rerun every process with the same command to resume from the last checkpoint.",
              flush=True)
    try:
        sizes = {k: int(v) for k, v in (kv.split("=") for kv in MESH.value.split(","))}
        return sharding.make_mesh(**sizes)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--mesh={MESH.value!r}: {e}; expected e.g. data=2,fsdp=2,tensor=2") \
            from None


# ------------------------------------------------------------ flags from config dataclasses


_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_config_flags(cls, *, names=None, defaults=None, skip=()) -> dict:
    """One flag per field of the dataclass `cls` that has a help text (field metadata
    "help"): the flag's name is the field's (or `names[field]`), its default the field's (or
    `defaults[field]`), an enum when the field lists "choices". Returns {field: FlagHolder};
    `config_values` reads them back. The config is the one home of each setting's
    default and meaning; mains do not re-list them."""
    names, defaults = names or {}, defaults or {}
    holders = {}
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help")
        if help_text is None or f.name in skip:
            continue
        default = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        name = names.get(f.name, f.name)
        choices = f.metadata.get("choices")
        if choices is not None:
            holders[f.name] = flags.DEFINE_enum(name, default, list(choices), help_text)
        else:
            kind = type(default) if default is not None else {"int": int, "float": float,
                                                              "str": str, "bool": bool}[f.type]
            holders[f.name] = _DEFINE[kind](name, default, help_text)
    return holders


def config_values(holders: dict) -> dict:
    """{field: parsed flag value} of `define_config_flags`'s holders."""
    return {name: holder.value for name, holder in holders.items()}
