"""The study's law fits with bootstrap intervals. Optimisation is always
``jdistill.scaling``'s (summed Huber, multi-start L-BFGS-B, ``fit_weighted`` refits).

Fits, per supervision format, on the *baseline* rows (default method ``full``, schedule
``one_shot``) plus the teacher row(s) at r = 1:

- in-domain error vs (r, D): ``distill_error`` (E + A r^alpha + B / D^beta) when the format
  has >= 6 points and >= 2 distinct data sizes D. With one D, B and beta cannot be told
  apart from E, so the fallback is ``power_error`` (E + A r^alpha, a 3-parameter law defined
  here) when there are >= 4 points; with fewer no fit is made (said in the notes). The
  teacher enters the 2-D fit at the largest observed D of its format (it is the r = 1
  model, and placing it there does not widen the fitted D range). Errors are floored at
  ``MIN_ERROR`` (an accuracy of 1.0 would make the log residual infinite).
- collapse of in-domain accuracy and of general score vs r: ``gk_collapse`` with the
  chance level fixed to the rows' known chance (``collapse_law``), so 3 free parameters
  (top, k, log r0) and r0 (the ratio at which the score is halfway to chance) is derived.

Huber delta: 1.345 x the median measured stderr of the points in residual units (stderr /
error for the log-residual error laws, stderr for the linear-residual collapse laws), the
classic choice (95% asymptotic efficiency under Gaussian noise): points within their noise
count quadratically, outliers linearly. Chinchilla's fixed 1e-3 suits losses measured to
~0.1%; accuracies from a few hundred evaluation examples carry 2-5% noise, so 1e-3 turns the
fit into least absolute deviations, whose kinks made L-BFGS-B bootstrap refits 2-3x slower
here. Rows without stderrs fall back to 1e-3 (log) / 0.01 (linear). Never below 1e-3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jdistill import scaling as sc
from jdistill.scaling.laws import POWER_ERROR, collapse_law
from jdistill.study.rows import Row

MIN_ERROR = 1e-3  # floor on in-domain error before log residuals
MIN_POINTS_2D = 6  # distill_error needs this many points (and >= 2 distinct D)
MIN_ROW_BOOT = 8  # fewer points: parametric bootstrap from the stderrs (see ``bootstrap``)
MIN_DOF_DECIDE = 2  # r0 intervals decide finding 2 only with n - p >= this
HUBER_K = 1.345  # Huber delta = HUBER_K x median stderr in residual units


@dataclasses.dataclass(frozen=True)
class CurveFit:
    """A fitted law for one (format, metric) and its bootstrap.

    ``metric`` is ``in_domain_error`` (fitted on error, predicted as accuracy),
    ``in_domain_collapse`` or ``general_collapse`` (fitted and predicted as the score).
    """

    format: str
    metric: str
    result: sc.Fit
    boot: sc.Bootstrap | None
    x: dict
    y: np.ndarray
    choice: str  # why this law

    @property
    def law(self) -> sc.Law:
        return self.result.law

    @property
    def on_error(self) -> bool:
        return self.metric == "in_domain_error"

    def _x(self, r, D=None) -> dict:
        r = np.atleast_1d(np.asarray(r, dtype=float))
        x = {"r": r}
        if "D" in self.law.x_names:
            if D is None:
                raise ValueError(f"{self.law.name} needs a data size D")
            x["D"] = np.broadcast_to(np.asarray(D, dtype=float), r.shape).copy()
        return x

    def predict(self, r, D=None) -> np.ndarray:
        """Predicted accuracy / score at ratios r (and data size D where the law has one)."""
        p = sc.predict(self.law, self.result.theta, self._x(r, D))
        return 1.0 - p if self.on_error else p

    def band(self, r, D=None) -> tuple[np.ndarray, np.ndarray] | None:
        """Bootstrap percentile band (low, high) of the accuracy / score; None without one."""
        if self.boot is None:
            return None
        lo, hi = self.boot.predict_interval(self._x(r, D))
        return (1.0 - hi, 1.0 - lo) if self.on_error else (lo, hi)

    @property
    def D_range(self) -> tuple[float, float] | None:
        if "D" not in self.x:
            return None
        return float(self.x["D"].min()), float(self.x["D"].max())

    def params(self) -> dict:
        return {**self.result.params, **self.law.derived_values(self.result.theta)}

    def intervals(self) -> dict:
        return self.boot.intervals() if self.boot is not None else {}

    def as_dict(self) -> dict:
        return {"format": self.format, "metric": self.metric, "law": self.law.name,
                "formula": self.law.formula, "choice": self.choice,
                "n_points": int(self.y.size), "params": self.params(),
                "intervals": self.intervals(),
                "level": self.boot.level if self.boot is not None else None,
                "n_boot": int(len(self.boot.thetas)) if self.boot is not None else 0,
                "converged": self.result.converged, "objective": self.result.objective,
                "huber_delta": self.result.delta, "residuals": self.result.residual_kind,
                "diagnostics": _safe(lambda: sc.diagnostics(self.result, self.x, self.y)),
                "r_range": [float(self.x["r"].min()), float(self.x["r"].max())],
                "D_range": list(self.D_range) if self.D_range else None}


def _safe(fn):
    try:
        return fn()
    except (ValueError, ZeroDivisionError, FloatingPointError) as err:
        return {"skipped": str(err)}


def error_law_choice(rows: Sequence[Row]) -> tuple[sc.Law | None, str]:
    """Which in-domain error law the points support (teacher included), and why."""
    n = len(rows)
    n_d = len({r.examples for r in rows if not r.teacher})
    if n >= MIN_POINTS_2D and n_d >= 2:
        why = f"distill_error: {n} points, {n_d} data sizes"
        if n_d == 2:  # E + B / D^beta takes only two values: a ridge in (E, B, beta)
            why += (" (with 2 sizes only E + B/D^beta at those sizes is identified, not E, B "
                    "and beta separately; extrapolating in D is a guess)")
        return sc.get_law("distill_error"), why
    if n >= 4:
        why = (f"only {n_d} data size" if n_d < 2 else f"only {n} points (< {MIN_POINTS_2D})")
        return POWER_ERROR, f"power_error (fallback: {why}; D term not identifiable)"
    return None, f"no fit: {n} points (teacher included); the smallest law needs >= 4"


def _error_xy(rows: Sequence[Row]) -> tuple[dict, np.ndarray, np.ndarray]:
    """({"r", "D"}, in-domain error, its stderr) for rows (teacher at the largest D)."""
    cells = [r for r in rows if not r.teacher]
    d_teacher = max((r.examples for r in cells), default=1)
    r = np.array([x.r for x in rows])
    d = np.array([float(d_teacher if x.teacher else x.examples) for x in rows])
    err = np.maximum(1.0 - np.array([x.acc for x in rows]), MIN_ERROR)
    return {"r": r, "D": d}, err, np.array([x.acc_se for x in rows])


def fit_error(rows: Sequence[Row], fmt: str, n_boot: int, seed: int, level: float = 0.95
              ) -> tuple[CurveFit | None, str]:
    """In-domain error law for one format's rows (teacher included); (fit or None, note)."""
    law, choice = error_law_choice(rows)
    if law is None:
        return None, f"{fmt}: in-domain error {choice}"
    x, y, se = _error_xy(rows)
    x = {k: v for k, v in x.items() if k in law.x_names}
    return _fit(law, x, y, se, fmt, "in_domain_error", choice, n_boot, seed, level,
                y_range=(MIN_ERROR, 1.0))


