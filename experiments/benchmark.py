"""Speed of one distillation step: our jitted step vs the same step in transformers PyTorch.

  python -m experiments.benchmark                                  # the real size (SmolLM2-135M
                                                                   # -> 15 layers), minutes on CPU
  python -m experiments.benchmark --preset=small                   # a 7M toy, ~1-2 min
  python -m experiments.benchmark --preset=tiny --steps=2 --out=/tmp/bench.json
  python -m experiments.benchmark --preset=1b                      # GPU: MFU, no torch
  python -m experiments.benchmark --student_dims=layers=8,hidden=512 --format=logits

One step = teacher forward (no gradient) + student forward/backward + the fused loss of
--format + global-norm clipping + AdamW, on one [batch_size, seq_len] batch of random
tokens with prompt / trace / answer segments. Ours is `train.make_step` under
`jax.jit(donate_argnums=0)` after `train._place`; the baseline is LlamaForCausalLM teacher
(no_grad) + student with the same loss written in torch, `clip_grad_norm_` and
`torch.optim.AdamW`. Both start from identical weights (the torch models are saved with
save_pretrained and loaded with `jdistill.load_pretrained`), so their first-step losses
must agree; the difference is printed next to the timings.

Timing: the first call of each compiles / warms up and is not timed; then --steps calls of
each, taking turns (ours, torch, ours, ...) so both see the same background load, each
waited for; the median is the step time (tokens/s = batch_size * seq_len / median).
Nothing here asserts a wall time: the numbers are reported, with the ratio ours / torch
measured in the same process.

Compile time is timed on its own (`jit(...).lower(...).compile()`), apart from the first
call. MFU counts model FLOPs as `jdistill.models.flops` does (MaxText's count: matmuls,
causal attention halved, backward = 2x forward, the lm-head at the supervised positions
the trainer forms it at), against the device's peak from its table (printed where the
device is in it, or with --peak_tflops).

--remat_memory prints the compiled temporary memory of one step at 8 x 2048 tokens for
each remat policy (XLA's memory_analysis; compiled, not run; minutes on a CPU).
--batch_sizes=16,8,4 tries each batch size in turn until one fits: an out-of-memory error
(RESOURCE_EXHAUSTED) moves on to the next, any other error stops the run.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli
from experiments import flags as common
from jdistill.distill import train
from jdistill.models.decoder import REMAT_POLICIES

DIM_KEYS = ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "head_dim", "tie")

# Llama dims per preset; `tie` 1 ties the lm head to the embedding (as SmolLM2 does).
PRESETS = {
    # the test's size: seconds on any CPU
    "tiny": dict(teacher=dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=512,
                              tie=1),
                 student=dict(hidden=64, ffn=128, layers=1, heads=4, kv_heads=2, vocab=512,
                              tie=1),
                 batch_size=2, seq_len=32, dtype="float32", steps=3),
    # a toy (~1-2 min on 2 cores): student = half the teacher's layers and MLP
    "small": dict(teacher=dict(hidden=256, ffn=768, layers=4, heads=4, kv_heads=2, vocab=16384,
                               tie=1),
                  student=dict(hidden=256, ffn=384, layers=2, heads=4, kv_heads=2, vocab=16384,
                               tie=1),
                  batch_size=8, seq_len=256, dtype="float32", steps=5),
    # the default, the size every experiment runs at: SmolLM2-135M as the teacher, a
    # half-depth student
    "smollm": dict(teacher=dict(hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3,
                                vocab=49152, tie=1),
                   student=dict(hidden=576, ffn=1536, layers=15, heads=9, kv_heads=3,
                                vocab=49152, tie=1),
                   batch_size=8, seq_len=512, dtype="float32", steps=5),
    # GPU: a ~1.4B teacher, a ~1.0B student (TinyLlama-like widths), bf16 compute
    "1b": dict(teacher=dict(hidden=2048, ffn=5632, layers=28, heads=32, kv_heads=8, vocab=32000,
                            tie=0),
               student=dict(hidden=2048, ffn=5632, layers=20, heads=32, kv_heads=8, vocab=32000,
                            tie=0),
               batch_size=8, seq_len=1024, dtype="bfloat16", steps=10),
}

PRESET = flags.DEFINE_enum("preset", "smollm", list(PRESETS), "model sizes and batch defaults")
TEACHER_DIMS = flags.DEFINE_string(
    "teacher_dims", None, "override preset teacher dims, e.g. hidden=576,ffn=1536,layers=30,"
    f"heads=9,kv_heads=3,vocab=49152 (keys {', '.join(DIM_KEYS)})")
STUDENT_DIMS = flags.DEFINE_string("student_dims", None, "override preset student dims")
BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "rows per step (default: preset's)")
SEQ_LEN = flags.DEFINE_integer("seq_len", None, "tokens per row (default: preset's)")
DTYPE = common.define_dtype(help="compute dtype (f32 master weights either way; default: "
                             "preset's)", choices=("float32", "bfloat16"))  # train.DTYPES
STEPS = flags.DEFINE_integer("steps", None, "timed steps per implementation, after one "
                             "untimed warm-up / compile step (default: preset's)")
REMAT_MEMORY = flags.DEFINE_bool("remat_memory", False, "also print each remat policy's "
                                 "compiled temporary memory at 8 x 2048 tokens")
BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "batch sizes to try largest first, moving "
                                "on after an out-of-memory error (default: --batch_size)")
# the step's settings are DistillConfig's flags (defaults and help live there), those the
# PyTorch reference step also has: forward KL, AdamW without decay or warm-up, full training
CONFIG = common.define_config_flags(
    train.DistillConfig, defaults={"format": "logits"},
    skip=("steps", "kind", "beta", "lam", "warmup_steps", "weight_decay", "compute_dtype",
          "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "seed"))
TORCH_FORMATS = ("logits", "blended")  # the formats `torch_loss` implements
INIT_STD = flags.DEFINE_float("init_std", 0.02, "std of the random weights (initializer_range)")
TORCH_BASELINE = flags.DEFINE_bool("torch_baseline", None, "also time the PyTorch step "
                                   "(default: on CPU yes, on GPU no: torch here is CPU-only)")
THREADS = flags.DEFINE_integer("threads", None, "torch threads (default: usable CPU cores)")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "device peak for MFU (default: the "
                                 "device's from jdistill.models.flops; none for CPUs)")
SEED = flags.DEFINE_integer("seed", 0, "weights and batch seed")
OUT = flags.DEFINE_string("out", None, "write all numbers as JSON here (atomic)")


# ------------------------------------------------------------------ configuration


def parse_dims(spec: str | None, base: dict) -> dict:
    """'hidden=512,layers=8' over the preset's dims; unknown keys or non-ints are errors."""
    dims = dict(base)
    if not spec:
        return dims
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in DIM_KEYS:
            raise app.UsageError(f"unknown dim {key!r} in {spec!r}; use {', '.join(DIM_KEYS)}")
        try:
            dims[key] = int(value)
        except ValueError:
            raise app.UsageError(f"dim {key}={value!r} in {spec!r} is not an integer")
    return dims


