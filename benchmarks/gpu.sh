#!/usr/bin/env bash
# Distillation-step speed and MFU on one GPU: a ~1.4B teacher -> ~1.0B student (Llama dims,
# hidden 2048, ffn 5632, 28 / 20 layers, 32 heads, 8 KV heads, vocab 32000), bf16 compute,
# f32 master weights + AdamW, sequence 2048, attention through cuDNN's fused kernel (named
# explicitly: JDISTILL_ATTENTION=cudnn), batch sizes 16, 8, 4, 2 tried in turn until one
# fits (an out-of-memory error moves on to the next), 10 timed steps.
#
#   bash benchmarks/gpu.sh [extra experiments.benchmark flags, e.g. --remat=dots]
#
# Writes $OUT/benchmark_gpu.json when $OUT is set (else ./benchmark_gpu.json) and prints
# the table (step time, tokens/s, compile time, model TFLOP/s, MFU against the device's
# peak from jdistill.models.flops). Installs only what is missing: the repo (pip install
# -e .) if jdistill does not import, and jax's CUDA plugin (same jax version) if jax sees
# no GPU. Without an NVIDIA GPU it says so and runs the CPU configuration instead
# ($BENCH_CPU_PRESET, default small, with the PyTorch baseline): tests/benchmarks runs
# that path so the script cannot rot. Everything is capped at $BENCH_TIMEOUT s (default
# 470) from the script's start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # GPU images may have no `python`

JSON="${OUT:-.}/benchmark_gpu.json"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-470}"   # seconds for everything, set-up included
left() { echo $(( BENCH_TIMEOUT - SECONDS > 10 ? BENCH_TIMEOUT - SECONDS : 10 )); }

if ! "$PY" -c "import jdistill, experiments" 2>/dev/null; then
  echo "== installing the repo (pip install -e .)"
  "$PY" -m pip install --quiet -e . || { echo "pip install -e . failed (offline?)" >&2; exit 1; }
fi

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

backend() { "$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none; }

if [[ $has_gpu == 1 && $(backend) != gpu ]]; then
  jax_version=$("$PY" -c "import jax; print(jax.__version__)")
  echo "== jax $jax_version sees no GPU: installing jax[cuda12]==$jax_version"
  "$PY" -m pip install --quiet "jax[cuda12]==$jax_version" \
    || { echo "could not install jax[cuda12] (offline?); install it and rerun" >&2; exit 1; }
fi

if [[ $has_gpu == 1 && $(backend) == gpu ]]; then
  # most of the GPU for the step (default preallocation is 75%)
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  export JDISTILL_ATTENTION=cudnn
  timeout "$(left)" "$PY" -m experiments.benchmark --preset=1b --format=logits \
    --seq_len=2048 --batch_sizes=16,8,4,2 --out="$JSON" "$@"
else
  echo "!! no usable NVIDIA GPU here (nvidia-smi: $([[ $has_gpu == 1 ]] && echo found || echo \
missing), jax backend: $(backend)): no GPU numbers. Running the CPU configuration" \
    "(--preset=${BENCH_CPU_PRESET:-small}, PyTorch baseline) instead; the JSON says" \
    "jax_backend=cpu." >&2
  timeout "$(left)" "$PY" -m experiments.benchmark --preset="${BENCH_CPU_PRESET:-small}" \
    --batch_sizes="${BENCH_CPU_BATCHES:-8,4}" --out="$JSON" "$@"
fi
