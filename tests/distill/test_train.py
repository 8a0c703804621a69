"""The distillation trainer: learning, accumulation, sharding, LoRA, NaN stop, kill + resume."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers

import jdistill
from jdistill import sharding
from jdistill.data import batching as packing
from jdistill.data import io as data
from jdistill.distill import formats, train
from jdistill.models import lora


def _encoded(root):
    tok = data.load_tokenizer(root / "student")
    return [data.encode_example(tok, r["prompt"], r["answer"], r["reasoning"], eos_id=2)
            for r in data.read_examples(root / "data.jsonl")]


def _same_layout(n=8, seed=0):
    """Rows with one segment layout: every micro-batch has the same supervised-token counts."""
    rng = np.random.default_rng(seed)
    segs = np.array([0] * 5 + [1] * 6 + [2] * 6, np.int32)
    return [(rng.integers(3, 97, len(segs)).astype(np.int32), segs) for _ in range(n)]


def _run(root, cfg, workdir, *, batch_size=4, accum=1, mesh=None, encoded=None, **kw):
    student = jdistill.load_pretrained(root / "student", mesh=mesh)
    t = jdistill.load_pretrained(root / "teacher", mesh=mesh)
    batcher = data.Batcher(encoded or _encoded(root), batch_size=batch_size, seq_len=16,
                           accum=accum)
    logs = []
    result = train.train(student, t, batcher, cfg, workdir=workdir, mesh=mesh,
                         log=logs.append, **kw)
    return result, logs


def _flat(model):
    return {"/".join(map(str, k)): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(train.pure_params(model))[0]}


def _assert_params_close(a, b, atol):
    # chex names the first differing leaf by its path and checks the tree structures match
    chex.assert_trees_all_close(_flat(a), _flat(b), atol=atol, rtol=0)


def test_loss_falls_and_progress_is_logged(models, tmp_path):
    cfg = train.DistillConfig(steps=25, format="blended", learning_rate=1e-2, warmup_steps=2)
    result, logs = _run(models, cfg, tmp_path, log_every=5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 5, 10, 15, 20, 25]
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"]
    assert {"trace_kl", "trace_ce", "answer_kl", "answer_ce", "grad_norm"} <= rows[0].keys()
    assert all(np.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    assert "tok/s" in logs[-1] and "ETA" in logs[-1] and "step 25/25" in logs[-1]
    assert "TFLOP/s" in logs[-1] and all(r["model_tflops_per_s"] > 0 for r in rows)
    assert rows[-1]["mfu"] is None  # no peak known for a CPU: no made-up utilisation
    assert result.throughput["tokens_per_s"] == pytest.approx(rows[-1]["tokens_per_s"])
    assert result.steps_run == 25 and result.resumed_from is None
    assert _tensorboard_scalars(tmp_path / "tensorboard", "train/loss")[-1] == pytest.approx(rows[-1]["loss"])


def _tensorboard_scalars(logdir, tag):
    """Values of one scalar tag, read back from TFRecord event files (independent reader)."""
    from tensorboardX.proto.event_pb2 import Event

    values = []
    for f in sorted(logdir.iterdir()):
        buf = f.read_bytes()
        while buf:
            n = int.from_bytes(buf[:8], "little")
            event = Event.FromString(buf[12:12 + n])
            buf = buf[12 + n + 4:]
            values += [v.simple_value for v in event.summary.value if v.tag == tag]
    return values


def test_a_run_without_checkpoints_or_tensorboard_creates_its_workdir(models, tmp_path,
                                                                      monkeypatch):
    # the README's install has no tensorboardX, and short runs write no checkpoints: the
    # metrics file still needs its directory (a fresh-install demo failed here)
    monkeypatch.setattr(train.tracking, "_missing", lambda module: True)
    workdir = tmp_path / "not" / "yet"
    _run(models, train.DistillConfig(steps=2, format="label"), workdir, checkpoint_every=0)
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert not (workdir / "checkpoints").exists()


def test_gradient_accumulation_equals_one_big_batch(models, tmp_path):
    # accumulation averages micro-batch losses; with equal token counts per micro-batch that
    # is exactly the big batch's loss
    cfg = train.DistillConfig(steps=3, format="blended", learning_rate=1e-2)
    rows = _same_layout()
    big, _ = _run(models, cfg, tmp_path / "big", batch_size=4, accum=1, encoded=rows)
    acc, _ = _run(models, cfg, tmp_path / "acc", batch_size=2, accum=2, encoded=rows)
    _assert_params_close(big.student, acc.student, atol=1e-5)


def test_sharded_step_equals_one_device(models, tmp_path):
    cfg = train.DistillConfig(steps=3, format="blended", learning_rate=1e-2)
    one, _ = _run(models, cfg, tmp_path / "one")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    eight, _ = _run(models, cfg, tmp_path / "eight", mesh=mesh)
    assert one.final_metrics["loss"] == pytest.approx(eight.final_metrics["loss"], rel=1e-5)
    _assert_params_close(one.student, eight.student, atol=1e-5)
    up = eight.student.layers[0].mlp.up_proj[...]  # the trained params stay sharded
    assert len(up.sharding.device_set) == 8 and not up.sharding.is_fully_replicated


def test_lora_trains_only_adapters(models, tmp_path):
    cfg = train.DistillConfig(steps=4, format="logits", learning_rate=1e-2, lora_rank=2)
    student = jdistill.load_pretrained(models / "student")
    state, frozen = train.init_state(student, cfg)
    n_adapter = lora.lora_param_count(state.params)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state)
                if np.ndim(x) > 0)
    assert n_opt == 2 * n_adapter  # Adam's two moments, of the adapters only
    assert n_adapter < 0.5 * student.config.num_params()
    result, _ = _run(models, cfg, tmp_path)
    base = _flat(jdistill.load_pretrained(models / "student"))
    trained = _flat(result.student)
    changed = [k for k in base if not np.array_equal(base[k], trained[k])]
    assert changed and all("proj" in k for k in changed)  # merged adapters, norms untouched
    assert all(np.array_equal(base[k], trained[k]) for k in base if "embed" in k or "norm" in k)


def test_remat_policies_change_memory_not_results(models, tmp_path):
    cfg = train.DistillConfig(steps=2, format="blended", learning_rate=1e-2)
    runs = {remat: _run(models, dataclasses.replace(cfg, remat=remat), tmp_path / remat,
                        checkpoint_every=0)[0] for remat in ("none", "dots", "full")}
    _assert_params_close(runs["none"].student, runs["dots"].student, atol=1e-6)
    _assert_params_close(runs["none"].student, runs["full"].student, atol=1e-6)


def test_bfloat16_compute_tracks_float32(models, tmp_path):
    f32, _ = _run(models, train.DistillConfig(steps=1, format="blended"), tmp_path / "a")
    bf16, _ = _run(models, train.DistillConfig(steps=1, format="blended",
                                               compute_dtype="bfloat16"), tmp_path / "b")
    assert bf16.final_metrics["loss"] == pytest.approx(f32.final_metrics["loss"], rel=3e-2)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(models, tmp_path):
    cfg = train.DistillConfig(steps=4, format="logits", learning_rate=1e-2)
    _run(models, cfg, tmp_path, checkpoint_every=2)
    teacher = jdistill.load_pretrained(models / "teacher")
    teacher.norm[...] = teacher.norm[...] * np.nan  # poisons the KL term
    student = jdistill.load_pretrained(models / "student")
    batcher = data.Batcher(_encoded(models), batch_size=4, seq_len=16)
    with pytest.raises(train.NonFiniteError, match=r"at step 5 .*last good checkpoint is step 4"):
        train.train(student, teacher, batcher, dataclasses.replace(cfg, steps=8),
                    workdir=tmp_path, checkpoint_every=2, log=lambda _: None)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4]


def _encoded_for(root, fmt):
    tok = data.load_tokenizer(root / "student")
    trace = formats.get(fmt).with_trace
    return [data.encode_example(tok, r["prompt"], r["answer"], r["reasoning"] if trace else None,
                                eos_id=2) for r in data.read_examples(root / "data.jsonl")[:7]]


def _loss_fn(root, cfg, sharpen=False):
    student = jdistill.load_pretrained(root / "student")
    teacher = jdistill.load_pretrained(root / "teacher")
    loss = jax.jit(functools.partial(train.batch_loss, s_graphdef=nnx_graphdef(student),
                                     t_graphdef=nnx_graphdef(teacher), cfg=cfg))
    s_params = train.pure_params(student)
    if sharpen:  # a random tiny model is near uniform: sharper attention and logits make
        # any cross-talk between packed examples show in the loss
        s_params["norm"] = s_params["norm"] * 16.0
        for layer in s_params["layers"].values():
            for name in ("q_proj", "k_proj", "v_proj"):
                layer["self_attn"][name] = layer["self_attn"][name] * 8.0
    t_params = train.teacher_inputs(train.pure_params(teacher), cfg)
    return lambda batch: loss(s_params, t_params,
                              {k: v[0] for k, v in batch.items()})


def nnx_graphdef(model):
    from flax import nnx
    return nnx.split(model)[0]


@pytest.mark.parametrize("fmt", ["label", "blended"])
def test_packed_batch_loss_equals_the_unpacked_examples(models, fmt):
    # the loss of a packed batch is the token-weighted loss of its examples run one per
    # row: packed examples neither see each other nor shift their positions, in the
    # student and (blended: KL terms) the teacher
    enc = _encoded_for(models, fmt)
    seq = 2 * max(len(ids) for ids, _ in enc)  # no example is cut; two fit in a row
    cfg = train.DistillConfig(steps=1, format=fmt)
    loss = _loss_fn(models, cfg, sharpen=True)
    packed = packing.PackedBatcher(enc, batch_size=1, seq_len=seq)
    rows = packed.epoch_rows(0)
    assert len(rows) < len(enc)  # several examples share a row
    packed = packing.PackedBatcher(enc, batch_size=len(rows), seq_len=seq)  # one epoch
    alone = data.Batcher(enc, batch_size=len(enc), seq_len=seq)  # every example, one a row
    (lp, mp), (la, ma) = loss(packed.batch(0)), loss(alone.batch(0))
    assert float(la) > 0.5
    assert float(lp) == pytest.approx(float(la), rel=1e-5)
    for k in ma:
        assert float(mp[k]) == pytest.approx(float(ma[k]), rel=1e-5, abs=1e-6), k
    # without the documents the examples of a row attend to each other: another loss
    crossed = {k: v for k, v in packed.batch(0).items() if k != "documents"}
    assert abs(float(loss(crossed)[0]) - float(la)) > 3e-3 * float(la)


def test_training_on_packed_rows_uses_the_documents(models, tmp_path):
    # the first step's logged loss is that of the packed batch (documents reach the step)
    enc = _encoded_for(models, "blended")
    cfg = train.DistillConfig(steps=1, format="blended")
    batcher = packing.PackedBatcher(enc, batch_size=2, seq_len=40, seed=1)
    result = train.train(jdistill.load_pretrained(models / "student"),
                         jdistill.load_pretrained(models / "teacher"), batcher, cfg,
                         workdir=tmp_path, log=lambda _: None)
    loss = _loss_fn(models, cfg)
    expected = float(loss(batcher.batch(0))[0])
    crossed = float(loss({k: v for k, v in batcher.batch(0).items() if k != "documents"})[0])
    assert result.final_metrics["loss"] == pytest.approx(expected, rel=2e-6)
    assert abs(crossed - expected) > 2e-5 * expected  # what dropping the documents would give


def test_bad_configs_are_explained():
    with pytest.raises(ValueError, match="unknown supervision format 'kd'"):
        train.DistillConfig(steps=1, format="kd")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train.DistillConfig(steps=0)
    with pytest.raises(ValueError, match="remat must be one of"):
        train.DistillConfig(steps=1, remat="some")


# ------------------------------------------------------------------ the distill main


def _distill_cmd(root, out, *extra):
    return [sys.executable, "-m", "experiments.distill", f"--teacher={root / 'teacher'}",
            f"--student={root / 'student'}", f"--data={root / 'data.jsonl'}", f"--out={out}",
            "--format=blended", "--batch_size=4", "--seq_len=16", "--learning_rate=1e-2",
            "--mesh=data=1,fsdp=1,tensor=1", *extra]


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _weights(path):
    return safetensors.numpy.load_file(str(path / "model.safetensors"))


def test_killed_run_resumes_to_the_uninterrupted_result(models, tmp_path):
    steps = ["--steps=400", "--checkpoint_every=20", "--log_every=50"]
    whole = subprocess.run(_distill_cmd(models, tmp_path / "whole", *steps), env=_env(),
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]

    cmd = _distill_cmd(models, tmp_path / "cut", *steps)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "cut.run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    chex.assert_trees_all_equal(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"))

    row, = [json.loads(x) for x in (tmp_path / "cut.run" / "results.jsonl").read_text().splitlines()]
    assert row["resumed_from"] > 0 and row["supervision_format"] == "blended"
    assert row["compression_ratio"] > 1 and row["data"]["tokens_seen"] == 400 * 4 * 16
    logged = [json.loads(x)["step"] for x in
              (tmp_path / "cut.run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == 400  # no step logged twice

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    assert hf.num_parameters() == row["student"]["params"]


def test_distill_main_explains_bad_input(models, tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "markets rally", "answer": "up"}) + "\n")
    cmd = [f"--data={plain}" if c.startswith("--data=") else c
           for c in _distill_cmd(models, tmp_path / "o", "--steps=1")]
    cot = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert cot.returncode != 0 and "needs 'reasoning'" in cot.stderr
    no_teacher = [c for c in _distill_cmd(models, tmp_path / "o", "--steps=1")
                  if not c.startswith("--teacher")]
    res = subprocess.run(no_teacher, env=_env(), capture_output=True, text=True)
    assert res.returncode != 0 and "give --teacher" in res.stderr
    hot = subprocess.run(_distill_cmd(models, tmp_path / "o", "--steps=1", "--temperature=2",
                                      f"--topk={tmp_path / 'topk.safetensors'}"),
                         env=_env(), capture_output=True, text=True)
    assert hot.returncode != 0 and "temperature-1 log-probs" in hot.stderr
    both = subprocess.run(_distill_cmd(models, tmp_path / "o", "--steps=1", "--pack",
                                       f"--topk={tmp_path / 'topk.safetensors'}"),
                          env=_env(), capture_output=True, text=True)
    assert both.returncode != 0 and "--pack with --topk is not supported" in both.stderr


def test_distill_main_packs(models, tmp_path):
    run = subprocess.run(_distill_cmd(models, tmp_path / "p", "--steps=2", "--pack",
                                      "--seq_len=48", "--batch_size=2"),
                         env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "examples/row" in run.stdout
    row, = [json.loads(x) for x in (tmp_path / "p.run" / "results.jsonl").read_text().splitlines()]
    assert row["packed"] is True and np.isfinite(row["metrics"]["train_loss"])
