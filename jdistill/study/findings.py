"""The study's findings, each decided by a stated rule, and the report summary.

Findings and their decision rules (``Z`` = 2 standard errors):

1. ``smooth_degradation``: per format, fit the error law on the rows with requested ratio
   below the largest, predict the largest-ratio rows (accuracy bounded below by chance);
   reproduced when the mean absolute
   accuracy error is <= max(``EXTRAP_TOL_ABS``, ``EXTRAP_TOL_SE`` x the rows' stderr) and
   the full-data curve is non-increasing in r; "not reproduced" when either fails.
2. ``general_collapses_first``: per format, the bootstrap intervals of r0 (general) and r0
   (in-domain): reproduced when the general interval lies wholly below the in-domain one,
   "not reproduced" when wholly above (used only when both fits have >= ``MIN_DOF_DECIDE``
   residual degrees of freedom: a 3-parameter sigmoid through 4 points has no say on r0).
   When they overlap (or cannot be used, or there is no bootstrap) the
   relative-retention gap decides: retention = (score - chance) / (teacher - chance); the
   mean of retention(in-domain) - retention(general) over the baseline cells, with its
   measurement stderr, by the Z rule.
3. ``trace_retains_general``: per trace format (cot, blended), paired general-score
   differences against ``label`` at cells matched on (ratio, method, schedule, prune steps,
   examples, seed), by the Z rule.
4. ``full_beats_lora`` and ``iterative_beats_one_shot``: paired differences in in-domain
   accuracy and general score at matched cells, by the Z rule.

Intervals: ``scaling.bootstrap`` (rows resampled) for fits with >= ``MIN_ROW_BOOT`` points;
below that a parametric bootstrap from the rows' measured stderrs (see ``bootstrap``).

Paired stderr: the larger of the empirical stderr of the differences (n >= 2) and the
measurement stderr sqrt(sum(se_a^2 + se_b^2)) / n, so neither a few lucky pairs nor
noisy evaluations can make a difference look sharper than the data allow. A finding with
several parts (formats, metrics) is reproduced when at least one part is and none
contradicts, "not reproduced" when at least one contradicts and none supports, and
inconclusive otherwise (the evidence names every part).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from jdistill.distill.formats import TRACE_FORMATS
from jdistill.study.fits import MIN_DOF_DECIDE, MIN_ERROR
from jdistill.study.statistics import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Z, combine,
                                       decide, paired_difference, retention_gap)

if TYPE_CHECKING:  # analyze() calls findings(); the Analysis it passes is only annotated here
    from jdistill.study.analysis import Analysis


EXTRAP_TOL_ABS = 0.05  # accuracy points tolerated when extrapolating to the largest ratio
EXTRAP_TOL_SE = 2.0  # ... or this many measured stderrs, whichever is larger


def _fmt_iv(iv) -> str:
    return f"[{iv[0]:.3g}, {iv[1]:.3g}]" if iv else "(no bootstrap)"


def findings(an: Analysis) -> list[dict]:
    """The study's findings (see the module docstring for the rules)."""
    return [_finding_smooth(an), _finding_collapse(an), _finding_trace(an),
            _finding_pair(an, "full_beats_lora", "method", "full", "lora", (),
                          "Full distillation retains more quality (in-domain accuracy, general "
                          "score) than LoRA distillation at matched cells"),
            _finding_pair(an, "iterative_beats_one_shot", "schedule", "iterative", "one_shot",
                          ("prune_steps",),
                          "Iterative pruning retains more quality (in-domain accuracy, general "
                          "score) than one-shot pruning at matched cells")]


FINDING_NUMBERS = {"smooth_degradation": "1", "general_collapses_first": "2",
                   "trace_retains_general": "3", "full_beats_lora": "4a",
                   "iterative_beats_one_shot": "4b"}


def _finding(fid, claim, parts, evidence, rule, reason=None) -> dict:
    status = combine([p["status"] for p in parts]) if parts else INCONCLUSIVE
    if reason and not parts:
        evidence = reason
    return {"id": fid, "number": FINDING_NUMBERS[fid], "claim": claim, "status": status,
            "evidence": evidence, "rule": rule, "parts": parts}


def _mono_text(mono) -> str:
    return "monotone" if mono else "NOT monotone" if mono is False else "not checked"


