"""The sweep: grid designs, shards, atomic rows and merge, stage cache, and a tiny real sweep."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jdistill.data import tasks
from jdistill.eval import benchmarks
from jdistill.study import runner, sweep
from tests.hf_models import make_hf_model, save_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_demo_is_one_chain_per_format_at_the_papers_ratios():
    cells = sweep.PRESETS["demo"].cells()
    assert len({c.id for c in cells}) == len(cells) == 4 * 2
    for fmt in ("label", "blended"):
        chain = [c for c in cells if c.format == fmt]
        assert [c.ratio for c in chain] == list(sweep.PAPER_RATIOS)
        assert all(c.schedule == "iterative" and c.method == "full" for c in chain)
        assert chain[-1].chain == sweep.PAPER_RATIOS


@pytest.mark.parametrize("name", sorted(sweep.PRESETS))
def test_every_preset_has_settings_its_shipped_data_can_meet(name):
    """The presets not run here (paper, paper_gpu) must not rot: their settings build, their
    benchmarks ship that many items, and in-domain evaluation comes in whole batches (a part
    batch costs a full one)."""
    s = runner.Settings(teacher="unused", **sweep.SETTINGS_PRESETS[name])
    cells = sweep.PRESETS[name].cells()
    assert cells and all(c.chain[-1] == c.ratio for c in cells if c.schedule == "iterative")
    for b in s.general:
        assert len(benchmarks.load_benchmark(b, limit=s.general_limit)) == s.general_limit, b
    task = runner.load_task(s.task, s.train_split, s.eval_split)
    test, train = tasks.load_split(task, s.eval_split), tasks.load_split(task, s.train_split)
    assert s.eval_examples <= len(test) and s.eval_examples % s.eval_batch_size == 0
    assert max(sweep.PRESETS[name].examples) <= len(train)
    assert s.correction_examples <= len(train)


def test_study_star_grid_has_every_comparison_the_findings_need():
    cells = sweep.PRESETS["study"].cells()
    assert len({c.id for c in cells}) == len(cells) == 3 * 18
    assert {c.seed for c in cells} == {0, 1, 2}
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # a seed at a time
    base = {(c.ratio, c.format) for c in cells
            if (c.method, c.schedule, c.examples, c.seed) == ("full", "iterative", 512, 0)}
    assert base == {(r, f) for r in sweep.PAPER_RATIOS for f in ("label", "blended")}
    assert {(c.ratio, c.format) for c in cells if c.method == "lora"} == base  # chains too
    contrasts = [c for c in cells if (c.schedule, c.examples) != ("iterative", 512)]
    assert {(c.method, c.schedule, c.examples, c.format, c.ratio) for c in contrasts} == {
        ("full", "one_shot", 512, "label", sweep.PAPER_RATIOS[1]),
        ("full", "iterative", 128, "label", sweep.PAPER_RATIOS[1])}


def test_factorial_grid_is_the_full_product():
    g = sweep.Grid(ratios=(2.0, 4.0), formats=("label", "cot"), methods=("full", "lora"),
                   schedules=("one_shot",), examples=(10, 20, 30), seeds=(0, 1),
                   design="factorial")
    cells = g.cells()
    assert len(cells) == 2 * 2 * 2 * 1 * 3 * 2 == len({c.id for c in cells})


def test_grid_sources_apply_in_order_and_bad_values_are_named(tmp_path):
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps({"ratios": [2, 3], "formats": ["logits"]}))
    g = sweep.grid_from("smoke", str(cfg), formats=["cot"], seeds=None)
    assert g.ratios == (2, 3) and g.formats == ("cot",) and g.methods == ("full", "lora")
    cfg.write_text(json.dumps({"ratio": [2]}))
    with pytest.raises(ValueError, match="unknown keys \\['ratio'\\]"):
        sweep.grid_from(None, str(cfg))
    with pytest.raises(ValueError, match="must be > 1"):
        sweep.Grid(ratios=(1.0, 2.0))
    with pytest.raises(ValueError, match="formats: \\['kd'\\] not allowed"):
        sweep.Grid(formats=("kd",))
    with pytest.raises(ValueError, match="unknown grid preset"):
        sweep.grid_from("huge")


def test_shards_partition_the_grid():
    cells = sweep.PRESETS["paper"].cells()
    shards = [sweep.shard(cells, 7, i) for i in range(7)]
    ids = [c.id for s in shards for c in s]
    assert sorted(ids) == sorted(c.id for c in cells) and len(ids) == len(set(ids))
    with pytest.raises(ValueError, match="shard_index"):
        sweep.shard(cells, 2, 2)


def test_rows_are_atomic_and_merge_ignores_unfinished_writes(tmp_path):
    sweep.write_row(tmp_path, "b", {"x": 2})
    sweep.write_row(tmp_path, "a", {"x": 1})
    (tmp_path / "rows" / ".c.jsonl.tmp123").write_text('{"x": ')  # a killed write
    assert sweep.is_done(tmp_path, "a") and not sweep.is_done(tmp_path, "c")
    path, n = sweep.merge_rows(tmp_path)
    assert n == 2 and [json.loads(l)["x"] for l in path.read_text().splitlines()] == [1, 2]
    (tmp_path / "rows" / "d.jsonl").write_text("{broken")
    with pytest.raises(ValueError, match="d.jsonl: not a JSON row.*delete the file"):
        sweep.merge_rows(tmp_path)


def test_cached_stage_builds_once_and_a_failed_build_leaves_nothing(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "out.txt").write_text("done")

    key = sweep.stage_key(a=1, b=[2, 3])
    p1 = sweep.cached_stage(tmp_path, "s", key, build, log=lambda _: None)
    p2 = sweep.cached_stage(tmp_path, "s", key, build, log=lambda _: None)
    assert p1 == p2 and len(calls) == 1 and (p1 / "out.txt").read_text() == "done"
    assert sweep.stage_key(a=1, b=[2, 3]) == key != sweep.stage_key(a=1, b=[3, 2])

    def broken(d):
        (d / "half.txt").write_text("half")
        raise KeyboardInterrupt  # killed mid-build

    with pytest.raises(KeyboardInterrupt):
        sweep.cached_stage(tmp_path, "t", key, broken)
    assert [p.name for p in tmp_path.iterdir()] == [p1.name]


def _env(cache):
    return {**os.environ, "JDISTILL_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT)}


def test_dry_run_prints_one_command_per_cell_of_the_shard(tmp_path):
    args = [sys.executable, "-m", "experiments.sweep", f"--out={tmp_path}/s", "--preset=demo",
            "--teacher=/nonexistent", "--dry_run", "--num_shards=2", "--shard_index=1"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    cells = sweep.shard(sweep.PRESETS["demo"].cells(), 2, 1)
    assert len(lines) == len(cells) + 1 and lines[-1].endswith("--merge")
    for line, c in zip(lines, cells):
        assert line.endswith(f"--cell={c.id}") and "--shard_index" not in line
        assert "--preset=demo" in line and "--dry_run" not in line


def make_study_inputs(root: Path):
    """A tiny random teacher with a tokenizer and a 4-class task as a user's CSV files."""
    make_hf_model("llama3", seed=0, max_position_embeddings=512).save_pretrained(
        root / "teacher")
    save_tokenizer(root / "teacher")
    texts = {"rates": "the fed holds rates", "markets": "markets rally",
             "fox": "the quick brown fox", "dog": "the lazy dog jumps"}
    for split, n in (("train", 48), ("test", 16)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                label = list(texts)[i % 4]
                w.writerow([texts[label] + " over" * (i % 3), label])
    return (f"--teacher={root / 'teacher'}",
            f"--task=train={root / 'train.csv'},test={root / 'test.csv'}",
            "--set=steps=2,correction_steps=2,eval_examples=8,general_limit=4,"
            "general=arc_easy,calib_samples=8,trace_max_new_tokens=4,seq_len=96,batch_size=8,"
            "eval_batch_size=8,lora_rank=4")


@pytest.mark.slow
def test_tiny_sweep_writes_rows_and_resumes(tmp_path):
    args = [sys.executable, "-m", "experiments.sweep", f"--out={tmp_path}/s",
            *make_study_inputs(tmp_path), "--ratios=2", "--formats=label,blended",
            "--methods=full", "--schedules=one_shot", "--examples=8", "--design=factorial",
            "--loggers=tensorboard,wandb"]
    env = {**_env(tmp_path / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    # one W&B run and one TensorBoard log per cell
    for cell in ("r2-label-full-oneshot-n8-s0", "r2-blended-full-oneshot-n8-s0"):
        logs = tmp_path / "s" / "cells" / cell / "logs"
        assert len(list(logs.glob("wandb/offline-run-*/run-*.wandb"))) == 1, cell
        assert list(logs.glob("events.out.tfevents.*")), cell
    rows = [json.loads(l) for l in (tmp_path / "s/results.jsonl").read_text().splitlines()]
    mains = sorted(r["main"] for r in rows)
    assert mains == ["sweep_cell", "sweep_cell", "sweep_teacher", "sweep_teacher_original"]
    for r in rows:
        m = r["metrics"]
        assert 0 <= m["in_domain_accuracy"] <= 1 and m["in_domain_chance"] == 0.25
        assert 0 <= m["general_score"] <= 1 and m["general"]["arc_easy"]["n"] == 4
    cells = {r["cell"]["format"]: r for r in rows if r["main"] == "sweep_cell"}
    assert set(cells) == {"label", "blended"}
    assert 1.9 < cells["label"]["compression_ratio"] < 2.1
    assert cells["label"]["train_metrics"]["loss"] > 0  # the answer fits: it is supervised
    # rerun: every cell is done, nothing is recomputed
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stdout
    # other settings into the same directory are refused, naming what differs
    other = subprocess.run(args[:-1] + ["--design=factorial", "--set=steps=3"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert other.returncode != 0 and "other settings" in other.stderr


@pytest.mark.slow
def test_processes_for_different_seeds_share_one_out(tmp_path):
    # README: run a study a seed at a time, side by side, into one --out and one cache
    base = [sys.executable, "-m", "experiments.sweep", f"--out={tmp_path}/s",
            *make_study_inputs(tmp_path), "--ratios=2", "--formats=label", "--methods=full",
            "--schedules=one_shot", "--examples=8", "--design=factorial"]
    env = _env(tmp_path / "cache")
    procs = [subprocess.Popen(base + [f"--seeds={s}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for s in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    both = subprocess.run(base + ["--seeds=0,1"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert both.returncode == 0, both.stderr[-3000:]
    assert "0 to run" in both.stdout  # each seed's process finished its own cells
    rows = [json.loads(l) for l in (tmp_path / "s/results.jsonl").read_text().splitlines()]
    cells = sorted(r["cell"]["id"] for r in rows if r["main"] == "sweep_cell")
    assert cells == ["r2-label-full-oneshot-n8-s0", "r2-label-full-oneshot-n8-s1"]
    assert sum(r["main"] == "sweep_teacher" for r in rows) == 1
    # the corrected teacher was built once for both (a lost race leaves no second copy)
    assert len(list((tmp_path / "cache").rglob("teacher-*/STAGE.json"))) == 1
    assert not list((tmp_path / "cache").rglob(".teacher-*"))
