"""Model FLOPs of a distillation step and model FLOPs utilisation (MFU).

Counted as MaxText counts them: matmuls only (2 FLOPs per multiply-add; norms, softmax
and the optimizer not counted), causal attention halved (QK^T and PV over the lower
triangle), a backward pass twice its forward. The lm-head is counted where the trainer
forms it: at the supervised positions the batch names (all positions without them).

  forward FLOPs = 2 * tokens * N + 2 * lm_tokens * D * V + tokens * 2 * L * H * hd * T
  N = L * (2*D*H*hd + 2*D*KV*hd + 3*D*F)       (q, o; k, v; gate, up, down)

Step = teacher forward + student forward + backward (2x forward; a LoRA student, whose
base weights get no gradient, 1x: only the activations' gradient is formed).
"""

from __future__ import annotations

from jdistill.models.config import ModelConfig

# dense (no sparsity) peak TFLOP/s per chip by compute dtype, from the vendors' data
# sheets; matched against jax's `device_kind` by substring, first match wins (so "H100
# PCIe" before "H100"). float32 on NVIDIA GPUs is TF32 matmuls (XLA's default precision).
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.7}),
    ("H200", {"bfloat16": 989.0, "float32": 494.7}),
    ("H20", {"bfloat16": 148.0, "float32": 74.0}),
    ("B200", {"bfloat16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),  # v5e
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),      # v5p reports "TPU v5"
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),      # Trillium (v6e)
)


def layer_matmul_params(c: ModelConfig) -> int:
    """Weights of one decoder layer that take part in a matmul."""
    d, hd = c.hidden_size, c.head_dim
    return 2 * d * c.num_heads * hd + 2 * d * c.num_kv_heads * hd + 3 * d * c.intermediate_size


def forward_flops(c: ModelConfig, *, batch: int, seq_len: int, lm_positions: int | None = None
                  ) -> float:
    """FLOPs of one forward over [batch, seq_len] tokens; the lm-head at `lm_positions` rows
    in all (default every token)."""
    tokens = batch * seq_len
    lm = tokens if lm_positions is None else lm_positions
    attention = 2 * c.num_layers * c.num_heads * c.head_dim * seq_len  # per token, causal
    return float(2 * tokens * c.num_layers * layer_matmul_params(c)
                 + 2 * lm * c.hidden_size * c.vocab_size + tokens * attention)


def step_flops(student: ModelConfig, teacher: ModelConfig | None, *, batch: int, seq_len: int,
               lm_positions: int | None = None, lora: bool = False) -> float:
    """Model FLOPs of one distillation step (module docstring); no teacher: none of its."""
    kw = dict(batch=batch, seq_len=seq_len, lm_positions=lm_positions)
    flops = (2 if lora else 3) * forward_flops(student, **kw)
    return flops + (0.0 if teacher is None else forward_flops(teacher, **kw))


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The chip's dense peak for `dtype` compute, or None when not in the table (CPUs)."""
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def utilisation(flops_per_step: float, seconds_per_step: float, *, devices: int,
                device_kind: str, dtype: str) -> dict:
    """{model_tflops_per_s, mfu}: achieved TFLOP/s over all devices and its fraction of
    their peak (mfu None where the peak is unknown)."""
    achieved = flops_per_step / max(seconds_per_step, 1e-12) / 1e12
    peak = peak_tflops(device_kind, dtype)
    return {"model_tflops_per_s": achieved,
            "mfu": None if peak is None else achieved / (peak * devices)}
