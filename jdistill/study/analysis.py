"""A study's analysis: every fit, held-out extrapolation and finding the report and the
planner read, as one ``Analysis``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jdistill import scaling as sc
from jdistill.study.findings import EXTRAP_TOL_ABS, EXTRAP_TOL_SE, findings
from jdistill.study.fits import (CurveFit, _error_xy, error_law_choice, fit_collapse, fit_error,
                                 huber_delta)
from jdistill.study.rows import Row, Study


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Everything the report and planner need: the study, its fits and findings."""

    study: Study
    method: str
    schedule: str
    n_boot: int
    seed: int
    level: float
    fits: dict  # {(format, metric): CurveFit}
    extrapolations: dict  # {format: dict}
    held_out_each: dict  # {format: [dict per held-out ratio]} (diagnostic; no finding reads it)
    findings: list
    notes: list

    def fit_for(self, fmt: str, metric: str) -> CurveFit | None:
        return self.fits.get((fmt, metric))

    def baseline(self, fmt: str) -> list[Row]:
        """The format's baseline cells plus the teacher rows (a fit's data)."""
        return [*self.study.teachers, *self.study.baseline(fmt, self.method, self.schedule)]


def baseline_schedule(study: Study, method: str) -> str:
    """The schedule the law fits read by default: the one with cells at the most ratios
    (a chain gives a whole curve); iterative, the paper's protocol, on a tie."""
    counts = {s: len({c.ratio for c in study.cells if c.method == method and c.schedule == s})
              for s in ("iterative", "one_shot")}
    return max(counts, key=lambda s: (counts[s], s == "iterative"))


def analyze(study: Study, *, method: str = "full", schedule: str | None = None,
            n_boot: int = 200, seed: int = 0, level: float = 0.95) -> Analysis:
    """Fits (with bootstrap), held-out extrapolation and findings for a study.

    Args:
      study: from ``select`` / ``load_study``.
      method, schedule: the baseline the per-format law fits use (schedule None:
        `baseline_schedule`).
      n_boot: bootstrap resamples per fit (0: no intervals; findings then use the
        interval-free tests only).
      seed: bootstrap seed (each fit gets seed + its index).
      level: interval coverage.
    """
    if n_boot == 1 or n_boot < 0:
        raise ValueError(f"n_boot must be 0 or >= 2, got {n_boot}")
    notes = list(study.notes)
    schedule = schedule or baseline_schedule(study, method)
    fits, extrap, each = {}, {}, {}
    if not any(c.method == method and c.schedule == schedule for c in study.cells):
        have = sorted({(c.method, c.schedule) for c in study.cells})
        notes.append(f"no cells with method={method!r}, schedule={schedule!r} (have {have}); "
                     "no law fits")
    if not study.has_general:
        notes.append("rows have no general-benchmark scores (or no general chance level): "
                     "general-knowledge fits and findings skipped")
    k = 0
    for fmt in study.formats:
        rows = [*study.teachers, *study.baseline(fmt, method, schedule)]
        if len(rows) == len(study.teachers):
            notes.append(f"{fmt}: no method={method!r}, schedule={schedule!r} cells; no law "
                         "fits for this format")
            continue
        jobs = [("in_domain_error", lambda s: fit_error(rows, fmt, n_boot, s, level)),
                ("in_domain_collapse", lambda s: fit_collapse(
                    rows, fmt, "in_domain_accuracy", study.in_domain_chance, n_boot, s, level))]
        if study.has_general:
            jobs.append(("general_collapse", lambda s: fit_collapse(
                rows, fmt, "general_score", study.general_chance, n_boot, s, level)))
        for metric, job in jobs:
            cf, note = job(seed + k)
            k += 1
            if cf is not None:
                fits[(fmt, metric)] = cf
            if note:
                notes.append(note)
        extrap[fmt] = extrapolate(rows, fmt, fits.get((fmt, "in_domain_error")),
                                  chance=study.in_domain_chance)
        each[fmt] = hold_out_each_ratio(rows, fmt, study.in_domain_chance)
    an = Analysis(study, method, schedule, n_boot, seed, level, fits, extrap, each, [], notes)
    an.findings.extend(findings(an))
    return an


def at_least_chance(accuracy, chance: float):
    """Accuracies as finding 1 predicts them: never below chance (0 where it is unknown)."""
    return np.maximum(accuracy, chance if math.isfinite(chance) else 0.0)


