"""Tests for jdistill.scaling against published fits (jdistill/shipped_data/scaling/MANIFEST.md).

Published numbers below are copied from the MANIFEST (Besiroglu et al. 2024 for
Chinchilla; Frantar et al. 2024 / jaxpruner for T5), never from this code's output.
"""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
from scipy import integrate

from jdistill import scaling as sc
from jdistill.data import io as data_lib
from jdistill.scaling.fitting import _fd_jac
from jdistill.utils import files as results

# the shipped reference data: these tests always run (a missing file is a failure)
CHIN = data_lib.data_file("scaling/chinchilla_epoch_svg_extracted.csv")
T5 = data_lib.data_file("scaling/sparsity_t5.csv")

# Besiroglu et al. 2024, grid + L-BFGS-B on the summed Huber objective.
EPOCH = {"A": 477.84, "B": 2143.86, "E": 1.8172, "alpha": 0.34731, "beta": 0.36718}
EPOCH_CI = {"A": (285.2, 743.6), "B": (1042.4, 5810.3), "E": (1.769, 1.871),
            "alpha": (0.317, 0.373), "beta": (0.331, 0.415)}
# Frantar et al. 2024 T5 coefficients a..g and the held-out point.
T5_PUB = np.array([0.56779, 0.72161, 1.52265, 0.24513, 0.63362, 0.20271, 0.65074])
T5_HELD_OUT = {"S": np.array([0.75]), "N": np.array([48 * 12 * 1024 ** 2 / 1e6]),
               "D": np.array([5.0])}
T5_PUB_PRED = 1.471  # the published fit's prediction at the held-out point (task brief)
T5_MEASURED = 1.48278


@pytest.fixture(scope="module")
def chin():
    x, y = sc.load_chinchilla_epoch(CHIN)
    return x, y, sc.fit(sc.LAWS["chinchilla"], x, y)


@pytest.fixture(scope="module")
def t5():
    x, y = sc.load_frantar_t5(T5)
    return x, y, sc.fit(sc.LAWS["frantar_sparsity"], x, y)


def overlaps(a, b):
    return a[0] <= b[1] and b[0] <= a[1]


# --- Chinchilla (Epoch replication) --------------------------------------------------------


def test_chinchilla_preprocessing_matches_epoch(chin):
    x, y, _ = chin
    assert y.size == 240  # 245 rows minus the 5 highest-loss rows
    assert np.all(x["D"] > 1e8) and np.all(x["N"] > 1e7)


def test_chinchilla_recovers_epoch_estimates(chin):
    _, _, res = chin
    p = res.params
    for k in ("E", "alpha", "beta"):
        assert p[k] == pytest.approx(EPOCH[k], rel=0.01), k
    for k in ("A", "B"):
        assert p[k] == pytest.approx(EPOCH[k], rel=0.05), k
    assert res.objective == pytest.approx(1.01827e-3, rel=1e-3)  # Epoch's reported objective
    assert res.converged


def test_chinchilla_bootstrap_overlaps_epoch_intervals(chin):
    x, y, res = chin
    iv = sc.bootstrap(res, x, y, n_boot=150, seed=0).intervals()
    for k, ci in EPOCH_CI.items():
        assert overlaps(iv[k], ci), (k, iv[k], ci)
        assert iv[k][0] < res.params[k] < iv[k][1]
    # Derived compute-optimal exponent a = beta / (alpha + beta) brackets the point value.
    a = EPOCH["beta"] / (EPOCH["alpha"] + EPOCH["beta"])
    assert iv["a_opt"][0] < a < iv["a_opt"][1]


@pytest.mark.slow
def test_chinchilla_full_bootstrap_overlaps_epoch_intervals(chin):
    x, y, res = chin
    iv = sc.bootstrap(res, x, y, n_boot=1000, seed=1).intervals()
    for k, ci in EPOCH_CI.items():
        assert overlaps(iv[k], ci), (k, iv[k], ci)


@pytest.mark.slow
def test_chinchilla_refine_all_starts_agrees_with_top_k(chin):
    x, y, res = chin
    full = sc.fit(sc.LAWS["chinchilla"], x, y, refine=None)
    assert full.objective <= res.objective * (1 + 1e-9)
    for k in EPOCH:
        assert full.params[k] == pytest.approx(res.params[k], rel=1e-3)


