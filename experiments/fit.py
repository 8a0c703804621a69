"""Fit a scaling law to results rows (JSONL) or a CSV and write fit.json, fit.md and plots.

  python -m experiments.fit --data=results.jsonl --law=distill_error \
      --x=r=compression_ratio,D=data.examples --y=metrics.in_domain_error --out=/tmp/fit
  python -m experiments.fit --data=chinchilla_epoch_svg_extracted.csv \
      --preset=chinchilla_epoch --law=chinchilla --out=/tmp/chin \
      --predict="N=1e9,D=2e10;N=7e10,D=1.4e12"

--x lists columns in the law's x order (``--x=N,D``) or by name (``--x=N=Model Size``);
dotted paths reach nested JSONL fields. All logic lives in jdistill.scaling; this file
only parses flags, calls it, and renders outputs. Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import cli
from jdistill import scaling as sc
from jdistill.utils import files

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Results JSONL (one row a line) or CSV with a header.")
flags.DEFINE_string("law", None, f"Law name: {sorted(sc.LAWS) + ['distill_error_grouped']}.")
flags.DEFINE_list("x", [], "x columns, in the law's order or NAME=COLUMN; dotted paths ok.")
flags.DEFINE_string("y", None, "y column (dotted path ok).")
flags.DEFINE_string("group", None, "Categorical column for distill_error_grouped.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_enum("preset", None, ["chinchilla_epoch", "frantar_t5", "frantar_vit"],
                  "Load --data with a published preprocessing (then --x/--y are implied).")
flags.DEFINE_float("delta", 1e-3, "Huber delta.")
flags.DEFINE_enum("residuals", None, ["log", "linear"], "Residual scale (default: the law's).")
flags.DEFINE_integer("refine", 16, "Run L-BFGS-B from this many best grid starts (0 = all).")
flags.DEFINE_integer("n_boot", 1000, "Bootstrap resamples (0 = no intervals).")
flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
flags.DEFINE_float("level", 0.95, "Interval coverage.")
flags.DEFINE_float("outlier_mad", None, "Drop |residual| > this many robust SDs, then refit.")
flags.DEFINE_bool("drop_nonfinite", False, "Drop NaN/Inf rows with a warning (else error).")
flags.DEFINE_float("holdout_frac", 0.8, "Extrapolation check: fit on rows with the first x "
                   "column <= this quantile, test on the rest (0 = skip).")
flags.DEFINE_string("compare", None, "Second law to compare by AIC/BIC and held-out error.")
flags.DEFINE_string("predict", None, 'Points to predict, e.g. "N=1e9,D=2e10;N=7e10,D=1.4e12".')


def load(law_name: str) -> tuple[sc.Law, dict, np.ndarray, dict]:
    """Read the data named by the flags; returns (law, x, y, column provenance)."""
    if FLAGS.preset == "chinchilla_epoch":
        x, y = sc.load_chinchilla_epoch(FLAGS.data)
        return sc.get_law(law_name), x, y, {"N": "Model Size", "D": "Training FLOP / (6 N)",
                                            "y": "loss", "preprocessing": "drop 5 highest loss"}
    if FLAGS.preset == "frantar_t5":
        x, y = sc.load_frantar_t5(FLAGS.data)
        return sc.get_law(law_name), x, y, {"S": "sparsity", "N": "24*12*768^2*scale*(1-S)/1e6",
                                            "D": "steps / 1e5", "y": "val-loss"}
    if FLAGS.preset == "frantar_vit":
        x, y = sc.load_frantar_vit(FLAGS.data)
        return sc.get_law(law_name), x, y, {"S": "sparsity", "D": "total_examples / 1e9",
                                            "N": "12*12*768^2*scale*(1-S)/1e6", "y": "val-loss"}
    if not FLAGS.y or not FLAGS.x:
        raise app.UsageError("--x and --y are required without --preset")
    rows = sc.read_rows(FLAGS.data)
    groups = None
    if FLAGS.group:
        codes, labels = sc.group_column(rows, FLAGS.group)
        groups = (codes, labels)
    law = sc.get_law(law_name, len(groups[1]) if groups else None)
    names = [n for n in law.x_names if n != "group"]
    mapping = {}
    for i, item in enumerate(FLAGS.x):
        if "=" in item:
            k, v = item.split("=", 1)
            mapping[k.strip()] = v.strip()
        elif i < len(names):
            mapping[names[i]] = item.strip()
    if sorted(mapping) != sorted(names):
        raise app.UsageError(f"--x must give columns for {names} (positional or NAME=COL); "
                             f"got {FLAGS.x}")
    cols = sc.columns(rows, list(mapping.values()) + [FLAGS.y])
    x = {k: cols[v] for k, v in mapping.items()}
    prov = dict(mapping, y=FLAGS.y)
    if groups:
        x["group"] = groups[0]
        prov["group"] = FLAGS.group
        prov["group_labels"] = groups[1]
    return law, x, cols[FLAGS.y], prov


def _fig_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _is_log(v: np.ndarray) -> bool:
    return bool(np.all(v > 0) and v.max() / v.min() > 20)


def plots(law, result, boot, x, y, out: Path, ylabel: str = "y") -> list[str]:
    """Render fit.png, residuals.png and (for 2-D laws) contours.png; returns file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in law.x_names if n != "group"]
    pred = sc.predict(law, result.theta, x)
    kept = np.ones(y.size, dtype=bool)
    kept[list(result.excluded)] = False
    written = []

    # Data with fitted curves and bootstrap bands along the first x, others at quantiles.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    x0 = names[0]
    other = names[1] if len(names) > 1 else None
    sc_kw = {}
    if other is not None:
        c = np.log10(x[other]) if _is_log(x[other]) else x[other]
        sc_kw = {"c": c, "cmap": "viridis"}
    markers = "o^sDvP*X"
    gcodes = x["group"].astype(int) if "group" in x else np.zeros(y.size, dtype=int)
    for g in np.unique(gcodes):  # one marker per group (supervision format)
        m = kept & (gcodes == g)
        kw = {k: v[m] if k == "c" else v for k, v in sc_kw.items()}
        if sc_kw:
            kw["norm"] = matplotlib.colors.Normalize(sc_kw["c"].min(), sc_kw["c"].max())
        pts = ax.scatter(x[x0][m], y[m], s=14, marker=markers[g % len(markers)], **kw)
    if (~kept).any():
        ax.scatter(x[x0][~kept], y[~kept], s=30, marker="x", color="red", label="excluded")
    if other is not None:
        fig.colorbar(pts, ax=ax, label=("log10 " if _is_log(x[other]) else "") + other)
    grid0 = (np.geomspace(x[x0].min(), x[x0].max(), 100) if _is_log(x[x0])
             else np.linspace(x[x0].min(), x[x0].max(), 100))
    slices = [{}]
    if len(names) > 1:
        # Hold the remaining inputs at their 10/50/90% quantiles (one curve each).
        slices = [{n: float(np.quantile(x[n], q)) for n in names[1:]} for q in (0.1, 0.5, 0.9)]
    groups = np.unique(x["group"]).astype(int) if "group" in x else [None]
    cmap = plt.get_cmap("viridis")
    for gi, g in enumerate(groups):
        for si, s in enumerate(slices):
            pts_x = {x0: grid0, **{k: np.full_like(grid0, v) for k, v in s.items()}}
            if g is not None:
                pts_x["group"] = np.full_like(grid0, g)
            curve = sc.predict(law, result.theta, pts_x)
            label = ", ".join(f"{k}={v:.3g}" for k, v in s.items())
            if g is not None:
                label = f"group {g} " + label
            color = f"C{gi}"
            if other is not None and g is None:  # match the scatter's colour scale
                v = s[other]
                color = cmap(pts.norm(math.log10(v) if _is_log(x[other]) else v))
            ax.plot(grid0, curve, color=color, label=label or "fit")
            if boot is not None:
                lo, hi = boot.predict_interval(pts_x)
                ax.fill_between(grid0, lo, hi, color=color, alpha=0.2)
    ax.set_xlabel(x0)
    ax.set_ylabel(ylabel)
    if _is_log(x[x0]):
        ax.set_xscale("log")
    ax.set_title(f"{law.name}: data and fit" + (f" ({int(boot.level * 100)}% bootstrap band)"
                                                if boot is not None else ""))
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.scatter(pred[kept], y[kept], s=12)
    lim = [min(pred.min(), y.min()), max(pred.max(), y.max())]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("observed")
    ax.set_title("observed vs predicted")
    files.atomic_write(out / "fit.png", _fig_bytes(fig))
    plt.close(fig)
    written.append("fit.png")

    # Residuals against each input and against the prediction.
    r = sc.residuals(law, x, y, result.theta, result.residual_kind)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.6))
    for ax, n in zip(axes, names + ["prediction"]):
        v = pred if n == "prediction" else x[n]
        ax.scatter(v[kept], r[kept], s=10)
        ax.axhline(0, color="k", lw=1)
        for sgn in (-1, 1):
            ax.axhline(sgn * result.delta, color="grey", lw=0.8, ls=":")
        if _is_log(v):
            ax.set_xscale("log")
        ax.set_xlabel(n)
    axes[0].set_ylabel(f"{result.residual_kind} residual (dotted: +-delta)")
    files.atomic_write(out / "residuals.png", _fig_bytes(fig))
    plt.close(fig)
    written.append("residuals.png")

    # Iso-quality contours for laws with exactly two continuous inputs.
    if len(names) == 2:
        a, b = names
        ga = (np.geomspace(x[a].min(), x[a].max() * 10, 120) if _is_log(x[a])
              else np.linspace(x[a].min(), x[a].max(), 120))
        gb = (np.geomspace(x[b].min(), x[b].max() * 10, 120) if _is_log(x[b])
              else np.linspace(x[b].min(), x[b].max(), 120))
        A, B = np.meshgrid(ga, gb)
        pts_x = {a: A.ravel(), b: B.ravel()}
        if "group" in x:
            pts_x["group"] = np.zeros(A.size)
        Z = sc.predict(law, result.theta, pts_x).reshape(A.shape)
        fig, ax = plt.subplots(figsize=(6.4, 5))
        cs = ax.contour(A, B, Z, levels=12, cmap="magma")
        ax.clabel(cs, fontsize=7, fmt="%.3g")
        ax.scatter(x[a], x[b], s=8, color="k", alpha=0.5, label="data")
        if _is_log(x[a]):
            ax.set_xscale("log")
        if _is_log(x[b]):
            ax.set_yscale("log")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.set_title(f"{law.name}: iso-y contours of the fit" +
                     (" (group 0)" if "group" in x else ""))
        ax.legend(fontsize=7)
        files.atomic_write(out / "contours.png", _fig_bytes(fig))
        plt.close(fig)
        written.append("contours.png")
    return written


