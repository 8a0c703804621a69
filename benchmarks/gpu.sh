#!/usr/bin/env bash
# Distillation-step speed and MFU on one GPU: a ~1.4B teacher -> ~1.0B student (Llama dims,
# hidden 2048, ffn 5632, 28 / 20 layers, 32 heads, 8 KV heads, vocab 32000), bf16 compute,
# f32 master weights + AdamW, batch 8 x 1024 tokens, 10 timed steps.
#
#   bash benchmarks/gpu.sh [extra experiments.benchmark flags, e.g. --batch_size=16]
#
# Writes $OUT/benchmark_gpu.json when $OUT is set (else ./benchmark_gpu.json) and prints
# the table. Installs only what is missing: the repo (pip install -e .) if jdistill does
# not import, and jax's CUDA plugin (same jax version) if jax sees no GPU. On a machine
# without an NVIDIA GPU it says so and runs the small CPU configuration instead (with the
# PyTorch baseline), so the script still checks that the benchmark works end to end.
# Budget: compile ~1-2 min + ~10 s of steps; everything is capped at $BENCH_TIMEOUT s
# (default 470) from the script's start.
set -euo pipefail
cd "$(dirname "$0")/.."

JSON="${OUT:-.}/benchmark_gpu.json"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-470}"   # seconds for everything, set-up included
left() { echo $(( BENCH_TIMEOUT - SECONDS > 10 ? BENCH_TIMEOUT - SECONDS : 10 )); }

if ! python -c "import jdistill, experiments" 2>/dev/null; then
  echo "== installing the repo (pip install -e .)"
  pip install --quiet -e . || { echo "pip install -e . failed (offline?)" >&2; exit 1; }
fi

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

backend() { python -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none; }

if [[ $has_gpu == 1 && $(backend) != gpu ]]; then
  jax_version=$(python -c "import jax; print(jax.__version__)")
  echo "== jax $jax_version sees no GPU: installing jax[cuda12]==$jax_version"
  pip install --quiet "jax[cuda12]==$jax_version" \
    || { echo "could not install jax[cuda12] (offline?); install it and rerun" >&2; exit 1; }
fi

if [[ $has_gpu == 1 && $(backend) == gpu ]]; then
  # most of the GPU for the step (default preallocation is 75%)
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  log=$(mktemp)
  # XLA:CPU's plan for this step needs ~89 GiB of temporaries (mostly f32 attention scores);
  # should the GPU's not fit, rerun once at half the batch rather than report nothing
  if ! timeout "$(left)" python -m experiments.benchmark --preset=1b --format=logits \
      --out="$JSON" "$@" 2>&1 | tee "$log"; then
    if grep -q "RESOURCE_EXHAUSTED\|Out of memory" "$log"; then
      echo "!! out of GPU memory at batch 8 x 1024: rerunning at batch 4 x 1024" >&2
      timeout "$(left)" python -m experiments.benchmark --preset=1b --format=logits \
        --batch_size=4 --out="$JSON" "$@"
    else
      exit 1
    fi
  fi
else
  echo "!! no usable NVIDIA GPU here (nvidia-smi: $([[ $has_gpu == 1 ]] && echo found || echo \
missing), jax backend: $(backend)): no GPU numbers. Running the CPU configuration" \
    "(--preset=small, PyTorch baseline) instead; the JSON says jax_backend=cpu." >&2
  timeout "$(left)" python -m experiments.benchmark --preset=small --out="$JSON" "$@"
fi
