"""The study's analysis: law fits with bootstrap intervals, the findings, a compression planner.

Input is the rows a sweep writes (one JSON object a line; ``main`` = ``sweep_cell`` for a
student, ``sweep_teacher`` for the (corrected) teacher, ``sweep_teacher_original`` for the
teacher before correction, shown for context only; other rows are ignored). Everything here is a
pure function of those rows returning dataclasses or plain dicts; plotting and writing live
in ``experiments/report.py`` and ``experiments/plan.py``. Optimisation is always
``jdistill.scaling.core``'s (summed Huber, multi-start L-BFGS-B, ``fit_weighted`` refits).

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

Findings and their decision rules (``Z`` = 2 standard errors):

1. ``smooth_degradation``: per format, fit the error law on the rows with requested ratio
   below the largest, predict the largest-ratio rows; reproduced when the mean absolute
   accuracy error is <= max(``EXTRAP_TOL_ABS``, ``EXTRAP_TOL_SE`` x the rows' stderr) and
   the full-data curve is non-increasing in r; "not reproduced" when either fails.
2. ``general_collapses_first``: per format, the bootstrap intervals of r0 (general) and r0
   (in-domain): reproduced when the general interval lies wholly below the in-domain one,
   "not reproduced" when wholly above (used only when both fits have >= ``MIN_DOF_DECIDE``
   residual degrees of freedom: a 3-parameter sigmoid through 4 points has no say on r0).
   When they overlap (or cannot be used, or there is no bootstrap) the
   relative-retention gap decides: retention = (score - chance) / (teacher - chance); the
   mean of retention(in-domain) - retention(general) over the baseline cells, with its
   measurement stderr, by the Z rule.
3. ``trace_retains_general``: per trace format (cot, blended), paired general-score
   differences against ``label`` at cells matched on (ratio, method, schedule, prune steps,
   examples, seed), by the Z rule.
4. ``full_beats_lora`` and ``iterative_beats_one_shot``: paired differences in in-domain
   accuracy and general score at matched cells, by the Z rule.

Intervals: ``scaling.bootstrap`` (rows resampled) for fits with >= ``MIN_ROW_BOOT`` points;
below that a parametric bootstrap from the rows' measured stderrs (see ``bootstrap``).

Paired stderr: the larger of the empirical stderr of the differences (n >= 2) and the
measurement stderr sqrt(sum(se_a^2 + se_b^2)) / n, so neither a few lucky pairs nor
noisy evaluations can make a difference look sharper than the data allow. A finding with
several parts (formats, metrics) is reproduced when at least one part is and none
contradicts, "not reproduced" when at least one contradicts and none supports, and
inconclusive otherwise (the evidence names every part).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import special

from jdistill.scaling import core as sc

STUDY_MAINS = ("sweep_cell", "sweep_teacher", "sweep_teacher_original")
TEACHER_MAINS = ("sweep_teacher", "sweep_teacher_original")
TRACE_FORMATS = ("cot", "blended")
Z = 2.0  # a difference counts when |mean| > Z * stderr
EXTRAP_TOL_ABS = 0.05  # accuracy points tolerated when extrapolating to the largest ratio
EXTRAP_TOL_SE = 2.0  # ... or this many measured stderrs, whichever is larger
MIN_ERROR = 1e-3  # floor on in-domain error before log residuals
MIN_POINTS_2D = 6  # distill_error needs this many points (and >= 2 distinct D)
MIN_ROW_BOOT = 8  # fewer points: parametric bootstrap from the stderrs (see ``bootstrap``)
MIN_DOF_DECIDE = 2  # r0 intervals decide finding 2 only with n - p >= this
HUBER_K = 1.345  # Huber delta = HUBER_K x median stderr in residual units
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


# ----------------------------------------------------------------------------------------
# Laws defined for the study (scaling.Law objects, fitted by scaling.fit)
# ----------------------------------------------------------------------------------------


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


POWER_ERROR = sc.Law(
    name="power_error", fn=power_error, param_names=("E", "A", "alpha"), x_names=("r",),
    bounds=((0.0, 1.0), (1e-6, 1.0), (0.0, 5.0)),
    start_grid=((0.0, 0.02, 0.1, 0.3), (0.005, 0.03, 0.1, 0.3), (0.25, 0.5, 1.0, 2.0)),
    formula="err = E + A r^alpha", residuals="log", jac=_power_error_jac)


def collapse_law(chance: float) -> sc.Law:
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
        return sc.gk_collapse(x, (top, c, k, log_r0))

    def jac(x, theta):
        top, k, log_r0 = theta
        u = np.log(x["r"]) - log_r0
        s = special.expit(-k * u)
        ds = s * (1 - s)
        return np.stack([s, (top - c) * ds * (-u), (top - c) * ds * k], axis=1)

    top_starts = sorted({min(1.0, c + f * (1.0 - c)) for f in (0.3, 0.6, 0.9)})
    return sc.Law(
        name="gk_collapse_fixed_chance", fn=fn, param_names=("top", "k", "log_r0"),
        x_names=("r",), bounds=((c, 1.0), (0.25, 20.0), (-2.0, 6.0)),
        start_grid=(tuple(top_starts), (1.0, 3.0, 10.0), (0.0, 0.7, 1.4, 2.1, 3.0, 5.0)),
        formula=f"score = {c:.4g} + (top - {c:.4g}) sigmoid(-k (log r - log r0))",
        residuals="linear", derived=lambda p: {"r0": math.exp(p["log_r0"])}, jac=jac,
        y_range=(0.0, 1.0))


# ----------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One study row, flattened. Missing optional metrics are NaN."""

    where: str  # "results.jsonl:7", for messages
    teacher: bool
    cell_id: str
    ratio: float  # requested ratio (1.0 for the teacher)
    r: float  # actual compression ratio, teacher params / student params
    format: str
    method: str
    schedule: str
    prune_steps: int
    examples: int
    seed: int
    acc: float
    acc_se: float
    chance: float
    general: float
    general_se: float
    general_chance: float
    task: str | None = None
    student_params: int | None = None
    teacher_params: int | None = None
    time: str | None = None
    run_id: str | None = None
    name: str | None = None  # the teacher's checkpoint (teacher rows)

    def key(self, drop: Sequence[str] = ()) -> tuple:
        """The cell's identity (ratio, format, method, schedule, steps, examples, seed)
        without the fields in ``drop`` (the one a comparison varies)."""
        fields = ("ratio", "format", "method", "schedule", "prune_steps", "examples", "seed")
        return tuple(getattr(self, f) for f in fields if f not in drop)

    def value(self, metric: str) -> tuple[float, float]:
        """(value, stderr) of ``in_domain_accuracy`` or ``general_score``."""
        if metric == "in_domain_accuracy":
            return self.acc, self.acc_se
        if metric == "general_score":
            return self.general, self.general_se
        raise ValueError(f"unknown metric {metric!r}")