def check_dims(teacher: dict, student: dict):
    if teacher["vocab"] != student["vocab"]:
        raise app.UsageError(f"teacher and student need one vocabulary for the KL, got "
                             f"{teacher['vocab']} and {student['vocab']}")
    for who, d in (("teacher", teacher), ("student", student)):
        if d["heads"] % d["kv_heads"]:
            raise app.UsageError(f"{who}: heads={d['heads']} is not a multiple of "
                                 f"kv_heads={d['kv_heads']}")
        if "head_dim" not in d and d["hidden"] % d["heads"]:
            raise app.UsageError(f"{who}: hidden={d['hidden']} is not divisible by "
                                 f"heads={d['heads']}; give head_dim=")


def head_dim(d: dict) -> int:
    return d.get("head_dim") or d["hidden"] // d["heads"]


def hf_config(d: dict, seq_len: int, init_std: float):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["ffn"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"], head_dim=head_dim(d),
        tie_word_embeddings=bool(d.get("tie", 0)), initializer_range=init_std,
        max_position_embeddings=max(seq_len, 2048))


def model_config(d: dict, seq_len: int):
    from jdistill.models.config import ModelConfig
    return ModelConfig(family="llama", vocab_size=d["vocab"], hidden_size=d["hidden"],
                       intermediate_size=d["ffn"], num_layers=d["layers"], num_heads=d["heads"],
                       num_kv_heads=d["kv_heads"], head_dim=head_dim(d),
                       tie_word_embeddings=bool(d.get("tie", 0)),
                       max_position_embeddings=max(seq_len, 2048))


