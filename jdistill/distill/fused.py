"""Distillation losses from hidden states and lm-heads, chunked over positions (no [B, T, V]).

Memory (``fused_*``): for vocabularies of ~150k the ``[B, T, V]`` f32 logits dominate memory.
The fused functions take the final hidden states and the lm-head matrices instead of logits,
and compute the per-token terms chunk by chunk (chunks of sequence positions, the whole batch
in each, about ``chunk_size`` tokens) inside a ``jax.lax.map`` whose body is wrapped in
``jax.checkpoint``: the forward pass keeps only a ``[chunk, V]`` slab of logits alive at a time
and the backward pass recomputes each chunk's logits instead of storing them (the
Liger-Kernel "fused linear" idea, done with XLA rematerialisation).  At B*T = 8192,
D = 1024, V = 151,936 (f32, loss + gradient) the compiled temporaries drop from 23.2 GiB to
0.93 GiB on XLA:CPU (4%); ``benchmarks/loss_memory.py`` measures it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

# the per-token pieces and input checks are the plain losses' own: one definition of each
from jdistill.distill.losses import (_F32, BlendWeights, Kind, _blend, _check_blend_inputs,
                                     _check_mask, _check_params, _check_temperature, _check_topk,
                                     _log_softmax, _token_ce, _topk_result, _topk_token_kl,
                                     masked_mean, token_divergence)

__all__ = ["fused_token_terms", "fused_divergence", "fused_forward_kl", "fused_cross_entropy",
           "fused_blended_cot_loss", "fused_topk_kl"]


def _chunk_positions(x, n_pad, chunk):
    """[B, T, ...] -> [T_chunks, B, chunk, ...] after zero-padding T by n_pad.

    The batch axis stays whole inside every chunk, so a batch (data/fsdp) sharding of the
    inputs carries over to every step of the map.
    """
    x = jnp.pad(x, [(0, 0), (0, n_pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], -1, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk_positions(x, t):
    """[T_chunks, B, chunk] -> [B, T]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1)[:, :t]


def fused_token_terms(student_hidden, student_lm_head, teacher_hidden=None,
                      teacher_lm_head=None, targets=None, *, kind: Kind = "forward",
                      temperature=1.0, beta=0.5, lam=0.1, chunk_size=512):
    """Per-token KL and/or CE straight from hidden states, without whole ``[B, T, V]`` logits.

    The tokens are split into chunks of about ``chunk_size`` tokens; for each chunk the student
    (and teacher) logits ``hidden @ lm_head`` are formed (f32 accumulation), turned into the
    per-token terms, and dropped.  The chunk body is ``jax.checkpoint``-ed inside
    ``jax.lax.map``, so the backward pass recomputes each chunk's logits rather than storing
    them: peak memory is O(max(chunk_size, B) * V) instead of O(B * T * V).  Each chunk's
    lm-head matmul is one 2-D ``[B * chunk, D] @ [D, V]`` product.

    The teacher branch is wrapped in ``jax.lax.stop_gradient`` (no gradient to the teacher).

    Args:
      student_hidden: ``[B, T, D]`` final (normed) student hidden states.
      student_lm_head: ``[D, V]`` student unembedding.
      teacher_hidden: ``[B, T, D']`` or None (then no KL is computed).
      teacher_lm_head: ``[D', V]`` or None.
      targets: ``[B, T]`` int or None (then no CE is computed).
      kind, beta, lam: divergence (see :func:`token_divergence`).
      temperature: tau for the KL (no tau**2 here — the callers apply it).
      chunk_size: tokens per chunk.  Chunks run over the sequence axis with the whole batch
        in each: ``max(1, chunk_size // B)`` positions (at most T) times B rows, so a
        batch-sharded input stays batch-sharded inside the map.

    Returns:
      ``(kl, ce)``: each ``[B, T]`` f32 or None when not requested.
    """
    chunk, n_pad = _chunked_inputs(student_hidden, student_lm_head, teacher_hidden,
                                   teacher_lm_head, targets, kind, temperature, beta, lam,
                                   chunk_size)
    b, t = student_hidden.shape[:2]
    want_kl, want_ce = teacher_hidden is not None, targets is not None
    xs = {"hs": _chunk_positions(student_hidden, n_pad, chunk)}
    if want_kl:
        xs["ht"] = _chunk_positions(teacher_hidden, n_pad, chunk)
    if want_ce:
        xs["y"] = _chunk_positions(targets, n_pad, chunk)

    def logits_of(h, w):  # [B, chunk, D] @ [D, V] as one 2-D matmul -> [B * chunk, V] f32
        return jnp.dot(h.reshape(-1, h.shape[-1]), w, preferred_element_type=_F32)

    @jax.checkpoint
    def body(w_s, w_t, x):
        out = {}
        ls_raw = logits_of(x["hs"], w_s)
        if want_kl:
            lt_raw = jax.lax.stop_gradient(logits_of(x["ht"], w_t))
            out["kl"] = token_divergence(_log_softmax(ls_raw, temperature),
                                         _log_softmax(lt_raw, temperature),
                                         kind=kind, beta=beta, lam=lam).reshape(b, chunk)
        if want_ce:
            out["ce"] = _token_ce(ls_raw, x["y"].reshape(-1)).reshape(b, chunk)
        return out

    w_t = jax.lax.stop_gradient(teacher_lm_head) if want_kl else None
    out = jax.lax.map(lambda x: body(student_lm_head, w_t, x), xs)
    kl = _unchunk_positions(out["kl"], t) if want_kl else None
    ce = _unchunk_positions(out["ce"], t) if want_ce else None
    return kl, ce


