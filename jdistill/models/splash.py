"""Attention through JAX's Pallas splash kernel (the TPU flash-attention path).

Splash attention is blockwise: it never forms the [B, H, T, S] scores, skips blocks the
causal / window mask removes, and handles GQA itself (several query heads per KV head).
It takes the structure of the mask as a static mask object (causal, or causal within a
sliding window) and padding and packed documents as segment ids: a query attends to the
keys of its own segment only. Off a TPU it runs in Pallas' interpret mode (slow, exact:
what the CPU tests check).

Pallas kernels cannot be partitioned by XLA, so on several devices the kernel runs under
`shard_map` on the mesh set by `jax.set_mesh` (the trainer sets it): each device runs it
on its batch rows and, when the tensor axis divides both head counts, its heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jdistill import sharding as sharding_lib

BLOCKS = (512, 256, 128)  # the kernel's tile sizes tried, largest first; 128 is the minimum
PAD_SEGMENT = jnp.iinfo(jnp.int32).min  # padding's segment id: no real document has it


def segment_ids(attention_mask, documents=None):
    """[B, T] int32: which keys a query may see besides causality — padding is one segment,
    real tokens another (or, in packed rows, one segment per document)."""
    if documents is None:
        return attention_mask.astype(jnp.int32)
    return jnp.where(attention_mask, documents.astype(jnp.int32), PAD_SEGMENT)


def fits(seq_len: int) -> bool:
    """Whether the kernel's tiles divide the sequence (else the caller uses XLA)."""
    return seq_len % BLOCKS[-1] == 0


def usable() -> bool:
    """One device, or a mesh set to shard_map over; several devices and no mesh would ask
    XLA to partition the kernel, which it cannot."""
    return jax.device_count() == 1 or not jax.sharding.get_abstract_mesh().empty


def attention(q, k, v, segments, sliding_window=None):
    """Causal GQA attention. q [B,T,H,hd], k/v [B,T,KV,hd], segments [B,T] (`segment_ids`);
    the same result as `decoder.attend` in every row of a real token (a padding query sees
    the padding before it instead of nothing: nothing reads those rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    run = functools.partial(_local, sliding_window=sliding_window)
    if mesh.empty:
        return run(q, k, v, segments)
    # the rules table's layout of each operand; heads split only where both counts divide,
    # or a device's query heads would not be the ones its KV heads serve
    q_spec = sharding_lib.spec_for(("batch", None, "heads", None), q.shape, mesh)
    kv_spec = sharding_lib.spec_for(("batch", None, "kv_heads", None), k.shape, mesh)
    spec = q_spec if q_spec == kv_spec else P(q_spec[0], None, None, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)),
                         out_specs=spec, check_vma=False)(q, k, v, segments)


def _local(q, k, v, segments, *, sliding_window):
    """One device's rows and heads: the kernel vmapped over the batch, heads first."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    t, h, hd = q.shape[1], q.shape[2], q.shape[3]
    block = next(s for s in BLOCKS if t % s == 0)
    one = (sm.CausalMask((t, t)) if sliding_window is None
           else sm.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * h), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=jax.default_backend() != "tpu")
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B,T,H,hd] <-> [B,H,T,hd]
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(hd ** -0.5, q.dtype)), heads_first(k),
                           heads_first(v), sk.SegmentIds(segments, segments))
    return heads_first(out)
