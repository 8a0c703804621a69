"""Experiment logging where users look: one small writer, TensorBoard and Weights & Biases
behind it.

  writer = tracking.open_writer(["tensorboard", "wandb"], logdir=DIR, run="r2-label",
                                group="runs/sweep", config={...})
  writer.scalars(step, {"loss": 1.2, "tokens_per_s": 900.0}, prefix="train")
  writer.summary({"in_domain_accuracy": 0.61})   # a run's final numbers
  writer.close()

Backends:
  tensorboard  event files under `logdir` (tensorboardX; optional: skipped when absent).
  wandb        one W&B run per writer, `group` grouping a sweep's cells (pip install wandb;
               WANDB_PROJECT names the project, default "jdistill"; WANDB_MODE=offline
               writes under `logdir`/wandb without a network).
Only process 0 writes; on every other process the writer does nothing. The progress lines
and metrics.jsonl stay as they are: this is for dashboards.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

BACKENDS = ("tensorboard", "wandb")
DEFAULT = ("tensorboard",)


class Writer:
    """Fans scalars and summaries out to the chosen backends."""

    def __init__(self, sinks=(), offset: int = 0):
        self.sinks, self.offset = list(sinks), offset

    def shifted(self, offset: int) -> "Writer":
        """A view logging step s as s + offset (a run continued by another, e.g. iterative
        pruning's recovery steps); close the original, not the view."""
        return Writer(self.sinks, self.offset + offset)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        values = {f"{prefix}/{k}" if prefix else k: float(v) for k, v in values.items()
                  if _is_number(v)}
        for sink in self.sinks:
            sink.scalars(int(step) + self.offset, values)

    def summary(self, values: dict) -> None:
        flat = {k: float(v) for k, v in flatten(values).items() if _is_number(v)}
        for sink in self.sinks:
            sink.summary(flat)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_writer(backends=DEFAULT, *, logdir, run: str | None = None, group: str | None = None,
                config: dict | None = None) -> Writer:
    """A `Writer` over `backends` (names from BACKENDS). Raises on an unknown name, or when
    wandb is asked for and not installed."""
    backends = check_backends(backends)
    if not _is_writer():
        return Writer()
    sinks = []
    if "tensorboard" in backends and not _missing("tensorboardX"):
        sinks.append(_TensorBoard(Path(logdir)))
    if "wandb" in backends:
        sinks.append(_WandB(Path(logdir), run=run, group=group, config=config))
    return Writer(sinks)


def check_backends(backends) -> list[str]:
    """The backend names, stripped; raises on an unknown one, or on wandb not installed."""
    backends = [b.strip() for b in backends if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; use any of {list(BACKENDS)}")
    if "wandb" in backends and _missing("wandb"):
        raise ValueError("the wandb logger needs Weights & Biases: pip install wandb (or drop "
                         "wandb from --loggers)")
    return backends


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dicts -> one level, keys joined with "/" ({"general": {"piqa": {"acc": ..}}}
    -> {"general/piqa/acc": ..})."""
    out = {}
    for k, v in values.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class _TensorBoard:
    """Event files, the folder made at the first value (a run that fails on bad input first
    writes nothing)."""

    def __init__(self, logdir: Path):
        self.logdir, self.board, self.last_step = logdir, None, 0

    def _open(self):
        if self.board is None:
            from tensorboardX import SummaryWriter

            self.board = SummaryWriter(str(self.logdir))
        return self.board

    def scalars(self, step, values):
        self.last_step = step
        for k, v in values.items():
            self._open().add_scalar(k, v, step)

    def summary(self, values):
        for k, v in values.items():
            self._open().add_scalar(f"summary/{k}", v, self.last_step)

    def close(self):
        if self.board is not None:
            self.board.close()


class _WandB:
    """One W&B run, started at the first value."""

    def __init__(self, logdir: Path, *, run, group, config):
        self.logdir, self.args, self.run = logdir, dict(name=run, group=group,
                                                        config=config or {}), None

    def _open(self):
        if self.run is None:
            import wandb

            self.logdir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jdistill"),
                                  dir=str(self.logdir), reinit="create_new", **self.args)
        return self.run

    def scalars(self, step, values):
        self._open().log(values, step=step)

    def summary(self, values):
        self._open().summary.update(values)

    def close(self):
        if self.run is not None:
            self.run.finish()


def _is_number(v) -> bool:
    if isinstance(v, (bool, str)):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _is_writer() -> bool:
    import sys

    jax = sys.modules.get("jax")  # no JAX imported: one process
    return jax is None or jax.process_index() == 0
