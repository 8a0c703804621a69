"""Rows of results or published data as float columns for the fitter, and the loaders of
the published data sets the replication tests fit (shipped_data/scaling/MANIFEST.md).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from jdistill.scaling.laws import Array


def lookup(row: Mapping, path: str):
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
                vals.append(_to_float(lookup(row, p)))
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
            raw.append(str(lookup(row, path)))
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
