"""End-to-end tests of ``python -m experiments.plan`` and ``python -m experiments.report``.

Each main runs in its own process (absl flags are global). Rows come from the synthetic
generator of tests/study/test_analysis.py (known laws + noise); bootstraps are small to stay fast.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.study.test_analysis import synthetic_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Baseline cells only (full, one-shot): 5 ratios x 2 data sizes x label / blended."""
    rows = synthetic_rows(methods=("full",), schedules=("one_shot",))
    return write_jsonl(tmp_path_factory.mktemp("plan") / "results.jsonl", rows)


def test_plan_main_recommends_and_writes_json(results, tmp_path):
    out = tmp_path / "sub" / "plan.json"
    proc = run("experiments.plan", f"--results={results}", "--min_in_domain_rel=0.9",
               "--max_general_drop=0.10", "--max_examples=256", "--n_boot=10", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("status: feasible")
    assert "Compress 2.9" in proc.stdout or "Compress 3" in proc.stdout  # true limit ~2.96x
    assert "with blended supervision on 256 examples" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["status"] == "feasible" and plan["recommendation"]["format"] == "blended"
    assert plan["recommendation"]["in_domain_accuracy"]["interval"] is not None
    assert not list(out.parent.glob(".*"))  # atomic write


def test_plan_text_says_infeasible_and_warns_on_extrapolation(results):
    from jdistill import study as sd

    an = sd.analyze(sd.load_study(results), n_boot=0)
    text = sd.plan_text(sd.plan(an, min_in_domain_rel=1.05, max_general_drop=0.0))
    assert text.startswith("status: infeasible")
    assert "cannot be met" in text and "cannot meet" in text
    text = sd.plan_text(sd.plan(an, min_in_domain_rel=0.5, max_examples=1000,
                                  formats=["label"]))
    assert text.startswith("status: feasible")
    assert "with label supervision on 1000 examples" in text
    assert "WARNING" in text and "beyond the largest observed ratio" in text
    assert "above the largest observed data size 256" in text


def test_plan_main_reports_malformed_rows(results, tmp_path):
    rows = [json.loads(line) for line in Path(results).read_text().splitlines()]
    del rows[3]["metrics"]["in_domain_accuracy"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = run("experiments.plan", f"--results={bad}", "--n_boot=0")
    assert proc.returncode == 2
    assert f"plan: error: {bad}:4: field 'metrics.in_domain_accuracy' is missing" in proc.stderr


def test_report_main_writes_report(results, tmp_path):
    out = tmp_path / "report"
    proc = run("experiments.report", f"--results={results}", f"--out={out}", "--n_boot=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "general_collapses_first" in proc.stdout and "wrote" in proc.stdout
    md = (out / "report.md").read_text()
    fits = json.loads((out / "fits.json").read_text())
    assert fits["settings"]["n_boot"] == 10
    for f in fits["findings"]:
        assert f"| {f['number']} | {f['id']} |" in md
    # baseline-only rows: the method / schedule comparisons have no matched cells
    assert {f["id"]: f["status"] for f in fits["findings"]}["full_beats_lora"] == "inconclusive"
    assert (out / "in_domain.png").exists() and (out / "general.png").exists()
