"""Compression schedules: one-shot, or k steps of rising compression (prune–distil–prune).

A schedule is a list of compression ratios r_1 < ... < r_k = r_final, each relative to the
original teacher. Ratios are spaced in sparsity s = 1 − 1/r (the fraction of parameters
removed) for linear and cubic schedules, and multiplicatively for geometric ones.
`iterative_prune` takes any prune function and any student → student step (distillation
plugs in there) and knows nothing of training.
"""

from __future__ import annotations

from typing import Callable

from jdistill.models.decoder import Decoder

KINDS = ("one_shot", "linear", "geometric", "cubic")


def compression_schedule(final_ratio: float, steps: int = 1, kind: str = "linear") -> list[float]:
    """Ratios for each step.

    linear:    s_t = s_f · t/k
    geometric: r_t = r_f^(t/k)  (the same relative shrink every step)
    cubic:     s_t = s_f + (s_i − s_f)(1 − t/k)³ with s_i = 0 (Zhu & Gupta 2017, "To prune,
               or not to prune"): large steps first, gentle ones near the end.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {KINDS}")
    if not final_ratio > 1.0:
        raise ValueError(f"final compression ratio must be > 1, got {final_ratio}")
    if kind == "one_shot" or steps == 1:
        return [float(final_ratio)]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s_f = 1.0 - 1.0 / final_ratio
    ratios = []
    for t in range(1, steps + 1):
        if kind == "geometric":
            ratios.append(final_ratio ** (t / steps))
            continue
        s = s_f * t / steps if kind == "linear" else s_f * (1.0 - (1.0 - t / steps) ** 3)
        ratios.append(1.0 / (1.0 - s))
    ratios[-1] = float(final_ratio)
    return ratios


def iterative_prune(model: Decoder, ratios: list[float],
                    prune: Callable[[Decoder, float], Decoder],
                    after_step: Callable[[Decoder], Decoder] = lambda m: m,
                    on_step: Callable[[int, Decoder], None] | None = None) -> Decoder:
    """Runs prune → after_step for each ratio (relative to the original `model`).

    prune(student, r) must return the current student pruned to the original's size / r,
    re-scoring it; `dims_within(original_config, r, axes, Dims.of(student.config))` gives
    each ratio one shape along any chain.
    """
    original = model.config.num_params()
    for step, ratio in enumerate(ratios):
        if model.config.num_params() > original / ratio * (1.0 + 1e-9):
            model = prune(model, ratio)
        model = after_step(model)
        if on_step is not None:
            on_step(step, model)
    return model