def fit_collapse(rows: Sequence[Row], fmt: str, metric: str, chance: float, n_boot: int,
                 seed: int, level: float = 0.95) -> tuple[CurveFit | None, str]:
    """Collapse law (chance fixed) of in-domain accuracy or general score vs r."""
    name = "in_domain_collapse" if metric == "in_domain_accuracy" else "general_collapse"
    pts = [(r.r, *r.value(metric)) for r in rows if math.isfinite(r.value(metric)[0])]
    if not math.isfinite(chance):
        return None, f"{fmt}: {name} skipped: rows give no chance level"
    if len(pts) < 4:
        return None, f"{fmt}: {name} skipped: {len(pts)} points, need >= 4 for 3 parameters"
    x = {"r": np.array([p[0] for p in pts])}
    y = np.array([p[1] for p in pts])
    se = np.array([p[2] for p in pts])
    return _fit(collapse_law(chance), x, y, se, fmt, name, f"gk_collapse, chance fixed at "
                f"{chance:.4g}: {len(pts)} points", n_boot, seed, level, y_range=(0.0, 1.0))


def huber_delta(y: np.ndarray, se: np.ndarray, kind: str) -> float:
    """Huber delta for a fit: HUBER_K x the median stderr in residual units (see the module
    docstring); 1e-3 (log) / 0.01 (linear) when no stderrs are known."""
    se = np.asarray(se, dtype=float)
    ok = np.isfinite(se) & (se > 0)
    if not ok.any():
        return 1e-3 if kind == "log" else 0.01
    scale = se[ok] / y[ok] if kind == "log" else se[ok]
    return max(1e-3, HUBER_K * float(np.median(scale)))


