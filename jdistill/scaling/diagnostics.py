"""Validation and comparison of fits: R^2, Huber likelihood and information criteria,
held-out extrapolation along a column, two laws compared.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

from jdistill.scaling.fitting import Fit, check_data, fit, huber, predict, residuals
from jdistill.scaling.laws import Array, Law, XDict


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