def test_chinchilla_mean_reduced_huber_stalls_with_default_tolerances(chin):
    # The MANIFEST's warning, checked: from the best grid start, scipy's L-BFGS-B with its
    # default (absolute) tolerances reaches Epoch's optimum on the summed Huber but stops
    # early on the mean-reduced one -- why the fitter always sums (and tightens tolerances).
    from scipy import optimize
    x, y, _ = chin
    law = sc.LAWS["chinchilla"]
    starts = sc.grid_starts(law)
    start = starts[np.argmin(sc.grid_objectives(law, x, y, starts))]
    n = y.size
    alphas = {}
    for scale in (1.0, 1.0 / n):
        def obj(t, scale=scale):
            f, g = sc.objective_and_grad(t, law, x, y, np.ones(n), 1e-3, "log")
            return f * scale, g * scale
        res = optimize.minimize(obj, start, jac=True, method="L-BFGS-B", bounds=law.bounds)
        alphas[scale] = law.reported(res.x)["alpha"]
    assert alphas[1.0] == pytest.approx(EPOCH["alpha"], rel=0.01)
    assert alphas[1.0 / n] != pytest.approx(EPOCH["alpha"], rel=0.1)


# --- Frantar et al. T5 sparsity --------------------------------------------------------------


def test_t5_published_coefficients_give_published_prediction():
    law = sc.LAWS["frantar_sparsity"]
    pred = sc.predict(law, T5_PUB, T5_HELD_OUT)[0]
    # 1.4683 from the rounded MANIFEST coefficients vs 1.471 quoted: 0.2% apart.
    assert pred == pytest.approx(T5_PUB_PRED, rel=0.005)


def test_t5_fit_predicts_held_out_point(t5):
    x, y, res = t5
    law = sc.LAWS["frantar_sparsity"]
    pred = sc.predict(law, res.theta, T5_HELD_OUT)[0]
    pub_pred = sc.predict(law, T5_PUB, T5_HELD_OUT)[0]
    assert pred == pytest.approx(pub_pred, rel=0.01)
    assert pred == pytest.approx(T5_MEASURED, rel=0.02)
    # Our optimum is at least as good as the published coefficients on their own objective.
    pub_obj = sc.grid_objectives(law, x, y, T5_PUB[None])[0]
    assert res.objective <= pub_obj
    # In-sample predictions agree with the published fit's to within 2%.
    assert np.max(np.abs(sc.predict(law, res.theta, x) / sc.predict(law, T5_PUB, x) - 1)) < 0.02


def test_t5_bootstrap_band_contains_published_prediction(t5):
    x, y, res = t5
    lo, hi = sc.bootstrap(res, x, y, n_boot=100, seed=0).predict_interval(T5_HELD_OUT)
    assert lo[0] < T5_PUB_PRED < hi[0]


def test_t5_notebook_recipe_reproduces_published_prediction(t5):
    """The published fit is the reference notebook's BFGS early stop (seed 1, mean Huber):
    rerun verbatim, it predicts the published 1.471 within 1%; our converged fit gets a
    lower value of the same objective (see BUILD_NOTES for why the two differ)."""
    x, y, res = t5
    law = sc.LAWS["frantar_sparsity"]
    nb = sc.fit_notebook_recipe(law, x, y, seed=1)
    assert sc.predict(law, nb.theta, T5_HELD_OUT)[0] == pytest.approx(T5_PUB_PRED, rel=0.01)
    assert res.objective < 0.8 * nb.objective


def test_t5_random_starts_recipe_reaches_same_optimum(t5):
    # MANIFEST recipe: 25 uniform(0, 1) random starts; all starts must be refined.
    x, y, res = t5
    law = sc.LAWS["frantar_sparsity"]
    rnd = sc.fit(law, x, y, starts=sc.random_starts(law, 25, seed=0), refine=None)
    assert rnd.objective == pytest.approx(res.objective, rel=1e-6)


VIT = data_lib.data_file("scaling/sparsity_vit.json")
VIT_PUB = np.array([1.30485, 0.82101, 2.07506, 0.39223, 0.27818, 0.88979, 4.51669])


def test_vit_recovers_published_coefficients():
    # Notebook recipe: linear residuals, delta = 0.01 (summed here; same minimiser).
    x, y = sc.load_frantar_vit(VIT)
    assert y.size == 112
    res = sc.fit(sc.LAWS["frantar_sparsity"], x, y, delta=0.01, kind="linear")
    np.testing.assert_allclose(res.theta, VIT_PUB, rtol=2e-3)


# --- Synthetic recovery for every shipped law -----------------------------------------------


