"""Scaling-law fitting: laws as pure functions, robust multi-start fits, bootstrap intervals.

A law is a pure function ``fn(x, theta) -> prediction`` where ``x`` maps column names to
float arrays of shape (n,) and ``theta`` is a sequence of internal parameters. Every
``theta[i]`` must broadcast against the ``x`` arrays: the fitter evaluates many starts at
once by passing ``x`` columns of shape (n, 1) and ``theta`` of shape (p, K), which gives
predictions of shape (n, K). Write laws with numpy ufuncs and this comes for free.

Fitting follows Chinchilla "approach 3" (Hoffmann et al. 2022) as replicated by
Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"): a *summed* Huber loss
(delta = 1e-3) on log residuals, minimised with L-BFGS-B from a grid of starts. A mean-
reduced Huber makes L-BFGS stop at its start (its convergence tests are absolute), so the
objective here is always the sum; tolerances are tightened as well.

Speed: the objective of every grid start is evaluated in one vectorised pass, and L-BFGS-B
(with an analytic gradient where the law provides a Jacobian, else vectorised central
differences) runs only from the ``refine`` best starts. Bootstrap refits reuse the full-data
optimum as their start (plus optionally the best few grid starts for the resample), with
resampling expressed as integer point weights.

This module imports nothing else from jdistill.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import functools
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import optimize, special

Array = np.ndarray
XDict = Mapping[str, Array]


# ----------------------------------------------------------------------------------------
# Laws
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Law:
    """A scaling law: a pure function plus what the fitter needs to know about it.

    Attributes:
      name: key used on the command line.
      fn: ``fn(x, theta) -> y_hat``; see the module docstring for broadcasting.
      param_names: names of the internal parameters ``theta`` (length p).
      x_names: the input columns the law reads from ``x``.
      bounds: p pairs (low, high) for L-BFGS-B; ``None`` for an open side.
      start_grid: p sequences; the fitter starts from their Cartesian product.
      formula: human-readable formula (reported in fit.json / fit.md).
      residuals: ``"log"`` (log y_hat - log y, needs y > 0) or ``"linear"``.
      report: maps internal theta (p,) to reported {name: value} (e.g. A = exp(a)).
      derived: maps the reported dict to derived quantities {name: value}.
      jac: optional analytic Jacobian ``jac(x, theta) -> (n, p)`` of ``fn`` for one theta.
      y_range: optional (low, high) range the target must lie in (checked, not fitted).
    """

    name: str
    fn: Callable[[XDict, Sequence], Array]
    param_names: tuple[str, ...]
    x_names: tuple[str, ...]
    bounds: tuple[tuple[float | None, float | None], ...]
    start_grid: tuple[Sequence[float], ...]
    formula: str = ""
    residuals: str = "log"
    report: Callable[[Array], dict] | None = None
    derived: Callable[[dict], dict] | None = None
    jac: Callable[[XDict, Array], Array] | None = None
    y_range: tuple[float, float] | None = None

    def __post_init__(self):
        p = len(self.param_names)
        if len(self.bounds) != p or len(self.start_grid) != p:
            raise ValueError(
                f"law {self.name!r}: {p} param_names but {len(self.bounds)} bounds and "
                f"{len(self.start_grid)} start_grid entries; give one of each per parameter")
        if self.residuals not in ("log", "linear"):
            raise ValueError(f"law {self.name!r}: residuals must be 'log' or 'linear'")

    def reported(self, theta: Array) -> dict:
        """Reported parameters {name: float} for internal ``theta`` of shape (p,)."""
        theta = np.asarray(theta, dtype=float)
        if self.report is None:
            return {k: float(v) for k, v in zip(self.param_names, theta)}
        return {k: float(v) for k, v in self.report(theta).items()}

    def derived_values(self, theta: Array) -> dict:
        """Derived quantities {name: float} (empty when the law defines none)."""
        if self.derived is None:
            return {}
        return {k: float(v) for k, v in self.derived(self.reported(theta)).items()}


def _lse3(t1, t2, t3):
    """log(exp t1 + exp t2 + exp t3), stable, with the softmax weights (for gradients)."""
    m = np.maximum(np.maximum(t1, t2), t3)
    e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = e1 + e2 + e3
    return m + np.log(s), (e1 / s, e2 / s, e3 / s)


def chinchilla(x: XDict, theta) -> Array:
    """Chinchilla loss L(N, D) = E + A / N^alpha + B / D^beta.

    Source: Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", eq. (2)
    and approach 3; LSE parametrisation as in Besiroglu et al. 2024:
    log L = LSE(a - alpha log N, b - beta log D, e), A = exp(a), B = exp(b), E = exp(e).

    Args:
      x: {"N": parameters, "D": training tokens}, arrays broadcastable to each other.
      theta: (a, b, e, alpha, beta), each a scalar or (K,) for K starts at once.
    Returns:
      predicted loss, shape of the broadcast of x and theta entries.
    """
    a, b, e, alpha, beta = theta
    log_l, _ = _lse3(a - alpha * np.log(x["N"]), b - beta * np.log(x["D"]), e + 0 * x["N"])
    return np.exp(log_l)


def _chinchilla_jac(x: XDict, theta) -> Array:
    a, b, e, alpha, beta = theta
    ln_n, ln_d = np.log(x["N"]), np.log(x["D"])
    log_l, (w1, w2, w3) = _lse3(a - alpha * ln_n, b - beta * ln_d, e + 0 * ln_n)
    f = np.exp(log_l)
    # d log L / d theta = softmax weights times the inner derivatives; dL = L dlogL.
    return f[:, None] * np.stack([w1, w2, w3, -w1 * ln_n, -w2 * ln_d], axis=1)


def _chinchilla_report(theta):
    a, b, e, alpha, beta = theta
    return {"A": math.exp(a), "B": math.exp(b), "E": math.exp(e), "alpha": alpha, "beta": beta}


def _chinchilla_derived(p):
    # Compute-optimal allocation N_opt ~ C^a_opt, D_opt ~ C^b_opt (Hoffmann et al. 2022, eq. 4).
    s = p["alpha"] + p["beta"]
    return {"a_opt": p["beta"] / s, "b_opt": p["alpha"] / s}


def frantar_sparsity(x: XDict, theta) -> Array:
    """Sparsity scaling law L(S, N, D) = (a (1 - S)^b + c) N^-d + e D^-f + g.

    Source: Frantar et al. 2024, "Scaling Laws for Sparsely-Connected Foundation Models"
    (ICLR 2024), eq. (1); S = sparsity in [0, 1), N = non-zero parameters, D = data (the
    reference notebook normalises N by 1e6 and D by 1e5 steps or 1e9 examples).

    Args:
      x: {"S", "N", "D"} arrays broadcastable to each other.
      theta: (a, b, c, d, e, f, g), each a scalar or (K,).
    """
    a, b, c, d, e, f, g = theta
    return (a * (1.0 - x["S"]) ** b + c) * x["N"] ** (-d) + e * x["D"] ** (-f) + g


def _frantar_jac(x: XDict, theta) -> Array:
    a, b, c, d, e, f, g = theta
    s = 1.0 - x["S"]
    ln_s = np.log(np.where(s > 0, s, 1.0))  # s^b ln s -> 0 as s -> 0 for b > 0
    sb, nd, df_ = s ** b, x["N"] ** (-d), x["D"] ** (-f)
    ln_n, ln_d = np.log(x["N"]), np.log(x["D"])
    return np.stack([sb * nd, a * sb * ln_s * nd, nd, -(a * sb + c) * nd * ln_n,
                     df_, -e * df_ * ln_d, np.ones_like(nd)], axis=1)


def distill_error(x: XDict, theta) -> Array:
    """In-domain error of a distilled student: err(r, D) = E + A r^alpha + B / D^beta.

    Form chosen for this study (BUILD_NOTES.md, "Scaling-law fitter"): a Chinchilla-
    style additive power law with an irreducible term E, a compression penalty growing as
    r^alpha (r = teacher params / student params >= 1, so r = 1 gives E + A + B/D^beta, the
    teacher-size student) and a data term B/D^beta (D = distillation examples or tokens).
    LSE parametrisation as for Chinchilla: log err = LSE(a + alpha log r, b - beta log D, e).

    Args:
      x: {"r": compression ratio, "D": examples or tokens}.
      theta: (a, b, e, alpha, beta); reported A = exp(a), B = exp(b), E = exp(e).
    """
    a, b, e, alpha, beta = theta
    log_err, _ = _lse3(a + alpha * np.log(x["r"]), b - beta * np.log(x["D"]), e + 0 * x["r"])
    return np.exp(log_err)


def _distill_error_jac(x: XDict, theta) -> Array:
    a, b, e, alpha, beta = theta
    ln_r, ln_d = np.log(x["r"]), np.log(x["D"])
    log_err, (w1, w2, w3) = _lse3(a + alpha * ln_r, b - beta * ln_d, e + 0 * ln_r)
    return np.exp(log_err)[:, None] * np.stack([w1, w2, w3, w1 * ln_r, -w2 * ln_d], axis=1)


def gk_collapse(x: XDict, theta) -> Array:
    """General-knowledge score with a collapse point r0 (a logistic in log r).

    score(r) = chance + (top - chance) * sigmoid(-k (log r - log r0))

    Form chosen for this study: general knowledge stays near the teacher's ``top`` for mild
    compression and collapses to ``chance`` (e.g. 0.25 on 4-way multiple choice) past r0;
    k sets how abrupt the collapse is. Same shape as the sigmoidal "emergence" fits of
    e.g. Srivastava et al. 2022 (BIG-bench), here decreasing in log compression ratio.
    Fitted on linear residuals since scores may approach chance. Derived: r0 = exp(log_r0).

    Args:
      x: {"r": compression ratio}.
      theta: (top, chance, k, log_r0).
    """
    top, chance, k, log_r0 = theta
    return chance + (top - chance) * special.expit(-k * (np.log(x["r"]) - log_r0))


def _gk_collapse_jac(x: XDict, theta) -> Array:
    top, chance, k, log_r0 = theta
    u = np.log(x["r"]) - log_r0
    s = special.expit(-k * u)
    ds = s * (1 - s)  # d sigmoid(z)/dz at z = -k u
    return np.stack([s, 1 - s, (top - chance) * ds * (-u), (top - chance) * ds * k], axis=1)


def grouped_error_law(n_groups: int) -> Law:
    """Per-group (e.g. per supervision format) ``distill_error`` with shared exponents.

    err(r, D, g) = E + A_g r^alpha + B_g / D^beta, g = integer column ``group`` in
    [0, n_groups). Exponents alpha, beta and E are shared across groups (the formats differ
    in how much they gain, not in how fast); amplitudes are per group. Theta is
    (e, alpha, beta, a_0..a_{G-1}, b_0..b_{G-1}) with A_g = exp(a_g), B_g = exp(b_g).
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    G = n_groups

    def amp(theta, start, group):
        # Sum of one-hot terms keeps (n,1) x (K,) broadcasting intact for grid evaluation.
        return sum(theta[start + g] * (group == g) for g in range(G))

    def fn(x, theta):
        e, alpha, beta = theta[0], theta[1], theta[2]
        grp = x["group"]
        a, b = amp(theta, 3, grp), amp(theta, 3 + G, grp)
        log_err, _ = _lse3(a + alpha * np.log(x["r"]), b - beta * np.log(x["D"]), e + 0 * a)
        return np.exp(log_err)

    def jac(x, theta):
        e, alpha, beta = theta[0], theta[1], theta[2]
        grp = x["group"]
        a, b = amp(theta, 3, grp), amp(theta, 3 + G, grp)
        ln_r, ln_d = np.log(x["r"]), np.log(x["D"])
        log_err, (w1, w2, w3) = _lse3(a + alpha * ln_r, b - beta * ln_d, e + 0 * a)
        cols = [w3, w1 * ln_r, -w2 * ln_d]
        cols += [w1 * (grp == g) for g in range(G)] + [w2 * (grp == g) for g in range(G)]
        return np.exp(log_err)[:, None] * np.stack(cols, axis=1)

    def report(theta):
        out = {"E": math.exp(theta[0]), "alpha": theta[1], "beta": theta[2]}
        out.update({f"A_{g}": math.exp(theta[3 + g]) for g in range(G)})
        out.update({f"B_{g}": math.exp(theta[3 + G + g]) for g in range(G)})
        return out

    names = ("e", "alpha", "beta") + tuple(f"a_{g}" for g in range(G)) + tuple(
        f"b_{g}" for g in range(G))
    bounds = ((-10.0, 2.0), (0.0, 5.0), (0.0, 5.0)) + ((-20.0, 20.0),) * (2 * G)
    grid = ((-4.0, -2.0, 0.0), (0.0, 0.5, 1.0, 2.0), (0.0, 0.5, 1.0)) + ((-4.0, 0.0),) * (2 * G)
    return Law(name="distill_error_grouped", fn=fn, param_names=names,
               x_names=("r", "D", "group"), bounds=bounds, start_grid=grid,
               formula="err = E + A_g r^alpha + B_g / D^beta (g = group; shared E, alpha, beta)",
               residuals="log", report=report, jac=jac)


