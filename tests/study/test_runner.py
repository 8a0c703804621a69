"""The study runner in process: the paper's iterative chain (every step a row, each step
cached and shared along the chain), compute-matched one-shot cells, the in-domain metrics
of every row, and trace-format students scored after their own trace."""

import json
from pathlib import Path

import pytest

from jdistill.study import runner, sweep
from tests.study.test_sweep import make_study_inputs


def test_paper_ratios_fall_in_constant_percentage_point_steps():
    r = sweep.paper_ratios()
    assert r == (1.2658, 1.7241, 2.7027, 6.25)
    keeps = [1 / x for x in r]
    assert [round(k, 3) for k in keeps] == [0.79, 0.58, 0.37, 0.16]
    with pytest.raises(ValueError, match="final_keep"):
        sweep.paper_ratios(final_keep=1.2)


def test_chain_cells_carry_their_chain_and_one_shot_matches_its_compute():
    g = sweep.Grid(ratios=(3.0, 1.5, 2.0), formats=("label",), methods=("full",),
                   schedules=("iterative", "one_shot"), design="star", contrast_ratios=(2.0,))
    cells = g.cells()
    it = [c for c in cells if c.schedule == "iterative"]
    assert [c.ratio for c in it] == [1.5, 2.0, 3.0]  # rising: each adds one cached step
    assert [c.chain for c in it] == [(1.5,), (1.5, 2.0), (1.5, 2.0, 3.0)]
    assert [c.prune_steps for c in it] == [1, 2, 3]
    (one,) = [c for c in cells if c.schedule == "one_shot"]
    assert one.ratio == 2.0 and one.prune_steps == 1 and one.recovery_rounds == 2
    with pytest.raises(ValueError, match="each ratio once"):
        sweep.Grid(ratios=(2.0, 2.0))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    teacher, task, _ = make_study_inputs(root)
    s = runner.Settings(teacher=teacher.split("=", 1)[1], task=task.split("=", 1)[1],
                        steps=2, correction_steps=0, eval_examples=8, general=(),
                        calib_samples=8, trace_max_new_tokens=4, seq_len=96, batch_size=4,
                        eval_batch_size=8)
    logs = []
    return runner.Runner(s, root / "cache", log=logs.append), logs, root


def test_chain_rows_share_cached_steps_and_one_shot_trains_as_long(study, monkeypatch):
    r, logs, root = study
    batchers = []  # every recovery's batch stream, in build order

    class Recorded(runner.packing.PackedBatcher):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            batchers.append(self)

    monkeypatch.setattr(runner.packing, "PackedBatcher", Recorded)
    g = sweep.Grid(ratios=(1.5, 2.0), formats=("label",), methods=("full",),
                   schedules=("iterative", "one_shot"), examples=(16,), design="star",
                   contrast_ratios=(2.0,))
    cells = {(c.schedule, c.ratio): c for c in g.cells()}
    first = r.run_cell(cells["iterative", 1.5], root / "cells" / "a")
    n_built = sum("[prune] chain step" in line for line in logs)
    second = r.run_cell(cells["iterative", 2.0], root / "cells" / "b")
    # the second cell reuses step 1 and builds step 2 only
    assert sum("[prune] chain step" in line for line in logs) == n_built + 1
    assert any(line.startswith("[chain] cached") for line in logs)
    teacher = first["teacher_params"]
    assert abs(teacher / first["student_params"] - 1.5) < 0.1
    assert abs(teacher / second["student_params"] - 2.0) < 0.15
    # the row's cost is the chain's: both recoveries
    assert second["data"]["tokens_seen"] == 2 * first["data"]["tokens_seen"]
    assert second["train_seconds"] > first["train_seconds"]
    one = r.run_cell(cells["one_shot", 2.0], root / "cells" / "c")
    assert one["data"]["tokens_seen"] == second["data"]["tokens_seen"]  # equal compute
    # each ratio's one shape (here the MLP is cut to fit in step 1's student, and
    # pruning.dims_within re-solves it): the chain loses heads where one-shot does
    assert second["student_dims"]["heads"] == one["student_dims"]["heads"] < 4
    # the chain's second recovery continues the first's batch stream: it sees the examples
    # one-shot's single run sees in its second half, not the first batches again
    step1, step2, single = batchers
    assert (step1.first_step, step2.first_step, single.first_step) == (0, 2, 0)
    for s in range(2):
        assert step1.members(s) == single.members(s)
        assert step2.members(s) == single.members(2 + s) != step1.members(s)
    for row in (first, second, one):
        m = row["metrics"]
        assert m["in_domain_scoring"] == "direct" and m["in_domain_n"] == 8
        for k in ("accuracy", "macro_f1", "nll", "brier"):
            assert m[f"in_domain_{k}"] == m[f"in_domain_direct_{k}"]
            assert m[f"in_domain_{k}_stderr"] >= 0
        assert m["in_domain_error"] == 1 - m["in_domain_accuracy"]
    stages = list(Path(r.cache).glob("chain-*/recovery.json"))
    assert len(stages) == 2
    info = [json.loads(p.read_text()) for p in stages]
    assert sorted(i["step"] for i in info) == [1, 2]


def test_a_trace_format_student_is_scored_after_its_own_trace(study):
    r, _, _ = study
    model = r.teacher()
    m = r.evaluate(model, "t", "blended")
    assert m["in_domain_scoring"] == "after_trace"
    assert m["in_domain_accuracy"] == m["in_domain_trace_accuracy"]
    assert "in_domain_direct_accuracy" in m and m["in_domain_trace_tokens"] > 0
    assert r.evaluate(model, "t", "label")["in_domain_scoring"] == "direct"


def test_compute_dtype_reaches_training_and_its_cache_keys(study):
    import dataclasses

    r, _, root = study
    cell = sweep.Grid(ratios=(1.5,), formats=("label",), methods=("full", "lora"),
                      schedules=("iterative",), examples=(16,), design="star",
                      contrast_ratios=(1.5,)).cells()
    bf16 = runner.Runner(dataclasses.replace(r.s, compute_dtype="bfloat16"), root / "cache")
    for c in cell:
        assert r.distill_config(c, 4).compute_dtype == "float32"
        assert bf16.distill_config(c, 4).compute_dtype == "bfloat16"
        assert bf16.chain_key(c, 1) != r.chain_key(c, 1)  # another student: not reused
    row = bf16.run_cell(cell[0], root / "cells" / "bf16")  # a bf16 recovery, end to end
    assert row["train_metrics"]["loss"] > 0 and 0 <= row["metrics"]["in_domain_accuracy"] <= 1
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        dataclasses.replace(r.s, compute_dtype="float16")
    # GPU presets train in bf16 (cuDNN's fused attention needs it); CPU presets in f32
    assert sweep.SETTINGS_PRESETS["paper_gpu"]["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in sweep.SETTINGS_PRESETS["study"]