def make_batch(vocab: int, batch_size: int, seq_len: int, seed: int) -> dict:
    """One [1, B, T] batch in `data.Batcher`'s layout: a prompt (first quarter, unsupervised),
    a trace, and an answer (last eighth); targets are the next tokens; no padding; the
    supervised positions [1, B, K] (the trainer forms logits only there; the PyTorch
    baseline, as transformers' models do, at every position)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch_size, seq_len + 1), dtype=np.int32)
    segments = np.full((batch_size, seq_len), 1, np.int32)
    segments[:, : seq_len // 4] = 0
    segments[:, seq_len - max(1, seq_len // 8):] = 2
    ones = np.ones((batch_size, seq_len), bool)
    out = {"tokens": ids[:, :-1], "mask": ones, "targets": ids[:, 1:], "segments": segments,
           "loss_mask": ones}
    # as every batcher gives the trainer: the positions whose target is not the prompt
    out["supervised"] = np.stack([np.flatnonzero(s > 0) for s in segments]).astype(np.int32)
    return {k: v[None] for k, v in out.items()}


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def warm_up(fn):
    """(result, seconds) of the first call (compile / allocator warm-up; never timed)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def interleaved_times(fns: dict, steps: int) -> dict:
    """Per-call seconds of each fn, called in turn `steps` times: on a shared, noisy machine
    every implementation sees the same background load."""
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------ ours