LAWS: dict[str, Law] = {
    "chinchilla": Law(
        name="chinchilla", fn=chinchilla, param_names=("a", "b", "e", "alpha", "beta"),
        x_names=("N", "D"),
        bounds=((-10.0, 40.0), (-10.0, 40.0), (-5.0, 5.0), (0.0, 3.0), (0.0, 3.0)),
        # Besiroglu et al. 2024 grid: 6 * 6 * 5 * 5 * 5 = 4500 starts.
        start_grid=(np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
                    np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5)),
        formula="L = E + A / N^alpha + B / D^beta", residuals="log",
        report=_chinchilla_report, derived=_chinchilla_derived, jac=_chinchilla_jac),
    "frantar_sparsity": Law(
        name="frantar_sparsity", fn=frantar_sparsity,
        param_names=("a", "b", "c", "d", "e", "f", "g"), x_names=("S", "N", "D"),
        bounds=((0.0, 100.0), (0.0, 5.0), (0.0, 100.0), (0.0, 5.0), (0.0, 100.0), (0.0, 5.0),
                (0.0, 100.0)),
        start_grid=((0.2, 1.0),) * 7,
        formula="L = (a (1 - S)^b + c) N^-d + e D^-f + g", residuals="log",
        jac=_frantar_jac),
    "distill_error": Law(
        name="distill_error", fn=distill_error, param_names=("a", "b", "e", "alpha", "beta"),
        x_names=("r", "D"),
        bounds=((-20.0, 20.0), (-20.0, 20.0), (-10.0, 2.0), (0.0, 5.0), (0.0, 5.0)),
        start_grid=((-6.0, -4.0, -2.0, 0.0), (-4.0, -2.0, 0.0, 2.0, 4.0), (-4.0, -2.0, 0.0),
                    (0.0, 0.5, 1.0, 2.0), (0.0, 0.25, 0.5, 1.0)),
        formula="err = E + A r^alpha + B / D^beta", residuals="log",
        report=_chinchilla_report, jac=_distill_error_jac),
    "gk_collapse": Law(
        name="gk_collapse", fn=gk_collapse, param_names=("top", "chance", "k", "log_r0"),
        x_names=("r",),
        bounds=((0.0, 1.0), (0.0, 1.0), (0.0, 50.0), (-5.0, 10.0)),
        start_grid=((0.5, 0.8), (0.1, 0.3), (1.0, 4.0, 10.0), (0.0, 1.0, 2.0, 3.0)),
        formula="score = chance + (top - chance) sigmoid(-k (log r - log r0))",
        residuals="linear",
        derived=lambda p: {"r0": math.exp(p["log_r0"])}, jac=_gk_collapse_jac,
        y_range=(0.0, 1.0)),
}