def _fit(law, x, y, se, fmt, metric, choice, n_boot, seed, level, y_range=(0.0, 1.0)):
    try:
        delta = huber_delta(np.asarray(y, dtype=float), se, law.residuals)
        res = sc.fit(law, x, y, delta=delta)
        boot, how = None, "none"
        if n_boot >= 2:
            boot, how = bootstrap(res, x, y, se, n_boot=n_boot, seed=seed, level=level,
                                  y_range=y_range)
    except ValueError as err:
        return None, f"{fmt}: {metric} fit failed: {err}"
    if boot is not None:
        choice += f"; {how}"
    return CurveFit(fmt, metric, res, boot, x, np.asarray(y, dtype=float), choice), ""


def bootstrap(result: sc.Fit, x: dict, y: np.ndarray, se: np.ndarray, *, n_boot: int,
              seed: int, level: float = 0.95, y_range=(0.0, 1.0)
              ) -> tuple[sc.Bootstrap, str]:
    """Bootstrap refits of ``result``: (scaling.Bootstrap, a line saying which kind).

    With at least ``MIN_ROW_BOOT`` points this is ``scaling.bootstrap`` (rows resampled with
    replacement). With fewer, row resampling has a few dozen distinct resamples, many
    fitting exactly (too narrow) or degenerate (absurd, and 10x slower refits), so when
    every point has a measured stderr it is a parametric bootstrap instead: new targets
    y* = fit + se_eff * N(0, 1), refitted by ``scaling.fit_weighted`` from the full-data
    optimum, where se_eff = se x max(1, sqrt(chi^2 / (n - p))) inflates the stderrs when
    the law misses the points by more than they allow (Birge ratio; n - p >= 1).
    """
    law = result.law
    n, p = y.size, len(result.theta)
    se = np.asarray(se, dtype=float)
    if n >= MIN_ROW_BOOT or not (np.all(np.isfinite(se)) and np.all(se > 0)):
        how = f"row bootstrap ({n_boot} resamples)"
        return sc.bootstrap(result, x, y, n_boot=n_boot, seed=seed, level=level), how
    pred = sc.predict(law, result.theta, x)
    chi2 = float(np.sum(((pred - y) / se) ** 2))
    birge = max(1.0, math.sqrt(chi2 / (n - p))) if n > p else 1.0
    rng = np.random.default_rng(seed)
    thetas = np.empty((n_boot, p))
    lo, hi = y_range
    for b in range(n_boot):
        y_b = np.clip(pred + birge * se * rng.standard_normal(n), lo, hi)
        thetas[b], _, _, _ = sc.fit_weighted(law, x, y_b, np.ones(n), result.theta[None],
                                             result.delta, result.residual_kind, refine=None)
    how = (f"parametric bootstrap from the rows' stderrs x {birge:.2f} ({n_boot} draws; "
           f"{n} points are too few for row resampling)")
    return sc.Bootstrap(law=law, thetas=thetas, seed=seed, level=level), how