@dataclasses.dataclass(frozen=True)
class Study:
    """Validated study rows: student ``cells``, ``teachers`` (the reference at r = 1, usually
    one row) and ``original_teachers`` (the teacher before task correction, shown for
    context only)."""

    source: str
    cells: tuple[Row, ...]
    teachers: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    original_teachers: tuple[Row, ...] = ()

    @property
    def formats(self) -> list[str]:
        return sorted({c.format for c in self.cells})

    def teacher_value(self, metric: str) -> tuple[float, float]:
        """Mean teacher (value, stderr) over the teacher rows (NaN when absent)."""
        vals = [t.value(metric) for t in self.teachers]
        v = np.array([a for a, _ in vals])
        s = np.array([b for _, b in vals])
        if not np.all(np.isfinite(v)):
            return math.nan, math.nan
        return float(v.mean()), float(np.sqrt(np.sum(s ** 2)) / len(s))

    @property
    def has_general(self) -> bool:
        """True when the teacher and at least one cell have a general score and chance."""
        t, _ = self.teacher_value("general_score")
        return (math.isfinite(t) and any(math.isfinite(c.general) for c in self.cells)
                and math.isfinite(self.general_chance))

    @property
    def in_domain_chance(self) -> float:
        return _common([r.chance for r in (*self.teachers, *self.cells)])

    @property
    def general_chance(self) -> float:
        return _common([r.general_chance for r in (*self.teachers, *self.cells)])

    def baseline(self, fmt: str, method: str, schedule: str) -> list[Row]:
        return [c for c in self.cells
                if c.format == fmt and c.method == method and c.schedule == schedule]