def get_law(name: str, n_groups: int | None = None) -> Law:
    """Look up a shipped law; ``distill_error_grouped`` needs ``n_groups``."""
    if name == "distill_error_grouped":
        if n_groups is None:
            raise ValueError("law 'distill_error_grouped' needs a group column (--group=COL)")
        return grouped_error_law(n_groups)
    if name not in LAWS:
        raise ValueError(f"unknown law {name!r}; shipped laws: "
                         f"{sorted(LAWS) + ['distill_error_grouped']}")
    return LAWS[name]


# ----------------------------------------------------------------------------------------
# Loss and objective
# ----------------------------------------------------------------------------------------


def huber(r: Array, delta: float) -> Array:
    """Elementwise Huber loss: r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def residuals(law: Law, x: XDict, y: Array, theta, kind: str | None = None) -> Array:
    """Residuals of ``law`` at ``theta``: log y_hat - log y or y_hat - y, shape (n,)."""
    kind = kind or law.residuals
    pred = law.fn(x, theta)
    if kind == "log":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log(pred) - np.log(y)
    return pred - y


def _fd_jac(law: Law, x: XDict, theta: Array) -> Array:
    """Central-difference Jacobian (n, p), all 2p evaluations in one broadcast call."""
    p = theta.size
    h = 1e-6 * np.maximum(1.0, np.abs(theta))
    th = np.concatenate([theta[:, None] + np.diag(h), theta[:, None] - np.diag(h)], axis=1)
    out = law.fn({k: v[:, None] for k, v in x.items()}, th)
    return (out[:, :p] - out[:, p:]) / (2 * h)


def objective_and_grad(theta: Array, law: Law, x: XDict, y: Array, w: Array, delta: float,
                       kind: str) -> tuple[float, Array]:
    """Summed weighted Huber of residuals and its gradient wrt internal theta (p,)."""
    pred = law.fn(x, theta)
    jac = law.jac(x, theta) if law.jac is not None else _fd_jac(law, x, theta)
    if kind == "log":
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.log(pred) - np.log(y)
        jac = jac / pred[:, None]
    else:
        r = pred - y
    f = float(np.sum(w * huber(r, delta)))
    g = (w * np.clip(r, -delta, delta)) @ jac
    if not np.isfinite(f) or not np.all(np.isfinite(g)):
        return 1e30, np.zeros_like(theta)  # e.g. log of a negative prediction: steer away
    return f, g


def grid_starts(law: Law) -> Array:
    """All start points from the law's start grid, shape (K, p)."""
    return np.array(list(itertools.product(*law.start_grid)), dtype=float)


