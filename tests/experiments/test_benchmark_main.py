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
    assert result["machine"]["jax_backend"] == "cpu" and result["machine"]["cpu_count"] >= 1
    assert "ratio ours/torch" in stdout and "MFU" in stdout
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_bad_dims_are_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--preset=tiny",
                           "--student_dims=vocab=100"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "one vocabulary" in proc.stderr