def _common(values) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.median(v)) if v else math.nan


def _numbered_rows(path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"results file {str(path)!r} does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not a JSON object ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        out.append((i, row))
    return out


def load_study(path) -> Study:
    """``select`` over the rows of a results file, errors naming ``path:line``."""
    numbered = _numbered_rows(path)
    return select([r for _, r in numbered], source=str(path),
                  where=[f"{path}:{i}" for i, _ in numbered])


_lookup = sc._lookup  # dotted paths into rows, as the fitter reads them


def _number(row, path, where, *, required=True, lo=None, hi=None) -> float:
    try:
        v = _lookup(row, path)
    except KeyError:
        if required:
            raise ValueError(f"{where}: field {path!r} is missing (main={row.get('main')!r}, "
                             f"cell {_cell_id(row)!r})") from None
        return math.nan
    if v is None and not required:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: field {path!r} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        if required:
            raise ValueError(f"{where}: field {path!r} is {v}; a study row needs a finite value")
        return math.nan
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{where}: field {path!r} = {v} outside [{lo}, {hi}]")
    return v


def _text(row, path, where, default=None) -> str:
    try:
        v = _lookup(row, path)
    except KeyError:
        if default is not None:
            return default
        raise ValueError(f"{where}: field {path!r} is missing (main={row.get('main')!r}, "
                         f"cell {_cell_id(row)!r})") from None
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where}: field {path!r} must be a non-empty string, got {v!r}")
    return v


def _int(row, path, where, default: int) -> int:
    v = _number(row, path, where, required=False, lo=0)
    return default if math.isnan(v) else int(v)


def _cell_id(row) -> str:
    cell = row.get("cell")
    return str(cell.get("id")) if isinstance(cell, Mapping) else "?"


def parse_row(row: Mapping, where: str) -> Row:
    """One study row -> ``Row``; ValueError naming ``where`` and the field on bad input."""
    teacher = row.get("main") in TEACHER_MAINS
    if not isinstance(row.get("cell"), Mapping):
        raise ValueError(f"{where}: field 'cell' is missing or not an object "
                         f"(main={row.get('main')!r})")
    m = "metrics."
    if "compression_ratio" in row or teacher:
        r = 1.0 if teacher else _number(row, "compression_ratio", where, lo=0.0)
    else:  # fall back to the parameter counts
        r = _number(row, "teacher_params", where, lo=1) / _number(row, "student_params", where,
                                                                  lo=1)
    if r < 1.0 - 1e-6:
        raise ValueError(f"{where}: compression_ratio {r} < 1 (teacher params / student "
                         "params must be >= 1)")
    acc = _number(row, m + "in_domain_accuracy", where, lo=0.0, hi=1.0)
    general = _number(row, m + "general_score", where, required=False, lo=0.0, hi=1.0)
    meta = lambda k: row.get(k) if isinstance(row.get(k), (str, int)) else None  # noqa: E731
    task = row.get("data", {}).get("task") if isinstance(row.get("data"), Mapping) else None
    name = None
    if teacher and isinstance(row.get("teacher"), Mapping):
        name = row["teacher"].get("original") or row["teacher"].get("path")
    return Row(
        where=where, teacher=teacher, cell_id=str(row["cell"].get("id", where)),
        ratio=1.0 if teacher else _number(row, "cell.ratio", where, lo=0.0),
        r=max(r, 1.0),
        format=_text(row, "cell.format", where, default="teacher" if teacher else None),
        method=_text(row, "cell.method", where, default="none" if teacher else None),
        schedule=_text(row, "cell.schedule", where, default="none" if teacher else None),
        prune_steps=_int(row, "cell.prune_steps", where, default=1),
        examples=0 if teacher else int(_number(row, "cell.examples", where, lo=1)),
        seed=_int(row, "cell.seed", where, default=0),
        acc=acc, acc_se=_number(row, m + "in_domain_accuracy_stderr", where, required=False,
                                lo=0.0),
        chance=_number(row, m + "in_domain_chance", where, required=False, lo=0.0, hi=1.0),
        general=general,
        general_se=_number(row, m + "general_score_stderr", where, required=False, lo=0.0),
        general_chance=_number(row, m + "general_chance", where, required=False, lo=0.0,
                               hi=1.0),
        task=task if isinstance(task, str) else None,
        student_params=meta("student_params"), teacher_params=meta("teacher_params"),
        time=meta("time"), run_id=meta("run_id"),
        name=name if isinstance(name, str) else None)


