"""The experiment-logging writer: TensorBoard event files read back, what a W&B run is sent
(a recording stand-in for wandb.init) and a real offline W&B run; nothing is written before
the first value."""

import glob

import pytest

from jdistill.utils import tracking
from tests.distill.test_train import _tensorboard_scalars


def test_tensorboard_scalars_summaries_and_shifted_steps(tmp_path):
    with tracking.open_writer(["tensorboard"], logdir=tmp_path / "tb") as w:
        w.scalars(1, {"loss": 2.0, "note": "text", "nan": float("nan")}, prefix="train")
        w.scalars(2, {"loss": 1.5}, prefix="train")
        w.shifted(2).scalars(1, {"loss": 1.0}, prefix="train")  # a continued run: step 3
        w.summary({"in_domain_accuracy": 0.5, "general": {"piqa": {"acc": 0.625}}})
    assert _tensorboard_scalars(tmp_path / "tb", "train/loss") == [2.0, 1.5, 1.0]
    assert _tensorboard_scalars(tmp_path / "tb", "summary/general/piqa/acc") == [0.625]
    assert _tensorboard_scalars(tmp_path / "tb", "train/note") == []  # non-numbers dropped


class _FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.summary, self.finished = kwargs, [], {}, False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_gets_one_run_per_cell_grouped_by_sweep(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1])
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    for cell in ("r2-label", "r2-blended"):
        with tracking.open_writer(["wandb"], logdir=tmp_path / cell, run=cell, group="sweep1",
                                  config={"ratio": 2.0}) as w:
            w.scalars(4, {"loss": 1.0}, prefix="train")
            w.summary({"metrics": {"acc": 0.5}})
    assert [r.init["name"] for r in runs] == ["r2-label", "r2-blended"]
    assert {r.init["group"] for r in runs} == {"sweep1"} and runs[0].init["project"] == "proj"
    assert runs[0].init["config"] == {"ratio": 2.0}
    assert runs[0].logged == [(4, {"train/loss": 1.0})]
    assert runs[0].summary == {"metrics/acc": 0.5} and all(r.finished for r in runs)


def test_real_offline_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with tracking.open_writer(["wandb"], logdir=tmp_path, run="cell", group="g") as w:
        w.scalars(1, {"loss": 2.0}, prefix="train")
        w.summary({"acc": 0.5})
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))) == 1


def test_nothing_is_written_before_the_first_value_and_bad_names_are_refused(tmp_path):
    with tracking.open_writer(["tensorboard", "wandb"], logdir=tmp_path / "x", run="r"):
        pass
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['mlflow'\]"):
        tracking.open_writer(["mlflow"], logdir=tmp_path)
