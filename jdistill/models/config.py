"""One architecture config for every supported decoder family, to and from HF `config.json`.

Where a new model family goes: one `Family` in `FAMILIES` (`register_family`), naming what
sets it apart from the shared Llama shape — the decoder, the checkpoint names and the
sharding rules read these fields and have no per-family branches. (GGUF files: llama.cpp's
tensor names in `checkpoints.gguf`, Llama family only.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jdistill.models.rope import check_rope_type, rope_type


@dataclasses.dataclass(frozen=True)
class Family:
    """A decoder family, keyed by HF's `model_type`.

    rejects: (HF config key, message): a checkpoint with that key set is refused with the
      message (a variant the decoder does not implement).
    hf_extra: (key, value) pairs written into config.json for transformers to read back.
    """

    model_type: str
    architecture: str                 # the HF class config.json names
    qkv_bias: bool = False            # biases on q/k/v (Qwen2)
    qk_norm: bool = False             # per-head q/k RMSNorm before RoPE (Qwen3)
    sliding_window: bool = False      # reads and writes HF's sliding_window (Mistral)
    hidden_multiple_of_heads: bool = False  # transformers' config check (LlamaConfig)
    rejects: tuple[tuple[str, str], ...] = ()
    hf_extra: tuple[tuple[str, Any], ...] = ()


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


_QWEN_WINDOW = "{family} with use_sliding_window=true is not supported; set " \
               "use_sliding_window=false in config.json"
_LLAMA_BIAS = "Llama checkpoints with attention_bias/mlp_bias are not supported; convert " \
              "them without biases"
register_family(Family("llama", "LlamaForCausalLM", hidden_multiple_of_heads=True,
                       rejects=(("attention_bias", _LLAMA_BIAS), ("mlp_bias", _LLAMA_BIAS)),
                       hf_extra=(("attention_bias", False), ("mlp_bias", False))))
register_family(Family("mistral", "MistralForCausalLM", sliding_window=True))
register_family(Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True,
                       rejects=(("use_sliding_window", _QWEN_WINDOW),),
                       hf_extra=(("use_sliding_window", False), ("sliding_window", None))))
register_family(Family("qwen3", "Qwen3ForCausalLM", qk_norm=True,
                       rejects=(("use_sliding_window", _QWEN_WINDOW),),
                       hf_extra=(("use_sliding_window", False), ("sliding_window", None),
                                 ("attention_bias", False))))


def get_family(model_type) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported family {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


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
        get_family(self.family)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        check_rope_type(rope_type(self.rope_scaling))

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def qkv_bias(self) -> bool:
        return self.spec.qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.spec.qk_norm

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
            f"{sorted(FAMILIES)} ({', '.join(f.architecture for f in FAMILIES.values())})"
        )
    spec = FAMILIES[family]
    for key, message in spec.rejects:
        if cfg.get(key):
            raise ValueError(message.format(family=family))
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act={cfg['hidden_act']!r}; only 'silu' (SwiGLU)")
    # transformers 5 nests theta and scaling under rope_parameters; 4.x has them top level.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    check_rope_type(kind)
    rope_scaling = None if kind == "default" else {**rope, "rope_type": kind}
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
        sliding_window=cfg.get("sliding_window") if spec.sliding_window else None,
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
        "architectures": [config.spec.architecture],
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
    out.update(config.spec.hf_extra)
    if config.spec.sliding_window:
        out["sliding_window"] = config.sliding_window
    return out


def load_hf_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        return from_hf_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export the checkpoint") from e
    except KeyError as e:
        raise ValueError(f"{path} lacks the key {e}; is this a decoder-only LM config.json?") from e