def select(rows: Sequence[Mapping], source: str = "<rows>",
           where: Sequence[str] | None = None) -> Study:
    """The study rows of ``rows`` (``main`` in ``STUDY_MAINS``), validated.

    ``sweep_teacher`` rows are the reference (r = 1) of every fit and finding;
    ``sweep_teacher_original`` rows (the teacher before correction) are kept for context.

    Raises ValueError naming the file and row for a malformed study row, when there is no
    teacher row, or when there are no cell rows. A repeated cell (same fields and seed) keeps
    its last row and says so in ``notes``.
    """
    where = list(where) if where is not None else [f"{source} row {i}" for i in range(len(rows))]
    cells, teachers, originals, notes = {}, [], [], []
    for row, loc in zip(rows, where):
        if not isinstance(row, Mapping):
            raise ValueError(f"{loc}: expected a JSON object")
        if row.get("main") not in STUDY_MAINS:
            continue
        parsed = parse_row(row, loc)
        if parsed.teacher:
            (teachers if row["main"] == "sweep_teacher" else originals).append(parsed)
            continue
        if parsed.key() in cells:
            notes.append(f"cell {parsed.cell_id} appears more than once; kept {loc}, dropped "
                         f"{cells[parsed.key()].where}")
        cells[parsed.key()] = parsed
    if not teachers:
        raise ValueError(f"{source}: no 'sweep_teacher' row; the study needs the teacher's "
                         "metrics (the r = 1 point of every fit)")
    if not cells:
        raise ValueError(f"{source}: no 'sweep_cell' rows to analyse")
    return Study(source=source, cells=tuple(cells.values()), teachers=tuple(teachers),
                 notes=tuple(notes), original_teachers=tuple(originals))


# ----------------------------------------------------------------------------------------
# Fits
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Statistics for the findings
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------


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
    findings: list
    notes: list

    def fit_for(self, fmt: str, metric: str) -> CurveFit | None:
        return self.fits.get((fmt, metric))

    def baseline(self, fmt: str) -> list[Row]:
        """The format's baseline cells plus the teacher rows (a fit's data)."""
        return [*self.study.teachers, *self.study.baseline(fmt, self.method, self.schedule)]


def analyze(study: Study, *, method: str = "full", schedule: str = "one_shot",
            n_boot: int = 200, seed: int = 0, level: float = 0.95) -> Analysis:
    """Fits (with bootstrap), held-out extrapolation and findings for a study.

    Args:
      study: from ``select`` / ``load_study``.
      method, schedule: the baseline the per-format law fits use.
      n_boot: bootstrap resamples per fit (0: no intervals; findings then use the
        interval-free tests only).
      seed: bootstrap seed (each fit gets seed + its index).
      level: interval coverage.
    """
    if n_boot == 1 or n_boot < 0:
        raise ValueError(f"n_boot must be 0 or >= 2, got {n_boot}")
    notes = list(study.notes)
    fits, extrap = {}, {}
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
        extrap[fmt] = extrapolate(rows, fmt, fits.get((fmt, "in_domain_error")))
    an = Analysis(study, method, schedule, n_boot, seed, level, fits, extrap, [], notes)
    an.findings.extend(findings(an))
    return an


