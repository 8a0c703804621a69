"""Checkpoints: HF directories (hf), llama.cpp GGUF files (gguf), the safetensors files
under both (safetensors), and `resolve`, the one place a path becomes a checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path


def resolve(path) -> Path:
    """The HF checkpoint directory for `path`: itself, or for a llama.cpp .gguf file the
    directory it is converted into once (under $JDISTILL_CACHE/gguf). The one place a
    .gguf path becomes a checkpoint."""
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        return path
    from jdistill.checkpoints import gguf  # numpy + the gguf reader: only for .gguf paths

    return gguf.cached_import(path)
