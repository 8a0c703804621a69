"""Compiled temporary memory of distillation loss + gradient: naive vs fused/chunked.

Compiles (never runs) ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` on abstract
``jax.ShapeDtypeStruct`` inputs, so nothing is allocated, and reports XLA's
``memory_analysis().temp_size_in_bytes`` for

* naive:   ``forward_kl(student_hidden @ W_s, teacher_hidden @ W_t, mask)`` — whole
           ``[B*T, V]`` f32 logits for student and teacher;
* chunked: ``fused_forward_kl(student_hidden, W_s, teacher_hidden, W_t, mask)``.

Gradients are taken w.r.t. the student hidden states and the student lm-head.

    PYTHONPATH=. python benchmarks/loss_memory.py        # B=8, B*T=8192, D=1024, V=151936
    PYTHONPATH=. python benchmarks/loss_memory.py --tokens 2048 --vocab 32768 --hidden 256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jdistill.distill.fused import fused_forward_kl
from jdistill.distill.losses import forward_kl


def temp_bytes(tokens, hidden, vocab, *, chunked, batch=8, chunk_size=512,
               dtype=jnp.float32, teacher_hidden=None):
    """Compiled temp bytes of value_and_grad of the loss; ``tokens`` = B*T, B = ``batch``."""
    if tokens % batch:
        raise ValueError("tokens must be a multiple of batch")
    teacher_hidden = teacher_hidden or hidden
    b, t = batch, tokens // batch
    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, hidden), dtype), sds((hidden, vocab), dtype),
            sds((b, t, teacher_hidden), dtype), sds((teacher_hidden, vocab), dtype),
            sds((b, t), jnp.float32))

    if chunked:
        def loss(hs, ws, ht, wt, mask):
            return fused_forward_kl(hs, ws, ht, wt, mask, chunk_size=chunk_size)[0]
    else:
        def loss(hs, ws, ht, wt, mask):
            s = jnp.dot(hs, ws, preferred_element_type=jnp.float32)
            t = jnp.dot(ht, wt, preferred_element_type=jnp.float32)
            return forward_kl(s, t, mask)[0]

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="B*T")
    ap.add_argument("--batch", type=int, default=8, help="B (T = tokens / B)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--bf16", action="store_true", help="bf16 hidden states and lm-heads")
    args = ap.parse_args()
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    print(f"backend {jax.default_backend()}, B={args.batch}, B*T={args.tokens}, "
          f"D={args.hidden}, V={args.vocab}, chunk {args.chunk_size} tokens, "
          f"inputs {jnp.dtype(dtype).name}")
    t0 = time.perf_counter()
    naive = temp_bytes(args.tokens, args.hidden, args.vocab, chunked=False, batch=args.batch,
                       dtype=dtype)
    t1 = time.perf_counter()
    chunked = temp_bytes(args.tokens, args.hidden, args.vocab, chunked=True, batch=args.batch,
                         chunk_size=args.chunk_size, dtype=dtype)
    t2 = time.perf_counter()
    print(f"naive   temp bytes: {naive:>15,d}  ({naive / 2**30:.2f} GiB, compile {t1 - t0:.1f}s)")
    print(f"chunked temp bytes: {chunked:>15,d}  ({chunked / 2**30:.2f} GiB, "
          f"compile {t2 - t1:.1f}s)")
    print(f"ratio chunked/naive: {chunked / naive:.4f}")


if __name__ == "__main__":
    main()
