"""Parameter + optimizer bytes per device, and distill-step time, for several mesh shapes.

  python benchmarks/mesh_memory.py [--layers=8] [--batch=8] [--seq=64] [--steps=2]

Runs on 8 simulated CPU devices (sets XLA_FLAGS itself). A random Llama-shaped student
(hidden 1024, ffn 2816, 16 heads / 8 KV heads, vocab 32000) is trained with AdamW under the
blended distillation loss, the teacher being a second model of the same size. For each mesh:
the bytes of params + AdamW moments held by device 0 and the most any device holds (summed
over `addressable_shards`), the teacher's bytes per device, XLA's temp buffer estimate for
the compiled step, and the median wall time of --steps steps after compilation. Prints a
markdown table (and one JSON line per mesh).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jdistill  # noqa: E402
from jdistill import sharding
from jdistill.data import io as data
from jdistill.distill import train  # noqa: E402
from jdistill.models.config import ModelConfig  # noqa: E402

MESHES = [("(1)", dict(data=1, fsdp=1, tensor=1), 1),
          ("(fsdp=2)", dict(data=1, fsdp=2, tensor=1), 2),
          ("(fsdp=4)", dict(data=1, fsdp=4, tensor=1), 4),
          ("(fsdp=8)", dict(data=1, fsdp=8, tensor=1), 8),
          ("(data=2, fsdp=2, tensor=2)", dict(data=2, fsdp=2, tensor=2), 8)]
MB = 2**20


def per_device_bytes(tree) -> dict:
    """device -> bytes of the shards of `tree`'s arrays that live on it."""
    out = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def random_rows(n, seq, vocab, seed=0):
    """Examples in `data.Batcher`'s form: a prompt, a trace and an answer segment."""
    rng = np.random.default_rng(seed)
    counts = [seq // 4, seq // 2, seq - seq // 4 - seq // 2 + 1]  # seq + 1 tokens
    segs = np.repeat(np.array([0, 1, 2], np.int32), counts)
    return [(rng.integers(3, vocab, len(segs)).astype(np.int32), segs) for _ in range(n)]


def measure(name, sizes, n_dev, cfg, student, teacher, args):
    mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:n_dev])
    dcfg = train.DistillConfig(steps=1000, format="blended", learning_rate=1e-4)
    s_graphdef, s_state = nnx.split(student)
    student = nnx.merge(s_graphdef, sharding.shard_state(s_state, mesh))
    t_params = train.pure_params(teacher)
    state, frozen, t_params, state_sh = train._place(student, t_params, mesh, dcfg)
    del student
    replicated = sharding.NamedSharding(mesh, sharding.P())
    step = jax.jit(train.make_step(s_graphdef, nnx.split(teacher)[0], dcfg), donate_argnums=0,
                   out_shardings=(state_sh, replicated))
    batcher = data.Batcher(random_rows(64, args.seq, cfg.vocab_size), batch_size=args.batch,
                           seq_len=args.seq)
    load, _ = train._batch_loader(batcher, mesh)
    params = per_device_bytes((state.params, state.opt_state))
    teach = per_device_bytes(t_params)
    d0 = jax.devices()[0]
    compiled = step.lower(state, frozen, t_params, load(0)).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    times = []
    for i in range(args.steps + 1):  # the first call also pays dispatch warm-up
        batch = load(i)
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, t_params, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    row = {"mesh": name, "devices": n_dev, "param_opt_mb_device0": params[d0] / MB,
           "param_opt_mb_max": max(params.values()) / MB,
           "param_opt_mb_total": sum(params.values()) / MB,
           "teacher_mb_max": max(teach.values()) / MB,
           "temp_mb_device": None if temp is None else temp / MB,
           "step_s": statistics.median(times[1:]), "loss": float(metrics["loss"])}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    cfg = ModelConfig(family="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      num_layers=args.layers, num_heads=16, num_kv_heads=8, head_dim=64)
    student = jdistill.init_model(cfg, seed=0)
    teacher = jdistill.init_model(cfg, seed=1)
    n = cfg.num_params()
    print(f"model: {n / 1e6:.1f}M params = {4 * n / MB:.0f} MiB float32 (params + AdamW "
          f"= {12 * n / MB:.0f} MiB); batch {args.batch} x {args.seq} tokens; "
          f"{os.cpu_count()} CPU cores, {jax.device_count()} simulated devices", flush=True)
    rows = []
    for name, sizes, n_dev in MESHES:
        rows.append(measure(name, sizes, n_dev, cfg, student, teacher, args))
    print("\n| mesh | devices | params + AdamW per device (device 0) | max over devices | "
          "teacher per device | XLA temp per device | step time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        temp = "n/a" if r["temp_mb_device"] is None else f"{r['temp_mb_device']:,.0f} MiB"
        print(f"| {r['mesh']} | {r['devices']} | {r['param_opt_mb_device0']:,.0f} MiB | "
              f"{r['param_opt_mb_max']:,.0f} MiB | {r['teacher_mb_max']:,.0f} MiB | {temp} | "
              f"{r['step_s']:.2f} s |")


if __name__ == "__main__":
    main()
