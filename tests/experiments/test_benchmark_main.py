"""End-to-end test of ``python -m experiments.benchmark`` (flags -> table + JSON).

Timings are only checked for being positive; the real check is that our step and the
PyTorch reference step start from the same loss, i.e. the comparison times the same work.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(args, tmp_path):
    """Runs the main in a fresh process (absl flags are global); returns (JSON, stdout)."""
    out = tmp_path / "bench.json"
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)  # one real CPU device, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args,
                           f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


# blended (KL * tau^2 + CE, per-segment means) runs by default: it covers the most of the
# torch reference; logits (one union mean of KL) is the same machinery, kept as slow.
@pytest.mark.parametrize("fmt", ["blended", pytest.param("logits", marks=pytest.mark.slow)])
def test_tiny_preset_matches_torch(tmp_path, fmt):
    # init_std 0.1 and tau 2 make the losses O(1), so agreement to 1e-3 means something
    result, stdout = run_benchmark(["--preset=tiny", "--steps=2", f"--format={fmt}",
                                    "--dtype=float32", "--init_std=0.1", "--temperature=2",
                                    "--peak_tflops=1"], tmp_path)
    for impl in ("ours", "torch"):
        assert result[impl]["tokens_per_s"] > 0
        assert len(result[impl]["times_s"]) == 2
        assert result[impl]["first_loss"] > 0.1
    assert result["ours"]["finite"]
    assert result["ours"]["first_loss"] == pytest.approx(result["torch"]["first_loss"], abs=1e-3)
    assert result["loss_abs_diff"] < 1e-3
    assert result["ratio_ours_over_torch"] > 0
    assert result["settings"]["tokens_per_step"] == 2 * 32
    assert result["flops_per_step"] > 0 and 0 < result["mfu"]
    assert 0 < result["ours"]["compile_s"] < result["ours"]["first_call_s"] + 60
    assert result["settings"]["attention"] == "xla" and result["settings"]["remat"] == "dots"
    assert result["machine"]["jax_backend"] == "cpu" and result["machine"]["cpu_count"] >= 1
    assert "ratio ours/torch" in stdout and "MFU" in stdout
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize("args, message", [
    (["--student_dims=vocab=100"], "one vocabulary"),
    (["--format=label"], "--format=label: the PyTorch baseline implements logits, blended"),
])
def test_bad_settings_are_a_usage_error(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--preset=tiny",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_batch_sweep_moves_on_only_after_out_of_memory():
    from experiments import benchmark

    tried = []

    def run(size):
        tried.append(size)
        if size > 4:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory allocating {size} GiB")
        return f"ran {size}"

    assert benchmark.first_fitting([16, 8, 4, 2], run, log=lambda _: None) == (4, "ran 4")
    assert tried == [16, 8, 4]
    with pytest.raises(ValueError, match="out of memory at every batch size"):
        benchmark.first_fitting([16, 8], run, log=lambda _: None)
    with pytest.raises(KeyError):  # anything else is not retried
        benchmark.first_fitting([16, 8], lambda size: {}["x"], log=lambda _: None)


def test_gpu_script_runs_its_cpu_path(tmp_path):
    """benchmarks/gpu.sh on a machine without an NVIDIA GPU: says so, runs the CPU
    configuration end to end (batch sweep included), writes the JSON."""
    env = {**os.environ, "OUT": str(tmp_path), "BENCH_CPU_PRESET": "tiny",
           "BENCH_CPU_BATCHES": "4,2", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--steps=1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no usable NVIDIA GPU" in proc.stderr
    result = json.loads((tmp_path / "benchmark_gpu.json").read_text())
    assert result["machine"]["jax_backend"] == "cpu"
    assert result["settings"]["batch_sizes_tried"] == [4, 2]
    assert result["settings"]["batch_size"] == 4 and result["ours"]["step_s"] > 0
