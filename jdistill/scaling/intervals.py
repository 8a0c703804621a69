"""Bootstrap intervals of a fit. Refits reuse the full-data optimum as their start (plus
optionally the best few grid starts for the resample), with resampling expressed as integer
point weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jdistill.scaling.fitting import (Fit, check_data, fit_weighted, grid_objectives, grid_starts,
                                      single_threaded_blas)
from jdistill.scaling.laws import Array, Law, XDict


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
