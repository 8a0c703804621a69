"""Scaling laws as pure functions and the one registry of them (``LAWS``, ``get_law``).

A law is a pure function ``fn(x, theta) -> prediction`` where ``x`` maps column names to
float arrays of shape (n,) and ``theta`` is a sequence of internal parameters. Every
``theta[i]`` must broadcast against the ``x`` arrays: the fitter evaluates many starts at
once by passing ``x`` columns of shape (n, 1) and ``theta`` of shape (p, K), which gives
predictions of shape (n, K). Write laws with numpy ufuncs and this comes for free.

The study's laws live here too: ``power_error`` (the one-data-size fallback) and
``collapse_law(chance)`` (``gk_collapse`` with the chance level fixed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import special

Array = np.ndarray
XDict = Mapping[str, Array]


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


def power_error(x, theta):
    """In-domain error vs compression only: err(r) = E + A r^alpha.

    ``distill_error`` with the data term folded into E; the fallback when a format was run
    at a single data size (then B / D^beta is a constant and not identifiable). Direct
    parametrisation with E >= 0 as a bound (not LSE's e = log E): when the data want E -> 0,
    L-BFGS-B stops at the bound instead of crawling down an asymptote (10-100x faster
    bootstrap refits, same optimum).

    Args:
      x: {"r": compression ratio}, (n,) or (n, 1).
      theta: (E, A, alpha), scalars or (K,).
    """
    e, a, alpha = theta
    return e + a * x["r"] ** alpha


def _power_error_jac(x, theta):
    e, a, alpha = theta
    ra = x["r"] ** alpha
    return np.stack([np.ones_like(ra), ra, a * ra * np.log(x["r"])], axis=1)


POWER_ERROR = Law(
    name="power_error", fn=power_error, param_names=("E", "A", "alpha"), x_names=("r",),
    bounds=((0.0, 1.0), (1e-6, 1.0), (0.0, 5.0)),
    start_grid=((0.0, 0.02, 0.1, 0.3), (0.005, 0.03, 0.1, 0.3), (0.25, 0.5, 1.0, 2.0)),
    formula="err = E + A r^alpha", residuals="log", jac=_power_error_jac)


def collapse_law(chance: float) -> Law:
    """``gk_collapse`` with the chance level fixed (closure): theta = (top, k, log_r0).

    score(r) = chance + (top - chance) sigmoid(-k (log r - log r0)); r0 = exp(log_r0) is
    where the score is halfway between top and chance. top is bounded to [chance, 1], k to
    [0.25, 20] (a smaller k is a slow linear decline in log r, not a collapse; a larger one
    is already a step), log r0 to [-2, 6] (r0 up to ~400). Tight bounds matter for speed:
    on few points the optimum often sits at a bound at the end of a flat valley, and
    L-BFGS-B's tight tolerances crawl the whole valley.
    """
    c = float(chance)
    if not 0.0 <= c < 1.0:
        raise ValueError(f"chance level must be in [0, 1), got {chance}")

    def fn(x, theta):
        top, k, log_r0 = theta
        return gk_collapse(x, (top, c, k, log_r0))

    def jac(x, theta):
        top, k, log_r0 = theta
        u = np.log(x["r"]) - log_r0
        s = special.expit(-k * u)
        ds = s * (1 - s)
        return np.stack([s, (top - c) * ds * (-u), (top - c) * ds * k], axis=1)

    top_starts = sorted({min(1.0, c + f * (1.0 - c)) for f in (0.3, 0.6, 0.9)})
    return Law(
        name="gk_collapse_fixed_chance", fn=fn, param_names=("top", "k", "log_r0"),
        x_names=("r",), bounds=((c, 1.0), (0.25, 20.0), (-2.0, 6.0)),
        start_grid=(tuple(top_starts), (1.0, 3.0, 10.0), (0.0, 0.7, 1.4, 2.1, 3.0, 5.0)),
        formula=f"score = {c:.4g} + (top - {c:.4g}) sigmoid(-k (log r - log r0))",
        residuals="linear", derived=lambda p: {"r0": math.exp(p["log_r0"])}, jac=jac,
        y_range=(0.0, 1.0))


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
    "power_error": POWER_ERROR,
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
