"""The compression planner: the smallest student whose predicted in-domain and general
scores meet a quality budget, read off the fitted laws with their bands.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jdistill.study.analysis import Analysis
from jdistill.study.findings import to_json


def plan(an: Analysis, *, min_in_domain_rel: float = 0.95,
         max_general_drop: float | None = None, max_examples: int | None = None,
         formats: Sequence[str] | None = None, ratio_span: float = 4.0, n_grid: int = 240,
         conservative: bool = False) -> dict:
    """Largest compression ratio (with its data size and format) the fitted laws allow.

    Searches ratios log-spaced in (1, ratio_span x the largest observed ratio] and data sizes
    (observed D up to ``max_examples``, plus ``max_examples`` itself when the format's law has
    a D term) for every format with an in-domain fit, keeping points where

      predicted in-domain accuracy >= min_in_domain_rel x teacher accuracy, and
      predicted general score >= teacher general score - max_general_drop (if given).

    The best point has the largest ratio (ties: higher in-domain accuracy, then fewer
    examples). ``conservative`` tests the bootstrap band's lower edge instead of the point
    prediction. Returns a dict with ``status`` ("feasible" / "infeasible"), a ``message``,
    the ``recommendation`` (predictions with intervals), extrapolation warnings quantified
    as factors beyond the fitted range, and per-format best points.
    """
    st = an.study
    if not 0 < min_in_domain_rel <= 1.5:
        raise ValueError(f"min_in_domain_rel must be in (0, 1.5], got {min_in_domain_rel}")
    if max_general_drop is not None and max_general_drop < 0:
        raise ValueError(f"max_general_drop must be >= 0, got {max_general_drop}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    if conservative and an.n_boot < 2:
        raise ValueError("conservative planning needs bootstrap bands (n_boot >= 2)")
    fitted = sorted({f for f, m in an.fits if m == "in_domain_error"})
    if formats:
        unknown = [f for f in formats if f not in st.formats]
        if unknown:
            raise ValueError(f"formats {unknown} not in the results (have {st.formats})")
    cands = [f for f in (formats or st.formats)]
    t_acc, _ = st.teacher_value("in_domain_accuracy")
    t_gen, _ = st.teacher_value("general_score")
    need_acc = min_in_domain_rel * t_acc
    need_gen = None
    notes = []
    if max_general_drop is not None:
        if st.has_general:
            need_gen = t_gen - max_general_drop
        else:
            notes.append("--max_general_drop ignored: the rows have no general-benchmark scores")
    r_max_obs = max(c.r for c in st.cells)
    grid = np.geomspace(1.0, ratio_span * r_max_obs, n_grid + 1)[1:]
    per_format, candidates, best = [], [], None
    for fmt in cands:
        if fmt not in fitted:
            notes.append(f"{fmt}: no in-domain law fitted (see the analysis notes); skipped")
            continue
        acc_fit = an.fit_for(fmt, "in_domain_error")
        gen_fit = an.fit_for(fmt, "general_collapse") if need_gen is not None else None
        if need_gen is not None and gen_fit is None:
            notes.append(f"{fmt}: no general-score law fitted; skipped")
            continue
        rows = an.baseline(fmt)
        d_obs = sorted({c.examples for c in rows if not c.teacher})
        r_obs = max(c.r for c in rows)
        if acc_fit.D_range is not None:
            ds = [d for d in d_obs if max_examples is None or d <= max_examples]
            if max_examples is not None and max_examples not in ds:
                ds.append(int(max_examples))
        else:  # no D term: the law speaks only for the data size it was fitted at
            ds = [d for d in d_obs if max_examples is None or d <= max_examples]
            if not ds:
                notes.append(f"{fmt}: its law was fitted at D = {d_obs} only (no data-size "
                             f"term) and the budget {max_examples} is below that; skipped")
                continue
        fmt_best = None
        for d in ds:
            acc = acc_fit.predict(grid, d)
            acc_band = acc_fit.band(grid, d)
            gen = gen_fit.predict(grid) if gen_fit is not None else None
            gen_band = gen_fit.band(grid) if gen_fit is not None else None
            acc_test = acc_band[0] if conservative else acc
            ok = acc_test >= need_acc
            if gen is not None:
                ok &= (gen_band[0] if conservative else gen) >= need_gen
            if not ok.any():
                cand = {"format": fmt, "examples": int(d), "ratio": None,
                        "binding": _binding(acc_test, need_acc, gen_band[0] if conservative and
                                            gen is not None else gen, need_gen)}
            else:
                i = int(np.flatnonzero(ok)[-1])
                cand = {"format": fmt, "examples": int(d), "ratio": float(grid[i]),
                        "in_domain_accuracy": _pred(acc[i], acc_band, i),
                        "general_score": _pred(gen[i], gen_band, i) if gen is not None else None,
                        "observed_max_ratio": r_obs, "observed_examples": d_obs,
                        "D_range": acc_fit.D_range}
            candidates.append(cand)
            if _better(cand, fmt_best):
                fmt_best = cand
            if _better(cand, best):
                best = cand
        per_format.append(fmt_best)
    constraints = {"min_in_domain_rel": min_in_domain_rel,
                   "min_in_domain_accuracy": need_acc, "teacher_in_domain_accuracy": t_acc,
                   "max_general_drop": max_general_drop, "min_general_score": need_gen,
                   "teacher_general_score": t_gen if st.has_general else None,
                   "max_examples": max_examples, "formats": list(cands),
                   "conservative": conservative,
                   "ratio_grid": [float(grid[0]), float(grid[-1]), int(len(grid))]}
    out = {"constraints": constraints, "per_format": per_format, "notes": notes,
           "method": an.method, "schedule": an.schedule}
    if best is None or best["ratio"] is None:
        why = " ".join(f"{p['format']} (D={p['examples']}): {p['binding']}."
                       for p in per_format if p and p.get("ratio") is None)
        msg = (f"The constraints cannot be met: no compression ratio > 1 keeps predicted "
               f"in-domain accuracy >= {need_acc:.4f} ({min_in_domain_rel:g} x teacher "
               f"{t_acc:.4f})" + (f" and general score >= {need_gen:.4f}" if need_gen is not
                                  None else "") + f" with the formats considered. {why}".rstrip())
        return to_json({**out, "status": "infeasible", "message": msg,
                        "recommendation": None, "extrapolation": None})
    best["fewest_examples_for_ratio"] = min(
        c["examples"] for c in candidates if c["format"] == best["format"]
        and c["ratio"] is not None and c["ratio"] >= best["ratio"])
    ext = _extrapolation(best)
    acc_p, gen_p = best["in_domain_accuracy"], best["general_score"]
    msg = (f"Compress {best['ratio']:.3g}x with {best['format']} supervision on "
           f"{best['examples']} examples ({an.method}, {an.schedule}): predicted in-domain "
           f"accuracy {acc_p['value']:.4f}{_iv_text(acc_p)} (need >= {need_acc:.4f})")
    if gen_p is not None:
        msg += f", general score {gen_p['value']:.4f}{_iv_text(gen_p)} (need >= {need_gen:.4f})"
    msg += "."
    if best["fewest_examples_for_ratio"] < best["examples"]:
        msg += (f" {best['fewest_examples_for_ratio']} examples reach the same ratio (with lower "
                "predicted in-domain accuracy).")
    if ext["warnings"]:
        msg += " WARNING: " + " ".join(ext["warnings"])
    return to_json({**out, "status": "feasible", "message": msg, "recommendation": best,
                    "extrapolation": ext})


def _pred(v, band, i) -> dict:
    return {"value": float(v),
            "interval": [float(band[0][i]), float(band[1][i])] if band is not None else None}


def _iv_text(p) -> str:
    return f" [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]" if p["interval"] else ""


def _binding(acc, need_acc, gen, need_gen) -> str:
    bits = []
    if not np.any(acc >= need_acc):
        bits.append(f"in-domain accuracy at most {float(np.max(acc)):.4f} < {need_acc:.4f}")
    if gen is not None and not np.any(gen >= need_gen):
        bits.append(f"general score at most {float(np.max(gen)):.4f} < {need_gen:.4f}")
    if not bits:
        bits.append("no single ratio meets both constraints")
    return "; ".join(bits)


def _better(c, best) -> bool:
    """Larger ratio; then inside the measured range; then higher accuracy; then less data."""
    if c is None or c["ratio"] is None:  # infeasible: keep the last (largest D) tried
        return c is not None and (best is None or best["ratio"] is None)
    if best is None or best["ratio"] is None:
        return True

    def key(p):
        inside = (p["ratio"] <= p["observed_max_ratio"]
                  and min(p["observed_examples"]) <= p["examples"] <= max(p["observed_examples"]))
        return (p["ratio"], inside, p["in_domain_accuracy"]["value"], -p["examples"])

    return key(c) > key(best)


def _extrapolation(best: dict) -> dict:
    warnings = []
    r_f = best["ratio"] / best["observed_max_ratio"]
    out = {"ratio_factor": r_f, "D_factor": 1.0}
    if r_f > 1.0 + 1e-9:
        warnings.append(f"ratio {best['ratio']:.3g} extrapolates {r_f:.2f}x beyond the largest "
                        f"observed ratio {best['observed_max_ratio']:.3g} for "
                        f"{best['format']}.")
    d, d_obs = best["examples"], best["observed_examples"]
    if d > max(d_obs):
        out["D_factor"] = d / max(d_obs)
        warnings.append(f"{d} examples is {d / max(d_obs):.2f}x above the largest observed "
                        f"data size {max(d_obs)}.")
    elif d < min(d_obs):
        out["D_factor"] = d / min(d_obs)
        warnings.append(f"{d} examples is {min(d_obs) / d:.2f}x below the smallest observed "
                        f"data size {min(d_obs)}.")
    elif d not in d_obs and len(d_obs) == 2:
        warnings.append(f"{d} examples lies between the only two observed data sizes {d_obs}; "
                        "with two sizes the shape of the data term is not identified, so this "
                        "interpolation is a guess.")
    out["extrapolated"] = bool(warnings)
    out["warnings"] = warnings
    return out


def plan_text(p: dict) -> str:
    """The plan as a few readable lines."""
    c = p["constraints"]
    lines = [f"status: {p['status']}", p["message"], "",
             f"constraints: in-domain accuracy >= {c['min_in_domain_accuracy']:.4f} "
             f"({c['min_in_domain_rel']:g} x teacher {c['teacher_in_domain_accuracy']:.4f})"
             + (f"; general score >= {c['min_general_score']:.4f} (teacher "
                f"{c['teacher_general_score']:.4f} - {c['max_general_drop']:g})"
                if c["min_general_score"] is not None else "")
             + (f"; <= {c['max_examples']} examples" if c["max_examples"] else "")
             + (" (lower band edges)" if c["conservative"] else "")]
    lines.append(f"laws fitted on method={p['method']}, schedule={p['schedule']} cells")
    lines.append("best per format:")
    for f in p["per_format"]:
        if f is None:
            continue
        if f["ratio"] is None:
            lines.append(f"  {f['format']:>8} D={f['examples']}: cannot meet ({f['binding']})")
        else:
            acc = f["in_domain_accuracy"]
            gen = f.get("general_score")
            lines.append(f"  {f['format']:>8} D={f['examples']}: ratio {f['ratio']:.3g}, "
                         f"in-domain {acc['value']:.4f}"
                         + (f", general {gen['value']:.4f}" if gen else ""))
    ext = p.get("extrapolation") or {}
    for w in ext.get("warnings", []):
        lines.append(f"WARNING: {w}")
    for n in p["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