def random_starts(law: Law, n: int, seed: int = 0, low: float = 0.0, high: float = 1.0
                  ) -> Array:
    """``n`` uniform random starts in [low, high]^p clipped to bounds, shape (n, p).

    The Frantar et al. reference notebook starts BFGS from uniform(0, 1) draws.
    """
    rng = np.random.default_rng(seed)
    return _clip_to_bounds(law, rng.uniform(low, high, size=(n, len(law.param_names))))


def _clip_to_bounds(law: Law, theta: Array) -> Array:
    lo = np.array([-np.inf if b[0] is None else b[0] for b in law.bounds])
    hi = np.array([np.inf if b[1] is None else b[1] for b in law.bounds])
    return np.clip(theta, lo, hi)


def grid_objectives(law: Law, x: XDict, y: Array, starts: Array, w: Array | None = None,
                    delta: float = 1e-3, kind: str | None = None, chunk: int = 2048
                    ) -> Array:
    """Objective at each start in one vectorised pass per chunk; (K,) with inf for invalid."""
    kind = kind or law.residuals
    w = np.ones_like(y) if w is None else w
    xb = {k: v[:, None] for k, v in x.items()}
    out = np.empty(len(starts))
    for i in range(0, len(starts), chunk):
        th = starts[i:i + chunk].T  # (p, k)
        with np.errstate(all="ignore"):
            pred = law.fn(xb, th)
            r = np.log(pred) - np.log(y)[:, None] if kind == "log" else pred - y[:, None]
            out[i:i + chunk] = np.sum(w[:, None] * huber(r, delta), axis=0)
    out[~np.isfinite(out)] = np.inf
    return out


# ----------------------------------------------------------------------------------------
# Data checks and loading
# ----------------------------------------------------------------------------------------


def check_data(law: Law, x: XDict, y: Array, drop_nonfinite: bool = False
               ) -> tuple[dict, Array, Array]:
    """Validate inputs; returns (x, y, kept_row_mask) with float arrays of shape (n,).

    NaN/Inf rows are an error unless ``drop_nonfinite`` (then dropped with a warning): a
    silently shrinking data set changes a fit, so the user must opt in.
    """
    missing = [k for k in law.x_names if k not in x]
    if missing:
        raise ValueError(f"law {law.name!r} needs x columns {list(law.x_names)}; missing "
                         f"{missing}. Pass them with --x=" + ",".join(law.x_names))
    y = np.asarray(y, dtype=float).reshape(-1)
    xs = {k: np.asarray(x[k], dtype=float).reshape(-1) for k in law.x_names}
    for k, v in xs.items():
        if v.shape != y.shape:
            raise ValueError(f"x column {k!r} has {v.size} rows but y has {y.size}")
    ok = np.isfinite(y)
    for v in xs.values():
        ok &= np.isfinite(v)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        if not drop_nonfinite:
            raise ValueError(
                f"{bad.size} row(s) have NaN/Inf in x or y (first rows: {bad[:10].tolist()}); "
                "fix the data or pass --drop_nonfinite to drop them with a warning")
        warnings.warn(f"dropping {bad.size} non-finite row(s): {bad[:10].tolist()}")
        y = y[ok]
        xs = {k: v[ok] for k, v in xs.items()}
    p = len(law.param_names)
    if y.size <= p:
        raise ValueError(f"law {law.name!r} has {p} parameters but only {y.size} usable "
                         f"points; need more than {p} points (add runs or use a smaller law)")
    if np.ptp(y) == 0:
        raise ValueError(f"y is constant ({y[0]!r}) over all {y.size} points; nothing to fit "
                         "(check --y names the metric you meant)")
    if law.residuals == "log" and np.any(y <= 0):
        raise ValueError(f"law {law.name!r} fits log residuals but y has values <= 0; use a "
                         "positive target (e.g. error = 1 - accuracy)")
    for k in ("N", "D", "r"):
        if k in xs and np.any(xs[k] <= 0):
            raise ValueError(f"x column {k!r} must be > 0 (it enters through a log/power)")
    return xs, y, ok


