"""Distillation: the losses (plain and fused), the supervision formats, teacher supervision
(traces, top-k logits), training records and the trainer.

Where a new loss goes: a pure ``(loss, metrics)`` function in ``losses`` (its chunked twin
from hidden states in ``fused``), a new format's weights in ``formats.FORMATS``. Every loss
is re-exported here on first use, as optax re-exports its losses.
"""

from __future__ import annotations

import importlib

_LOSS_MODULES = ("jdistill.distill.losses", "jdistill.distill.fused")


def __getattr__(name: str):
    for module in _LOSS_MODULES:
        mod = importlib.import_module(module)
        if name in getattr(mod, "__all__", ()):
            return getattr(mod, name)
    raise AttributeError(f"module 'jdistill.distill' has no attribute {name!r}")