def prepare_ours(teacher, student, batch: dict, cfg):
    """(first-call info, one-step fn): `train.make_step` jitted with the state donated,
    placed as `train.train` places it; each call waits for its results."""
    from flax import nnx

    from jdistill import sharding as sharding_lib

    mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
    s_graphdef, t_graphdef = nnx.split(student)[0], nnx.split(teacher)[0]
    state, frozen, t_params, state_sh = train._place(student, train.pure_params(teacher), mesh,
                                                     cfg)
    replicated = sharding_lib.NamedSharding(mesh, sharding_lib.P())
    step_fn = jax.jit(train.make_step(s_graphdef, t_graphdef, cfg), donate_argnums=0,
                      out_shardings=(state_sh, replicated))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # as the trainer traces it (kernels shard_map over the mesh)
        compiled = step_fn.lower(state, frozen, t_params, batch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def one_step():
        box["state"], metrics = compiled(box["state"], frozen, t_params, batch)
        jax.block_until_ready((box["state"], metrics))
        return metrics

    metrics, first_s = warm_up(one_step)
    return {"first_loss": float(metrics["loss"]), "compile_s": compile_s,
            "first_call_s": first_s, "finite": bool(float(metrics["finite"]))}, one_step


def step_temp_memory(teacher, student, batch: dict, cfg) -> dict:
    """XLA's memory_analysis of the compiled step (not run): temporaries and arguments."""
    from flax import nnx

    from jdistill import sharding as sharding_lib

    mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
    state, frozen, t_params, _ = train._place(student, train.pure_params(teacher), mesh, cfg)
    step = jax.jit(train.make_step(nnx.split(student)[0], nnx.split(teacher)[0], cfg))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        mem = step.lower(state, frozen, t_params, batch).compile().memory_analysis()
    return {"temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes}


# ------------------------------------------------------------------ torch


def torch_loss(s_logits, t_logits, batch: dict, fmt: str, temperature: float, weights):
    """The loss of `formats.FORMATS[fmt]` in torch (f32): logits = forward KL * tau^2 over the
    trace and answer tokens (one mean); blended = per segment KL * tau^2 and CE, each
    normalised by that segment's token count, weighted by `weights` (BlendWeights)."""
    import torch
    import torch.nn.functional as F

    tau = temperature
    ls = F.log_softmax(s_logits.float() / tau, dim=-1)
    lt = F.log_softmax(t_logits.float() / tau, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    seg, m = batch["segments"], batch["loss_mask"].float()
    if fmt == "logits":
        sup = m * (seg > 0)
        return tau ** 2 * (kl * sup).sum() / sup.sum().clamp_min(1.0)
    ce = F.cross_entropy(s_logits.float().flatten(0, 1), batch["targets"].flatten().long(),
                         reduction="none").view_as(kl)
    loss = torch.zeros(())
    for seg_id, w_kl, w_ce in ((1, weights.trace_kl, weights.trace_ce),
                               (2, weights.answer_kl, weights.answer_ce)):
        sm = m * (seg == seg_id)
        n = sm.sum().clamp_min(1.0)
        loss = loss + w_kl * tau ** 2 * (kl * sm).sum() / n + w_ce * (ce * sm).sum() / n
    return loss


def prepare_torch(teacher, student, batch: dict, *, fmt, dtype, temperature, learning_rate,
                  clip_norm, weights, threads):
    """The same step with transformers models: teacher no_grad, student + AdamW + clipping.
    bfloat16 = autocast over f32 master weights (our compute_dtype="bfloat16")."""
    import contextlib

    import torch

    torch.set_num_threads(threads)
    tb = {k: torch.from_numpy(np.asarray(v[0])) for k, v in batch.items()}
    ids, mask = tb["tokens"].long(), tb["mask"].long()
    teacher.eval().requires_grad_(False)
    student.train()
    if dtype == "bfloat16":
        teacher.to(torch.bfloat16)
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    opt = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)

    def one_step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
        with autocast():
            s_logits = student(input_ids=ids, attention_mask=mask).logits
        loss = torch_loss(s_logits, t_logits, tb, fmt, temperature, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), clip_norm)
        opt.step()
        return loss.item()

    first, first_s = warm_up(one_step)
    return {"first_loss": first, "first_call_s": first_s,
            "threads": torch.get_num_threads()}, one_step


# ------------------------------------------------------------------ models


def build_models(t_dims, s_dims, *, seq_len, dtype, init_std, seed, with_torch):
    """(our teacher, our student, torch teacher, torch student). With torch the weights are
    made by transformers and loaded through save_pretrained -> load_pretrained (identical
    weights on both sides); without it we init ours directly (no torch needed, and no disk
    round trip of a billion-parameter model)."""
    import jdistill
    if not with_torch:
        t = jdistill.init_model(model_config(t_dims, seq_len), dtype=jnp.dtype(dtype), seed=seed)
        s = jdistill.init_model(model_config(s_dims, seq_len), dtype=jnp.float32, seed=seed + 1)
        return t, s, None, None
    import torch
    import transformers
    hf = []
    for i, d in enumerate((t_dims, s_dims)):
        torch.manual_seed(seed + i)
        hf.append(transformers.LlamaForCausalLM(hf_config(d, seq_len, init_std)))
    with tempfile.TemporaryDirectory() as tmp:
        hf[0].save_pretrained(f"{tmp}/teacher")
        hf[1].save_pretrained(f"{tmp}/student")
        # teacher straight in the compute dtype (it never trains); student f32 master weights
        t = jdistill.load_pretrained(f"{tmp}/teacher", dtype=dtype)
        s = jdistill.load_pretrained(f"{tmp}/student", dtype="float32")
    return t, s, hf[0], hf[1]


# ------------------------------------------------------------------ report


def summarize(raw: dict, tokens: int) -> dict:
    med = statistics.median(raw["times_s"])
    return {**raw, "step_s": med, "tokens_per_s": tokens / med}


def machine_info() -> dict:
    dev = jax.devices()[0]
    return {"jax_backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "cpu_count": usable_cpus(),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds")}