def _lookup(row: Mapping, path: str):
    """Value at a column name, or a dotted path into nested dicts (``metrics.acc``)."""
    if path in row:
        return row[path]
    cur = row
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise KeyError(path)
        cur = cur[part]
    return cur


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results JSONL file (one JSON object a line) or a CSV with a header."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i + 1}: not a JSON object ({err})") from None
        return rows
    return list(csv.DictReader(text.splitlines()))


def _to_float(v) -> float:
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"value {v!r} is not a number") from None


def columns(rows: Sequence[Mapping], paths: Sequence[str]) -> dict[str, Array]:
    """Float columns {path: (n,)} from rows; missing values become NaN (checked later)."""
    if not rows:
        raise ValueError("data file has no rows")
    out = {}
    for p in paths:
        vals = []
        for i, row in enumerate(rows):
            try:
                vals.append(_to_float(_lookup(row, p)))
            except KeyError:
                vals.append(math.nan)
            except ValueError as err:
                raise ValueError(f"row {i}, column {p!r}: {err}") from None
        if all(math.isnan(v) for v in vals):
            keys = sorted(rows[0].keys())
            raise ValueError(f"column {p!r} not found in any row; top-level keys of row 0: "
                             f"{keys} (use dotted paths for nested values, e.g. metrics.acc)")
        out[p] = np.array(vals, dtype=float)
    return out


def group_column(rows: Sequence[Mapping], path: str) -> tuple[Array, list[str]]:
    """Integer codes (n,) for a categorical column and the sorted labels they index."""
    raw = []
    for row in rows:
        try:
            raw.append(str(_lookup(row, path)))
        except KeyError:
            raise ValueError(f"group column {path!r} missing in a row") from None
    labels = sorted(set(raw))
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index[v] for v in raw], dtype=float), labels


def load_chinchilla_epoch(path: str | os.PathLike) -> tuple[dict[str, Array], Array]:
    """Epoch AI's extraction of Chinchilla Fig. 4 with their preprocessing.

    Besiroglu et al. 2024: N = "Model Size", D = "Training FLOP" / (6 N), y = "loss"; the 5
    rows with the highest loss are dropped (245 -> 240 points).
    Returns ({"N": (240,), "D": (240,)}, loss (240,)).
    """
    cols = columns(read_rows(path), ["Model Size", "Training FLOP", "loss"])
    n, c, y = cols["Model Size"], cols["Training FLOP"], cols["loss"]
    keep = np.sort(np.argsort(y, kind="stable")[: y.size - 5])
    n, c, y = n[keep], c[keep], y[keep]
    return {"N": n, "D": c / (6.0 * n)}, y


def load_frantar_t5(path: str | os.PathLike) -> tuple[dict[str, Array], Array]:
    """T5 sparsity data of Frantar et al. 2024 with the jaxpruner notebook's normalisation.

    N = 24 * 12 * 768^2 * scale * (1 - S) / 1e6 non-zero parameters, D = steps / 1e5.
    Returns ({"S", "N", "D"} each (48,), val-loss (48,)).
    """
    cols = columns(read_rows(path), ["sparsity", "scale", "val-loss", "steps"])
    s = cols["sparsity"]
    n = 24 * 12 * 768 ** 2 * cols["scale"] * (1 - s) / 1e6
    return {"S": s, "N": n, "D": cols["steps"] / 1e5}, cols["val-loss"]


def load_frantar_vit(path: str | os.PathLike) -> tuple[dict[str, Array], Array]:
    """ViT sparsity data of Frantar et al. 2024 (a pandas column dict), notebook-normalised.

    N = 12 * 12 * 768^2 * scale * (1 - S) / 1e6, D = total_examples / 1e9; fit it with
    linear residuals and delta = 0.01 as the reference notebook does.
    Returns ({"S", "N", "D"} each (112,), val-loss (112,)).
    """
    data = json.loads(Path(path).read_text())
    keys = sorted(data["val-loss"], key=int)
    col = {c: np.array([_to_float(data[c][k]) for k in keys])
           for c in ("sparsity", "scale", "total_examples", "val-loss")}
    s = col["sparsity"]
    n = 12 * 12 * 768 ** 2 * col["scale"] * (1 - s) / 1e6
    return {"S": s, "N": n, "D": col["total_examples"] / 1e9}, col["val-loss"]


# ----------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fit:
    """Result of :func:`fit`. ``theta`` is internal (p,); see ``Law.reported``."""

    law: Law
    theta: Array
    objective: float
    delta: float
    residual_kind: str
    n_points: int
    n_starts: int
    n_refined: int
    converged: bool
    excluded: tuple[int, ...] = ()
    outlier_rule: str = "none"

    @property
    def params(self) -> dict:
        return self.law.reported(self.theta)


