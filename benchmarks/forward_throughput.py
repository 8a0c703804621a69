"""Forward tokens/s: jdistill (JAX, jitted) vs transformers PyTorch, same weights, same batch.

  python benchmarks/forward_throughput.py [--batch=8 --length=256 --repeats=5]

Prints the ratio jdistill / torch measured in one process. Needs the `test` extra (torch).
"""

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jdistill
from jdistill.models.decoder import jit_forward


def best_time(fn, repeats):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    # SmolLM2-135M's shape with fewer layers: a small model of the family we default to.
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=6, num_attention_heads=9,
                                   num_key_value_heads=3, tie_word_embeddings=True,
                                   rope_theta=100000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.length))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = jdistill.load_pretrained(d, dtype="float32")
    forward, state = jit_forward(ours)
    tokens, mask = jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)
    t_jax = best_time(lambda: forward(state, tokens, mask).block_until_ready(), args.repeats)
    tids = torch.tensor(ids)
    with torch.inference_mode():
        t_torch = best_time(lambda: hf(input_ids=tids), args.repeats)
    n = ids.size
    print(f"model: Llama {cfg.num_hidden_layers} layers x hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}, {hf.num_parameters():,} params, float32; batch {args.batch} x "
          f"{args.length}; {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
    print(f"jdistill (jax.jit)      {n / t_jax:10,.0f} tokens/s")
    print(f"transformers (PyTorch)  {n / t_torch:10,.0f} tokens/s")
    print(f"ratio jdistill / torch  {t_torch / t_jax:10.2f}")


if __name__ == "__main__":
    main()
