"""One architecture config for every supported decoder family, to and from HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# model_type -> (architecture class name, qkv bias, per-head q/k RMSNorm)
FAMILIES = {
    "llama": ("LlamaForCausalLM", False, False),
    "mistral": ("MistralForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3).

    `head_dim` is independent of `hidden_size / num_heads`; `num_heads` must be a multiple of
    `num_kv_heads` (GQA; 1 KV head is multi-query attention).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # llama3 parameters as sorted (key, value) pairs (hashable: configs are static under jit)
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported family {self.family!r}; supported: {sorted(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        rope_type = dict(self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 has biases on q/k/v projections."""
        return FAMILIES[self.family][1]

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises each query/key head before RoPE."""
        return FAMILIES[self.family][2]

    @property
    def num_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count as `transformers` counts it (tied embeddings once)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * h * hd * 2 + d * kv * hd * 2
        if self.qkv_bias:
            attn += (h + 2 * kv) * hd
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d


def from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF `config.json` (transformers 4.x or 5.x keys)."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"unsupported architecture model_type={family!r} "
            f"(architectures={cfg.get('architectures')}); supported model types: "
            f"{sorted(FAMILIES)} ({', '.join(a for a, _, _ in FAMILIES.values())})"
        )
    if family == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError("Llama checkpoints with attention_bias/mlp_bias are not supported; "
                         "convert them without biases")
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ValueError(f"{family} with use_sliding_window=true is not supported; "
                         "set use_sliding_window=false in config.json")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act={cfg['hidden_act']!r}; only 'silu' (SwiGLU)")
    # transformers 5 nests theta and scaling under rope_parameters; 4.x has them top level.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        family=family,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        sliding_window=cfg.get("sliding_window") if family == "mistral" else None,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def to_hf_dict(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict that `transformers` reads back into the same architecture."""
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope_parameters.update(dict(config.rope_scaling))
    out = {
        "architectures": [FAMILIES[config.family][0]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope_parameters,
        "rope_theta": config.rope_theta,  # read by transformers 4.x
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (list(config.eos_token_id) if isinstance(config.eos_token_id, tuple)
                         else config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if config.family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if config.family == "mistral":
        out["sliding_window"] = config.sliding_window
    if config.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    if config.family == "qwen3":
        out["attention_bias"] = False
    return out


def load_hf_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        return from_hf_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export the checkpoint") from e
    except KeyError as e:
        raise ValueError(f"{path} lacks the key {e}; is this a decoder-only LM config.json?") from e