def markdown(report: dict) -> str:
    """Human summary of fit.json."""
    lines = [f"# Scaling-law fit: {report['law']}", "", f"`{report['formula']}`", "",
             f"Data: `{report['settings']['data']}` ({report['diagnostics']['n_points']} points)",
             ""]
    labels = report["columns"].get("group_labels")
    if labels:
        lines += ["Groups: " + ", ".join(f"{i} = {lab}" for i, lab in enumerate(labels)), ""]
    lines += ["| param | value | interval |", "|---|---|---|"]
    iv = report.get("intervals", {})
    for k, v in {**report["params"], **report["derived"]}.items():
        lo_hi = iv.get(k)
        lines.append(f"| {k} | {v:.6g} | " +
                     (f"[{lo_hi[0]:.6g}, {lo_hi[1]:.6g}]" if lo_hi else "-") + " |")
    lines += ["", f"Objective (summed Huber, delta={report['settings']['delta']}, "
                  f"{report['settings']['residuals']} residuals): {report['objective']:.6g}", "",
              "## Diagnostics", ""]
    for k, v in report["diagnostics"].items():
        if not isinstance(v, dict):
            lines.append(f"- {k}: {v}")
    ex = report["diagnostics"].get("extrapolation")
    if ex:
        lines += ["", f"Extrapolation: fit on {ex['n_train']} rows with {ex['column']} <= "
                      f"{ex['cut']:.4g}, tested on {ex['n_test']}: RMSE {ex['test_rmse']:.4g}, "
                      f"mean |rel err| {ex['test_mean_abs_rel_err']:.4g}"]
    if report.get("comparison"):
        lines += ["", "## Comparison", "", "```", json.dumps(report["comparison"], indent=1),
                  "```"]
    if report.get("predictions"):
        lines += ["", "## Predictions", "", "| point | prediction | interval |", "|---|---|---|"]
        for p in report["predictions"]:
            iv_ = p.get("interval")
            lines.append(f"| {p['x']} | {p['prediction']:.6g} | " +
                         (f"[{iv_[0]:.6g}, {iv_[1]:.6g}]" if iv_ else "-") + " |")
    lines += ["", "Plots: " + ", ".join(f"![{f}]({f})" for f in report["plots"]), ""]
    return "\n".join(lines)


