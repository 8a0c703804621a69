"""Scale-out proven on one machine.

Two processes x 4 CPU devices, joined by `jax.distributed` with real (gloo) collectives, run
the distill and prune mains and must agree with 1 process x 8 devices and with 1 device;
each process loads only its rows of a batch; only process 0 writes; a killed process stops
the others with a message and a rerun resumes. Also: sharded checkpoint loading reads only
each device's block, and its peak host memory stays near the model size.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy

import jdistill
from jdistill import sharding
from jdistill.checkpoints import hf as checkpoint
from jdistill.data import io as data
from tests.hf_models import ANSWERS, PROMPTS

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS)")
ROOT = Path(__file__).resolve().parents[1]
MESH = "--mesh=data=2,fsdp=2,tensor=2"


# ------------------------------------------------------------------ launching processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, logdir: Path, *, processes=1, devices=8):
    """Starts `processes` copies of `python -m ARGS`, each with `devices` CPU devices, joined
    through a fresh localhost coordinator; stdout+stderr of process i go to logdir/p{i}.log."""
    logdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JDISTILL_DISTRIBUTED", "SLURM_STEP_NUM_TASKS"):
        env.pop(k, None)
    port = _free_port()
    procs = []
    for i in range(processes):
        joined = ([f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",
                   f"--process_id={i}", "--heartbeat_timeout=5"] if processes > 1 else [])
        log = open(logdir / f"p{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", *args, *joined], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _finish(procs, logdir: Path, timeout=240):
    """Waits for every process; returns their logs. Fails (killing the stragglers) on a
    timeout or a non-zero exit."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            pytest.fail(f"processes did not finish in {timeout}s:\n" + _tail(logdir))
    logs = [(logdir / f"p{i}.log").read_text() for i in range(len(procs))]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{logs[i][-4000:]}"
    return logs


def _tail(logdir: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logdir.glob("*.log")))


def _distill(root, out, *extra):
    return ["experiments.distill", f"--teacher={root / 'teacher'}",
            f"--student={root / 'student'}", f"--data={root / 'data.jsonl'}", f"--out={out}",
            "--format=blended", "--batch_size=8", "--seq_len=16", "--learning_rate=1e-2",
            *extra]


def _losses(workdir: Path) -> dict:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _weights(path: Path) -> dict:
    return safetensors.numpy.load_file(str(path / "model.safetensors"))


def _assert_weights_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


# ------------------------------------------------------------------ distill main


