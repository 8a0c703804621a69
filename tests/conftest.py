"""Test session setup (8 simulated CPU devices, set before the first jax import) and the
shared fixtures: tiny random checkpoints of each family, built once per test session (once
per xdist worker) and shared read-only.
"""

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.hf_models import ANSWERS, PROMPTS, make_hf_model, save_tokenizer  # noqa: E402


@dataclasses.dataclass
class TinyCheckpoint:
    path: Path        # HF checkpoint directory (config.json, model.safetensors[, tokenizer])
    hf_model: object  # the transformers model it was saved from (eval mode, random weights)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """build(variant, seed=0, tokenizer=False, **config_overrides) -> TinyCheckpoint.

    `variant` is one of tests.hf_models.VARIANTS. Each distinct request is built once per
    session; tests must not write into `.path` (save beside it, under their own tmp_path)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def build(variant, seed=0, tokenizer=False, **overrides):
        key = (variant, seed, tokenizer, tuple(sorted(overrides.items())))
        if key not in built:
            path = root / f"{variant}-{len(built)}"
            model = make_hf_model(variant, seed, **overrides)
            model.save_pretrained(path)
            if tokenizer:
                save_tokenizer(path)
            built[key] = TinyCheckpoint(path, model)
        return built[key]

    return build


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A teacher (2 layers) and student (1 layer) of the llama3 variant with tokenizers,
    distillation records (data.jsonl) and calibration text (calib.txt): the trainer's and
    the multi-process tests' shared inputs."""
    root = tmp_path_factory.mktemp("models")
    make_hf_model("llama3", seed=0).save_pretrained(root / "teacher")
    make_hf_model("llama3", seed=1, num_hidden_layers=1).save_pretrained(root / "student")
    for name in ("teacher", "student"):
        save_tokenizer(root / name)
    records = [{"prompt": p, "reasoning": f"it says {p} so", "answer": a}
               for p, a in zip(PROMPTS, ANSWERS)] * 4
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "calib.txt").write_text("\n\n".join(f"{p} {a}" for p, a in zip(PROMPTS, ANSWERS)) * 4)
    return root
