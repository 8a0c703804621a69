"""Statistics behind the findings: the Z rule, combined verdicts, paired differences and
the retention gap.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jdistill.study.rows import Row, Study

Z = 2.0  # a difference counts when |mean| > Z * stderr
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def decide(mean: float, stderr: float, n: int) -> str:
    """The Z rule: reproduced if mean > Z se, not reproduced if mean < -Z se, else
    inconclusive (also when there are no pairs or no positive stderr)."""
    if n == 0 or not math.isfinite(mean) or not math.isfinite(stderr) or stderr <= 0:
        return INCONCLUSIVE
    if mean > Z * stderr:
        return REPRODUCED
    if mean < -Z * stderr:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def combine(statuses: Sequence[str]) -> str:
    """A finding of several parts: reproduced if some part is and none contradicts, not
    reproduced if some part contradicts and none supports, else inconclusive."""
    yes, no = REPRODUCED in statuses, NOT_REPRODUCED in statuses
    if yes and not no:
        return REPRODUCED
    if no and not yes:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def paired_difference(cells: Sequence[Row], field: str, a: str, b: str, metric: str,
                      drop: Sequence[str] = ()) -> dict:
    """Mean of metric(field = a) - metric(field = b) over cells matched on every other cell
    field (and not on ``drop``), with its stderr (see the module docstring)."""
    drop = (field, *drop)
    side_a = {c.key(drop): c for c in cells if getattr(c, field) == a}
    side_b = {c.key(drop): c for c in cells if getattr(c, field) == b}
    diffs, var, pairs = [], [], []
    for k in sorted(set(side_a) & set(side_b), key=str):
        (va, sa), (vb, sb) = side_a[k].value(metric), side_b[k].value(metric)
        if not (math.isfinite(va) and math.isfinite(vb)):
            continue
        diffs.append(va - vb)
        var.append(sa ** 2 + sb ** 2)  # NaN when a stderr is missing
        pairs.append({"a": side_a[k].cell_id, "b": side_b[k].cell_id, "diff": va - vb})
    n = len(diffs)
    out = {"metric": metric, "field": field, "a": a, "b": b, "n": n, "pairs": pairs,
           "n_a": len(side_a), "n_b": len(side_b)}
    if n == 0:
        return {**out, "mean": math.nan, "stderr": math.nan, "stderr_kind": "none"}
    d = np.array(diffs)
    meas = math.sqrt(np.sum(var)) / n if np.all(np.isfinite(var)) else math.nan
    emp = float(np.std(d, ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
    cands = [(s, k) for s, k in ((emp, "empirical"), (meas, "measurement")) if math.isfinite(s)]
    se, kind = max(cands) if cands else (math.nan, "none")
    return {**out, "mean": float(d.mean()), "stderr": se, "stderr_kind": kind,
            "stderr_empirical": emp, "stderr_measurement": meas}


def retention_gap(cells: Sequence[Row], study: Study) -> dict:
    """Mean of retention(in-domain) - retention(general) over ``cells`` with its stderr.

    retention = (score - chance) / (teacher - chance); positive means general knowledge lost
    a larger share of its above-chance margin than in-domain quality did. Stderr from the
    rows' measurement stderrs (cells independent; the teacher's error, shared by all cells,
    added once).
    """
    t_acc, t_acc_se = study.teacher_value("in_domain_accuracy")
    t_gen, t_gen_se = study.teacher_value("general_score")
    c_in, c_gen = study.in_domain_chance, study.general_chance
    m_in, m_gen = t_acc - c_in, t_gen - c_gen
    out = {"n": 0, "mean": math.nan, "stderr": math.nan}
    if not all(math.isfinite(v) for v in (m_in, m_gen)) or m_in <= 0 or m_gen <= 0:
        return {**out, "skipped": "teacher not above chance on both metrics (or chance unknown)"}
    use = [c for c in cells if math.isfinite(c.general)]
    if not use:
        return {**out, "skipped": "no cells with both metrics"}
    ret_in = np.array([(c.acc - c_in) / m_in for c in use])
    ret_gen = np.array([(c.general - c_gen) / m_gen for c in use])
    se_in = np.array([c.acc_se for c in use]) / m_in
    se_gen = np.array([c.general_se for c in use]) / m_gen
    n = len(use)
    var = np.sum(se_in ** 2 + se_gen ** 2) / n ** 2
    var += (ret_in.mean() * t_acc_se / m_in) ** 2 + (ret_gen.mean() * t_gen_se / m_gen) ** 2
    return {"n": n, "mean": float(np.mean(ret_in - ret_gen)), "stderr": float(math.sqrt(var)),
            "retention_in_domain": float(ret_in.mean()),
            "retention_general": float(ret_gen.mean()),
            "by_ratio": {f"{k:g}": {"in_domain": float(ret_in[at].mean()),
                                    "general": float(ret_gen[at].mean())}
                         for k in sorted({c.ratio for c in use})
                         for at in [np.array([c.ratio == k for c in use])]}}