def extrapolate(rows: Sequence[Row], fmt: str, full_fit: CurveFit | None) -> dict:
    """Fit the error law on rows with requested ratio below the largest, predict the rest.

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
    pred = 1.0 - sc.predict(law, res.theta, {k: tx[k] for k in law.x_names})
    obs = np.array([t.acc for t in test])
    se = np.array([t.acc_se for t in test])
    se_rms = float(np.sqrt(np.mean(se ** 2))) if np.all(np.isfinite(se)) else math.nan
    tol = max(EXTRAP_TOL_ABS, EXTRAP_TOL_SE * se_rms) if math.isfinite(se_rms) else EXTRAP_TOL_ABS
    out.update(law=law.name, choice=choice, train_max_ratio=max(r.ratio for r in train),
               predicted=pred.tolist(), observed=obs.tolist(),
               abs_err=np.abs(pred - obs).tolist(), mean_abs_err=float(np.mean(np.abs(pred - obs))),
               max_abs_err=float(np.max(np.abs(pred - obs))), tolerance=tol,
               stderr_rms=se_rms)
    if full_fit is not None:
        rg = np.geomspace(1.0, max(r.r for r in rows), 200)
        ds = sorted({float(d) for d in full_fit.x["D"]}) if "D" in full_fit.x else [None]
        out["monotone"] = bool(all(np.all(np.diff(full_fit.predict(rg, d)) <= 1e-9) for d in ds))
    return out


def _fmt_iv(iv) -> str:
    return f"[{iv[0]:.3g}, {iv[1]:.3g}]" if iv else "(no bootstrap)"


def findings(an: Analysis) -> list[dict]:
    """The study's findings (see the module docstring for the rules)."""
    return [_finding_smooth(an), _finding_collapse(an), _finding_trace(an),
            _finding_pair(an, "full_beats_lora", "method", "full", "lora", (),
                          "Full distillation retains more quality (in-domain accuracy, general "
                          "score) than LoRA distillation at matched cells"),
            _finding_pair(an, "iterative_beats_one_shot", "schedule", "iterative", "one_shot",
                          ("prune_steps",),
                          "Iterative pruning retains more quality (in-domain accuracy, general "
                          "score) than one-shot pruning at matched cells")]


FINDING_NUMBERS = {"smooth_degradation": "1", "general_collapses_first": "2",
                   "trace_retains_general": "3", "full_beats_lora": "4a",
                   "iterative_beats_one_shot": "4b"}


def _finding(fid, claim, parts, evidence, rule, reason=None) -> dict:
    status = combine([p["status"] for p in parts]) if parts else INCONCLUSIVE
    if reason and not parts:
        evidence = reason
    return {"id": fid, "number": FINDING_NUMBERS[fid], "claim": claim, "status": status,
            "evidence": evidence, "rule": rule, "parts": parts}


def _mono_text(mono) -> str:
    return "monotone" if mono else "NOT monotone" if mono is False else "not checked"


def _finding_smooth(an: Analysis) -> dict:
    claim = "In-domain quality degrades smoothly and predictably with compression"
    rule = (f"per format: fit on ratios below the largest, predict the largest; mean |acc "
            f"error| <= max({EXTRAP_TOL_ABS}, {EXTRAP_TOL_SE} x stderr) and fitted accuracy "
            "non-increasing in r")
    parts, texts = [], []
    for fmt, ex in sorted(an.extrapolations.items()):
        if "skipped" in ex:
            parts.append({"format": fmt, "status": INCONCLUSIVE, "reason": ex["skipped"]})
            texts.append(f"{fmt}: inconclusive ({ex['skipped']})")
            continue
        mono = ex.get("monotone")
        ok = ex["mean_abs_err"] <= ex["tolerance"] and mono is not False
        status = REPRODUCED if ok else NOT_REPRODUCED
        parts.append({"format": fmt, "status": status, **{k: ex[k] for k in (
            "mean_abs_err", "max_abs_err", "tolerance", "held_out_ratio", "law")},
            "monotone": mono})
        texts.append(f"{fmt}: {ex['law']} fit on ratio <= {ex['train_max_ratio']:g} "
                     f"({ex['n_train']} rows) predicts ratio {ex['held_out_ratio']:g} "
                     f"({ex['n_test']} rows): accuracy {np.mean(ex['predicted']):.3f} "
                     f"predicted vs {np.mean(ex['observed']):.3f} measured, "
                     f"mean |error| {ex['mean_abs_err']:.3f} "
                     f"(max {ex['max_abs_err']:.3f}; tolerance {ex['tolerance']:.3f}); fitted "
                     f"curve {_mono_text(mono)} -> {status}")
    return _finding("smooth_degradation", claim, parts, "; ".join(texts), rule,
                    "no format has baseline cells")


