"""Distillation training: a pure, jitted, sharded step and a resumable, checkpointed loop.

The step is one compiled function of (train state, frozen base, teacher params, batch):
teacher forward without gradient + student forward/backward + the loss for the supervision
format, gradient accumulation over micro-batches (a `lax.scan`), global-norm clipping and
AdamW with warm-up + cosine decay. Full fine-tuning trains every student parameter; LoRA
trains only adapters (the base is an argument, not state, so the optimizer never sees it).

The data position of a run is its step (batches are a pure function of seed and step, see
`data.Batcher` and, for packed rows, `packing.PackedBatcher`), so an orbax checkpoint of
(step, params, optimizer state) is the whole state: rerunning a killed command resumes where
the last checkpoint left off and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from pathlib import Path
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jdistill import sharding as sharding_lib
from jdistill.distill import formats, fused, losses
from jdistill.models import flops as flops_lib
from jdistill.models import lora as lora_lib
from jdistill.models.config import ModelConfig
from jdistill.models.decoder import REMAT_POLICIES, Decoder, stack_trees
from jdistill.utils import files
from jdistill.utils import tracking

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _field(default, help: str, choices=None):
    """A config field with the help text (and choices) its command-line flag shows."""
    meta = {"help": help, **({"choices": choices} if choices is not None else {})}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Everything that defines the optimisation (hashable: it is static under jit). The
    distill main's flags are these fields (`experiments.flags.define_config_flags`)."""

    steps: int = dataclasses.field(metadata={"help": "optimizer steps"})
    format: str = _field("blended", "supervision format", formats.NAMES)
    kind: str = _field("forward", "divergence of the KL terms", losses.KINDS)
    temperature: float = _field(1.0, "distillation temperature")
    beta: float = _field(0.5, "generalized JSD mixing weight (kind=jsd)")
    lam: float = _field(0.1, "skew KL mixing weight (kind=skew, skew_reverse)")
    weights: losses.BlendWeights | None = None  # overrides the format's weights
    learning_rate: float = _field(1e-4, "peak learning rate")
    warmup_steps: int = _field(0, "linear warm-up steps")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    clip_norm: float = _field(1.0, "global gradient-norm clip")
    compute_dtype: str = _field("float32", "forward/backward dtype (master weights stay in "
                                "--dtype); bfloat16: bf16 compute, f32 master weights",
                                ("float32", "bfloat16"))
    lora_rank: int = _field(0, "LoRA rank; 0 trains every parameter")
    lora_alpha: float = _field(16.0, "LoRA alpha (scale alpha / rank)")
    lora_dropout: float = _field(0.0, "LoRA input dropout")
    lora_targets: str = _field(r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj",
                               "regex of the linear layers LoRA adapts")
    chunk_size: int = _field(512, "tokens per chunk of the fused lm-head loss")
    remat: str = _field("dots", "what the backward pass recomputes of each student layer: "
                        "dots (projections kept; fastest on CPU), none (everything kept), "
                        "full (least memory)",
                        tuple(REMAT_POLICIES))
    seed: int = _field(0, "data order, LoRA init and dropout seed")

    def __post_init__(self):
        formats.get(self.format)
        if self.kind not in losses.KINDS:
            raise ValueError(f"unknown loss kind {self.kind!r}; choose one of {losses.KINDS}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def blend(self):
        spec = formats.get(self.format)
        return (self.weights or spec.weights), spec.normalize

    @property
    def needs_teacher(self) -> bool:
        w, _ = self.blend
        return w.trace_kl != 0 or w.answer_kl != 0


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict            # full params (pure dict) or LoRA adapters
    opt_state: optax.OptState
    rng: jax.Array


def make_optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def pure_params(model: Decoder) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def stack_layers(params: dict) -> dict:
    """Pure params with `layers` {0: tree, 1: tree, ...} as one tree of [L, ...] arrays.

    Why: the optimizer, gradient and NaN guard then handle ~10 arrays instead of ~10 per
    layer, and XLA:CPU compiles a 30-layer train step several times faster (each small
    per-leaf fusion is compiled on its own). The model's scanned forward stacks the layers
    anyway, so stack(unstack(x)) folds away."""
    layers = params["layers"]
    return {**params, "layers": stack_trees([layers[i] for i in sorted(layers)])}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers` (the model's own per-layer structure)."""
    stacked = params["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return {**params, "layers": {i: jax.tree_util.tree_map(lambda x: x[i], stacked)
                                 for i in range(n)}}


def init_state(student: Decoder, cfg: DistillConfig):
    """(TrainState, frozen base or None). LoRA: adapters train, the base is frozen."""
    return init_state_from(pure_params(student), cfg)


def init_state_from(base: dict, cfg: DistillConfig):
    """`init_state` as a pure function of the student's params (jit-able)."""
    rng = jax.random.key(cfg.seed)
    init_rng, rng = jax.random.split(rng)
    if cfg.lora_rank:
        trainable = lora_lib.init_lora(base, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha,
                                       init_rng)
        frozen = base
    else:
        trainable, frozen = stack_layers(base), None
    opt_state = make_optimizer(cfg).init(trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=opt_state,
                      rng=rng), frozen


def student_params(state_params, frozen, cfg: DistillConfig, rng=None):
    """The model's pure params from a train state's (stacked layers, or LoRA + base)."""
    if not cfg.lora_rank:
        return unstack_layers(state_params)
    return lora_lib.apply_lora(frozen, state_params, dropout=cfg.lora_dropout, rng=rng)


def teacher_inputs(teacher_params: dict | None, cfg: DistillConfig) -> dict | None:
    """The frozen teacher as the step takes it: cast to the compute dtype and layers
    stacked, once per run (inside the step both were redone every step: a copy of every
    teacher weight)."""
    if teacher_params is None:
        return None
    return stack_layers(_cast(teacher_params, DTYPES[cfg.compute_dtype]))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                                  else x, tree)


def check_topk_temperature(cfg: DistillConfig):
    """Cached top-k log-probs are the teacher's at temperature 1 and `losses.topk_kl` divides
    only the student by the temperature: any other temperature would compare a tempered
    student with an untempered teacher. (Tempering the teacher needs its full logits: a
    top-k file cannot be re-tempered exactly.)"""
    if cfg.temperature != 1.0:
        raise ValueError(
            f"temperature={cfg.temperature} with a cached top-k teacher: the top-k file holds "
            "the teacher's temperature-1 log-probs and only the student would be tempered, so "
            "the KL would compare different temperatures; train with temperature 1.0 "
            "(--temperature=1, Minitron's choice) or drop the cache (--topk) and distil from "
            "the online teacher (--teacher) to use another temperature")


def batch_loss(params, teacher_params, batch, *, s_graphdef, t_graphdef, cfg: DistillConfig):
    """(loss, metrics) of one micro-batch {tokens, mask, targets, segments, loss_mask [B, T],
    optional documents [B, T] (packed rows, see `packing`), optional supervised [B, K]
    (the positions whose targets a loss can see, -1 padded), optional topk_logprobs /
    topk_ids [B, T, k]} from hidden states (fused lm-head loss)."""
    if "topk_ids" in batch:  # a static check (the batch's keys), so it fails at trace time
        check_topk_temperature(cfg)
    dtype = DTYPES[cfg.compute_dtype]
    # packed rows: every example attends only to itself, with its own positions, in both
    # the student and the teacher (None for unpacked batches)
    documents = batch.get("documents")
    student = nnx.merge(s_graphdef, _cast(params, dtype))
    h_s, _ = student.forward(batch["tokens"], attention_mask=batch["mask"],
                             documents=documents, remat=cfg.remat)
    w_s = student.unembed_weight()
    weights, normalize = cfg.blend
    if "topk_ids" in batch:  # offline KD from cached teacher top-k: no teacher forward
        supervised = batch["loss_mask"] * (batch["segments"] != losses.PROMPT)
        lp, ids = batch["topk_logprobs"], batch["topk_ids"]
        if "supervised" in batch:  # the lm-head only where the top-k KL can be non-zero
            at = batch["supervised"]
            h_s, lp, ids = (_at(x, at) for x in (h_s, lp, ids))
            supervised = _at(supervised, at) * (at >= 0)
        return fused.fused_topk_kl(h_s, w_s, lp, ids, supervised, temperature=cfg.temperature,
                                    chunk_size=cfg.chunk_size)
    h_t = w_t = None
    if cfg.needs_teacher:  # its params arrive cast and stacked (`teacher_inputs`)
        teacher = nnx.merge(t_graphdef, unstack_layers(teacher_params))
        h_t, _ = teacher.forward(batch["tokens"], attention_mask=batch["mask"],
                                 documents=documents, layers=teacher_params["layers"])
        h_t, w_t = jax.lax.stop_gradient((h_t, teacher.unembed_weight()))
    targets, segments, loss_mask = batch["targets"], batch["segments"], batch["loss_mask"]
    if "supervised" in batch:
        # only these positions can carry a loss term (prompt targets never do): the lm-head
        # and the loss run on them alone (every batcher names them; ~1/4 of a packed row
        # of label examples, the answer alone of an unpacked one)
        at = batch["supervised"]
        h_s, targets, segments = (_at(x, at) for x in (h_s, targets, segments))
        h_t = None if h_t is None else _at(h_t, at)
        loss_mask = _at(loss_mask, at) * (at >= 0)
    return fused.fused_blended_cot_loss(
        h_s, w_s, h_t, w_t, targets, segments, mask=loss_mask,
        weights=weights, temperature=cfg.temperature, kind=cfg.kind, beta=cfg.beta,
        lam=cfg.lam, normalize=normalize, chunk_size=cfg.chunk_size)


def _at(x, positions):
    """x [B, T, ...] at positions [B, K] (-1: any position; its loss mask is 0) -> [B, K, ...]."""
    at = jnp.maximum(positions, 0).reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, at, axis=1)


def make_step(s_graphdef, t_graphdef, cfg: DistillConfig):
    """The pure step: (state, frozen, teacher_params, batch [A, B, T]) -> (state, metrics).

    A non-finite loss or gradient leaves the state unchanged and sets metrics["finite"] = 0,
    so the caller can stop with the last good state intact.
    """
    optimizer = make_optimizer(cfg)

    def loss_of(trainable, frozen, teacher_params, micro, rng):
        params = student_params(trainable, frozen, cfg, rng)
        return batch_loss(params, teacher_params, micro, s_graphdef=s_graphdef,
                          t_graphdef=t_graphdef, cfg=cfg)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state: TrainState, frozen, teacher_params, batch):
        rng, step_rng = jax.random.split(state.rng)
        accum = batch["tokens"].shape[0]

        def micro_step(carry, micro):
            (loss, metrics), grads = grad_fn(state.params, frozen, teacher_params, micro,
                                             step_rng)
            g_sum, m_sum = carry
            return (jax.tree_util.tree_map(jnp.add, g_sum, grads),
                    jax.tree_util.tree_map(jnp.add, m_sum, {**metrics, "loss": loss})), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        first = jax.tree_util.tree_map(lambda x: x[0], batch)
        m_shape = jax.eval_shape(lambda: grad_fn(state.params, frozen, teacher_params, first,
                                                 step_rng)[0])
        m_zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                         {**m_shape[1], "loss": m_shape[0]})
        (grads, metrics), _ = jax.lax.scan(micro_step, (zeros, m_zeros), batch)
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        metrics = {k: v / accum for k, v in metrics.items()}
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {**metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}

    return step


class NonFiniteError(FloatingPointError):
    pass


@dataclasses.dataclass
class RunResult:
    student: Decoder
    steps_run: int
    resumed_from: int | None
    tokens_seen: int
    seconds: float
    final_metrics: dict
    throughput: dict = dataclasses.field(default_factory=dict)  # `_Meter.speed`


def train(student: Decoder, teacher: Decoder | None, batcher, cfg: DistillConfig, *,
          workdir, mesh=None, checkpoint_every: int = 50, keep_checkpoints: int = 3,
          log_every: int = 10, log: Callable[[str], None] = print,
          writer=None) -> RunResult:
    """Runs (or resumes) `cfg.steps` optimizer steps; returns the trained student model.

    workdir/checkpoints holds orbax checkpoints (the last `keep_checkpoints`, every
    `checkpoint_every` steps and at the end; 0: none, for runs cheaper to redo); workdir/
    metrics.jsonl one line per logged step, also sent to `writer` (a `tracking.Writer`;
    default: TensorBoard event files in workdir/tensorboard when tensorboardX is installed,
    closed at the end — a writer passed in stays open). Raises NonFiniteError naming the
    step when the loss or gradient is not finite; the last good checkpoint stays on disk.
    """
    workdir = Path(workdir)
    if getattr(batcher, "topk", None) is not None:  # a supervision.TopkBatcher: fail early
        check_topk_temperature(cfg)
    if cfg.needs_teacher and teacher is None:
        raise ValueError(f"format {cfg.format!r} needs a teacher (it has a KL term)")
    mesh = mesh or sharding_lib.make_mesh(devices=jax.devices()[:1])
    s_graphdef, _ = nnx.split(student)
    t_graphdef, t_params = (None, None) if teacher is None else \
        (nnx.split(teacher)[0], pure_params(teacher))
    _check_global(student, teacher)
    load_batch, rows = _batch_loader(batcher, mesh)  # checks the batch fits the mesh
    settings = run_settings(cfg, batcher, student)
    if checkpoint_every:
        check_resume_settings(workdir, settings)
    state, frozen, t_params, state_sh = _place(student, t_params, mesh, cfg)
    manager = None if not checkpoint_every else ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep_checkpoints,
                                             enable_async_checkpointing=False))
    resumed_from = None if manager is None else manager.latest_step()
    if resumed_from is not None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = manager.restore(resumed_from, args=ocp.args.StandardRestore(abstract))
        log(f"resumed from step {resumed_from} ({workdir / 'checkpoints'})")
        _truncate_metrics(workdir / "metrics.jsonl", resumed_from)
    replicated = sharding_lib.NamedSharding(mesh, sharding_lib.P())
    # fixed out_shardings: the state keeps its layout step after step, metrics are replicated
    # so every process can read them
    step_fn = jax.jit(make_step(s_graphdef, t_graphdef, cfg), donate_argnums=0,
                      out_shardings=(state_sh, replicated))
    if manager is not None and sharding_lib.is_writer():
        files.atomic_write(workdir / SETTINGS_FILE, json.dumps(settings, indent=1))
    if jax.process_count() > 1:
        log(f"process {jax.process_index()} of {jax.process_count()} loads batch rows "
            f"{_spans(rows)} of {batcher.batch_size} per micro-batch")
    start = int(state.step)
    tokens_per_step = batcher.rows_per_step * batcher.seq_len
    meter = _Meter(start, tokens_per_step, devices=mesh.size, dtype=cfg.compute_dtype)
    metrics = {}
    owned = writer is None
    if owned:
        writer = tracking.open_writer(tracking.DEFAULT, logdir=workdir / "tensorboard")

    def finish(done, metrics):
        """Reads a step's metrics (the host's only wait for the device), stops on a
        non-finite step, logs every `log_every` steps."""
        if not float(metrics["finite"]):
            last = None if manager is None else manager.latest_step()
            kept = (f"the last good checkpoint is step {last} in {workdir / 'checkpoints'}"
                    if last is not None else "no checkpoint was written before it")
            raise NonFiniteError(
                f"non-finite loss or gradient at step {done} (loss {float(metrics['loss'])}, "
                f"grad norm {float(metrics['grad_norm'])}); {kept}; lower the learning rate, "
                "check the data, or check the teacher for NaN weights")
        meter.tick(done)
        if done % log_every == 0 or done == cfg.steps or done == start + 1:
            speed = meter.speed()
            row = {"step": done, **{k: float(v) for k, v in metrics.items()}, **speed}
            _append_metrics(workdir / "metrics.jsonl", row)
            writer.scalars(done, {k: v for k, v in row.items() if v is not None}, prefix="train")
            terms = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()
                             if k in ("loss", "trace_kl", "trace_ce", "answer_kl", "answer_ce",
                                      "union_kl", "union_ce", "grad_norm"))
            log(f"step {done}/{cfg.steps} {terms} | {meter.line(speed)} | ETA "
                f"{meter.eta(cfg.steps - done):,.0f}s")

    pending = None  # the last dispatched step, its metrics not read yet
    for step in range(start, cfg.steps):
        batch = load_batch(step)
        if meter.flops_per_step is None:
            meter.flops_per_step = batch_flops(batch, student.config,
                                               teacher and teacher.config, cfg)
        with jax.set_mesh(mesh):  # kernels that XLA cannot partition shard_map over it
            state, metrics = step_fn(state, frozen, t_params, batch)
        done = step + 1
        if pending is not None:  # read step N while step N + 1 runs (no per-step host sync)
            finish(*pending)
        pending = (done, metrics)
        if manager is not None and (done % checkpoint_every == 0 or done == cfg.steps):
            finish(*pending)  # a checkpoint only of a step known to be finite
            pending = None
            manager.save(done, args=ocp.args.StandardSave(state))
    if pending is not None:
        finish(*pending)
    if manager is not None:
        manager.wait_until_finished()
    if owned:
        writer.close()
    final = student_params(state.params, frozen, dataclasses.replace(cfg, lora_dropout=0.0))
    trained = nnx.merge(s_graphdef, final)
    if getattr(student, "source_path", None):
        trained.source_path = student.source_path
    return RunResult(student=trained, steps_run=cfg.steps - start, resumed_from=resumed_from,
                     tokens_seen=cfg.steps * tokens_per_step, seconds=meter.elapsed(),
                     final_metrics={k: float(v) for k, v in metrics.items()},
                     throughput=meter.speed())


def batch_flops(batch: dict, student: ModelConfig, teacher: ModelConfig | None,
                cfg: DistillConfig) -> float:
    """Model FLOPs of one step on this batch's shapes (`models.flops`): the lm-head at the
    supervised positions the batch names, the teacher's forward when the step runs it."""
    accum, rows, seq_len = batch["tokens"].shape
    lm = None if "supervised" not in batch else rows * batch["supervised"].shape[-1]
    online_teacher = cfg.needs_teacher and "topk_ids" not in batch
    return accum * flops_lib.step_flops(
        student, teacher if online_teacher else None, batch=rows, seq_len=seq_len,
        lm_positions=lm, lora=bool(cfg.lora_rank))


class _Meter:
    """Step times and the speeds shown in progress lines and rows. The first step's time
    is compilation mostly: the rates are over the steps after it once there are any."""

    def __init__(self, start: int, tokens_per_step: int, *, devices: int, dtype: str):
        self.start, self.tokens, self.devices, self.dtype = start, tokens_per_step, devices, dtype
        self.device_kind = jax.devices()[0].device_kind
        self.flops_per_step = None
        self.t0 = time.perf_counter()
        self.first = None  # (step, time) when the first step's metrics were read
        self.last = None

    def tick(self, done: int):
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
        self.last = (done, now)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step_seconds(self) -> float | None:
        if self.last is None:
            return None
        (s0, t0), (s1, t1) = self.first, self.last
        if s1 > s0:
            return (t1 - t0) / (s1 - s0)
        return (t1 - self.t0) / max(s1 - self.start, 1)  # only the first step so far

    def speed(self) -> dict:
        sec = self.step_seconds()
        if sec is None:  # no step ran (a resumed run that was already done)
            return {}
        out = {"step_s": sec, "tokens_per_s": self.tokens / sec, "elapsed_s": self.elapsed()}
        if self.flops_per_step:
            out.update(flops_lib.utilisation(self.flops_per_step, sec, devices=self.devices,
                                             device_kind=self.device_kind, dtype=self.dtype))
        return out

    def line(self, speed: dict) -> str:
        text = f"{speed['tokens_per_s']:,.0f} tok/s"
        if "model_tflops_per_s" in speed:
            text += f" | {speed['model_tflops_per_s']:.3g} TFLOP/s"
            if speed["mfu"] is not None:
                text += f" MFU {100 * speed['mfu']:.1f}%"
        return text

    def eta(self, steps_left: int) -> float:
        return steps_left * (self.step_seconds() or 0.0)


SETTINGS_FILE = "run_settings.json"  # beside the checkpoints: what a resume must match


def run_settings(cfg: DistillConfig, batcher, student) -> dict:
    """What a resumed run must share with the checkpointed one: the optimisation (but
    `steps`: a run may be extended; `remat` changes memory, not results), the batches and
    the student's size (JSON-ready)."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("steps", "remat")}
    return {"config": json.loads(json.dumps(config, default=str)),
            "batches": {"kind": type(batcher).__name__, "batch_size": batcher.batch_size,
                        "accum": batcher.accum, "seq_len": batcher.seq_len,
                        "seed": getattr(batcher, "seed", None),
                        "first_step": getattr(batcher, "first_step", 0),
                        "examples": len(getattr(batcher, "encoded", ()))},
            "student": {"params": student.config.num_params()}}


def check_resume_settings(workdir, settings: dict) -> None:
    """Raises when `workdir` holds checkpoints of a run with other settings (resuming them
    would silently mix two runs)."""
    path = Path(workdir) / SETTINGS_FILE
    if not path.exists() or not (Path(workdir) / "checkpoints").exists():
        return
    old = json.loads(path.read_text())
    diffs = [f"{group}.{k}: {old.get(group, {}).get(k)!r} -> {v!r}"
             for group, values in settings.items() for k, v in values.items()
             if old.get(group, {}).get(k) != v]
    if diffs:
        raise ValueError(f"{workdir} holds checkpoints of a run with other settings "
                         f"({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}); rerun "
                         "with the same settings to resume, or give another --workdir/--out "
                         "(or delete that folder) to start afresh")


def _check_global(*models):
    """Multi-process runs need every model already on the global mesh: a process cannot put
    its local arrays onto another process's devices."""
    if jax.process_count() == 1:
        return
    for model in models:
        if model is not None and any(getattr(x, "is_fully_addressable", False)
                                     for x in jax.tree_util.tree_leaves(pure_params(model))):
            raise ValueError("in a multi-process run load the student and teacher onto the "
                             "global mesh: jdistill.load_pretrained(path, mesh=mesh)")


def _place(student, t_params, mesh, cfg):
    """(state, frozen, teacher params, state shardings), built on the mesh.

    The initial state comes out of one jitted init whose out_shardings place it: params by
    the rules table, optimizer moments like their params, the rest (step, rng, LoRA adapters,
    which are small) replicated. Nothing is built on one device and then copied out, so it
    works the same across processes.
    """
    def shard(tree):
        return None if tree is None else sharding_lib.shard_state(tree, mesh)

    replicated = sharding_lib.NamedSharding(mesh, sharding_lib.P())
    base = shard(pure_params(student))
    abstract, _ = jax.eval_shape(lambda b: init_state_from(b, cfg), base)
    if cfg.lora_rank:
        param_sh = jax.tree_util.tree_map(lambda _: replicated, abstract.params)
    else:
        param_sh = sharding_lib.state_shardings(abstract.params, mesh)
    opt_sh = optax.tree_map_params(  # moments take their parameter's sharding
        make_optimizer(cfg), lambda _, sh: sh, abstract.opt_state, param_sh,
        transform_non_params=lambda _: replicated)
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)

    def init(b):  # a copy of the params: the step donates its state, not the caller's model
        state, _ = init_state_from(b, cfg)
        return jax.tree_util.tree_map(jnp.copy, state)

    state = jax.jit(init, out_shardings=state_sh)(base)
    teacher = None
    if t_params is not None:  # cast and stacked on the mesh, as the student's state is
        prepare = lambda t: teacher_inputs(t, cfg)  # noqa: E731
        t_sh = sharding_lib.state_shardings(jax.eval_shape(prepare, t_params), mesh)
        teacher = jax.jit(prepare, out_shardings=t_sh)(shard(t_params))
    return state, (base if cfg.lora_rank else None), teacher, state_sh


def _batch_loader(batcher, mesh):
    """step -> the global batch, this process loading only the rows its devices hold.

    Batch arrays are [accum, batch, ...] with the batch axis over the mesh's batch axes. A
    batcher whose `batch` takes `rows` builds only those rows; any other is sliced after
    building the whole host batch (same result, more host work).
    """
    axes = tuple(a for a in sharding_lib.RULES["batch"] if a in mesh.shape)
    ways = math.prod(mesh.shape[a] for a in axes)
    if batcher.batch_size % ways:
        raise ValueError(f"batch size {batcher.batch_size} is not a multiple of the mesh's "
                         f"batch ways (data x fsdp = {ways}); use a batch size divisible by "
                         f"{ways} or change --mesh")
    sharding = sharding_lib.NamedSharding(mesh, sharding_lib.P(None, axes))
    lead = (batcher.accum, batcher.batch_size)
    rows = sharding_lib.local_rows(sharding, lead, axis=1)
    takes_rows = "rows" in inspect.signature(batcher.batch).parameters

    def load(step):
        if takes_rows:
            local = batcher.batch(step, rows=rows)
        else:
            local = {k: v[:, rows] for k, v in batcher.batch(step).items()}
        return {k: sharding_lib.from_local_rows(v, rows, sharding, lead + v.shape[2:], axis=1)
                for k, v in local.items()}

    return load, rows


def _spans(rows) -> str:
    """[0, 1, 2, 5, 6] -> '0-2,5-6'."""
    out, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r != start else f"{r}")
            start = None
    return ",".join(out)


def _append_metrics(path: Path, row: dict):
    if jax.process_index() != 0:
        return
    # nothing else need create the workdir: no checkpoints, no tensorboardX
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int):
    """On resume, drop metric lines logged after the checkpoint (they will be logged again)."""
    if jax.process_index() != 0 or not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    files.atomic_write(path, "".join(line + "\n" for line in keep))