@functools.lru_cache(maxsize=1)
def _openblas_thread_controls() -> tuple:
    """(get, set) ctypes functions of every OpenBLAS loaded in this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return ()
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", "", "_64_"):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            if get is None or set_ is None:
                get = getattr(lib, "openblas_get_num_threads", None)
                set_ = getattr(lib, "openblas_set_num_threads", None)
            if get is not None and set_ is not None:
                controls.append((get, set_))
                break
    return tuple(controls)


@contextlib.contextmanager
def single_threaded_blas():
    """Run the block with OpenBLAS at one thread, restoring the previous counts after.

    Why: L-BFGS-B on a handful of parameters calls BLAS/LAPACK on tiny arrays; when another
    process keeps a core busy, OpenBLAS thread hand-offs made each call ~20x slower on the
    2-core dev box (a 50-resample bootstrap went from 0.7 s to 5-25 s).
    """
    controls = _openblas_thread_controls()
    before = [get() for get, _ in controls]
    try:
        for _, set_ in controls:
            set_(1)
        yield
    finally:
        for (_, set_), n in zip(controls, before):
            set_(n)


def _lbfgs(law, x, y, w, theta0, delta, kind, maxiter=1000):
    bounds = [(lo, hi) for lo, hi in law.bounds]
    # Tight tolerances: L-BFGS-B's tests are absolute, and a summed Huber with delta = 1e-3
    # is ~1e-2 in size, so the defaults would stop far from the optimum.
    return optimize.minimize(
        objective_and_grad, theta0, args=(law, x, y, w, delta, kind), jac=True,
        method="L-BFGS-B", bounds=bounds,
        options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20})


def fit_weighted(law: Law, x: XDict, y: Array, w: Array, starts: Array, delta: float = 1e-3,
                 kind: str | None = None, refine: int | None = 16
                 ) -> tuple[Array, float, bool, int]:
    """Core multi-start fit with point weights w (n,); returns (theta, objective, ok, k).

    The objective of every start is computed in one vectorised pass; L-BFGS-B then runs from
    the ``refine`` best (all when None) and the lowest final objective wins.
    """
    kind = kind or law.residuals
    starts = np.atleast_2d(np.asarray(starts, dtype=float))
    if refine is not None and refine < len(starts):
        f0 = grid_objectives(law, x, y, starts, w, delta, kind)
        starts = starts[np.argsort(f0, kind="stable")[:refine]]
    best = None
    with single_threaded_blas():
        for s in starts:
            res = _lbfgs(law, x, y, w, s, delta, kind)
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    if best is None or best.fun >= 1e30:
        raise ValueError(f"law {law.name!r}: no start gave a finite objective; check that "
                         "the data and law match (e.g. positive predictions for log residuals)")
    ok = bool(best.success) or "ABNORMAL" in str(best.message)  # ABNORMAL: line search at
    # machine precision on a flat Huber optimum, which is a converged point in practice.
    return np.asarray(best.x), float(best.fun), ok, len(starts)


def fit(law: Law, x: XDict, y: Array, *, delta: float = 1e-3, kind: str | None = None,
        starts: Array | None = None, refine: int | None = 16, outlier_mad: float | None = None,
        drop_nonfinite: bool = False) -> Fit:
    """Fit ``law`` to (x, y) by summed Huber loss and multi-start L-BFGS-B.

    Args:
      law: the law.
      x: {name: (n,)} columns named as ``law.x_names``.
      y: (n,) targets.
      delta: Huber threshold (1e-3 as in Hoffmann et al. 2022 for log residuals).
      kind: "log" or "linear" residuals; default the law's own.
      starts: (K, p) internal starts; default the law's start grid.
      refine: run L-BFGS-B from this many best starts (None: from all).
      outlier_mad: if set, drop points whose |residual| after a first fit exceeds
        outlier_mad * 1.4826 * MAD(residuals), then refit; dropped rows are recorded.
      drop_nonfinite: drop NaN/Inf rows with a warning instead of raising.
    """
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    kind = kind or law.residuals
    xs, y, _ = check_data(law, x, y, drop_nonfinite)
    starts = grid_starts(law) if starts is None else _clip_to_bounds(law, np.atleast_2d(starts))
    w = np.ones_like(y)
    theta, obj, ok, k = fit_weighted(law, xs, y, w, starts, delta, kind, refine)
    excluded, rule = (), "none"
    if outlier_mad is not None:
        r = residuals(law, xs, y, theta, kind)
        mad = 1.4826 * np.median(np.abs(r - np.median(r)))
        out = np.abs(r - np.median(r)) > outlier_mad * mad
        rule = f"|r - median(r)| > {outlier_mad} * 1.4826 * MAD(r) after a first fit"
        if out.any():
            excluded = tuple(int(i) for i in np.flatnonzero(out))
            w = (~out).astype(float)
            if w.sum() <= len(law.param_names):
                raise ValueError("outlier rule removed too many points; raise outlier_mad")
            theta, obj, ok, k = fit_weighted(law, xs, y, w, np.vstack([theta, starts]), delta,
                                             kind, refine)
    return Fit(law=law, theta=theta, objective=obj, delta=delta, residual_kind=kind,
               n_points=int(y.size), n_starts=len(starts), n_refined=k, converged=ok,
               excluded=excluded, outlier_rule=rule)


def fit_notebook_recipe(law: Law, x: XDict, y: Array, *, delta: float = 1e-3,
                        kind: str | None = None, n_starts: int = 25, seed: int = 1) -> Fit:
    """Reproduces the Frantar et al. (2024) reference-notebook fit, early stop included.

    jaxpruner's bigsparse notebook: np.random.seed(seed); n_starts starts drawn as
    np.random.uniform(size=p); scipy BFGS with default tolerances and finite-difference
    gradients on the *mean*-reduced Huber of log residuals; the lowest successful result wins.
    Mean reduction makes the gradients ~1e-6, under BFGS's default gtol 1e-5, so it stops
    before the minimum: the published coefficients are that early stop, not an optimum of the
    stated objective (`fit` reaches a lower value). Use this only to reproduce published
    numbers; `fit` is the estimator.
    """
    kind = kind or law.residuals
    xs, y, _ = check_data(law, x, y)
    legacy = np.random.RandomState(seed)  # the notebook's global-seed draws, in order

    def objective(theta):  # NaN where the law is invalid, as in the notebook (no guard)
        return float(np.mean(huber(residuals(law, xs, y, theta, kind), delta)))

    best = None
    with single_threaded_blas(), np.errstate(all="ignore"):
        for _ in range(n_starts):
            res = optimize.minimize(objective, legacy.uniform(size=len(law.param_names)),
                                    method="BFGS")
            if res.success and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise ValueError(f"law {law.name!r}: no BFGS start converged")
    return Fit(law=law, theta=np.asarray(best.x), objective=float(best.fun) * y.size,
               delta=delta, residual_kind=kind, n_points=int(y.size), n_starts=n_starts,
               n_refined=n_starts, converged=True, excluded=(), outlier_rule="none")


def predict(law: Law, theta: Array, x: XDict) -> Array:
    """Law prediction at points x {name: (m,)} for internal theta (p,); returns (m,)."""
    return np.asarray(law.fn({k: np.asarray(v, dtype=float) for k, v in x.items()}, theta))


# ----------------------------------------------------------------------------------------
# Uncertainty
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Bootstrap refits: ``thetas`` (B, p) internal parameters, one row per resample."""

    law: Law
    thetas: Array
    seed: int
    level: float

    def samples(self) -> dict[str, Array]:
        """Reported and derived parameter samples {name: (B,)}."""
        rows = [{**self.law.reported(t), **self.law.derived_values(t)} for t in self.thetas]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}

    def intervals(self) -> dict[str, list[float]]:
        """Percentile intervals {name: [low, high]} at ``level`` for params and derived."""
        q = 100 * (1 - self.level) / 2
        return {k: [float(np.percentile(v, q)), float(np.percentile(v, 100 - q))]
                for k, v in self.samples().items()}

    def predict_interval(self, x: XDict) -> tuple[Array, Array]:
        """Pointwise percentile band (low (m,), high (m,)) of predictions at x."""
        xb = {k: np.asarray(v, dtype=float)[:, None] for k, v in x.items()}
        preds = self.law.fn(xb, self.thetas.T)  # (m, B)
        q = 100 * (1 - self.level) / 2
        return np.percentile(preds, q, axis=1), np.percentile(preds, 100 - q, axis=1)