def _finding_smooth(an: Analysis) -> dict:
    claim = "In-domain quality degrades smoothly and predictably with compression"
    rule = (f"per format: fit on ratios below the largest, predict the largest (accuracy "
            f"floored at chance); mean |acc "
            f"error| <= max({EXTRAP_TOL_ABS}, {EXTRAP_TOL_SE} x stderr) and fitted accuracy "
            "non-increasing in r")
    parts, texts = [], []
    for fmt, ex in sorted(an.extrapolations.items()):
        if "skipped" in ex:
            parts.append({"format": fmt, "status": INCONCLUSIVE, "reason": ex["skipped"]})
            texts.append(f"{fmt}: inconclusive ({ex['skipped']})")
            continue
        mono = ex.get("monotone")
        ok = ex["mean_abs_err"] <= ex["tolerance"] and mono is not False
        status = REPRODUCED if ok else NOT_REPRODUCED
        parts.append({"format": fmt, "status": status, **{k: ex[k] for k in (
            "mean_abs_err", "max_abs_err", "tolerance", "held_out_ratio", "law")},
            "monotone": mono})
        texts.append(f"{fmt}: {ex['law']} fit on ratio <= {ex['train_max_ratio']:g} "
                     f"({ex['n_train']} rows) predicts ratio {ex['held_out_ratio']:g} "
                     f"({ex['n_test']} rows): accuracy {np.mean(ex['predicted']):.3f} "
                     f"predicted vs {np.mean(ex['observed']):.3f} measured, "
                     f"mean |error| {ex['mean_abs_err']:.3f} "
                     f"(max {ex['max_abs_err']:.3f}; tolerance {ex['tolerance']:.3f}); fitted "
                     f"curve {_mono_text(mono)} -> {status}")
    return _finding("smooth_degradation", claim, parts, "; ".join(texts), rule,
                    "no format has baseline cells")


def _finding_collapse(an: Analysis) -> dict:
    claim = "General knowledge collapses at a lower compression ratio than in-domain quality"
    rule = ("per format: general r0 interval wholly below in-domain r0 interval -> reproduced, "
            f"wholly above -> not reproduced (fits with >= {MIN_DOF_DECIDE} residual dof); "
            "otherwise the relative-retention gap "
            f"(in-domain - general) by the {Z:g}-stderr rule")
    if not an.study.has_general:
        return _finding("general_collapses_first", claim, [], "", rule,
                        "no general-benchmark scores in the rows")
    parts, texts = [], []
    for fmt in an.study.formats:
        cells = an.study.baseline(fmt, an.method, an.schedule)
        if not cells:
            continue
        gen, ind = an.fit_for(fmt, "general_collapse"), an.fit_for(fmt, "in_domain_collapse")
        part = {"format": fmt}
        text = f"{fmt}: "
        status = INCONCLUSIVE
        if gen is not None and ind is not None:
            g_iv, i_iv = gen.intervals().get("r0"), ind.intervals().get("r0")
            part.update(r0_general=gen.params()["r0"], r0_in_domain=ind.params()["r0"],
                        r0_general_interval=g_iv, r0_in_domain_interval=i_iv)
            r_top = max(c.r for c in cells)
            beyond = lambda v: " (beyond the largest ratio measured, %.3g)" % r_top \
                if v > r_top else ""  # noqa: E731
            text += (f"r0 general {gen.params()['r0']:.3g} {_fmt_iv(g_iv)}"
                     f"{beyond(gen.params()['r0'])} vs in-domain {ind.params()['r0']:.3g} "
                     f"{_fmt_iv(i_iv)}{beyond(ind.params()['r0'])}")
            dof = min(gen.y.size, ind.y.size) - len(gen.result.theta)
            if g_iv and i_iv and dof < MIN_DOF_DECIDE:
                text += (f" (not used: {dof} residual degree(s) of freedom, need "
                         f">= {MIN_DOF_DECIDE})")
            elif g_iv and i_iv:
                if g_iv[1] < i_iv[0]:
                    status, part["decided_by"] = REPRODUCED, "r0 intervals"
                elif i_iv[1] < g_iv[0]:
                    status, part["decided_by"] = NOT_REPRODUCED, "r0 intervals"
                else:
                    text += " (intervals overlap)"
        else:
            text += "no collapse fits"
        gap = retention_gap([c for c in cells if c.r > 1.0], an.study)
        part["retention_gap"] = {k: v for k, v in gap.items() if k != "by_ratio"}
        if gap["n"]:
            text += (f"; retention in-domain {gap['retention_in_domain']:.3f} vs general "
                     f"{gap['retention_general']:.3f}, gap {gap['mean']:+.3f} +- "
                     f"{gap['stderr']:.3f} over {gap['n']} cells")
            if status == INCONCLUSIVE:
                status = decide(gap["mean"], gap["stderr"], gap["n"])
                if status != INCONCLUSIVE:
                    part["decided_by"] = "retention gap"
        else:
            text += f"; retention gap skipped ({gap.get('skipped')})"
        part["status"] = status
        parts.append(part)
        texts.append(text + f" -> {status}" + (f" (by {part['decided_by']})"
                                                if "decided_by" in part else ""))
    return _finding("general_collapses_first", claim, parts, "; ".join(texts), rule,
                    "no baseline cells")