def test_two_processes_train_like_one_process_and_one_device(models, tmp_path):
    steps = ["--steps=4", "--checkpoint_every=2", "--log_every=1"]
    # all at once: the time is mostly compilation, which overlaps well on two cores
    two = _launch(_distill(models, tmp_path / "two", MESH, *steps), tmp_path / "log2",
                  processes=2, devices=4)
    eight = _launch(_distill(models, tmp_path / "eight", MESH, *steps), tmp_path / "log8")
    one = _launch(_distill(models, tmp_path / "one", "--mesh=data=1,fsdp=1,tensor=1", *steps),
                  tmp_path / "log1", devices=1)
    logs = _finish(two, tmp_path / "log2")
    _finish(eight, tmp_path / "log8")
    _finish(one, tmp_path / "log1")

    # each process built and placed only the rows its devices hold
    assert "process 0 of 2 loads batch rows 0-3 of 8" in logs[0]
    assert "process 1 of 2 loads batch rows 4-7 of 8" in logs[1]
    curves = {n: _losses(tmp_path / f"{n}.run") for n in ("two", "eight", "one")}
    assert list(curves["two"]) == [1, 2, 3, 4]
    for n in ("eight", "one"):
        assert curves[n].keys() == curves["two"].keys()
        np.testing.assert_allclose(list(curves[n].values()), list(curves["two"].values()),
                                   rtol=1e-5, err_msg=n)
    _assert_weights_close(_weights(tmp_path / "two"), _weights(tmp_path / "eight"))
    _assert_weights_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"))
    # process 0 alone wrote the results row and the TensorBoard events; both saved checkpoints
    run = tmp_path / "two.run"
    assert len((run / "results.jsonl").read_text().splitlines()) == 1
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow
def test_killed_process_stops_the_run_and_a_rerun_resumes(models, tmp_path):
    steps = ["--steps=30", "--checkpoint_every=3", "--log_every=5"]
    cmd = _distill(models, tmp_path / "cut", MESH, *steps)
    procs = _launch(cmd, tmp_path / "log_a", processes=2, devices=4)
    ckpts = tmp_path / "cut.run" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "a process ended before the kill:\n" + \
        _tail(tmp_path / "log_a")
    killed_at = time.time()
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    try:
        procs[0].wait(timeout=60)  # heartbeat 5 s: a dead peer must not leave it hanging
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 still ran 60 s after process 1 was killed")
    stopped_after = time.time() - killed_at
    log0 = (tmp_path / "log_a" / "p0.log").read_text()
    assert procs[0].returncode != 0
    # our message when the failure surfaces in Python (a collective errors), JAX's when its
    # coordination service ends the process (the peer stopped sending heartbeats)
    assert ("jdistill: process 0 of 2 stopped" in log0 and "rerun all of them" in log0) or \
        "another task died" in log0, log0[-3000:]
    assert "rerun every process with the same command to resume" in log0  # said at start-up
    assert not (tmp_path / "cut").exists(), "the run finished before it could be killed"
    print(f"process 0 stopped {stopped_after:.1f}s after process 1 was killed")

    logs = _finish(_launch(cmd, tmp_path / "log_b", processes=2, devices=4), tmp_path / "log_b")
    assert all("resumed from step" in log for log in logs)
    whole = _launch(_distill(models, tmp_path / "whole", MESH, *steps), tmp_path / "log_w")
    _finish(whole, tmp_path / "log_w")
    _assert_weights_close(_weights(tmp_path / "cut"), _weights(tmp_path / "whole"))
    row, = [json.loads(x) for x in
            (tmp_path / "cut.run" / "results.jsonl").read_text().splitlines()]
    assert row["resumed_from"] > 0
    logged = list(_losses(tmp_path / "cut.run"))
    assert logged == sorted(set(logged)) and logged[-1] == 30  # no step logged twice
    cut, ref = _losses(tmp_path / "cut.run"), _losses(tmp_path / "whole.run")
    assert ref.keys() <= cut.keys()  # the resumed run also logs its first step
    np.testing.assert_allclose([cut[k] for k in ref], list(ref.values()), rtol=1e-5)


# ------------------------------------------------------------------ prune main


@pytest.mark.slow
def test_two_processes_prune_like_one_device(models, tmp_path):
    args = ["experiments.prune", f"--model={models / 'teacher'}", "--compression=1.5",
            "--axes=mlp,heads,hidden", f"--calib_data={models / 'calib.txt'}",
            "--calib_samples=16", "--seq_len=16", "--batch_size=8"]
    two = _launch([*args, f"--out={tmp_path / 'two'}", MESH], tmp_path / "log2", processes=2,
                  devices=4)
    logs = _finish(two, tmp_path / "log2")
    one = _launch([*args, f"--out={tmp_path / 'one'}", "--mesh=data=1,fsdp=1,tensor=1"],
                  tmp_path / "log1", devices=1)
    _finish(one, tmp_path / "log1")
    reports = [json.loads((tmp_path / n / "pruning_report.json").read_text())
               for n in ("two", "one")]
    assert reports[0]["steps"][0]["kept"] == reports[1]["steps"][0]["kept"]
    _assert_weights_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"), atol=0)
    a, b = (np.load(tmp_path / n / "scores_step1.npz") for n in ("two", "one"))
    for k in a:  # block_distance's diagonal is arccos(~1): float noise of order 1e-5
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=5e-5, err_msg=k)
    assert "pruned" in logs[0] and "pruned" not in logs[1]  # process 0 alone reports


