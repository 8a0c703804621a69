"""Top-p sampling cost per decode step: `generate.nucleus` (bisection) vs a vocabulary sort.

The baseline is the sort-based nucleus the sampler used before (sorted softmax, cumulative
mass, threshold), timed in the same process on the same logits; both are checked to keep
the same tokens. Then one whole `generate` call on the SmolLM2-135M shape (random
weights), greedy and sampled, per decode step.

    PYTHONPATH=. python benchmarks/sampling.py                 # batch 16, vocab 49152
    PYTHONPATH=. python benchmarks/sampling.py --batch 8 --skip_generate
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def sorted_nucleus(logits, top_p):
    """The baseline: the smallest prefix of the sorted distribution with mass >= top_p."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                        keepdims=True)
    return logits >= threshold


def best_of(fn, *args, repeats=10):
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    from jdistill.models import decoder
    from jdistill.models import generate as gen
    from jdistill.models.config import ModelConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--skip_generate", action="store_true")
    a = ap.parse_args()

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(a.batch, a.vocab)) * 3 / 0.6,
                         jnp.float32)
    ours = jax.jit(lambda x: gen.nucleus(x, a.top_p))
    base = jax.jit(lambda x: sorted_nucleus(x, a.top_p))
    same = bool(jnp.all(ours(logits) == base(logits)))
    t_ours, t_base = best_of(ours, logits), best_of(base, logits)
    print(f"nucleus [{a.batch}, {a.vocab}] top_p {a.top_p}: bisection {t_ours * 1e3:.1f} ms, "
          f"sort {t_base * 1e3:.1f} ms, ratio {t_ours / t_base:.2f}; same tokens kept: {same}")
    if a.skip_generate:
        return
    c = ModelConfig(family="llama", vocab_size=a.vocab, hidden_size=576, intermediate_size=1536,
                    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                    tie_word_embeddings=True)
    model = decoder.init_model(c)
    tokens = np.random.default_rng(1).integers(0, a.vocab, (a.batch, 64))
    for name, kw in (("greedy", {}), ("sampled", dict(temperature=0.6, top_p=a.top_p))):
        def run(n, kw=kw):
            return gen.generate(model, tokens, max_new_tokens=n, **kw)
        full, prefill = best_of(run, 24, repeats=2), best_of(run, 1, repeats=2)
        print(f"generate {name}: {(full - prefill) / 23:.3f} s a decode step "
              f"(batch {a.batch}, 64-token prompts)")


if __name__ == "__main__":
    main()