def _finding_collapse(an: Analysis) -> dict:
    claim = "General knowledge collapses at a lower compression ratio than in-domain quality"
    rule = ("per format: general r0 interval wholly below in-domain r0 interval -> reproduced, "
            f"wholly above -> not reproduced (fits with >= {MIN_DOF_DECIDE} residual dof); "
            "otherwise the relative-retention gap "
            f"(in-domain - general) by the {Z:g}-stderr rule")
    if not an.study.has_general:
        return _finding("general_collapses_first", claim, [], "", rule,
                        "no general-benchmark scores in the rows")
    parts, texts = [], []
    for fmt in an.study.formats:
        cells = an.study.baseline(fmt, an.method, an.schedule)
        if not cells:
            continue
        gen, ind = an.fit_for(fmt, "general_collapse"), an.fit_for(fmt, "in_domain_collapse")
        part = {"format": fmt}
        text = f"{fmt}: "
        status = INCONCLUSIVE
        if gen is not None and ind is not None:
            g_iv, i_iv = gen.intervals().get("r0"), ind.intervals().get("r0")
            part.update(r0_general=gen.params()["r0"], r0_in_domain=ind.params()["r0"],
                        r0_general_interval=g_iv, r0_in_domain_interval=i_iv)
            r_top = max(c.r for c in cells)
            beyond = lambda v: " (beyond the largest ratio measured, %.3g)" % r_top \
                if v > r_top else ""  # noqa: E731
            text += (f"r0 general {gen.params()['r0']:.3g} {_fmt_iv(g_iv)}"
                     f"{beyond(gen.params()['r0'])} vs in-domain {ind.params()['r0']:.3g} "
                     f"{_fmt_iv(i_iv)}{beyond(ind.params()['r0'])}")
            dof = min(gen.y.size, ind.y.size) - len(gen.result.theta)
            if g_iv and i_iv and dof < MIN_DOF_DECIDE:
                text += (f" (not used: {dof} residual degree(s) of freedom, need "
                         f">= {MIN_DOF_DECIDE})")
            elif g_iv and i_iv:
                if g_iv[1] < i_iv[0]:
                    status, part["decided_by"] = REPRODUCED, "r0 intervals"
                elif i_iv[1] < g_iv[0]:
                    status, part["decided_by"] = NOT_REPRODUCED, "r0 intervals"
                else:
                    text += " (intervals overlap)"
        else:
            text += "no collapse fits"
        gap = retention_gap([c for c in cells if c.r > 1.0], an.study)
        part["retention_gap"] = {k: v for k, v in gap.items() if k != "by_ratio"}
        if gap["n"]:
            text += (f"; retention in-domain {gap['retention_in_domain']:.3f} vs general "
                     f"{gap['retention_general']:.3f}, gap {gap['mean']:+.3f} +- "
                     f"{gap['stderr']:.3f} over {gap['n']} cells")
            if status == INCONCLUSIVE:
                status = decide(gap["mean"], gap["stderr"], gap["n"])
                if status != INCONCLUSIVE:
                    part["decided_by"] = "retention gap"
        else:
            text += f"; retention gap skipped ({gap.get('skipped')})"
        part["status"] = status
        parts.append(part)
        texts.append(text + f" -> {status}" + (f" (by {part['decided_by']})"
                                                if "decided_by" in part else ""))
    return _finding("general_collapses_first", claim, parts, "; ".join(texts), rule,
                    "no baseline cells")


def _stat_text(s: dict) -> str:
    if not s["n"]:
        return f"no matched cells ({s['n_a']} {s['a']}, {s['n_b']} {s['b']})"
    return (f"{s['a']} - {s['b']} = {s['mean']:+.4f} +- {s['stderr']:.4f} "
            f"({s['stderr_kind']} stderr, {s['n']} matched cells)")