# ------------------------------------------------------------------ evaluate main


def test_two_processes_evaluate_like_one_device(models, tmp_path):
    task = tmp_path / "task.csv"
    task.write_text("text,label\n" + "".join(f"{p},{a}\n" for p, a in zip(PROMPTS, ANSWERS)) * 3)
    args = ["experiments.evaluate", f"--model={models / 'teacher'}", f"--task={task}",
            "--general=arc_easy", "--general_limit=8", "--perplexity",
            "--ppl_max_tokens=64", "--ppl_window=32", "--ppl_stride=16", "--batch_size=8"]
    two = _launch([*args, f"--out={tmp_path / 'two'}", MESH], tmp_path / "log2", processes=2,
                  devices=4)
    logs = _finish(two, tmp_path / "log2")
    one = _launch([*args, f"--out={tmp_path / 'one'}", "--mesh=data=1,fsdp=1,tensor=1"],
                  tmp_path / "log1", devices=1)
    _finish(one, tmp_path / "log1")
    rows = [[json.loads(x) for x in (tmp_path / n / "results.jsonl").read_text().splitlines()]
            for n in ("two", "one")]
    assert len(rows[0]) == 1  # process 0 alone writes
    a, b = rows[0][0]["metrics"], rows[1][0]["metrics"]
    assert a["in_domain_accuracy"] == b["in_domain_accuracy"]
    assert a["general"]["arc_easy"] == b["general"]["arc_easy"]
    np.testing.assert_allclose(a["perplexity"], b["perplexity"], rtol=1e-5)
    assert "accuracy" in logs[0] and "accuracy" not in logs[1]


# ------------------------------------------------------------------ in-process pieces


def test_batcher_builds_only_the_rows_asked_for(models):
    tok = data.load_tokenizer(models / "student")
    encoded = [data.encode_example(tok, p, a, eos_id=2) for p, a in zip(PROMPTS, ANSWERS)] * 3
    batcher = data.Batcher(encoded, batch_size=6, seq_len=8, accum=2, seed=3)
    for step in (0, 5):
        full = batcher.batch(step)
        part = batcher.batch(step, rows=[1, 2, 5])
        for k in full:  # per position, or per supervised position (-1 padded)
            assert part[k].shape == (2, 3, batcher.capacity if k == "supervised" else 8)
            np.testing.assert_array_equal(part[k], full[k][:, [1, 2, 5]], err_msg=k)


@needs_8
def test_local_rows_round_trip_to_a_global_batch():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    host = np.arange(2 * 8 * 3).reshape(2, 8, 3)
    rows = sharding.local_rows(sh, host.shape, axis=1)
    np.testing.assert_array_equal(rows, np.arange(8))  # one process holds every row
    out = sharding.from_local_rows(host[:, rows], rows, sh, host.shape, axis=1)
    assert out.sharding == sh
    np.testing.assert_array_equal(np.asarray(out), host)
    with pytest.raises(ValueError, match="local_rows"):
        sharding.from_local_rows(host[:, :4], np.arange(4), sh, host.shape, axis=1)