def extrapolate(rows: Sequence[Row], fmt: str, full_fit: CurveFit | None,
                chance: float = 0.0) -> dict:
    """Fit the error law on rows with requested ratio below the largest, predict the rest.

    The predicted accuracy is bounded below by `chance` (the error law alone is unbounded
    and, past the knee, predicts accuracies below zero that no classifier can score): a law
    that says "collapsed" at the held-out ratio is right when the student is at chance.

    Returns the held-out accuracy errors, the tolerance and whether the full-data curve is
    non-increasing in r (checked on a grid from 1 to the largest ratio at each data size).
    """
    cells = [r for r in rows if not r.teacher]
    out = {"format": fmt}
    if not cells:
        return {**out, "skipped": "no cells"}
    top = max(c.ratio for c in cells)
    train = [r for r in rows if r.ratio < top]
    test = [r for r in rows if r.ratio == top]
    out.update(held_out_ratio=top, n_train=len(train), n_test=len(test))
    law, choice = error_law_choice(train)
    if law is None:
        return {**out, "skipped": f"training rows (ratio < {top:g}): {choice}"}
    x, y, se_train = _error_xy(train)
    x = {k: v for k, v in x.items() if k in law.x_names}
    try:
        res = sc.fit(law, x, y, delta=huber_delta(y, se_train, law.residuals))
    except ValueError as err:
        return {**out, "skipped": f"fit on ratio < {top:g} failed: {err}"}
    tx = {"r": np.array([t.r for t in test]), "D": np.array([float(t.examples) for t in test])}
    pred = at_least_chance(1.0 - sc.predict(law, res.theta, {k: tx[k] for k in law.x_names}),
                           chance)
    obs = np.array([t.acc for t in test])
    tol, se_rms = _tolerance(test)
    out.update(law=law.name, choice=choice, chance_floor=float(at_least_chance(0.0, chance)),
               train_max_ratio=max(r.ratio for r in train),
               predicted=pred.tolist(), observed=obs.tolist(),
               abs_err=np.abs(pred - obs).tolist(), mean_abs_err=float(np.mean(np.abs(pred - obs))),
               max_abs_err=float(np.max(np.abs(pred - obs))), tolerance=tol,
               stderr_rms=se_rms)
    if full_fit is not None:
        rg = np.geomspace(1.0, max(r.r for r in rows), 200)
        ds = sorted({float(d) for d in full_fit.x["D"]}) if "D" in full_fit.x else [None]
        out["monotone"] = bool(all(np.all(np.diff(full_fit.predict(rg, d)) <= 1e-9) for d in ds))
    return out


def _tolerance(test: Sequence[Row]) -> tuple[float, float]:
    """(accuracy error tolerated at held-out rows, their rms stderr): finding 1's rule."""
    se = np.array([t.acc_se for t in test])
    se_rms = float(np.sqrt(np.mean(se ** 2))) if np.all(np.isfinite(se)) else math.nan
    tol = max(EXTRAP_TOL_ABS, EXTRAP_TOL_SE * se_rms) if math.isfinite(se_rms) else EXTRAP_TOL_ABS
    return tol, se_rms


def hold_out_each_ratio(rows: Sequence[Row], fmt: str, chance: float) -> list[dict]:
    """Each ratio held out in turn: both in-domain laws fitted on the other ratios' rows (and
    the teacher) predict its rows' accuracy.

    Finding 1's rule holds out only the largest ratio, where a collapsed student sits at the
    chance floor whatever the curve before it; this shows how each law does between the
    ratios too (interpolation) and next to the teacher. A diagnostic, read by no finding:
    its rule was written after the study it was first run on (BUILD_NOTES.md).
    """
    out = []
    for held in sorted({r.ratio for r in rows if not r.teacher}):
        train = [r for r in rows if r.ratio != held]
        test = [r for r in rows if r.ratio == held]
        obs = np.array([t.acc for t in test])
        tol, _ = _tolerance(test)
        entry = {"held_out_ratio": held, "n_train": len(train), "n_test": len(test),
                 "observed": float(obs.mean()), "tolerance": tol, "laws": {}}
        fits = {"error": fit_error(train, fmt, 0, 0),
                "collapse": fit_collapse(train, fmt, "in_domain_accuracy", chance, 0, 0)}
        for kind, (cf, note) in fits.items():
            if cf is None:
                entry["laws"][kind] = {"skipped": note}
                continue
            pred = np.array([cf.predict(t.r, float(t.examples))[0] for t in test])
            pred = at_least_chance(pred, chance) if kind == "error" else pred
            err = np.abs(pred - obs)
            entry["laws"][kind] = {"law": cf.law.name, "predicted": float(pred.mean()),
                                   "mean_abs_err": float(err.mean()),
                                   "within_tolerance": bool(err.mean() <= tol)}
        out.append(entry)
    return out