def _finding_trace(an: Analysis) -> dict:
    claim = ("CoT / blended supervision retains more general knowledge than label-only "
             "supervision at equal compression ratio")
    rule = (f"per trace format: paired general-score difference vs label at matched cells; "
            f"reproduced if > {Z:g} stderr, not reproduced if < -{Z:g} stderr")
    if not an.study.has_general:
        return _finding("trace_retains_general", claim, [], "", rule,
                        "no general-benchmark scores in the rows")
    trace = [f for f in TRACE_FORMATS if f in an.study.formats]
    if "label" not in an.study.formats or not trace:
        return _finding("trace_retains_general", claim, [], "", rule,
                        f"needs label and cot/blended cells; formats present: "
                        f"{an.study.formats}")
    parts, texts = [], []
    for f in trace:
        s = paired_difference(an.study.cells, "format", f, "label", "general_score")
        st = decide(s["mean"], s["stderr"], s["n"])
        parts.append({"format": f, "status": st, **{k: v for k, v in s.items() if k != "pairs"}})
        texts.append(f"general score {_stat_text(s)} -> {st}")
    if all(p["n"] == 0 for p in parts):
        return _finding("trace_retains_general", claim, [], "", rule,
                        "no matched (ratio, method, schedule, examples, seed) cells between "
                        "label and cot/blended")
    return _finding("trace_retains_general", claim, parts, "; ".join(texts), rule)


def _finding_pair(an, fid, field, a, b, drop, claim) -> dict:
    rule = (f"paired differences ({a} - {b}) at matched cells in in-domain accuracy and general "
            f"score; reproduced if some metric > {Z:g} stderr and none < -{Z:g} stderr")
    metrics = ["in_domain_accuracy"] + (["general_score"] if an.study.has_general else [])
    parts, texts = [], []
    for m in metrics:
        s = paired_difference(an.study.cells, field, a, b, m, drop)
        if not s["n"]:
            continue
        st = decide(s["mean"], s["stderr"], s["n"])
        won = (a if s["mean"] > 0 else b) if st != INCONCLUSIVE else "neither (within noise)"
        parts.append({"metric": m, "status": st, "winner": won,
                      **{k: v for k, v in s.items() if k != "pairs"}})
        texts.append(f"{m}: {_stat_text(s)}; better: {won}")
    if not parts:
        n_a = sum(getattr(c, field) == a for c in an.study.cells)
        n_b = sum(getattr(c, field) == b for c in an.study.cells)
        return _finding(fid, claim, [], "", rule, f"no matched cells ({n_a} {field}={a} rows, "
                        f"{n_b} {field}={b} rows)")
    if not an.study.has_general:
        texts.append("general score not measured")
    return _finding(fid, claim, parts, "; ".join(texts), rule)


def summary(an: Analysis) -> dict:
    """JSON-serialisable summary (NaN -> null): settings, teacher, fits, findings, rows."""
    st = an.study
    t_acc, t_acc_se = st.teacher_value("in_domain_accuracy")
    t_gen, t_gen_se = st.teacher_value("general_score")
    out = {
        "source": st.source,
        "settings": {"method": an.method, "schedule": an.schedule, "n_boot": an.n_boot,
                     "seed": an.seed, "level": an.level, "z": Z,
                     "extrapolation_tolerance": {"abs": EXTRAP_TOL_ABS, "stderr": EXTRAP_TOL_SE},
                     "min_error": MIN_ERROR},
        "teacher": {"in_domain_accuracy": t_acc, "in_domain_accuracy_stderr": t_acc_se,
                    "general_score": t_gen, "general_score_stderr": t_gen_se,
                    "in_domain_chance": st.in_domain_chance, "general_chance": st.general_chance,
                    "params": st.teachers[0].teacher_params, "task": st.teachers[0].task,
                    "name": st.teachers[0].name,
                    "original": [dataclasses.asdict(r) for r in st.original_teachers]},
        "n_cells": len(st.cells), "formats": st.formats,
        "fits": [cf.as_dict() for cf in an.fits.values()],
        "extrapolation": an.extrapolations,
        "findings": an.findings,
        "notes": an.notes,
        "rows": [dataclasses.asdict(r) for r in (*st.teachers, *st.cells)],
    }
    return to_json(out)


def to_json(obj):
    """Plain JSON types: NaN/Inf -> None, numpy scalars/arrays -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ----------------------------------------------------------------------------------------
# Planner
# ----------------------------------------------------------------------------------------


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
