"""jdistill: task-specific LLM compression (structured pruning + distillation) with scaling laws.

The public names load on first use (PEP 562), so ``import jdistill`` costs no JAX import:
a process that only reads results (report, plan, fit) never pays for it.
"""

from __future__ import annotations

import importlib

# public name -> the module that is its home
_HOMES = {
    "Decoder": "jdistill.models.decoder",
    "init_model": "jdistill.models.decoder",
    "ModelConfig": "jdistill.models.config",
    "generate": "jdistill.models.generate",
    "load_pretrained": "jdistill.checkpoints.hf",
    "save_pretrained": "jdistill.checkpoints.hf",
}
_LOSSES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
           "cross_entropy", "topk_kl", "blended_cot_loss", "token_divergence", "masked_mean",
           "BlendWeights")
_FUSED = ("fused_token_terms", "fused_divergence", "fused_forward_kl", "fused_cross_entropy",
          "fused_blended_cot_loss", "fused_topk_kl")
_HOMES.update({n: "jdistill.distill.losses" for n in _LOSSES})
_HOMES.update({n: "jdistill.distill.fused" for n in _FUSED})
# every loss, plain and fused, under one name as before the re-layout (`jdistill.losses.X`)
_MODULES = {"losses": "jdistill.distill"}

__all__ = sorted([*_HOMES, *_MODULES])


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'jdistill' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted([*globals(), *__all__])