def _synthetic(law_name, seed=0):
    """(law, x, y, true internal theta, noise sd) drawn from the law with known params."""
    rng = np.random.default_rng(seed)
    if law_name == "chinchilla":
        law = sc.LAWS[law_name]
        n = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 200))
        d = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 200))
        theta = np.array([np.log(400.0), np.log(2000.0), np.log(1.8), 0.34, 0.37])
        x = {"N": n, "D": d}
    elif law_name == "frantar_sparsity":
        law = sc.LAWS[law_name]
        s = rng.choice([0.0, 0.5, 0.75, 0.875], 160)
        x = {"S": s, "N": np.exp(rng.uniform(np.log(1), np.log(500), 160)) * (1 - s),
             "D": np.exp(rng.uniform(np.log(0.5), np.log(50), 160))}
        theta = np.array([0.6, 0.7, 1.5, 0.25, 0.6, 0.3, 0.65])
    elif law_name == "distill_error":
        law = sc.LAWS[law_name]
        x = {"r": np.exp(rng.uniform(0, np.log(16), 150)),
             "D": np.exp(rng.uniform(np.log(1e3), np.log(1e6), 150))}
        theta = np.array([np.log(0.02), np.log(3.0), np.log(0.05), 0.8, 0.4])
    elif law_name == "gk_collapse":
        law = sc.LAWS[law_name]
        x = {"r": np.exp(rng.uniform(0, np.log(32), 120))}
        theta = np.array([0.62, 0.25, 3.0, np.log(6.0)])
    elif law_name == "distill_error_grouped":
        law = sc.grouped_error_law(3)
        x = {"r": np.exp(rng.uniform(0, np.log(16), 240)),
             "D": np.exp(rng.uniform(np.log(1e3), np.log(1e6), 240)),
             "group": rng.integers(0, 3, 240).astype(float)}
        theta = np.array([np.log(0.05), 0.8, 0.4, np.log(0.01), np.log(0.02), np.log(0.03),
                          np.log(2.0), np.log(3.0), np.log(5.0)])
    else:
        raise KeyError(law_name)
    f = sc.predict(law, theta, x)
    noise = 0.01
    y = f * np.exp(noise * rng.standard_normal(f.size)) if law.residuals == "log" else (
        f + noise * rng.standard_normal(f.size))
    return law, x, y, theta


SHIPPED = ["chinchilla", "frantar_sparsity", "distill_error", "gk_collapse",
           "distill_error_grouped"]


@pytest.mark.parametrize("name", SHIPPED)
def test_synthetic_parameters_inside_bootstrap_intervals(name):
    law, x, y, theta = _synthetic(name)
    # Noise (1%) is ~10x delta, so this exercises the robust (linear) part of the Huber.
    res = sc.fit(law, x, y, delta=1e-3)
    boot = sc.bootstrap(res, x, y, n_boot=100, seed=0, level=0.99)
    iv = boot.intervals()
    truth = {**law.reported(theta), **law.derived_values(theta)}
    for k, v in truth.items():
        assert iv[k][0] <= v <= iv[k][1], (k, v, iv[k])


