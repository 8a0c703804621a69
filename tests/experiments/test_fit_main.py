"""End-to-end tests of ``python -m experiments.fit`` (flags -> fit.json, fit.md, PNGs)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jdistill import scaling as sc
from jdistill.data import io as data_lib

REPO = Path(__file__).resolve().parents[2]
CHIN = data_lib.data_file("scaling/chinchilla_epoch_svg_extracted.csv")  # shipped


def run_main(args, expect_ok=True):
    """Run ``python -m experiments.fit ARGS`` in a fresh process (absl flags are global, so
    in-process runs could collide with other mains' flags); returns (fit.json dict, proc)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.fit", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if not expect_ok:
        return None, proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out="))
    return json.loads((Path(out) / "fit.json").read_text()), proc


def _png_ok(path):
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_chinchilla_preset_end_to_end(tmp_path):
    out = tmp_path / "chin"
    on_disk, proc = run_main([f"--data={CHIN}", "--preset=chinchilla_epoch",
                              "--law=chinchilla", f"--out={out}", "--n_boot=30", "--refine=4",
                              "--predict=N=1e9,D=2e10;N=7e10,D=1.4e12"])
    assert json.loads(proc.stdout)["params"] == on_disk["params"]
    assert set(on_disk["params"]) == {"A", "B", "E", "alpha", "beta"}
    assert on_disk["params"]["E"] == pytest.approx(1.8172, rel=0.01)  # Epoch's estimate
    assert set(on_disk["intervals"]) >= {"A", "B", "E", "alpha", "beta", "a_opt"}
    for k, (lo, hi) in on_disk["intervals"].items():
        assert lo <= hi, k
    preds = on_disk["predictions"]
    assert len(preds) == 2
    for p in preds:
        assert p["interval"][0] <= p["prediction"] <= p["interval"][1]
    assert {"r2", "aic", "bic", "extrapolation"} <= set(on_disk["diagnostics"])
    assert on_disk["settings"]["delta"] == 1e-3
    assert "| alpha |" in (out / "fit.md").read_text()
    for name in ("fit.png", "residuals.png", "contours.png"):
        assert _png_ok(out / name), name
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def _write_results_jsonl(path, rng):
    """Results rows shaped like the experiment mains' output (nested metrics)."""
    law = sc.grouped_error_law(2)
    theta = np.array([np.log(0.05), 0.7, 0.4, np.log(0.01), np.log(0.02),
                      np.log(2.0), np.log(4.0)])
    rows = []
    for i in range(80):
        r = float(np.exp(rng.uniform(0, np.log(12))))
        d = float(np.exp(rng.uniform(np.log(1e3), np.log(1e6))))
        g = i % 2
        err = sc.predict(law, theta, {"r": np.array([r]), "D": np.array([d]),
                                      "group": np.array([float(g)])})[0]
        err *= float(np.exp(0.01 * rng.standard_normal()))
        rows.append({"run_id": f"run{i}", "compression_ratio": r,
                     "data": {"examples": d}, "supervision": {"format": ["cot", "logits"][g]},
                     "metrics": {"in_domain_error": err, "in_domain_accuracy": 1 - err}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return theta


def test_grouped_law_from_results_jsonl(tmp_path):
    data = tmp_path / "results.jsonl"
    theta = _write_results_jsonl(data, np.random.default_rng(0))
    out = tmp_path / "grouped"
    report, _ = run_main([f"--data={data}", "--law=distill_error_grouped",
                       "--x=r=compression_ratio,D=data.examples",
                       "--y=metrics.in_domain_error", "--group=supervision.format",
                       f"--out={out}", "--n_boot=40"])
    assert report["columns"]["group_labels"] == ["cot", "logits"]
    assert report["params"]["alpha"] == pytest.approx(theta[1], rel=0.1)
    assert report["params"]["beta"] == pytest.approx(theta[2], rel=0.1)
    assert _png_ok(out / "fit.png")


def test_csv_columns_and_nonfinite_handling(tmp_path):
    rng = np.random.default_rng(1)
    law = sc.LAWS["chinchilla"]
    theta = np.array([np.log(400.0), np.log(2000.0), np.log(1.8), 0.34, 0.37])
    n = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 60))
    d = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 60))
    y = sc.predict(law, theta, {"N": n, "D": d}) * np.exp(0.005 * rng.standard_normal(60))
    y[7] = np.nan
    path = tmp_path / "points.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["params", "tokens", "loss"])
        w.writerows(zip(n, d, y))
    _, proc = run_main([f"--data={path}", "--law=chinchilla", "--x=params,tokens", "--y=loss",
                        f"--out={tmp_path / 'a'}", "--n_boot=0"], expect_ok=False)
    assert proc.returncode == 2 and "drop_nonfinite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "a" / "fit.json").exists()
    report, _ = run_main([f"--data={path}", "--law=chinchilla", "--x=params,tokens",
                       "--y=loss", f"--out={tmp_path / 'b'}", "--n_boot=20",
                       "--drop_nonfinite", "--compare=chinchilla"])
    assert report["diagnostics"]["n_points"] == 59
    assert report["params"]["alpha"] == pytest.approx(0.34, rel=0.1)


def test_collapse_law_interval_contains_true_r0(tmp_path):
    rng = np.random.default_rng(2)
    r = np.exp(rng.uniform(0, np.log(32), 60))
    theta = np.array([0.62, 0.25, 3.0, np.log(6.0)])
    score = sc.predict(sc.LAWS["gk_collapse"], theta, {"r": r}) + 0.01 * rng.standard_normal(60)
    path = tmp_path / "gk.csv"
    path.write_text("ratio,mmlu\n" + "".join(f"{a},{b}\n" for a, b in zip(r, score)))
    out = tmp_path / "gk"
    rep, _ = run_main([f"--data={path}", "--law=gk_collapse", "--x=ratio", "--y=mmlu",
                       f"--out={out}", "--n_boot=50", "--predict=r=4;r=16"])
    assert len(rep["predictions"]) == 2
    lo, hi = rep["intervals"]["r0"]
    assert lo < 6.0 < hi
    assert _png_ok(out / "fit.png") and _png_ok(out / "residuals.png")
