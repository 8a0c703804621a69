"""jdistill: task-specific LLM compression (structured pruning + distillation) with scaling laws."""

from jdistill.checkpoints.hf import load_pretrained, save_pretrained
from jdistill.models.config import ModelConfig
from jdistill.models.generate import generate
from jdistill.models.decoder import Decoder, init_model

__all__ = ["Decoder", "ModelConfig", "generate", "init_model", "load_pretrained",
           "save_pretrained"]
