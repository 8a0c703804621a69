"""The results-row schema: rows written (`new_row`), parsed, checked and selected.

A row is one JSON object a line: run metadata, ``main`` (who wrote it), ``cell`` (the
experiment's coordinates: `CELL_KEYS`), ``compression_ratio`` (teacher params / student
params), the two parameter counts, ``metrics`` and whatever else its writer records. Every
main that writes rows builds them with `new_row`; `parse_row` reads the same keys back.
The study uses ``main`` = ``sweep_cell`` (a student), ``sweep_teacher`` (the corrected
teacher) and ``sweep_teacher_original`` (the teacher before correction, context only);
other rows (e.g. ``distill``) are ignored by `select`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from jdistill.scaling.tables import lookup  # dotted paths into rows, as the fitter reads them
from jdistill.utils import files

STUDY_MAINS = ("sweep_cell", "sweep_teacher", "sweep_teacher_original")
TEACHER_MAINS = ("sweep_teacher", "sweep_teacher_original")
CELL_KEYS = ("id", "ratio", "format", "method", "schedule", "examples", "seed", "prune_steps")


def new_row(main: str, cell: Mapping, *, teacher_params, student_params, metrics: Mapping,
            **fields) -> dict:
    """A results row: run metadata, `main`, the `cell` (all of `CELL_KEYS`), the compression
    ratio of the parameter counts (None without a teacher count), `fields`, then `metrics`."""
    missing = [k for k in CELL_KEYS if k not in cell]
    if missing:
        raise ValueError(f"a {main} row's cell lacks {missing}")
    ratio = teacher_params / student_params if teacher_params and student_params else None
    return {**files.run_metadata(), "main": main, "cell": dict(cell), "compression_ratio": ratio,
            "student_params": student_params, "teacher_params": teacher_params, **fields,
            "metrics": dict(metrics)}


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
    acc_se: float  # max(measurement stderr, between-seed sd) once `select` has seen seeds
    chance: float
    general: float
    general_se: float  # likewise
    general_chance: float
    task: str | None = None
    student_params: int | None = None
    teacher_params: int | None = None
    time: str | None = None
    run_id: str | None = None
    name: str | None = None  # the teacher's checkpoint (teacher rows)
    acc_seed_sd: float = math.nan  # sd over the seeds of this cell (NaN below 2 seeds)
    general_seed_sd: float = math.nan
    # the paper's other in-domain metrics, as measured (NaN in rows that predate them)
    macro_f1: float = math.nan
    macro_f1_se: float = math.nan
    nll: float = math.nan
    nll_se: float = math.nan
    brier: float = math.nan
    brier_se: float = math.nan
    scoring: str = "direct"  # "after_trace": a trace-format student scored after its trace

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


def _number(row, path, where, *, required=True, lo=None, hi=None) -> float:
    try:
        v = lookup(row, path)
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
        v = lookup(row, path)
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
        name=name if isinstance(name, str) else None,
        scoring=_text(row, m + "in_domain_scoring", where, default="direct"),
        **{field: _number(row, m + "in_domain_" + key, where, required=False, lo=0.0)
           for field, key in (("macro_f1", "macro_f1"), ("macro_f1_se", "macro_f1_stderr"),
                              ("nll", "nll"), ("nll_se", "nll_stderr"), ("brier", "brier"),
                              ("brier_se", "brier_stderr"))})


def with_seed_spread(cells: Sequence[Row]) -> list[Row]:
    """Rows whose cell was run with >= 2 seeds carry the between-seed sd of accuracy and
    general score, and use max(measurement stderr, that sd) as their stderr: a seed changes
    the data order, the LoRA init and the traces, which no single evaluation measures."""
    groups: dict = {}
    for c in cells:
        groups.setdefault(c.key(drop=("seed",)), []).append(c)

    def sd(values):
        v = np.array([x for x in values if math.isfinite(x)])
        return float(np.std(v, ddof=1)) if len(v) >= 2 else math.nan

    out = []
    for c in cells:
        group = groups[c.key(drop=("seed",))]
        acc_sd, gen_sd = sd([g.acc for g in group]), sd([g.general for g in group])
        out.append(dataclasses.replace(
            c, acc_seed_sd=acc_sd, general_seed_sd=gen_sd,
            acc_se=float(np.fmax(c.acc_se, acc_sd)),
            general_se=float(np.fmax(c.general_se, gen_sd))))
    return out


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
    spread = with_seed_spread(list(cells.values()))
    n_multi = sum(math.isfinite(c.acc_seed_sd) for c in spread)
    if n_multi:
        notes.append(f"{n_multi} rows have replicates over seeds: their stderr is the larger of "
                     "the measurement stderr and the between-seed sd")
    return Study(source=source, cells=tuple(spread), teachers=tuple(teachers),
                 notes=tuple(notes), original_teachers=tuple(originals))
