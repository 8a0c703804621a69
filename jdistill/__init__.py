"""jdistill: task-specific LLM compression (structured pruning + distillation) with scaling laws."""

from jdistill.checkpoint import load_pretrained, save_pretrained
from jdistill.config import ModelConfig
from jdistill.generate import generate
from jdistill.model import Decoder, init_model

__all__ = ["Decoder", "ModelConfig", "generate", "init_model", "load_pretrained",
           "save_pretrained"]