def bootstrap(result: Fit, x: XDict, y: Array, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95, extra_starts: int = 0, starts: Array | None = None
              ) -> Bootstrap:
    """Nonparametric bootstrap over points (rows resampled with replacement).

    Each refit starts from the full-data optimum; with ``extra_starts`` > 0 it also runs
    from that many best grid starts for the resample (guards against a resample whose
    optimum lies in another basin, at ~(1 + extra_starts)x the cost). Points excluded by the
    outlier rule stay excluded. Seeded; ``x``/``y`` must be what ``fit`` was given.
    """
    law = result.law
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    xs, y, _ = check_data(law, x, y, drop_nonfinite=True)
    n = y.size
    keep = np.ones(n, dtype=bool)
    keep[list(result.excluded)] = False
    idx_pool = np.flatnonzero(keep)
    grid = grid_starts(law) if starts is None else np.atleast_2d(starts)
    rng = np.random.default_rng(seed)
    thetas = np.empty((n_boot, len(result.theta)))
    with single_threaded_blas():
        thetas = _bootstrap_loop(law, result, xs, y, n, idx_pool, grid, rng, thetas,
                                 extra_starts)
    return Bootstrap(law=law, thetas=thetas, seed=seed, level=level)


def _bootstrap_loop(law, result, xs, y, n, idx_pool, grid, rng, thetas, extra_starts):
    for b in range(len(thetas)):
        w = np.bincount(rng.choice(idx_pool, size=idx_pool.size), minlength=n).astype(float)
        cand = result.theta[None]
        if extra_starts > 0:
            f0 = grid_objectives(law, xs, y, grid, w, result.delta, result.residual_kind)
            cand = np.vstack([cand, grid[np.argsort(f0, kind="stable")[:extra_starts]]])
        thetas[b], _, _, _ = fit_weighted(law, xs, y, w, cand, result.delta,
                                          result.residual_kind, refine=None)
    return thetas


# ----------------------------------------------------------------------------------------
# Validation and comparison
# ----------------------------------------------------------------------------------------


