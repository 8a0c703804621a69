"""Distillation losses: pure, masked, per-token functions in the style of ``optax``.

Every loss takes per-position inputs of shape ``[B, T, ...]`` and a ``mask`` of shape
``[B, T]`` (0/1 or non-negative weights) and returns ``(loss, metrics)``:

* ``loss`` is a f32 scalar: the mask-weighted mean over tokens of a per-token term,
  ``sum_t w_t * d_t / sum_t w_t``.  A mask whose total weight is 0 gives loss 0 (and zero
  gradients), never NaN.
* ``metrics`` is a dict of f32 scalars (the unscaled divergence, the supervised-token count).

Precision: inputs may be bf16 (or any float); every softmax / log-softmax, divergence and
reduction runs in f32.  The lm-head matmul of the fused path keeps the inputs' dtype and
accumulates in f32 (``preferred_element_type=float32``).

Temperature: the divergences compare ``softmax(logits / tau)`` distributions and multiply by
``tau**2`` (Hinton et al. 2015, "Distilling the knowledge in a neural network") so that the
gradient scale does not shrink as ``tau`` grows.  Cross-entropy on hard targets never uses a
temperature.

Divergences (``p_T`` teacher, ``p_S`` student, both at temperature ``tau``):

* ``forward_kl``  KL(p_T || p_S)  — mass covering (Hinton; Minitron uses tau = 1).
* ``reverse_kl``  KL(p_S || p_T)  — mode seeking (MiniLLM, Gu et al. 2023).
* ``generalized_jsd``  JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M),
  M = (1 - beta) p_S + beta p_T, M computed in log space.  This is the convention of TRL's
  ``GKDTrainer.generalized_jsd_loss`` (Agarwal et al. 2023, "On-policy distillation of language
  models", GKD).  The formula itself is identically 0 at beta = 0 and beta = 1 (M equals one of
  the two distributions and that term's weight vanishes), so, exactly like TRL, beta = 0 is
  *defined* as forward KL(p_T || p_S) and beta = 1 as reverse KL(p_S || p_T).  These are the
  limits of JSD_beta / beta as beta -> 0 and of JSD_beta / (1 - beta) as beta -> 1, i.e. the
  directions the mixture tends to, not the (vanishing) values of the formula.
* ``skew_kl``  skew forward KL(p_T || lam p_T + (1 - lam) p_S) (DistiLLM, Ko et al. 2024,
  lam = 0.1); ``skew_reverse_kl``  KL(p_S || lam p_S + (1 - lam) p_T).  lam = 0 gives the plain
  KLs.
* ``topk_kl``  forward KL against cached teacher top-k log-probabilities (DistillKit style).

The same losses computed from hidden states and the lm-head, chunk by chunk, are in
``jdistill.distill.fused``. From the rest of ``jdistill`` this module imports only the segment ids (``data.io``) and
``BlendWeights`` (``formats``, where each supervision format names its weights).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jdistill.data.io import ANSWER, PROMPT, TRACE  # segment ids of the blended loss
from jdistill.distill.formats import BlendWeights

__all__ = [
    "PROMPT", "TRACE", "ANSWER",
    "BlendWeights",
    "forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
    "cross_entropy", "topk_kl", "blended_cot_loss",
    "token_divergence", "masked_mean",
]
Kind = Literal["forward", "reverse", "jsd", "skew", "skew_reverse"]
KINDS = ("forward", "reverse", "jsd", "skew", "skew_reverse")
_F32 = jnp.float32


def _check_logits(name, x):
    if x.ndim != 3:
        raise ValueError(f"{name} must be [B, T, V], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_mask(mask, bt, name="mask"):
    if tuple(mask.shape) != tuple(bt):
        raise ValueError(f"{name} must be [B, T] = {tuple(bt)}, got {tuple(mask.shape)}")


def _check_temperature(temperature):
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_params(kind, beta, lam):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd":
        if not isinstance(beta, (int, float)):
            raise TypeError("beta must be a Python number (beta = 0 / 1 select another formula)")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
    if kind in ("skew", "skew_reverse"):
        if isinstance(lam, (int, float)) and not 0.0 <= lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {lam}")


def _kl_logp(log_p, log_q):
    """KL(p || q) over the last axis from log-probabilities; 0 * log 0 terms count as 0.

    Only p = 0 (log p = -inf) is masked: a NaN in either input must reach the loss, so the
    trainer's non-finite check sees a broken teacher instead of a silent zero KL.
    """
    live = ~jnp.isneginf(log_p)
    log_p_safe = jnp.where(live, log_p, 0.0)
    log_q_safe = jnp.where(live, log_q, 0.0)
    terms = jnp.where(live, jnp.exp(log_p_safe) * (log_p_safe - log_q_safe), 0.0)
    return jnp.sum(terms, axis=-1)


def _log_mix(log_a, log_b, w_a):
    """log(w_a * a + (1 - w_a) * b) from log a, log b (w_a a Python or traced scalar)."""
    w_a = jnp.asarray(w_a, _F32)
    return jnp.logaddexp(log_a + jnp.log(w_a), log_b + jnp.log1p(-w_a))


def token_divergence(student_logp, teacher_logp, *, kind: Kind = "forward", beta=0.5,
                     lam=0.1):
    """Per-token divergence between two log-probability arrays.

    Args:
      student_logp: ``[..., V]`` student log-probabilities (f32).
      teacher_logp: ``[..., V]`` teacher log-probabilities (f32).
      kind: ``"forward"`` KL(p_T||p_S), ``"reverse"`` KL(p_S||p_T), ``"jsd"`` generalised
        JSD_beta (TRL GKD convention, beta = 0 / 1 are forward / reverse KL), ``"skew"``
        KL(p_T || lam p_T + (1-lam) p_S), ``"skew_reverse"`` KL(p_S || lam p_S + (1-lam) p_T).
      beta: JSD mixture weight of the teacher (Python number).
      lam: skew weight.

    Returns:
      ``[...]`` f32 divergences (no temperature factor).
    """
    _check_params(kind, beta, lam)
    ls, lt = student_logp.astype(_F32), teacher_logp.astype(_F32)
    if kind == "forward" or (kind == "jsd" and beta == 0):
        return _kl_logp(lt, ls)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return _kl_logp(ls, lt)
    if kind == "jsd":
        log_m = _log_mix(lt, ls, beta)  # M = beta p_T + (1 - beta) p_S
        return beta * _kl_logp(lt, log_m) + (1.0 - beta) * _kl_logp(ls, log_m)
    if kind == "skew":
        return _kl_logp(lt, _log_mix(lt, ls, lam))
    return _kl_logp(ls, _log_mix(ls, lt, lam))  # skew_reverse


def masked_mean(values, mask):
    """``(sum(mask * values) / sum(mask), sum(mask))`` in f32; 0 when ``sum(mask) == 0``.

    Masked-out entries are dropped with ``where`` (a NaN/inf there cannot leak in).
    """
    mask = mask.astype(_F32)
    values = jnp.where(mask != 0, values.astype(_F32), 0.0)
    total = jnp.sum(mask)
    num = jnp.sum(values * mask)
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, num / safe, 0.0), total


def _log_softmax(logits, temperature=1.0):
    return jax.nn.log_softmax(logits.astype(_F32) / temperature, axis=-1)


def _token_ce(logits, targets):
    """-log softmax(logits)[target] per token, f32; targets are clipped into [0, V)."""
    logp = _log_softmax(logits)
    t = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
    return -jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]


def _divergence_loss(student_logits, teacher_logits, mask, *, kind, temperature, beta, lam):
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student/teacher logits differ: {student_logits.shape} vs "
                         f"{teacher_logits.shape}")
    _check_mask(mask, student_logits.shape[:2])
    _check_temperature(temperature)
    d = token_divergence(_log_softmax(student_logits, temperature),
                         _log_softmax(teacher_logits, temperature),
                         kind=kind, beta=beta, lam=lam)
    mean, count = masked_mean(d, mask)
    loss = jnp.asarray(temperature, _F32) ** 2 * mean
    return loss, {"loss": loss, "divergence": mean, "tokens": count}


def forward_kl(student_logits, teacher_logits, mask, *, temperature=1.0):
    """Forward KL(p_T || p_S) distillation loss (Hinton et al. 2015; Minitron: tau = 1).

    Args:
      student_logits: ``[B, T, V]`` (any float dtype; computed in f32).
      teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]`` 0/1 or non-negative token weights.
      temperature: tau > 0; both distributions are ``softmax(logits / tau)``.

    Returns:
      ``(loss, metrics)``: ``loss = tau**2 * sum_t m_t KL_t / sum_t m_t`` (0 if the mask is
      empty); metrics ``loss``, ``divergence`` (without tau**2) and ``tokens`` (sum of mask).

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # [B=1, T=2, V=3]
      >>> t = jnp.array([[[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])
      >>> loss, metrics = forward_kl(s, t, jnp.array([[1, 0]]))  # only token 0 counts
      >>> round(float(loss), 4), float(metrics["tokens"])
      (0.097, 1.0)
    """
    return _divergence_loss(student_logits, teacher_logits, mask, kind="forward",
                            temperature=temperature, beta=0.0, lam=0.0)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature=1.0):
    """Reverse KL(p_S || p_T) (mode seeking; MiniLLM, Gu et al. 2023).

    Shapes, masking, temperature and return value as in :func:`forward_kl`.
    """
    return _divergence_loss(student_logits, teacher_logits, mask, kind="reverse",
                            temperature=temperature, beta=0.0, lam=0.0)


def generalized_jsd(student_logits, teacher_logits, mask, *, beta=0.5, temperature=1.0):
    """Generalised Jensen-Shannon divergence JSD_beta (GKD, Agarwal et al. 2023; TRL).

    ``JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M)`` with
    ``M = (1 - beta) p_S + beta p_T``, ``log M`` computed as a logaddexp of the log-probs plus
    log weights.  As in TRL, ``beta == 0`` returns forward KL(p_T || p_S) and ``beta == 1``
    reverse KL(p_S || p_T) (the formula itself vanishes at both ends; these are its
    normalised limits).  ``beta`` must therefore be a Python number.

    Shapes, masking, temperature and return value as in :func:`forward_kl`.
    """
    return _divergence_loss(student_logits, teacher_logits, mask, kind="jsd",
                            temperature=temperature, beta=beta, lam=0.0)


def skew_kl(student_logits, teacher_logits, mask, *, lam=0.1, temperature=1.0):
    """Skew forward KL(p_T || lam p_T + (1 - lam) p_S) (DistiLLM, Ko et al. 2024, lam = 0.1).

    Mixing a little teacher mass into the student side bounds the log-ratio (by -log lam)
    where the student puts ~0 mass, which stabilises the gradient.  ``lam = 0`` is forward KL.
    Shapes, masking, temperature and return value as in :func:`forward_kl`.
    """
    return _divergence_loss(student_logits, teacher_logits, mask, kind="skew",
                            temperature=temperature, beta=0.0, lam=lam)


def skew_reverse_kl(student_logits, teacher_logits, mask, *, lam=0.1, temperature=1.0):
    """Skew reverse KL(p_S || lam p_S + (1 - lam) p_T) (DistiLLM's SRKL).

    Shapes, masking, temperature and return value as in :func:`forward_kl`.
    """
    return _divergence_loss(student_logits, teacher_logits, mask, kind="skew_reverse",
                            temperature=temperature, beta=0.0, lam=lam)


def cross_entropy(student_logits, targets, mask):
    """Token cross-entropy ``-log softmax(logits)[target]`` against hard targets.

    Args:
      student_logits: ``[B, T, V]``.
      targets: ``[B, T]`` int token ids; values where ``mask == 0`` are ignored (any value,
        e.g. -100, is allowed there).
      mask: ``[B, T]`` 0/1 or weights.

    Returns:
      ``(loss, metrics)`` with the mask-weighted mean CE (0 for an empty mask); metrics
      ``loss``, ``tokens``, ``accuracy`` (weighted argmax accuracy).

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # [B=1, T=2, V=3]
      >>> loss, metrics = cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1, 1]]))
      >>> round(float(loss), 4), float(metrics["accuracy"])
      (0.5639, 0.5)
    """
    _check_logits("student_logits", student_logits)
    _check_mask(targets, student_logits.shape[:2], "targets")
    _check_mask(mask, student_logits.shape[:2])
    ce = _token_ce(student_logits, targets)
    loss, count = masked_mean(ce, mask)
    hit = (jnp.argmax(student_logits, axis=-1) == targets).astype(_F32)
    acc, _ = masked_mean(hit, mask)
    return loss, {"loss": loss, "tokens": count, "accuracy": acc}


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def topk_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, mask, *,
            temperature=1.0, missing: Literal["renormalize", "bucket"] = "renormalize"):
    """Forward KL against cached sparse teacher top-k log-probabilities (DistillKit style).

    Args:
      student_logits: ``[B, T, V]``.
      teacher_topk_logprobs: ``[B, T, k]`` teacher log-probabilities of its top-k tokens,
        taken as given (cache them at the temperature you distil at; only the student is
        divided by ``temperature`` here).  Values at masked positions are ignored.
      teacher_topk_ids: ``[B, T, k]`` int ids of those tokens (distinct per position).
      mask: ``[B, T]`` 0/1 or weights.
      temperature: student temperature tau; the loss carries the tau**2 factor.
      missing: what to do with the teacher mass outside the top-k:

        * ``"renormalize"``: drop it.  Both distributions are restricted to the k ids and
          renormalised there: ``q = softmax_k(teacher_logprobs)``,
          ``s = softmax_k(student_logprobs[ids])``; loss ``KL(q || s)`` (a proper KL >= 0,
          and with k = V it is exactly :func:`forward_kl`).
        * ``"bucket"``: keep it as one extra (k+1)-th outcome: teacher bucket
          ``1 - sum_k p_T``, student bucket ``1 - sum_k p_S[ids]``, both computed as
          ``log1p(-exp(logsumexp(.)))`` stably; loss is the KL over the k+1 outcomes.  The
          student bucket log-mass is floored at ``log(eps_f32)`` so a student that puts
          all its mass on the k ids gives a finite (large) loss.

    Returns:
      ``(loss, metrics)`` as in :func:`forward_kl`; metrics also ``teacher_topk_mass``
      (mean cached mass inside the top-k).
    """
    _check_logits("student_logits", student_logits)
    lt, ids = _check_topk(student_logits.shape[:2], teacher_topk_logprobs, teacher_topk_ids,
                          mask, missing, temperature, student_logits.shape[-1])
    d = _topk_token_kl(student_logits, lt, ids, temperature, missing)
    return _topk_result(d, lt, mask, temperature)


def _check_topk(bt, teacher_topk_logprobs, teacher_topk_ids, mask, missing, temperature, v):
    """Validates top-k inputs; returns (f32 log-probs sanitised at masked positions, int32 ids)."""
    if teacher_topk_logprobs.ndim != 3 or tuple(teacher_topk_logprobs.shape[:2]) != tuple(bt):
        raise ValueError(f"teacher_topk_logprobs must be [B, T, k] with [B, T] = {tuple(bt)}, "
                         f"got {teacher_topk_logprobs.shape}")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError("teacher_topk_ids must have the shape of teacher_topk_logprobs")
    if not jnp.issubdtype(teacher_topk_ids.dtype, jnp.integer):
        raise ValueError(f"teacher_topk_ids must be integer, got {teacher_topk_ids.dtype}")
    if missing not in ("renormalize", "bucket"):
        raise ValueError(f"missing must be 'renormalize' or 'bucket', got {missing!r}")
    _check_mask(mask, bt)
    _check_temperature(temperature)
    live = (mask != 0)[..., None]
    lt = jnp.where(live, teacher_topk_logprobs.astype(_F32), -1.0)  # sanitise padding
    ids = jnp.clip(teacher_topk_ids.astype(jnp.int32), 0, v - 1)
    return lt, ids


def _topk_token_kl(student_logits, lt, ids, temperature, missing):
    """Per-token sparse forward KL ``[...]`` from student logits ``[..., V]``, ``lt``/``ids``
    ``[..., k]`` (see :func:`topk_kl`)."""
    ls = jnp.take_along_axis(_log_softmax(student_logits, temperature), ids, axis=-1)
    lse_t = jax.nn.logsumexp(lt, axis=-1)
    if missing == "renormalize":
        return _kl_logp(lt - lse_t[..., None], jax.nn.log_softmax(ls, axis=-1))
    lse_s = jax.nn.logsumexp(ls, axis=-1)
    tiny = jnp.finfo(_F32).eps
    lt_bucket = _log1mexp(jnp.minimum(lse_t, 0.0))  # -inf when top-k holds all mass
    ls_bucket = _log1mexp(jnp.minimum(lse_s, -tiny))
    return _kl_logp(jnp.concatenate([lt, lt_bucket[..., None]], -1),
                    jnp.concatenate([ls, ls_bucket[..., None]], -1))


def _topk_result(d, lt, mask, temperature):
    mean, count = masked_mean(d, mask)
    loss = jnp.asarray(temperature, _F32) ** 2 * mean
    mass, _ = masked_mean(jnp.exp(jax.nn.logsumexp(lt, axis=-1)), mask)
    return loss, {"loss": loss, "divergence": mean, "tokens": count,
                  "teacher_topk_mass": mass}


def _blend(kl_tok, ce_tok, segment_ids, mask, weights: BlendWeights, temperature, normalize):
    """Combine per-token KL / CE ``[B, T]`` into the blended loss (see blended_cot_loss)."""
    if normalize not in ("segment", "union"):
        raise ValueError(f"normalize must be 'segment' or 'union', got {normalize!r}")
    mask = jnp.ones(segment_ids.shape, _F32) if mask is None else mask.astype(_F32)
    t2 = jnp.asarray(temperature, _F32) ** 2
    terms = {"kl": kl_tok, "ce": ce_tok}
    scale = {"kl": t2, "ce": jnp.asarray(1.0, _F32)}
    metrics, loss = {}, jnp.asarray(0.0, _F32)
    for seg, seg_name in ((TRACE, "trace"), (ANSWER, "answer")):
        seg_mask = mask * (segment_ids == seg)
        metrics[f"{seg_name}_tokens"] = jnp.sum(seg_mask)
        for term in ("kl", "ce"):
            if terms[term] is not None:
                metrics[f"{seg_name}_{term}"], _ = masked_mean(terms[term], seg_mask)
            w = weights.weight(seg, term)
            if w != 0 and normalize == "segment":
                loss = loss + w * scale[term] * metrics[f"{seg_name}_{term}"]
    if normalize == "union":
        for term in ("kl", "ce"):
            seg_w = {seg: weights.weight(seg, term) for seg in (TRACE, ANSWER)}
            if terms[term] is None or all(w == 0 for w in seg_w.values()):
                continue
            w_tok = jnp.zeros(segment_ids.shape, _F32)
            active = jnp.zeros(segment_ids.shape, _F32)
            for seg, w in seg_w.items():
                if w != 0:
                    w_tok = w_tok + w * (segment_ids == seg)
                    active = active + (segment_ids == seg)
            union_mean, _ = masked_mean(w_tok * terms[term].astype(_F32),
                                        mask * active)
            metrics[f"union_{term}"] = union_mean
            loss = loss + scale[term] * union_mean
    metrics["loss"] = loss
    return loss, metrics


def _check_blend_inputs(bt, targets, segment_ids, mask, weights, kind, beta, lam, temperature):
    _check_mask(targets, bt, "targets")
    _check_mask(segment_ids, bt, "segment_ids")
    if mask is not None:
        _check_mask(mask, bt)
    if not isinstance(weights, BlendWeights):
        raise TypeError(f"weights must be a BlendWeights, got {type(weights).__name__}")
    _check_params(kind, beta, lam)
    _check_temperature(temperature)


def blended_cot_loss(student_logits, teacher_logits, targets, segment_ids, *, mask=None,
                     weights: BlendWeights = BlendWeights(), temperature=1.0,
                     kind: Kind = "forward", beta=0.5, lam=0.1,
                     normalize: Literal["segment", "union"] = "segment"):
    """Blended chain-of-thought distillation loss: per segment, KL to the teacher + CE.

    Each position carries a segment id: ``PROMPT`` = 0 (never supervised), ``TRACE`` = 1
    (teacher reasoning trace), ``ANSWER`` = 2.  With ``normalize="segment"`` (default)::

        loss = sum_{s in {trace, answer}}  w[s, kl] * tau**2 * mean_{t in s} D(p_T || p_S)_t
                                         + w[s, ce] *          mean_{t in s} CE(target_t)_t

    every mean weighted by ``mask`` and normalised by that segment's own supervised-token
    count (an empty segment contributes 0).  With ``normalize="union"`` each term is instead
    one weighted mean over the union of the segments where that term's weight is non-zero::

        loss = sum_{term} scale_term * sum_t m_t w[s_t, term] x_t / sum_t m_t [w[s_t, term] != 0]

    Exact special cases (tested): ``BlendWeights.logit_kd()`` with ``normalize="union"`` is
    :func:`forward_kl` (or the chosen ``kind``) with mask ``m * (segment in {1, 2})``;
    ``BlendWeights.answer_sft()`` (either normalisation) is :func:`cross_entropy` with mask
    ``m * (segment == 2)``; ``BlendWeights.cot_sft()`` with ``normalize="union"`` is
    :func:`cross_entropy` on trace ∪ answer (with ``"segment"`` it is the sum of the two
    per-segment CE means).

    Why the blend stabilises distillation on long traces:

    * Per-segment normalisation: a 200-token trace and a 3-token answer each contribute one
      mean, so the few answer tokens — the ones the task is scored on — are not drowned by
      the trace (in a union mean they would carry ~1.5% of the weight), and the loss scale
      does not drift with trace length.
    * The CE term anchors the student to the tokens the teacher actually sampled.  Inside a
      reasoning trace the teacher distribution is often high-entropy (many valid
      continuations); forward KL then spreads student mass over all of them, while CE pins
      the one path that leads to this answer (the student is conditioned on that path at the
      next positions, so this keeps it self-consistent).
    * The KL term supplies the dense "dark knowledge" signal CE lacks (relative probabilities
      of the alternatives), which regularises CE and keeps the student from collapsing to the
      sampled trace; a temperature tau > 1 smooths it further (tau**2 keeps its scale).

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      targets: ``[B, T]`` int target ids (ignored where not supervised).
      segment_ids: ``[B, T]`` int in {0, 1, 2}; other values are unsupervised.
      mask: optional ``[B, T]`` weights (padding), multiplied into every segment mask.
      weights: :class:`BlendWeights`.
      temperature: tau for the KL terms (CE never uses it).
      kind: divergence, one of ``"forward"``, ``"reverse"``, ``"jsd"``, ``"skew"``,
        ``"skew_reverse"`` (see :func:`token_divergence`); ``beta`` / ``lam`` its parameters.
      normalize: ``"segment"`` or ``"union"`` (above).

    Returns:
      ``(loss, metrics)``; metrics hold per-segment ``{trace,answer}_{kl,ce}`` means (KL
      without tau**2) and ``{trace,answer}_tokens``.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("student/teacher logits differ in shape")
    _check_blend_inputs(student_logits.shape[:2], targets, segment_ids, mask, weights, kind,
                        beta, lam, temperature)
    kl_tok = token_divergence(_log_softmax(student_logits, temperature),
                              _log_softmax(teacher_logits, temperature),
                              kind=kind, beta=beta, lam=lam)
    ce_tok = _token_ce(student_logits, targets)
    return _blend(kl_tok, ce_tok, segment_ids, mask, weights, temperature, normalize)
