"""benchmarks/paper_gpu.sh: the teacher's halves for the GPU machine's two calls join to the
same bytes (or fail naming what is missing), and the run path works on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.study.test_sweep import ROOT, _env, make_study_inputs

SCRIPT = ROOT / "benchmarks" / "paper_gpu.sh"


def script(*args, env=None, timeout=120):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_teacher_halves_join_to_the_same_bytes(tmp_path):
    teacher = tmp_path / "teacher.gguf"
    teacher.write_bytes(np.random.default_rng(0).bytes(1_000_001))  # odd: unequal halves
    dev = tmp_path / "dev"
    env = {"TEACHER": str(teacher), "DEVICE_DIR": str(dev)}
    prep = script("prepare", env=env)
    assert prep.returncode == 0, prep.stderr
    a, b = dev / "a" / "teacher.gguf.0", dev / "b" / "teacher.gguf.1"
    assert a.stat().st_size == 500_001 and b.stat().st_size == 500_000
    assert (dev / "a" / "site" / "gguf" / "__init__.py").exists()  # the reader travels too
    joined = script("join", env={"DEVICE_DIR": str(dev)})
    assert joined.returncode == 0, joined.stderr
    assert Path(joined.stdout.strip()).read_bytes() == teacher.read_bytes()

    b.write_bytes(b.read_bytes()[:-1] + b"x")  # a half of another prepare
    bad = script("join", env={"DEVICE_DIR": str(dev)})
    assert bad.returncode == 2 and "sha256 differs" in bad.stderr
    b.unlink()  # the second call did not happen
    missing = script("join", env={"DEVICE_DIR": str(dev)})
    assert missing.returncode == 2 and f"{b} is missing: carry {b.parent}" in missing.stderr


@pytest.mark.slow
def test_run_path_on_a_cpu_reports_into_out(tmp_path):
    teacher, task, settings = make_study_inputs(tmp_path)
    env = {**_env(tmp_path / "cache"), "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "TEACHER": teacher.split("=", 1)[1], "PAPER_GPU_PRESET": "smoke",
           "RUN_DIR": str(tmp_path / "run"), "DEVICE_DIR": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(SCRIPT), task, settings, "--n_boot=10"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = tmp_path / "out" / "paper_gpu"
    assert "paper_gpu: demo exit 0" in (report / "run.log").read_text()
    assert "## Findings" in (report / "report.md").read_text()
    assert json.loads((report / "fits.json").read_text())["source"] == "results.jsonl"
    assert (report / "plan.json").exists() and (report / "in_domain.png").exists()