def r_squared(y: Array, pred: Array) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot on the given scale."""
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot


def diagnostics(result: Fit, x: XDict, y: Array) -> dict:
    """Goodness of fit on the points used (outliers excluded): R^2 (linear and log), RMSE."""
    xs, y, _ = check_data(result.law, x, y, drop_nonfinite=True)
    keep = np.ones(y.size, dtype=bool)
    keep[list(result.excluded)] = False
    pred = predict(result.law, result.theta, xs)[keep]
    yk = y[keep]
    out = {"r2": r_squared(yk, pred), "rmse": float(np.sqrt(np.mean((pred - yk) ** 2))),
           "mean_abs_rel_err": float(np.mean(np.abs(pred / yk - 1)))}
    if np.all(yk > 0) and np.all(pred > 0):
        out["r2_log"] = r_squared(np.log(yk), np.log(pred))
    return out


def huber_nll(r: Array, delta: float) -> tuple[float, float]:
    """Negative log-likelihood of residuals under the Huber density, at its MLE scale.

    Density: p(r) = exp(-rho_delta(r) / tau) / Z(tau), rho_delta = Huber loss, with
    Z(tau) = sqrt(2 pi tau) erf(delta / sqrt(2 tau)) + 2 (tau / delta) exp(-delta^2 / (2 tau))
    (Gaussian core inside |r| <= delta, exponential tails outside). The scale tau is
    maximised out numerically. This is the likelihood whose maximiser in the law's
    parameters is the Huber fit (for fixed tau); cf. the "Huber likelihood" of Besiroglu
    et al. 2024.
    Returns (nll, tau).
    """
    rho_sum, n = float(np.sum(huber(r, delta))), r.size

    def nll(log_tau):
        tau = math.exp(log_tau)
        z = (math.sqrt(2 * math.pi * tau) * math.erf(delta / math.sqrt(2 * tau))
             + 2 * tau / delta * math.exp(-delta ** 2 / (2 * tau)))
        return rho_sum / tau + n * math.log(z)

    guess = math.log(max(rho_sum / n, 1e-300))
    res = optimize.minimize_scalar(nll, bounds=(guess - 20, guess + 20), method="bounded",
                                   options={"xatol": 1e-10})
    return float(res.fun), math.exp(res.x)


def information_criteria(result: Fit, x: XDict, y: Array) -> dict:
    """AIC and BIC from the Huber likelihood (k = law params + 1 for the scale tau)."""
    xs, y, _ = check_data(result.law, x, y, drop_nonfinite=True)
    keep = np.ones(y.size, dtype=bool)
    keep[list(result.excluded)] = False
    r = residuals(result.law, xs, y, result.theta, result.residual_kind)[keep]
    nll, tau = huber_nll(r, result.delta)
    k, n = len(result.theta) + 1, r.size
    return {"nll": nll, "tau": tau, "aic": 2 * k + 2 * nll, "bic": k * math.log(n) + 2 * nll}


def split_by(x: XDict, column: str, train_frac: float) -> tuple[Array, Array]:
    """Boolean masks (train, test): train = rows with ``column`` <= its train_frac quantile.

    Used for leave-out extrapolation: fit on the small-x part, test on the large-x rest.
    """
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    v = np.asarray(x[column], dtype=float)
    cut = np.quantile(v, train_frac)
    train = v <= cut
    if train.all() or not train.any():
        raise ValueError(f"column {column!r} has too few distinct values to split at "
                         f"quantile {train_frac}")
    return train, ~train


def extrapolation(law: Law, x: XDict, y: Array, column: str, train_frac: float = 0.8,
                  **fit_kw) -> dict:
    """Fit on the rows with small ``column``, report errors on the held-out large rows."""
    xs, y, _ = check_data(law, x, y, drop_nonfinite=fit_kw.pop("drop_nonfinite", False))
    train, test = split_by(xs, column, train_frac)
    res = fit(law, {k: v[train] for k, v in xs.items()}, y[train], **fit_kw)
    pred = predict(law, res.theta, {k: v[test] for k, v in xs.items()})
    return {"column": column, "train_frac": train_frac, "n_train": int(train.sum()),
            "n_test": int(test.sum()), "cut": float(np.max(xs[column][train])),
            "params": res.params,
            "test_rmse": float(np.sqrt(np.mean((pred - y[test]) ** 2))),
            "test_mean_abs_rel_err": float(np.mean(np.abs(pred / y[test] - 1))),
            "test_huber": float(np.sum(huber(residuals(law, {k: v[test] for k, v in xs.items()},
                                                       y[test], res.theta, res.residual_kind),
                                             res.delta)))}


def compare_laws(law1: Law, law2: Law, x: XDict, y: Array, column: str | None = None,
                 train_frac: float = 0.8, **fit_kw) -> dict:
    """Compare two laws on the same (x, y): AIC/BIC (Huber likelihood) and held-out error.

    Both must use the same residual kind and delta so their likelihoods are comparable.
    """
    k1 = fit_kw.get("kind") or law1.residuals
    k2 = fit_kw.get("kind") or law2.residuals
    if k1 != k2:
        raise ValueError(f"laws use different residuals ({k1} vs {k2}); pass kind= to compare")
    out = {}
    for law in (law1, law2):
        res = fit(law, x, y, **fit_kw)
        entry = {"objective": res.objective, **information_criteria(res, x, y),
                 **diagnostics(res, x, y)}
        if column is not None:
            entry["extrapolation"] = extrapolation(law, x, y, column, train_frac, **fit_kw)
        out[law.name] = entry
    a, b = out[law1.name], out[law2.name]
    out["preferred_by_aic"] = law1.name if a["aic"] <= b["aic"] else law2.name
    out["preferred_by_bic"] = law1.name if a["bic"] <= b["bic"] else law2.name
    if column is not None:
        e1, e2 = a["extrapolation"]["test_rmse"], b["extrapolation"]["test_rmse"]
        out["preferred_by_heldout"] = law1.name if e1 <= e2 else law2.name
    return out


# ----------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------


def parse_points(spec: str) -> list[dict[str, float]]:
    """Parse ``"N=1e9,D=2e10;N=7e10,D=1.4e12"`` into [{"N": 1e9, "D": 2e10}, ...]."""
    points = []
    for chunk in filter(None, (c.strip() for c in spec.split(";"))):
        point = {}
        for item in filter(None, (i.strip() for i in chunk.split(","))):
            if "=" not in item:
                raise ValueError(f"bad point item {item!r}; expected NAME=VALUE")
            k, v = item.split("=", 1)
            point[k.strip()] = float(v)
        points.append(point)
    return points

