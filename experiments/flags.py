"""Flags every main shares: multi-process set-up and the device mesh."""

from absl import flags

COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run (else single process, "
    "or JAX_COORDINATOR_ADDRESS / JDISTILL_DISTRIBUTED=1 from the environment)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a multi-process run")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0-based")
MESH = flags.DEFINE_string(
    "mesh", "data=1,fsdp=-1,tensor=1",
    "device mesh sizes; -1 takes the remaining devices (fsdp shards params and batch, "
    "tensor shards heads/MLP/vocab, data shards only the batch)")


def setup():
    """Joins a multi-process run if asked to, then builds the mesh from --mesh."""
    from jdistill import sharding

    sharding.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    try:
        sizes = {k: int(v) for k, v in (kv.split("=") for kv in MESH.value.split(","))}
        return sharding.make_mesh(**sizes)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--mesh={MESH.value!r}: {e}; expected e.g. data=2,fsdp=2,tensor=2")
