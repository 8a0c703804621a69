"""XLA:CPU options screened on the decoder's forward + backward at the real size.

  PYTHONPATH=. python benchmarks/xla_flags.py                 # every candidate, ~1 min each
  PYTHONPATH=. python benchmarks/xla_flags.py --one           # (internal) one timing

Each candidate runs in its own process (XLA_FLAGS is read once, at backend start-up): the
15-layer SmolLM2-width student (hidden 576, ffn 1536, 9 heads / 3 KV) on 8 x 512 tokens,
value_and_grad of a loss on the final hidden states (the lm-head and the fused loss are
measured elsewhere: benchmarks/loss_memory.py, experiments.benchmark), in f32 and bf16.
The baseline (no flags) runs first and last, so drift of the shared machine shows; each
line prints its median of 3 calls after a compile and its ratio to the first baseline.
A flag this jaxlib does not know makes the process fail: it is reported, not hidden.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

CANDIDATES = [
    ("baseline", ""),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("no thunk runtime", "--xla_cpu_use_thunk_runtime=false"),
    ("xnnpack", "--xla_cpu_use_xnnpack=true"),
    ("onednn", "--xla_cpu_use_onednn=true"),
    ("prefer 512-bit vectors", "--xla_cpu_prefer_vector_width=512"),
    ("baseline (again)", ""),
]


def one(dtype_name: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jdistill
    from jdistill.models.config import ModelConfig

    c = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_layers=15, num_heads=9, num_kv_heads=3, head_dim=64,
                    tie_word_embeddings=True, max_position_embeddings=2048)
    model = jdistill.init_model(c)
    graphdef, params = nnx.split(model)
    dtype = jnp.dtype(dtype_name)
    tokens = jax.random.randint(jax.random.key(0), (8, 512), 0, c.vocab_size)

    def loss(p):
        p = jax.tree_util.tree_map(lambda x: x.astype(dtype), p)
        h, _ = nnx.merge(graphdef, p).forward(tokens)
        return jnp.mean(jnp.square(h.astype(jnp.float32)))

    f = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(f(params))
    first = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params))
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times)}


def main():
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2])))
        return
    base = {}
    for dtype in ("float32", "bfloat16"):
        for name, flags in CANDIDATES:
            env = {**os.environ, "XLA_FLAGS": flags}
            p = subprocess.run([sys.executable, __file__, "--one", dtype], env=env,
                               capture_output=True, text=True)
            if p.returncode:
                last = (p.stderr.strip().splitlines() or ["?"])[-1][:120]
                print(f"{dtype:9s} {name:24s} failed: {last}", flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            base.setdefault(dtype, r["median_s"])
            print(f"{dtype:9s} {name:24s} {r['median_s']:7.2f} s  (x{r['median_s'] / base[dtype]:.2f}"
                  f" of baseline; first call {r['first_s']:.1f} s)  {flags}", flush=True)


if __name__ == "__main__":
    main()
