"""Cost of importance scoring per calibration batch, as a ratio to one plain jitted forward.

  python benchmarks/pruning_cost.py [--layers=6 --batch=8 --length=128]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdistill
from jdistill.models.decoder import init_model
from jdistill.pruning import importance


def best(fn, repeats=3):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    args = p.parse_args()
    config = jdistill.ModelConfig(family="llama", vocab_size=49152, hidden_size=576,
                                  intermediate_size=1536, num_layers=args.layers, num_heads=9,
                                  num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    model = init_model(config)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.length)))
    mask = jnp.ones(tokens.shape, bool)
    forward = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask=m))
    base = best(lambda: forward(state, tokens, mask))
    rows = {
        "activation (heads, neurons, hidden, block importance)":
            lambda: importance.activation_statistics(graphdef, state, tokens, mask),
        "taylor (one forward + backward)":
            lambda: importance._taylor_batch(graphdef, state, tokens, mask),
        f"layer skip loss ({args.layers + 1} forwards)":
            lambda: importance._skip_losses(graphdef, state, tokens, mask),
    }
    print(f"SmolLM2-shaped Llama, {args.layers} layers, batch {args.batch} x {args.length}, "
          f"{jax.devices()[0].platform}; plain forward {base * 1e3:.0f} ms")
    for name, fn in rows.items():
        print(f"{name:55s} {best(fn) / base:6.2f} x forward")


if __name__ == "__main__":
    main()