def test_distributed_settings_follow_flags_then_environment():
    assert sharding.distributed_settings(env={}) is None
    assert sharding.distributed_settings("h:1", 2, 1, env={}) == \
        {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    env = {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert sharding.distributed_settings(env=env) == \
        {"coordinator_address": "h:2", "num_processes": 4, "process_id": 3}
    # on a cluster JAX detects, the missing values are left to it
    auto = {"coordinator_address": None, "num_processes": None, "process_id": None}
    assert sharding.distributed_settings("auto", env={}) == auto
    assert sharding.distributed_settings(env={"SLURM_STEP_NUM_TASKS": "8"}) == auto
    assert sharding.distributed_settings(env={"SLURM_STEP_NUM_TASKS": "1"}) is None
    with pytest.raises(ValueError, match="--num_processes=N --process_id=i"):
        sharding.distributed_settings(env={"JAX_COORDINATOR_ADDRESS": "h:3"})


@needs_8
@pytest.mark.parametrize("variant", ["qwen2_untied", "qwen3", "llama_mqa"])
def test_sharded_load_reads_each_block_exactly(variant, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    whole = checkpoint.nnx.state(jdistill.load_pretrained(ckpt.path))
    for sizes in [(1, 8, 1), (1, 2, 4), (2, 2, 2), (1, 1, 8)]:
        mesh = sharding.make_mesh(*sizes)
        sharded = checkpoint.nnx.state(jdistill.load_pretrained(ckpt.path, mesh=mesh))
        assert all(len(b.sharding.device_set) == 8 for b in jax.tree_util.tree_leaves(sharded))
        chex.assert_trees_all_equal(whole, sharded)


def test_block_reads_match_whole_tensor_slices(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen2_untied")
    reader = checkpoint.SafetensorsFile(ckpt.path / "model.safetensors")
    try:
        q = checkpoint.to_ours(reader.read("model.layers.0.self_attn.q_proj.weight"), "q_proj",
                               (32, 4, 12))
        # a head_dim split (the rules never make one) is not contiguous in HF layout: the
        # fallback reads the whole tensor and must still give the right block
        for index in [(slice(8, 24), slice(None), slice(None)),
                      (slice(None), slice(2, 4), slice(None)),
                      (slice(0, 16), slice(1, 3), slice(0, 6))]:
            block = checkpoint._read_block(reader, "model.layers.0.self_attn.q_proj.weight",
                                           "q_proj", (32, 4, 12), index)
            np.testing.assert_array_equal(block, q[index])
        emb = reader.read("model.embed_tokens.weight")
        np.testing.assert_array_equal(reader.read("model.embed_tokens.weight", [(5, 50), (8, 16)]),
                                      emb[5:50, 8:16])
    finally:
        reader.close()


LOAD_PEAK = """
import json, sys, jax, numpy as np
import jdistill
from jdistill import sharding
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
jax.block_until_ready(sharding.shard_batch(np.zeros((8, 4), np.float32), mesh))
open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS (VmHWM) to the current
base = status("VmRSS")
model = jdistill.load_pretrained(sys.argv[1], mesh=mesh)
leaves = jax.block_until_ready(jax.tree_util.tree_leaves(jdistill.checkpoints.hf.nnx.state(model)))
print(json.dumps({"model": sum(x.nbytes for x in leaves), "peak": status("VmHWM") - base}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from Linux procfs")
def test_sharded_load_peak_host_memory_stays_near_the_model_size(tmp_path):
    # ~150 MB of float32, 42% of it in one [32000, 512] embedding (and 42% in the lm head):
    # loading a tensor whole (or memory-mapping the file) would show up clearly in the peak
    from jdistill.models import config as config_lib

    cfg = config_lib.ModelConfig(family="llama", vocab_size=32000, hidden_size=512,
                                 intermediate_size=1536, num_layers=2, num_heads=8,
                                 num_kv_heads=4, head_dim=64)
    abstract = checkpoint.nnx.eval_shape(
        lambda: jdistill.Decoder(cfg, rngs=checkpoint.nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tensors = {checkpoint.hf_name(p): rng.standard_normal(
        checkpoint.hf_shape(tuple(leaf.shape), p[-1]), np.float32)
        for p, leaf in checkpoint.param_paths(checkpoint.nnx.split(abstract)[1])}
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_hf_dict(cfg)))
    del tensors
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    res = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    ratio = got["peak"] / got["model"]
    print(f"model {got['model'] / 2**20:.0f} MiB, peak {got['peak'] / 2**20:.0f} MiB "
          f"({ratio:.2f}x)")
    # the loaded params themselves live in host memory (CPU devices): 1.0x is the floor
    assert 0.9 < ratio < 1.3
