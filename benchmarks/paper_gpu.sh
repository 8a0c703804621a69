#!/usr/bin/env bash
# The study at the paper's sizes on one GPU (`jdistill demo --preset=paper_gpu`), its report
# copied to $OUT/paper_gpu/ (report.md, fits.json, results.jsonl, plots, plan.json, run.log).
#
#   bash benchmarks/paper_gpu.sh prepare   # here: .device/a and .device/b for the trip
#   bash benchmarks/paper_gpu.sh join      # there: the teacher from the two halves (a path)
#   bash benchmarks/paper_gpu.sh [demo flags, e.g. --seeds=0]   # there: the run
#
# Why the halves: the GPU machines lent to this project reach no package index and take at
# most 64 MiB of working tree a call, while the default teacher's GGUF is 94 MiB. `prepare`
# splits it into .device/a and .device/b (git-ignored; .device/a also holds the pure-Python
# `gguf` reader, which the GPU image lacks). Carry .device/a in one call and .device/b in the
# next, while the machine is warm: ignored paths a call does not name stay there, so the
# second call finds both halves, and `join` checks the sha256 of the whole.
#
# Settings: TEACHER (a checkpoint; default: the joined halves, else the installed default
# teacher), PAPER_GPU_PRESET (default paper_gpu; tests run `smoke` on a CPU),
# PAPER_GPU_TIMEOUT (seconds for the run, default 540: a killed run is resumable, and what
# finished is reported), RUN_DIR (the demo's --out, default runs/PRESET), DEVICE_DIR
# (default .device), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEV="${DEVICE_DIR:-.device}"

default_teacher() {
  "$PY" -c "from jdistill.checkpoints import gguf; print(gguf.default_teacher_path())"
}

if [[ "${1:-}" == prepare ]]; then
  teacher="${TEACHER:-$(default_teacher)}"
  rm -rf "$DEV" && mkdir -p "$DEV/a/site" "$DEV/b"
  size=$(stat -c %s "$teacher")
  split -b $(( (size + 1) / 2 )) -d -a 1 "$teacher" "$DEV/part."
  mv "$DEV/part.0" "$DEV/a/teacher.gguf.0" && mv "$DEV/part.1" "$DEV/b/teacher.gguf.1"
  sha256sum "$teacher" | cut -d' ' -f1 | tee "$DEV/a/teacher.sha256" > "$DEV/b/teacher.sha256"
  gguf_dir=$("$PY" -c "import gguf, os; print(os.path.dirname(gguf.__file__))")
  cp -r "$gguf_dir" "$DEV/a/site/" && find "$DEV/a/site" -name __pycache__ -prune -exec rm -rf {} +
  echo "prepared $DEV: a $(du -sm "$DEV/a" | cut -f1) MiB, b $(du -sm "$DEV/b" | cut -f1) MiB" \
       "(teacher $(basename "$teacher"), $size bytes)"
  exit 0
fi

join_teacher() {  # prints the joined teacher's path; fails naming the missing half
  for half in "$DEV/a/teacher.gguf.0" "$DEV/b/teacher.gguf.1"; do
    [[ -f $half ]] || { echo "paper_gpu: error: $half is missing: carry $(dirname "$half")" \
      "in a call on this machine (bash benchmarks/paper_gpu.sh prepare makes it)" >&2; return 2; }
  done
  local out="$DEV/teacher.gguf"
  cat "$DEV/a/teacher.gguf.0" "$DEV/b/teacher.gguf.1" > "$out.tmp"
  if [[ $(sha256sum "$out.tmp" | cut -d' ' -f1) != $(cat "$DEV/a/teacher.sha256") ]]; then
    rm -f "$out.tmp"
    echo "paper_gpu: error: the joined teacher's sha256 differs from prepare's: the halves" \
         "come from different prepares; run prepare again and carry both" >&2
    return 2
  fi
  mv "$out.tmp" "$out" && echo "$out"
}

if [[ "${1:-}" == join ]]; then
  join_teacher
  exit 0
fi

if [[ -n "${TEACHER:-}" ]]; then
  teacher="$TEACHER"
elif [[ -f "$DEV/a/teacher.gguf.0" || -f "$DEV/b/teacher.gguf.1" ]]; then
  teacher=$(join_teacher)
else
  teacher=$(default_teacher) || { echo "paper_gpu: error: no teacher: set TEACHER, or carry" \
    "the halves that 'bash benchmarks/paper_gpu.sh prepare' writes" >&2; exit 2; }
fi
export PYTHONPATH=".:$DEV/a/site${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices()[0].device_kind)"

preset="${PAPER_GPU_PRESET:-paper_gpu}"
run="${RUN_DIR:-runs/$preset}"
report="${OUT:-runs}/paper_gpu"
mkdir -p "$run" "$report"
start=$SECONDS
set +e
timeout "${PAPER_GPU_TIMEOUT:-540}" "$PY" -m experiments.demo --preset="$preset" \
  --teacher="$teacher" --out="$run" "$@" 2>&1 | tee "$report/run.log"
rc=${PIPESTATUS[0]}
set -e
echo "paper_gpu: demo exit $rc after $(( SECONDS - start )) s" | tee -a "$report/run.log"
if [[ $rc != 0 ]]; then  # timed out or failed: report the rows that finished
  "$PY" -m experiments.sweep --preset="$preset" --teacher="$teacher" --out="$run" --merge "$@" \
    && "$PY" -m experiments.report --results="$run/results.jsonl" --out="$run/report" \
    2>&1 | tee -a "$report/run.log" || true
fi
for f in report.md fits.json results.jsonl in_domain.png general.png comparisons.png plan.json; do
  [[ -f "$run/report/$f" ]] && cp "$run/report/$f" "$report/"
done
ls "$report"
exit "$rc"