def _student_chunking(student_hidden, student_lm_head, chunk_size):
    """Checks the student's hidden states [B, T, D], lm-head [D, V] and chunk_size; returns
    (sequence positions per chunk, padding of T): every chunk holds the whole batch."""
    if student_hidden.ndim != 3:
        raise ValueError(f"student_hidden must be [B, T, D], got {student_hidden.shape}")
    b, t, d = student_hidden.shape
    if student_lm_head.ndim != 2 or student_lm_head.shape[0] != d:
        raise ValueError(f"student_lm_head must be [D={d}, V], got {student_lm_head.shape}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    chunk = min(max(1, chunk_size // b), t)
    return chunk, (-t) % chunk


def _chunked_inputs(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, targets,
                    kind, temperature, beta, lam, chunk_size):
    """Checks fused_token_terms' arguments; returns (chunk positions, padding)."""
    chunking = _student_chunking(student_hidden, student_lm_head, chunk_size)
    b, t, _ = student_hidden.shape
    v = student_lm_head.shape[1]
    if teacher_hidden is not None:
        if teacher_lm_head is None:
            raise ValueError("teacher_hidden needs teacher_lm_head")
        if teacher_hidden.ndim != 3 or teacher_hidden.shape[:2] != (b, t):
            raise ValueError(f"teacher_hidden must be [B={b}, T={t}, D'], got "
                             f"{teacher_hidden.shape}")
        if teacher_lm_head.shape != (teacher_hidden.shape[2], v):
            raise ValueError(f"teacher_lm_head must be [D', V={v}], got {teacher_lm_head.shape}")
        _check_params(kind, beta, lam)
    if targets is not None:
        _check_mask(targets, (b, t), "targets")
    if teacher_hidden is None and targets is None:
        raise ValueError("nothing to compute: pass teacher_hidden and/or targets")
    _check_temperature(temperature)
    return chunking


def reduced_token_terms(reduce, student_hidden, student_lm_head, teacher_hidden=None,
                        teacher_lm_head=None, targets=None, *, kind: Kind = "forward",
                        temperature=1.0, beta=0.5, lam=0.1, chunk_size=512):
    """``(reduce(kl, ce), (kl, ce))`` with the gradients formed in the forward pass.

    ``reduce(kl, ce) -> scalar`` must be *linear* in the per-token terms (every masked mean
    and blend of the losses is): then its per-token coefficients are its gradient, known
    before any logits exist. Each chunk's logits are formed once, and in the same pass its
    gradient with respect to the student hidden states and lm-head is computed and kept
    (a ``jax.custom_vjp``, as Liger-Kernel's fused linear cross-entropy / JSD): per step the
    lm-head costs 4 matmul units (student and teacher logits, d hidden, d lm-head) instead of
    6 when the backward pass recomputes both logits. Memory stays bounded by one chunk's
    ``[chunk, V]`` slabs plus the ``[D, V]`` f32 lm-head gradient.

    ``kl``, ``ce`` (``[B, T]`` f32 or None) are returned for metrics, without gradient. The
    loss's value is ``reduce`` of them, exactly as the unfused functions compute it.
    """
    chunk, n_pad = _chunked_inputs(student_hidden, student_lm_head, teacher_hidden,
                                   teacher_lm_head, targets, kind, temperature, beta, lam,
                                   chunk_size)
    want_kl, want_ce = teacher_hidden is not None, targets is not None
    b, t, d = student_hidden.shape
    zeros = jnp.zeros((b, t), _F32)
    coef_kl, coef_ce = jax.grad(lambda k, c: reduce(k if want_kl else None,
                                                    c if want_ce else None),
                                argnums=(0, 1))(zeros, zeros)

    def chunk_terms(ls_raw, lt_raw, y):
        """Per-token (kl, ce) of one chunk's f32 logits [N, V]."""
        kl = (token_divergence(_log_softmax(ls_raw, temperature),
                               _log_softmax(lt_raw, temperature), kind=kind, beta=beta,
                               lam=lam) if want_kl else jnp.zeros(ls_raw.shape[:1], _F32))
        ce = _token_ce(ls_raw, y) if want_ce else jnp.zeros(ls_raw.shape[:1], _F32)
        return kl, ce

    def chunks(hs, ht, y, ckl, cce):
        xs = {"hs": _chunk_positions(hs, n_pad, chunk),
              "ckl": _chunk_positions(ckl, n_pad, chunk),
              "cce": _chunk_positions(cce, n_pad, chunk)}
        if want_kl:
            xs["ht"] = _chunk_positions(ht, n_pad, chunk)
        if want_ce:
            xs["y"] = _chunk_positions(y, n_pad, chunk)
        return xs

    def logits_of(h, w):  # [B, chunk, D] @ [D, V] as one 2-D matmul -> [B * chunk, V] f32
        return jnp.dot(h.reshape(-1, h.shape[-1]), w, preferred_element_type=_F32)

    def weighted(kl, ce, ckl, cce):  # sum_t c_t * term_t; masked-out (c = 0) terms never count
        return (jnp.sum(jnp.where(ckl != 0, ckl * kl, 0.0))
                + jnp.sum(jnp.where(cce != 0, cce * ce, 0.0)))

    def with_grads(hs, ws, ht, wt, y, ckl, cce):
        xs = chunks(hs, ht, y, ckl, cce)

        def step(dws, x):
            ls_raw = logits_of(x["hs"], ws)
            lt_raw = logits_of(x["ht"], wt) if want_kl else None
            yy = x["y"].reshape(-1) if want_ce else None
            (kl, ce), pullback = jax.vjp(lambda ls: chunk_terms(ls, lt_raw, yy), ls_raw)
            (dls,) = pullback((x["ckl"].reshape(-1), x["cce"].reshape(-1)))
            dls = dls.astype(ws.dtype)
            dhs = jnp.dot(dls, ws.T, preferred_element_type=_F32).astype(hs.dtype)
            h2 = x["hs"].reshape(-1, d)
            dws = dws + jnp.dot(h2.T, dls, preferred_element_type=_F32)
            return dws, (kl.reshape(b, chunk), ce.reshape(b, chunk), dhs.reshape(b, chunk, d))

        dws, (kl, ce, dhs) = jax.lax.scan(step, jnp.zeros(ws.shape, _F32), xs)
        kl, ce = _unchunk_positions(kl, t), _unchunk_positions(ce, t)
        dhs = jnp.moveaxis(dhs, 0, 1).reshape(b, -1, d)[:, :t]
        return (weighted(kl, ce, ckl, cce), kl, ce), (dhs, dws.astype(ws.dtype))

    @jax.custom_vjp
    def linear_loss(hs, ws, ht, wt, y, ckl, cce):  # not differentiated: the plain pass
        kl, ce = fused_token_terms(hs, ws, ht, wt, y, kind=kind, temperature=temperature,
                                   beta=beta, lam=lam, chunk_size=chunk_size)
        kl = jnp.zeros(hs.shape[:2], _F32) if kl is None else kl
        ce = jnp.zeros(hs.shape[:2], _F32) if ce is None else ce
        return weighted(kl, ce, ckl, cce), kl, ce

    def linear_loss_fwd(hs, ws, ht, wt, y, ckl, cce):
        return with_grads(hs, ws, ht, wt, y, ckl, cce)

    def linear_loss_bwd(grads, cotangents):
        g = cotangents[0]  # kl and ce leave under stop_gradient: theirs are zero
        dhs, dws = grads
        return ((g * dhs).astype(dhs.dtype), (g * dws).astype(dws.dtype), None, None, None,
                None, None)

    linear_loss.defvjp(linear_loss_fwd, linear_loss_bwd)
    ht = jax.lax.stop_gradient(teacher_hidden) if want_kl else None
    wt = jax.lax.stop_gradient(teacher_lm_head) if want_kl else None
    y = targets if want_ce else None
    fl, kl, ce = linear_loss(student_hidden, student_lm_head, ht, wt, y,
                             jax.lax.stop_gradient(coef_kl), jax.lax.stop_gradient(coef_ce))
    kl = jax.lax.stop_gradient(kl) if want_kl else None
    ce = jax.lax.stop_gradient(ce) if want_ce else None
    value = reduce(kl, ce)
    return value + (fl - jax.lax.stop_gradient(fl)), (kl, ce)


def fused_divergence(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, mask,
                     *, kind: Kind = "forward", temperature=1.0, beta=0.5, lam=0.1,
                     chunk_size=512):
    """Memory-lean distillation loss from hidden states + lm-heads (see fused_token_terms).

    Equals ``{forward_kl, reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl}`` applied to
    ``student_hidden @ student_lm_head`` and ``teacher_hidden @ teacher_lm_head`` (up to f32
    rounding), without materialising either ``[B, T, V]`` logits array.

    Args:
      student_hidden: ``[B, T, D]``; student_lm_head: ``[D, V]``.
      teacher_hidden: ``[B, T, D']``; teacher_lm_head: ``[D', V]`` (no gradient flows to them).
      mask: ``[B, T]``.
      kind, beta, lam, temperature: as in :func:`token_divergence` / :func:`forward_kl`.
      chunk_size: tokens per chunk; memory ~ chunk_size * V * 4 bytes * (a few).

    Returns:
      ``(loss, metrics)`` as in :func:`forward_kl`.
    """
    _check_mask(mask, student_hidden.shape[:2])
    t2 = jnp.asarray(temperature, _F32) ** 2
    loss, (kl, _) = reduced_token_terms(
        lambda kl, _: t2 * masked_mean(kl, mask)[0], student_hidden, student_lm_head,
        teacher_hidden, teacher_lm_head, kind=kind, temperature=temperature, beta=beta,
        lam=lam, chunk_size=chunk_size)
    mean, count = masked_mean(kl, mask)
    return loss, {"loss": loss, "divergence": mean, "tokens": count}


def fused_forward_kl(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, mask,
                     *, temperature=1.0, chunk_size=512):
    """:func:`forward_kl` from hidden states + lm-heads, chunked (see :func:`fused_divergence`)."""
    return fused_divergence(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head,
                            mask, kind="forward", temperature=temperature,
                            chunk_size=chunk_size)


def fused_cross_entropy(student_hidden, student_lm_head, targets, mask, *, chunk_size=512):
    """:func:`cross_entropy` of ``student_hidden @ student_lm_head``, chunked over tokens.

    Args:
      student_hidden: ``[B, T, D]``; student_lm_head: ``[D, V]``; targets, mask: ``[B, T]``.

    Returns:
      ``(loss, metrics)`` with metrics ``loss`` and ``tokens``.
    """
    _check_mask(mask, student_hidden.shape[:2])
    loss, (_, ce) = reduced_token_terms(lambda _, ce: masked_mean(ce, mask)[0], student_hidden,
                                        student_lm_head, targets=targets, chunk_size=chunk_size)
    return loss, {"loss": loss, "tokens": masked_mean(ce, mask)[1]}


def fused_blended_cot_loss(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head,
                           targets, segment_ids, *, mask=None,
                           weights: BlendWeights = BlendWeights(), temperature=1.0,
                           kind: Kind = "forward", beta=0.5, lam=0.1,
                           normalize: Literal["segment", "union"] = "segment", chunk_size=512):
    """:func:`blended_cot_loss` from hidden states + lm-heads, chunked over tokens.

    Same arguments as :func:`blended_cot_loss` with the logits replaced by
    ``student_hidden [B, T, D]``, ``student_lm_head [D, V]``, ``teacher_hidden [B, T, D']``,
    ``teacher_lm_head [D', V]``; the teacher is skipped when both KL weights are 0 and the
    CE is skipped when both CE weights are 0.
    """
    _check_blend_inputs(student_hidden.shape[:2], targets, segment_ids, mask, weights, kind,
                        beta, lam, temperature)
    need_kl = weights.trace_kl != 0 or weights.answer_kl != 0
    need_ce = weights.trace_ce != 0 or weights.answer_ce != 0
    if not (need_kl or need_ce):
        raise ValueError("all blend weights are 0")
    def blend(kl, ce):
        return _blend(kl, ce, segment_ids, mask, weights, temperature, normalize)

    loss, (kl, ce) = reduced_token_terms(
        lambda kl, ce: blend(kl, ce)[0], student_hidden, student_lm_head,
        teacher_hidden if need_kl else None, teacher_lm_head if need_kl else None,
        targets if need_ce else None, kind=kind, temperature=temperature, beta=beta, lam=lam,
        chunk_size=chunk_size)
    return loss, {**blend(kl, ce)[1], "loss": loss}


def fused_topk_kl(student_hidden, student_lm_head, teacher_topk_logprobs, teacher_topk_ids,
                  mask, *, temperature=1.0,
                  missing: Literal["renormalize", "bucket"] = "renormalize", chunk_size=512):
    """:func:`topk_kl` of ``student_hidden @ student_lm_head``, chunked over tokens.

    Cached teacher top-k is already small (``[B, T, k]``); this keeps the *student's*
    ``[B, T, V]`` logits from existing whole (same chunking as :func:`fused_token_terms`).

    Args:
      student_hidden: ``[B, T, D]``; student_lm_head: ``[D, V]``.
      teacher_topk_logprobs, teacher_topk_ids: ``[B, T, k]``; mask: ``[B, T]``.
      temperature, missing: as in :func:`topk_kl`.
      chunk_size: tokens per chunk.

    Returns:
      ``(loss, metrics)`` as in :func:`topk_kl`.
    """
    chunk, n_pad = _student_chunking(student_hidden, student_lm_head, chunk_size)
    b, t, d = student_hidden.shape
    lt, ids = _check_topk((b, t), teacher_topk_logprobs, teacher_topk_ids, mask, missing,
                          temperature, student_lm_head.shape[1])
    k = lt.shape[-1]
    xs = {"hs": _chunk_positions(student_hidden, n_pad, chunk),
          "lt": _chunk_positions(lt, n_pad, chunk), "ids": _chunk_positions(ids, n_pad, chunk)}

    @jax.checkpoint
    def body(w_s, x):
        logits = jnp.dot(x["hs"].reshape(-1, d), w_s, preferred_element_type=_F32)
        dk = _topk_token_kl(logits, x["lt"].reshape(-1, k), x["ids"].reshape(-1, k),
                            temperature, missing)
        return dk.reshape(b, chunk)

    dtok = _unchunk_positions(jax.lax.map(lambda x: body(student_lm_head, x), xs), t)
    return _topk_result(dtok, lt, mask, temperature)
