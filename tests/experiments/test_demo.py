"""The README's main job end to end on a tiny random teacher: every artifact exists and parses."""

import json
import subprocess
import sys

import pytest

from jdistill.study import sweep
from tests.study.test_sweep import ROOT, _env, make_study_inputs


@pytest.mark.slow
def test_demo_pipeline_on_a_tiny_teacher(tmp_path):
    out = tmp_path / "demo"
    args = [sys.executable, "-m", "experiments.demo", f"--out={out}",
            *make_study_inputs(tmp_path), "--examples=16,8", "--n_boot=20"]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                         env=_env(tmp_path / "cache"), timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[sweep] cell 1/" in run.stdout and "ETA" in run.stdout  # progress is shown

    cells = sweep.grid_from("demo", examples=[16, 8]).cells()
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["cell"]["id"] for r in rows) == sorted(
        [c.id for c in cells] + ["teacher"])  # the demo skips the original teacher
    for r in rows:
        assert {"in_domain_accuracy", "general_score", "general"} <= set(r["metrics"])

    report = out / "report"
    md = (report / "report.md").read_text()
    findings = [l for l in md.splitlines() if l.startswith(("| 1 |", "| 2 |", "| 3 |", "| 4a |",
                                                              "| 4b |"))]
    assert len(findings) == 5
    for line in findings:
        assert any(f"**{s}**" in line for s in ("reproduced", "not reproduced", "inconclusive"))
    pngs = sorted(report.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    for p in pngs:
        assert p.name in md  # every plot is shown in the report
    fits = json.loads((report / "fits.json").read_text())
    assert fits
    plan = json.loads((report / "plan.json").read_text())
    assert plan.get("status")
