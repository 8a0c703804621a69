"""Supervision formats: the one registry of what a student is trained on and with which loss.

A format decides the tokens of a training record (with or without the teacher's reasoning
trace, see ``records``) and the weights of the blended loss over its segments
(``losses.blended_cot_loss``):

  label    {"prompt", "answer"}                CE on the answer tokens
  logits   {"prompt", "answer"}                the same tokens, the teacher's logits as targets
  cot      {"prompt", "reasoning", "answer"}   CE on the teacher's trace + the answer
  blended  {"prompt", "reasoning", "answer"}   per-segment KL + CE

A new format is one ``SupervisionFormat`` added to ``FORMATS``; flags, sweeps and the study
read their choices from here. This module imports no JAX, so the analysis side can use it.
"""

from __future__ import annotations

import dataclasses

from jdistill.data.io import ANSWER, TRACE


@dataclasses.dataclass(frozen=True)
class BlendWeights:
    """Weights of the blended chain-of-thought loss, one per (segment, term).

    Segments: ``TRACE`` (1, the teacher's reasoning trace) and ``ANSWER`` (2); ``PROMPT`` (0)
    and any other id are never supervised.  Terms: ``kl`` (divergence against the teacher's
    distribution) and ``ce`` (cross-entropy against the target tokens).

    Presets (all exact special cases, see :func:`blended_cot_loss`):
      ``BlendWeights.logit_kd()``   KL 1 on trace and answer, CE 0 (with ``normalize="union"``
                                    equals :func:`forward_kl` over trace ∪ answer);
      ``BlendWeights.answer_sft()`` CE 1 on the answer only (= :func:`cross_entropy` on the
                                    answer tokens);
      ``BlendWeights.cot_sft()``    CE 1 on trace and answer (with ``normalize="union"``
                                    = :func:`cross_entropy` on trace ∪ answer).
    """

    trace_kl: float = 1.0
    trace_ce: float = 0.5
    answer_kl: float = 1.0
    answer_ce: float = 1.0

    @classmethod
    def logit_kd(cls):
        return cls(trace_kl=1.0, trace_ce=0.0, answer_kl=1.0, answer_ce=0.0)

    @classmethod
    def answer_sft(cls):
        return cls(trace_kl=0.0, trace_ce=0.0, answer_kl=0.0, answer_ce=1.0)

    @classmethod
    def cot_sft(cls):
        return cls(trace_kl=0.0, trace_ce=1.0, answer_kl=0.0, answer_ce=1.0)

    def weight(self, segment: int, term: str) -> float:
        return {(TRACE, "kl"): self.trace_kl, (TRACE, "ce"): self.trace_ce,
                (ANSWER, "kl"): self.answer_kl, (ANSWER, "ce"): self.answer_ce}[(segment, term)]


@dataclasses.dataclass(frozen=True)
class SupervisionFormat:
    """One format: its loss weights, how the weighted segments are normalised ("segment":
    each segment's mean, "union": one mean over every supervised token) and whether its
    records carry the teacher's trace."""

    name: str
    weights: BlendWeights
    normalize: str
    with_trace: bool

    @property
    def needs_teacher_logits(self) -> bool:
        return self.weights.trace_kl != 0 or self.weights.answer_kl != 0


FORMATS: dict[str, SupervisionFormat] = {f.name: f for f in (
    SupervisionFormat("label", BlendWeights.answer_sft(), "segment", with_trace=False),
    SupervisionFormat("logits", BlendWeights.logit_kd(), "union", with_trace=False),
    SupervisionFormat("cot", BlendWeights.cot_sft(), "union", with_trace=True),
    SupervisionFormat("blended", BlendWeights(), "segment", with_trace=True),
)}
NAMES = tuple(FORMATS)
TRACE_FORMATS = tuple(n for n, f in FORMATS.items() if f.with_trace)


def get(name: str) -> SupervisionFormat:
    """The format called `name` (one line naming the choices otherwise)."""
    if name not in FORMATS:
        raise ValueError(f"unknown supervision format {name!r}; choose one of {list(NAMES)}")
    return FORMATS[name]