def run(argv_unused=None) -> dict:
    """Fit, bootstrap, validate and write outputs under --out; returns the report dict."""
    for name in ("data", "law", "out"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    t0 = time.time()
    out = cli.output_dir(FLAGS.out)
    law, x, y, prov = load(FLAGS.law)
    kw = dict(delta=FLAGS.delta, kind=FLAGS.residuals, refine=FLAGS.refine or None,
              outlier_mad=FLAGS.outlier_mad, drop_nonfinite=FLAGS.drop_nonfinite)
    result = sc.fit(law, x, y, **kw)
    x, y, _ = sc.check_data(law, x, y, drop_nonfinite=FLAGS.drop_nonfinite)
    boot = (sc.bootstrap(result, x, y, n_boot=FLAGS.n_boot, seed=FLAGS.seed, level=FLAGS.level)
            if FLAGS.n_boot > 0 else None)
    diag = {"n_points": result.n_points, "n_starts": result.n_starts,
            "n_refined": result.n_refined, "converged": result.converged,
            "excluded_rows": list(result.excluded), "outlier_rule": result.outlier_rule,
            **sc.diagnostics(result, x, y), **sc.information_criteria(result, x, y)}
    fit_kw = {k: v for k, v in kw.items() if k != "drop_nonfinite"}
    names = [n for n in law.x_names if n != "group"]
    if FLAGS.holdout_frac > 0:
        try:
            diag["extrapolation"] = sc.extrapolation(law, x, y, names[0], FLAGS.holdout_frac,
                                                     **fit_kw)
        except ValueError as err:  # too few points or values: report, don't fail the fit
            diag["extrapolation"] = {"skipped": str(err)}
    comparison = None
    if FLAGS.compare:
        comparison = sc.compare_laws(law, sc.get_law(FLAGS.compare), x, y,
                                     column=names[0] if FLAGS.holdout_frac > 0 else None,
                                     train_frac=FLAGS.holdout_frac or 0.8, **fit_kw)
    predictions = []
    if FLAGS.predict:
        for point in sc.parse_points(FLAGS.predict):
            missing = [n for n in law.x_names if n not in point]
            if missing:
                raise app.UsageError(f"--predict point {point} lacks {missing}")
            px = {k: np.array([point[k]]) for k in law.x_names}
            entry = {"x": point, "prediction": float(sc.predict(law, result.theta, px)[0])}
            if boot is not None:
                lo, hi = boot.predict_interval(px)
                entry["interval"] = [float(lo[0]), float(hi[0])]
            predictions.append(entry)
    plot_names = plots(law, result, boot, x, y, out, ylabel=str(prov.get("y", "y")))
    report = {
        "law": law.name, "formula": law.formula, "columns": prov,
        "params": result.params, "derived": law.derived_values(result.theta),
        "intervals": boot.intervals() if boot is not None else {},
        "internal_params": dict(zip(law.param_names, map(float, result.theta))),
        "objective": result.objective, "diagnostics": diag, "comparison": comparison,
        "predictions": predictions, "plots": plot_names,
        "settings": {"data": str(FLAGS.data), "preset": FLAGS.preset, "delta": FLAGS.delta,
                     "residuals": result.residual_kind, "loss": "summed Huber",
                     "optimizer": "L-BFGS-B, analytic gradient" if law.jac else
                     "L-BFGS-B, central-difference gradient",
                     "starts": "law start grid", "refine": FLAGS.refine,
                     "n_boot": FLAGS.n_boot, "seed": FLAGS.seed, "level": FLAGS.level,
                     "bootstrap": "rows resampled with replacement; refits start from the "
                                  "full-data optimum; percentile intervals",
                     "outlier_mad": FLAGS.outlier_mad, "drop_nonfinite": FLAGS.drop_nonfinite,
                     "holdout_frac": FLAGS.holdout_frac, "wall_s": round(time.time() - t0, 3)},
    }
    files.atomic_write(out / "fit.json", json.dumps(report, indent=2, default=_json_default))
    files.atomic_write(out / "fit.md", markdown(report))
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = run()
    print(json.dumps({"params": report["params"], "intervals": report["intervals"],
                      "objective": report["objective"]}, indent=1))


if __name__ == "__main__":
    cli.run(main)