def _stat_text(s: dict) -> str:
    if not s["n"]:
        return f"no matched cells ({s['n_a']} {s['a']}, {s['n_b']} {s['b']})"
    return (f"{s['a']} - {s['b']} = {s['mean']:+.4f} +- {s['stderr']:.4f} "
            f"({s['stderr_kind']} stderr, {s['n']} matched cells)")


def _finding_trace(an: Analysis) -> dict:
    claim = ("CoT / blended supervision retains more general knowledge than label-only "
             "supervision at equal compression ratio")
    rule = (f"per trace format: paired general-score difference vs label at matched cells; "
            f"reproduced if > {Z:g} stderr, not reproduced if < -{Z:g} stderr")
    if not an.study.has_general:
        return _finding("trace_retains_general", claim, [], "", rule,
                        "no general-benchmark scores in the rows")
    trace = [f for f in TRACE_FORMATS if f in an.study.formats]
    if "label" not in an.study.formats or not trace:
        return _finding("trace_retains_general", claim, [], "", rule,
                        f"needs label and cot/blended cells; formats present: "
                        f"{an.study.formats}")
    parts, texts = [], []
    for f in trace:
        s = paired_difference(an.study.cells, "format", f, "label", "general_score")
        st = decide(s["mean"], s["stderr"], s["n"])
        parts.append({"format": f, "status": st, **{k: v for k, v in s.items() if k != "pairs"}})
        texts.append(f"general score {_stat_text(s)} -> {st}")
    if all(p["n"] == 0 for p in parts):
        return _finding("trace_retains_general", claim, [], "", rule,
                        "no matched (ratio, method, schedule, examples, seed) cells between "
                        "label and cot/blended")
    return _finding("trace_retains_general", claim, parts, "; ".join(texts), rule)


def _finding_pair(an, fid, field, a, b, drop, claim) -> dict:
    rule = (f"paired differences ({a} - {b}) at matched cells in in-domain accuracy and general "
            f"score; reproduced if some metric > {Z:g} stderr and none < -{Z:g} stderr")
    metrics = ["in_domain_accuracy"] + (["general_score"] if an.study.has_general else [])
    parts, texts = [], []
    for m in metrics:
        s = paired_difference(an.study.cells, field, a, b, m, drop)
        if not s["n"]:
            continue
        st = decide(s["mean"], s["stderr"], s["n"])
        won = (a if s["mean"] > 0 else b) if st != INCONCLUSIVE else "neither (within noise)"
        parts.append({"metric": m, "status": st, "winner": won,
                      **{k: v for k, v in s.items() if k != "pairs"}})
        texts.append(f"{m}: {_stat_text(s)}; better: {won}")
    if not parts:
        n_a = sum(getattr(c, field) == a for c in an.study.cells)
        n_b = sum(getattr(c, field) == b for c in an.study.cells)
        return _finding(fid, claim, [], "", rule, f"no matched cells ({n_a} {field}={a} rows, "
                        f"{n_b} {field}={b} rows)")
    if not an.study.has_general:
        texts.append("general score not measured")
    return _finding(fid, claim, parts, "; ".join(texts), rule)


def summary(an: Analysis) -> dict:
    """JSON-serialisable summary (NaN -> null): settings, teacher, fits, findings, rows."""
    st = an.study
    t_acc, t_acc_se = st.teacher_value("in_domain_accuracy")
    t_gen, t_gen_se = st.teacher_value("general_score")
    out = {
        "source": st.source,
        "settings": {"method": an.method, "schedule": an.schedule, "n_boot": an.n_boot,
                     "seed": an.seed, "level": an.level, "z": Z,
                     "extrapolation_tolerance": {"abs": EXTRAP_TOL_ABS, "stderr": EXTRAP_TOL_SE},
                     "min_error": MIN_ERROR},
        "teacher": {"in_domain_accuracy": t_acc, "in_domain_accuracy_stderr": t_acc_se,
                    "general_score": t_gen, "general_score_stderr": t_gen_se,
                    "in_domain_chance": st.in_domain_chance, "general_chance": st.general_chance,
                    "params": st.teachers[0].teacher_params, "task": st.teachers[0].task,
                    "name": st.teachers[0].name,
                    "original": [dataclasses.asdict(r) for r in st.original_teachers]},
        "n_cells": len(st.cells), "formats": st.formats,
        "fits": [cf.as_dict() for cf in an.fits.values()],
        "extrapolation": an.extrapolations,
        "held_out_each_ratio": an.held_out_each,
        "findings": an.findings,
        "notes": an.notes,
        "rows": [dataclasses.asdict(r) for r in (*st.teachers, *st.cells)],
    }
    return to_json(out)


def to_json(obj):
    """Plain JSON types: NaN/Inf -> None, numpy scalars/arrays -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