@pytest.mark.parametrize("name", SHIPPED)
def test_analytic_jacobian_matches_finite_differences(name):
    law, x, _, theta = _synthetic(name)
    x = {k: v[:20] for k, v in x.items()}
    fd = _fd_jac(dataclasses.replace(law, jac=None), x, theta)
    np.testing.assert_allclose(law.jac(x, theta), fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", SHIPPED)
def test_noiseless_extrapolation_is_exact(name):
    law, x, _, theta = _synthetic(name)
    y = sc.predict(law, theta, x)
    first = law.x_names[0]
    ex = sc.extrapolation(law, x, y, first, 0.7)
    assert ex["n_test"] > 0
    assert ex["test_mean_abs_rel_err"] < 1e-3, ex


def test_user_defined_law_and_comparison_prefers_true_law():
    # A user adds a law by writing a function: here error without a data term.
    def no_data_term(x, theta):
        a, e, alpha = theta
        return np.exp(e) + np.exp(a) * x["r"] ** alpha

    simple = sc.Law(name="no_data_term", fn=no_data_term, param_names=("a", "e", "alpha"),
                    x_names=("r",), bounds=((-20, 20), (-10, 2), (0, 5)),
                    start_grid=((-4.0, -2.0), (-4.0, -2.0), (0.5, 1.0)))
    law, x, y, _ = _synthetic("distill_error")
    cmp = sc.compare_laws(law, simple, x, y, column="r", train_frac=0.7)
    assert cmp["preferred_by_aic"] == "distill_error"
    assert cmp["preferred_by_bic"] == "distill_error"
    assert cmp["preferred_by_heldout"] == "distill_error"
    assert cmp["distill_error"]["aic"] < cmp["no_data_term"]["aic"]


def test_outlier_rule_excludes_injected_outliers():
    law, x, y, theta = _synthetic("distill_error")
    y = y.copy()
    bad = [3, 50, 111]
    y[bad] *= 1.5
    res = sc.fit(law, x, y, outlier_mad=6.0)
    assert set(bad) <= set(res.excluded)
    assert len(res.excluded) <= 6
    assert "MAD" in res.outlier_rule
    assert res.params["alpha"] == pytest.approx(0.8, rel=0.05)


# --- Likelihood, loss, inputs ---------------------------------------------------------------


@pytest.mark.parametrize("tau", [1e-7, 1e-6, 1e-4])
def test_huber_density_normalises(tau):
    delta = 1e-3

    def dens(r):
        return math.exp(-float(sc.huber(np.array(r), delta)) / tau)

    z = (math.sqrt(2 * math.pi * tau) * math.erf(delta / math.sqrt(2 * tau))
         + 2 * tau / delta * math.exp(-delta ** 2 / (2 * tau)))
    lim = delta + 60 * tau / delta + 10 * math.sqrt(tau)
    total = sum(integrate.quad(dens, a, b, limit=200)[0]
                for a, b in [(-lim, -delta), (-delta, delta), (delta, lim)])
    assert total / z == pytest.approx(1.0, rel=1e-6)


def test_huber_nll_scale_is_mle():
    r = np.random.default_rng(0).normal(0, 2e-3, 300)
    nll, tau = sc.huber_nll(r, 1e-3)
    assert nll == pytest.approx(_nll_at(r, 1e-3, tau), rel=1e-9)
    for f in (0.9, 1.1):
        assert nll < _nll_at(r, 1e-3, tau * f)


def _nll_at(r, delta, tau):
    z = (math.sqrt(2 * math.pi * tau) * math.erf(delta / math.sqrt(2 * tau))
         + 2 * tau / delta * math.exp(-delta ** 2 / (2 * tau)))
    return float(np.sum(sc.huber(r, delta))) / tau + r.size * math.log(z)


def test_nonfinite_rows_error_or_drop():
    law, x, y, _ = _synthetic("distill_error")
    y = y.copy()
    y[5] = np.nan
    with pytest.raises(ValueError, match="drop_nonfinite"):
        sc.fit(law, x, y)
    with pytest.warns(UserWarning, match="dropping 1"):
        res = sc.fit(law, x, y, drop_nonfinite=True)
    assert res.n_points == y.size - 1


def test_too_few_points_and_constant_y():
    law = sc.LAWS["chinchilla"]
    x = {"N": np.array([1e8, 1e9, 1e10]), "D": np.array([1e9, 1e10, 1e11])}
    with pytest.raises(ValueError, match="5 parameters but only 3"):
        sc.fit(law, x, np.array([3.0, 2.5, 2.2]))
    x = {k: np.geomspace(v[0], v[-1], 10) for k, v in x.items()}
    with pytest.raises(ValueError, match="constant"):
        sc.fit(law, x, np.full(10, 2.0))
    with pytest.raises(ValueError, match="<= 0"):
        sc.fit(law, x, np.linspace(-1, 1, 10))
    with pytest.raises(ValueError, match="missing"):
        sc.fit(law, {"N": x["N"]}, np.linspace(2, 3, 10))


def test_jsonl_dotted_columns_and_groups(tmp_path):
    rows = [{"compression_ratio": 2.0 + i, "data": {"examples": 1000 * (i + 1)},
             "supervision": {"format": ["label", "logits"][i % 2]},
             "metrics": {"in_domain_accuracy": 0.9 - 0.01 * i}} for i in range(6)]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = sc.read_rows(path)
    cols = sc.columns(got, ["compression_ratio", "data.examples", "metrics.in_domain_accuracy"])
    np.testing.assert_allclose(cols["data.examples"], [1000, 2000, 3000, 4000, 5000, 6000])
    codes, labels = sc.group_column(got, "supervision.format")
    assert labels == ["label", "logits"] and codes.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="not found"):
        sc.columns(got, ["metrics.nope"])


def test_parse_points():
    pts = sc.parse_points("N=1e9,D=2e10;N=7e10,D=1.4e12")
    assert pts == [{"N": 1e9, "D": 2e10}, {"N": 7e10, "D": 1.4e12}]
    with pytest.raises(ValueError):
        sc.parse_points("N:1e9")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "fit.json"
    results.atomic_write(p, '{"ok": 1}')
    assert json.loads(p.read_text()) == {"ok": 1}
    with pytest.raises(TypeError):
        results.atomic_write(p, 12345)  # not str/bytes: fails mid-write
    assert json.loads(p.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["fit.json"]  # no temp file left behind