def table(result: dict) -> str:
    rows = [("impl", "step s (median)", "tokens/s", "first-step loss", "first call s")]
    for name in ("ours", "torch"):
        r = result.get(name)
        if r:
            rows.append((name, f"{r['step_s']:.4f}", f"{r['tokens_per_s']:,.0f}",
                         f"{r['first_loss']:.6f}", f"{r['first_call_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    if "ratio_ours_over_torch" in result:
        lines.append(f"ratio ours/torch (time) {result['ratio_ours_over_torch']:.3f}  "
                     f"(goal <= 0.8; speed-up {1 / result['ratio_ours_over_torch']:.2f}x)")
        lines.append(f"first-step loss |ours - torch| {result['loss_abs_diff']:.2e}")
    line = (f"model TFLOP/step {result['flops_per_step'] / 1e12:.3g}  achieved "
            f"{result['achieved_tflops']:.3g} TFLOP/s; compile {result['ours']['compile_s']:.1f} s")
    if "mfu" in result:
        line += f"  MFU {100 * result['mfu']:.1f}% of {result['peak_tflops']:g}"
    lines.append(line)
    for policy, mem in result.get("remat_memory", {}).items():
        lines.append(f"remat={policy}: compiled temporaries {mem['temp_bytes'] / 2**30:.2f} GiB "
                     f"at {mem['batch_size']} x {mem['seq_len']} tokens")
    return "\n".join(lines)


def write_json_atomic(path: str, obj: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def is_out_of_memory(error: BaseException) -> bool:
    """XLA's allocation failure (any backend), as opposed to any other error."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def first_fitting(batch_sizes: list[int], run, log=print):
    """(batch size, run(batch size)) of the first size that does not run out of memory;
    an out-of-memory error moves on to the next (smaller) size, anything else is raised."""
    for i, size in enumerate(batch_sizes):
        try:
            return size, run(size)
        except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types
            if not is_out_of_memory(e):
                raise
            if i + 1 == len(batch_sizes):
                raise ValueError(f"out of memory at every batch size {batch_sizes}: give "
                                 "smaller --batch_sizes, a shorter --seq_len or --remat=full") from e
            log(f"!! out of memory at batch {size}: retrying at batch {batch_sizes[i + 1]}")
            jax.clear_caches()  # drop the failed executable and its buffers
    raise AssertionError("unreachable")


def remat_memory(t_dims, s_dims, cfg, *, batch_size=8, seq_len=2048) -> dict:
    """Compiled temporaries of one step at batch_size x seq_len per remat policy."""
    import dataclasses

    import jdistill

    # real weights (random): _place builds the state from them; only the step is compiled
    teacher = jdistill.init_model(model_config(t_dims, seq_len),
                                  dtype=jnp.dtype(cfg.compute_dtype))
    student = jdistill.init_model(model_config(s_dims, seq_len), dtype=jnp.float32, seed=1)
    batch = make_batch(t_dims["vocab"], batch_size, seq_len, 0)
    out = {}
    for policy in REMAT_POLICIES:
        mem = step_temp_memory(teacher, student, batch, dataclasses.replace(cfg, remat=policy))
        out[policy] = {**mem, "batch_size": batch_size, "seq_len": seq_len}
        print(f"remat={policy}: compiled temporaries {mem['temp_bytes'] / 2**30:.2f} GiB at "
              f"{batch_size} x {seq_len}", flush=True)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from jdistill.models import flops as flops_lib

    if importlib.util.find_spec("torch") is None:  # the baseline: a test-extra package
        raise ValueError("the benchmark's baseline is PyTorch: pip install torch==2.13.0 "
                         "transformers (or pip install -e \".[test]\")")
    preset = PRESETS[PRESET.value]
    t_dims = parse_dims(TEACHER_DIMS.value, preset["teacher"])
    s_dims = parse_dims(STUDENT_DIMS.value, preset["student"])
    check_dims(t_dims, s_dims)
    try:
        sizes = [int(b) for b in BATCH_SIZES.value] if BATCH_SIZES.value else \
            [BATCH_SIZE.value or preset["batch_size"]]
    except ValueError:
        raise app.UsageError(f"--batch_sizes={','.join(BATCH_SIZES.value)}: give integers, "
                             "e.g. 16,8,4")
    seq_len = SEQ_LEN.value or preset["seq_len"]
    dtype = DTYPE.value or preset["dtype"]
    steps = STEPS.value or preset["steps"]
    on_gpu = jax.default_backend() == "gpu"
    with_torch = (not on_gpu) if TORCH_BASELINE.value is None else TORCH_BASELINE.value
    threads = THREADS.value or usable_cpus()
    cfg = train.DistillConfig(steps=steps + 1, compute_dtype=dtype, seed=SEED.value,
                              **common.config_values(CONFIG))
    if with_torch and cfg.format not in TORCH_FORMATS:
        raise app.UsageError(f"--format={cfg.format}: the PyTorch baseline implements "
                             f"{', '.join(TORCH_FORMATS)}; pick one, or --notorch_baseline")
    from jdistill.models import decoder
    attention = decoder.attention_implementation(jnp.dtype(dtype), head_dim(s_dims))
    result = {
        "settings": {"preset": PRESET.value, "teacher_dims": t_dims, "student_dims": s_dims,
                     "seq_len": seq_len, "format": cfg.format, "dtype": dtype,
                     "steps": steps, "chunk_size": cfg.chunk_size, "remat": cfg.remat,
                     "attention": attention, "temperature": cfg.temperature,
                     "learning_rate": cfg.learning_rate, "clip_norm": cfg.clip_norm,
                     "init_std": INIT_STD.value,
                     "torch_baseline": with_torch, "batch_sizes_tried": sizes},
        "teacher_params": model_config(t_dims, seq_len).num_params(),
        "student_params": model_config(s_dims, seq_len).num_params(),
        "machine": machine_info(),
    }
    print(f"teacher {result['teacher_params']:,} params {t_dims}\nstudent "
          f"{result['student_params']:,} params {s_dims}\nseq {seq_len}, format "
          f"{cfg.format}, {dtype}, remat {cfg.remat}, attention {attention}, {steps} timed "
          f"steps; jax {result['machine']['jax_backend']} ({result['machine']['device_kind']})",
          flush=True)
    *ours, hf_t, hf_s = build_models(t_dims, s_dims, seq_len=seq_len, dtype=dtype,
                                     init_std=INIT_STD.value, seed=SEED.value,
                                     with_torch=with_torch)

    def prepare(batch_size):
        print(f"batch {batch_size} x {seq_len}", flush=True)
        batch = make_batch(t_dims["vocab"], batch_size, seq_len, SEED.value)
        return batch, prepare_ours(*ours, batch, cfg)

    batch_size, (batch, (ours_info, ours_fn)) = first_fitting(sizes, prepare)
    ours.clear()  # the step holds its own copies; free the originals
    tokens = batch_size * seq_len
    result["settings"].update(batch_size=batch_size, tokens_per_step=tokens)
    info, fns = {"ours": ours_info}, {"ours": ours_fn}
    if with_torch:
        weights, _ = cfg.blend
        info["torch"], fns["torch"] = prepare_torch(
            hf_t, hf_s, batch, fmt=cfg.format, dtype=dtype, temperature=cfg.temperature,
            learning_rate=cfg.learning_rate, clip_norm=cfg.clip_norm, weights=weights,
            threads=threads)
    for name, times in interleaved_times(fns, steps).items():
        result[name] = summarize({**info[name], "times_s": times}, tokens)
    if with_torch:
        result["ratio_ours_over_torch"] = result["ours"]["step_s"] / result["torch"]["step_s"]
        result["loss_abs_diff"] = abs(result["ours"]["first_loss"] - result["torch"]["first_loss"])

    # as the trainer counts them (`train.batch_flops`)
    flops = train.batch_flops(batch, model_config(s_dims, seq_len),
                              model_config(t_dims, seq_len), cfg)
    result["flops_per_step"] = flops
    result["achieved_tflops"] = flops / result["ours"]["step_s"] / 1e12
    peak = PEAK_TFLOPS.value or flops_lib.peak_tflops(result["machine"]["device_kind"], dtype)
    if peak:
        result.update(peak_tflops=peak, mfu=result["achieved_tflops"] / peak)
    if REMAT_MEMORY.value:
        result["remat_memory"] = remat_memory(t_dims, s_dims, cfg)
    print(table(result), flush=True)
    if OUT.value:
        write_json_atomic(OUT.value, result)
        print(f"wrote {OUT.value}")


if __name__ == "__main__":
    cli.run(main)
