"""One study cell end to end: teacher correction -> prune -> distill -> evaluate -> a row.

The same library calls the single-stage mains make (`experiments.correct_teacher`, `prune`,
`supervise`, `distill`, `evaluate`), run in one process so that a sweep pays Python/JAX
start-up and XLA compilation once per shape rather than once per main. Every stage shared
between cells is cached by its inputs in CACHE/ (see `sweep.cached_stage`): the corrected
teacher, the teacher's importance scores and evaluation, CoT traces, the pruned models.

Stage keys include the *identity* of their inputs (teacher files by size and mtime, data
files by content, all settings), so a changed input recomputes exactly what depends on it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

import jdistill
from jdistill import checkpoints, pruning
from jdistill.data import batching as packing
from jdistill.data import io as data
from jdistill.data import tasks
from jdistill.distill import formats, records, supervision, train
from jdistill.eval import benchmarks, classify
from jdistill.pruning import report as prune_report
from jdistill.study import rows, sweep
from jdistill.utils import files
from jdistill.utils import tracking
from jdistill.utils.progress import fmt_time

SHORT_RUN_STEPS = 50  # runs shorter than this are not checkpointed
# settings that change how a student is measured, not the student
EVAL_FIELDS = ("eval_split", "eval_examples", "general", "general_limit", "eval_batch_size")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a study cell depends on besides the cell itself."""

    teacher: str                       # HF directory or .gguf file
    task: str = tasks.DEFAULT_TASK     # shipped task name or a labelled data file
    train_split: str = "train"
    eval_split: str = "test"
    eval_examples: int = 200           # in-domain test examples (stratified, seeded)
    general: tuple = ("arc_easy", "piqa")
    general_limit: int = 100
    eval_batch_size: int = 16
    # teacher correction (0 steps: use the teacher as it is)
    correction_steps: int = 30
    correction_learning_rate: float = 5e-5
    correction_examples: int = 512
    # pruning
    axes: tuple = ("mlp", "heads", "hidden")
    importance: str = "activation"
    calib_samples: int = 64
    calib_seq_len: int = 64
    # distillation
    steps: int = 40
    batch_size: int = 8                # packed rows of seq_len tokens per step
    seq_len: int = 96
    learning_rate: float = 2e-4
    warmup_steps: int = 4
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_learning_rate: float = 1e-3
    # training's forward/backward dtype (f32 master weights either way): bfloat16 on GPUs and
    # TPUs (cuDNN's fused attention needs it); float32 on CPUs, where bf16 bought no speed
    compute_dtype: str = "float32"
    # CoT traces
    trace_max_new_tokens: int = 40
    trace_batch_size: int = 16
    # 0: greedy traces (one set for every seed); > 0: sampled, the cell's seed draws them
    trace_temperature: float = 0.0
    trace_top_p: float = 1.0

    def __post_init__(self):
        if self.compute_dtype not in train.DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: use one of "
                             f"{sorted(train.DTYPES)}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


IN_DOMAIN_METRICS = ("accuracy", "accuracy_stderr", "macro_f1", "macro_f1_stderr", "nll",
                     "nll_stderr", "brier", "brier_stderr", "n")


def in_domain_metrics(result: dict, prefix: str) -> dict:
    """The row's in-domain fields of a `classify` result, under `prefix`."""
    return {prefix + k: result[k] for k in IN_DOMAIN_METRICS}


def load_task(spec: str, train_split: str, eval_split: str) -> tasks.TaskSpec:
    """A shipped task name, a Hugging Face data set (hub name or save_to_disk folder), or the
    user's files as "train=FILE,test=FILE" (a study needs a split to train on and a disjoint
    one to evaluate)."""
    if "=" in spec:
        try:
            paths = dict(kv.split("=", 1) for kv in spec.split(","))
        except ValueError:
            paths = {}
        if set(paths) != {train_split, eval_split}:
            raise ValueError(f"task {spec!r}: name both splits of your data, e.g. "
                             f"{train_split}=train.csv,{eval_split}=test.csv (text/headline + "
                             "label columns)")
        return tasks.task_from_file(paths, name=Path(paths[train_split]).stem)
    task = tasks.get_task(spec)
    missing = [s for s in (train_split, eval_split) if s not in task.splits]
    if missing:
        raise ValueError(f"task {spec!r} has splits {sorted(task.splits)}, not {missing}; "
                         "choose them with --set=train_split=NAME,eval_split=NAME")
    return task


class Runner:
    """Shared state of a sweep process: the teacher, task, caches and mesh."""

    def __init__(self, settings: Settings, cache_dir, *, mesh=None,
                 log: Callable[[str], None] = print):
        self.s, self.cache, self.mesh, self.log = settings, Path(cache_dir), mesh, log
        self.task = load_task(settings.task, settings.train_split, settings.eval_split)
        self._teacher_dir = None
        self._models = {}

    # ------------------------------------------------------------ inputs

    @property
    def original_teacher_dir(self) -> Path:
        t = checkpoints.resolve(self.s.teacher)
        if not (t / "config.json").exists():
            raise FileNotFoundError(f"teacher {t}: no config.json; give an HF checkpoint "
                                    "directory or a .gguf file")
        return t

    def train_examples(self, n: int) -> list:
        """The first n of the nested, stratified, seeded train subsets (size is swept)."""
        return tasks.subsample(tasks.load_split(self.task, self.s.train_split), n, seed=0)

    def eval_examples(self) -> list:
        examples = tasks.load_split(self.task, self.s.eval_split)
        n = min(self.s.eval_examples, len(examples))
        return tasks.subsample(examples, n, seed=0)

    def _identity(self, path) -> dict:
        return supervision.model_identity(path)

    # ------------------------------------------------------------ teacher

    def teacher_dir(self) -> Path:
        """The corrected teacher (fine-tuned on the task; cached), or the teacher itself."""
        if self._teacher_dir is not None:
            return self._teacher_dir
        original = self.original_teacher_dir
        if self.s.correction_steps == 0:
            self._teacher_dir = original
            return original
        examples = self.train_examples(min(self.s.correction_examples,
                                           len(tasks.load_split(self.task,
                                                                self.s.train_split))))
        settings = {k: getattr(self.s, k) for k in
                    ("task", "train_split", "correction_steps", "correction_learning_rate",
                     "correction_examples", "batch_size", "seq_len", "compute_dtype")}
        key = sweep.stage_key(teacher=self._identity(original), packed=True, **settings)

        def build(tmp):
            self.log(f"[teacher correction] {self.s.correction_steps} steps of label CE on "
                     f"{len(examples)} {self.task.name} examples")
            model = jdistill.load_pretrained(original, mesh=self.mesh)
            records = tasks.to_records(self.task, examples)
            cfg = train.DistillConfig(steps=self.s.correction_steps, format="label",
                                      learning_rate=self.s.correction_learning_rate,
                                      warmup_steps=min(5, self.s.correction_steps - 1),
                                      compute_dtype=self.s.compute_dtype)
            # a stable workdir (not inside tmp): a killed correction resumes from its checkpoint
            run_dir = self.cache / f"teacher-{key[:16]}.run"
            result = self._train(model, None, records, cfg, run_dir, with_reasoning=False)
            jdistill.save_pretrained(result.student, tmp / "model")
            files.atomic_write_json(tmp / "correction.json", {
                "teacher": str(original), "examples": len(examples), "settings": settings,
                "final_metrics": result.final_metrics, "seconds": result.seconds})
            shutil.rmtree(run_dir, ignore_errors=True)

        self._teacher_dir = sweep.cached_stage(self.cache, "teacher", key, build,
                                               self.log) / "model"
        return self._teacher_dir

    def teacher(self):
        return self._load(self.teacher_dir())

    def _load(self, path):
        path = str(path)
        if path not in self._models:  # the teacher is used by many cells: load it once
            self._models = {path: jdistill.load_pretrained(path, mesh=self.mesh)}
        return self._models[path]

    # ------------------------------------------------------------ pruning

    def calibration(self, model_dir):
        tok = data.load_tokenizer(model_dir)
        texts = [tasks.prompt(self.task, t) for t, _ in self.train_examples(
            min(1024, len(tasks.load_split(self.task, self.s.train_split))))]
        batches = data.calibration_batches(tok, texts, num_samples=self.s.calib_samples,
                                           seq_len=self.s.calib_seq_len, batch_size=8, seed=0)
        return batches

    def scores(self, model, model_key: str) -> dict:
        """Importance scores of `model` on the task's calibration prompts (cached)."""
        key = sweep.stage_key(model=model_key, importance=self.s.importance,
                              samples=self.s.calib_samples, seq_len=self.s.calib_seq_len,
                              task=self.s.task)

        def build(tmp):
            t0 = time.perf_counter()
            batches = self.calibration(self.teacher_dir())
            s = pruning.compute_scores(model, batches, self.s.importance, "block")
            prune_report.save_scores(tmp / "scores.npz",
                                     jax.tree_util.tree_map(np.asarray, s))
            prune_report.plot_scores(jax.tree_util.tree_map(np.asarray, s),
                                     tmp / "importance.png",
                                     title=f"{self.s.importance} importance")
            self.log(f"[scores] {time.perf_counter() - t0:.1f}s")

        return prune_report.load_scores(
            sweep.cached_stage(self.cache, "scores", key, build, self.log) / "scores.npz")

    def prune_to(self, model, ratio: float, model_key: str):
        """`model` (the teacher or a chain's student; scores cached) pruned to the one
        architecture of `ratio` (`pruning.dims_within` says why): one-shot and chain
        students of a ratio have the same shape, so the schedules differ in the path only."""
        scores = self.scores(model, model_key)
        dims = pruning.dims_within(self.teacher().config, ratio, list(self.s.axes),
                                   pruning.Dims.of(model.config))
        masks = pruning.select_masks(scores, model.config, dims)
        return pruning.slice_model(model, masks, mesh=self.mesh)

    def one_shot(self, ratio: float) -> Path:
        """The teacher pruned to `ratio` in one step (cached, shared by formats/methods)."""
        t_dir = self.teacher_dir()
        key = sweep.stage_key(teacher=self._identity(t_dir), ratio=ratio, axes=self.s.axes,
                              importance=self.s.importance, samples=self.s.calib_samples,
                              seq_len=self.s.calib_seq_len, task=self.s.task)

        def build(tmp):
            student = self.prune_to(self.teacher(), ratio,
                                    json.dumps(self._identity(t_dir), sort_keys=True))
            self.log(f"[prune] ratio {ratio:g}: {pruning.Dims.of(student.config).as_dict()} "
                     f"-> {student.config.num_params():,} params")
            jdistill.save_pretrained(student, tmp / "model")

        return sweep.cached_stage(self.cache, "pruned", key, build, self.log) / "model"

    # ------------------------------------------------------------ distillation

    def records(self, fmt: str, examples: list, seed: int = 0) -> tuple[list[dict], dict]:
        prompts = [tasks.prompt(self.task, t) for t, _ in examples]
        answers = [tasks.answer(self.task, y) for _, y in examples]
        settings = supervision.TraceSettings(max_new_tokens=self.s.trace_max_new_tokens,
                                             batch_size=self.s.trace_batch_size,
                                             temperature=self.s.trace_temperature,
                                             top_p=self.s.trace_top_p, seed=seed,
                                             recipe="{prompt}")
        t_dir = self.teacher_dir()
        return records.build_records(
            fmt, prompts, answers, texts=[t for t, _ in examples],
            gold=[y for _, y in examples], label_names=list(self.task.label_names),
            teacher_dir=t_dir, cache_dir=self.cache / "traces", settings=settings,
            model=self.teacher() if formats.get(fmt).with_trace else None, log=self.log)

    def _train(self, student, teacher, records, cfg, workdir, *, with_reasoning: bool,
               writer=None, first_step: int = 0):
        tok = data.load_tokenizer(student.source_path)
        encoded = supervision.encode_records(tok, records, student.config,
                                             with_reasoning=with_reasoning)
        cut = sum(len(ids) > self.s.seq_len + 1 for ids, _ in encoded)
        if cut:
            self.log(f"warning: {cut}/{len(encoded)} examples are longer than seq_len="
                     f"{self.s.seq_len} and lose their answer tokens; raise seq_len")
        pad = student.config.pad_token_id if student.config.pad_token_id is not None else 0
        # packed rows: task examples are a fraction of seq_len, and packing computes each
        # exactly as alone (packing.py), so a step sees more examples for the same FLOPs
        batcher = packing.PackedBatcher(encoded, batch_size=self.s.batch_size,
                                        seq_len=self.s.seq_len, seed=cfg.seed, pad_id=pad,
                                        first_step=first_step)
        # a run of a few minutes is cheaper to redo than to checkpoint (~1 GB per save)
        every = 0 if cfg.steps < SHORT_RUN_STEPS else max(10, cfg.steps // 4)
        return train.train(student, teacher, batcher, cfg, workdir=workdir, mesh=self.mesh,
                           checkpoint_every=every, keep_checkpoints=1,
                           log_every=max(1, cfg.steps // 5), log=self.log, writer=writer)

    def distill_config(self, cell: sweep.Cell, steps: int) -> train.DistillConfig:
        lora = cell.method == "lora"
        return train.DistillConfig(
            steps=steps, format=cell.format, seed=cell.seed,
            learning_rate=self.s.lora_learning_rate if lora else self.s.learning_rate,
            warmup_steps=min(self.s.warmup_steps, steps - 1),
            lora_rank=self.s.lora_rank if lora else 0, lora_alpha=self.s.lora_alpha,
            compute_dtype=self.s.compute_dtype)

    def distill(self, cell: sweep.Cell, student, records, workdir, steps: int, writer=None,
                first_step: int = 0):
        cfg = self.distill_config(cell, steps)
        teacher = self.teacher() if cfg.needs_teacher else None
        return self._train(student, teacher, records, cfg, workdir,
                           with_reasoning=formats.get(cell.format).with_trace, writer=writer,
                           first_step=first_step)

    def student_for(self, cell: sweep.Cell, records, workdir: Path, writer=None):
        """(trained student, train seconds, tokens seen, final train metrics, throughput)
        for a cell. One-shot prunes the teacher once and distils `cell.recovery_rounds` x
        `steps`; iterative walks the cell's chain (`chain_step`, each step cached), so
        seconds and tokens are those of the whole chain up to this student."""
        if cell.schedule == "one_shot":
            student = self._load_fresh(self.one_shot(cell.ratio))
            r = self.distill(cell, student, records, workdir / "distill",
                             self.s.steps * cell.recovery_rounds, writer)
            return r.student, r.seconds, r.tokens_seen, r.final_metrics, r.throughput
        done = None
        for k in range(1, len(cell.chain) + 1):
            done = self.chain_step(cell, k, records, workdir, writer)
        info = json.loads((done / "recovery.json").read_text())
        return (self._load_fresh(done / "model"), info["chain_seconds"],
                info["chain_tokens"], info["final_metrics"], info["throughput"])

    def chain_key(self, cell: sweep.Cell, k: int) -> str:
        """Step k of a chain: what its student depends on (not the evaluation settings)."""
        train_settings = {f: v for f, v in self.s.as_dict().items() if f not in EVAL_FIELDS}
        return sweep.stage_key(teacher=self._identity(self.teacher_dir()),
                               chain=cell.chain[:k], format=cell.format, method=cell.method,
                               examples=cell.examples, seed=cell.seed, task=self.s.task,
                               settings=train_settings, stream="continued",
                               shapes="one_per_ratio")  # steps cached before dims_within differ

    def chain_step(self, cell: sweep.Cell, k: int, records, workdir: Path, writer=None) -> Path:
        """The stage directory of step k of `cell`'s chain: step k-1's recovered student (the
        teacher for k = 1) re-scored, pruned to chain[k-1] and recovered by `steps` of
        distillation; model/ and recovery.json (this step's and the chain's seconds and
        tokens). Cached, so the cells along one chain (and a rerun) share the prefix."""
        key = self.chain_key(cell, k)

        def build(tmp):
            if k == 1:
                model, before = self.teacher(), {"chain_seconds": 0.0, "chain_tokens": 0}
                model_key = json.dumps(self._identity(self.teacher_dir()), sort_keys=True)
            else:
                prev = self.chain_step(cell, k - 1, records, workdir, writer)
                model = self._load_fresh(prev / "model")
                before = json.loads((prev / "recovery.json").read_text())
                model_key = self.chain_key(cell, k - 1)
            target = cell.chain[k - 1]
            model = self.prune_to(model, target, model_key)
            self.log(f"[prune] chain step {k}/{len(cell.chain)}: ratio {target:.3g} -> "
                     f"{model.config.num_params():,} params")
            # one curve and one batch stream along the chain: each recovery continues the
            # previous one's steps and examples (as one-shot's single run does), rather than
            # seeing the stream's first batches again
            done = self.s.steps * (k - 1)
            r = self.distill(cell, model, records, workdir / f"chain{k}", self.s.steps,
                             writer and writer.shifted(done), first_step=done)
            jdistill.save_pretrained(r.student, tmp / "model")
            files.atomic_write_json(tmp / "recovery.json", {
                "ratio": target, "step": k, "seconds": r.seconds, "tokens": r.tokens_seen,
                "chain_seconds": before["chain_seconds"] + r.seconds,
                "chain_tokens": before["chain_tokens"] + r.tokens_seen,
                "final_metrics": r.final_metrics, "throughput": r.throughput})
            shutil.rmtree(workdir / f"chain{k}", ignore_errors=True)

        return sweep.cached_stage(self.cache, "chain", key, build, self.log)

    def _load_fresh(self, path):
        return jdistill.load_pretrained(path, mesh=self.mesh)

    # ------------------------------------------------------------ evaluation

    def evaluate(self, model, label: str, fmt: str | None = None) -> dict:
        """In-domain accuracy / macro-F1 / gold-label NLL / Brier (label log-likelihoods)
        and the general benchmarks. A student of a trace format is also scored the way it
        was trained (its own greedy trace, then the labels): that score is the row's
        in_domain_* (in_domain_scoring says which), the direct one in_domain_direct_*."""
        tok = data.load_tokenizer(model.source_path or self.teacher_dir())
        examples = self.eval_examples()
        bs = self.s.eval_batch_size
        direct = classify.evaluate_classification(model, tok, self.task, examples,
                                                  batch_size=bs, mesh=self.mesh,
                                                  progress=f"{label} in-domain")
        m = {**in_domain_metrics(direct, "in_domain_direct_"),
             "in_domain_chance": 1.0 / self.task.num_classes}
        if fmt is not None and formats.get(fmt).with_trace:
            traced = classify.evaluate_after_trace(
                model, tok, self.task, examples, max_new_tokens=self.s.trace_max_new_tokens,
                batch_size=bs, mesh=self.mesh, separator=records.TRACE_SEPARATOR,
                progress=f"{label} in-domain after trace")
            m.update(in_domain_metrics(traced, "in_domain_trace_"),
                     in_domain_trace_tokens=traced["trace_tokens"])
            m.update(in_domain_metrics(traced, "in_domain_"), in_domain_scoring="after_trace")
        else:
            m.update(in_domain_metrics(direct, "in_domain_"), in_domain_scoring="direct")
        m["in_domain_error"] = 1.0 - m["in_domain_accuracy"]
        general = {}
        for name in self.s.general:
            items = benchmarks.load_benchmark(name, limit=self.s.general_limit, seed=0)
            g = benchmarks.evaluate_mc(model, tok, items, batch_size=bs, mesh=self.mesh,
                                     progress=f"{label} {name}")
            general[name] = {**g, "chance": float(np.mean([1 / len(it.choices)
                                                           for it in items]))}
        if general:
            scores = [g["acc_norm"] for g in general.values()]
            errs = [g["acc_norm_stderr"] for g in general.values()]
            m.update({"general": general, "general_score": float(np.mean(scores)),
                      "general_score_stderr": float(np.sqrt(np.sum(np.square(errs)))
                                                    / len(errs)),
                      "general_chance": float(np.mean([g["chance"]
                                                       for g in general.values()]))})
        return m

    def eval_key(self) -> dict:
        return {k: getattr(self.s, k) for k in ("task", "eval_split", "eval_examples",
                                                 "general", "general_limit")}

    def teacher_row(self, corrected: bool = True) -> dict:
        """The reference row (compression 1.0) of the corrected (or original) teacher."""
        t_dir = self.teacher_dir() if corrected else self.original_teacher_dir
        main = "sweep_teacher" if corrected else "sweep_teacher_original"
        start = time.perf_counter()
        key = sweep.stage_key(model=self._identity(t_dir), **self.eval_key())

        def build(tmp):
            model = self._load(t_dir)
            label = "teacher" if corrected else "original teacher"
            files.atomic_write_json(tmp / "metrics.json", {
                "params": model.config.num_params(), "metrics": self.evaluate(model, label)})

        done = json.loads((sweep.cached_stage(self.cache, "teacher_eval", key, build, self.log)
                           / "metrics.json").read_text())
        n = done["params"]
        cell = {"id": "teacher" if corrected else "teacher-original", "ratio": 1.0,
                "format": "teacher", "method": "none", "schedule": "none", "prune_steps": 0,
                "examples": 0, "seed": 0}
        return rows.new_row(main, cell, teacher_params=n, student_params=n,
                            metrics=done["metrics"],
                            teacher={"path": str(t_dir), "original": str(self.s.teacher)},
                            data={"task": self.task.name, "examples": 0},
                            settings=self.s.as_dict(), wall_time_s=time.perf_counter() - start)

    # ------------------------------------------------------------ a cell

    def run_cell(self, cell: sweep.Cell, work_dir: Path, writer=None) -> dict:
        """Runs one cell (resuming its training checkpoints) and returns its results row;
        training curves go to `writer` (a `tracking.Writer`) too."""
        start = time.perf_counter()
        examples = self.train_examples(cell.examples)
        records, trace_stats = self.records(cell.format, examples, cell.seed)
        student, train_s, tokens, train_metrics, throughput = self.student_for(
            cell, records, Path(work_dir), writer)
        teacher_params = self.teacher().config.num_params()
        n = student.config.num_params()
        metrics = self.evaluate(student, cell.id, cell.format)
        return rows.new_row(
            "sweep_cell", cell.as_dict(), teacher_params=teacher_params, student_params=n,
            metrics=metrics, student_dims=pruning.Dims.of(student.config).as_dict(),
            teacher={"path": str(self.teacher_dir()), "original": str(self.s.teacher)},
            data={"task": self.task.name, "examples": cell.examples, "records": len(records),
                  "traces": trace_stats, "tokens_seen": tokens},
            settings=self.s.as_dict(), train_seconds=train_s, train_metrics=train_metrics,
            throughput=throughput,
            wall_time_s=time.perf_counter() - start)


# ------------------------------------------------------------ the sweep


def enable_compilation_cache(directory) -> None:
    """Persist XLA executables in `directory` (beside the stage cache): a rerun (or another
    shard on the same file system) skips the minutes a CPU spends compiling a 30-layer step."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def run_sweep(out: Path, g: sweep.Grid, s: Settings, cells, *, cache_dir, mesh=None,
              loggers=(), original_teacher: bool = True, log=print) -> int:
    """Teacher rows, then every unfinished cell (each logged to `loggers`, one tracking run
    per cell); returns the number of cells run. Resumable: finished cells are skipped."""
    study = Runner(s, cache_dir, mesh=mesh, log=log)
    start = time.perf_counter()
    refs = [("teacher", True)] + ([("teacher-original", False)]
                                  if original_teacher and s.correction_steps else [])
    for name, corrected in refs:
        if not sweep.is_done(out, name):
            log(f"[sweep] evaluating the {'corrected ' if corrected else 'original '}teacher")
            sweep.write_row(out, name, study.teacher_row(corrected))
    todo = [c for c in cells if not sweep.is_done(out, c.id)]
    log(f"[sweep] {len(cells)} cells in this shard, {len(cells) - len(todo)} done, "
        f"{len(todo)} to run")
    cell_times = []
    for i, cell in enumerate(todo, 1):
        eta = (f", ETA {fmt_time(sum(cell_times) / len(cell_times) * (len(todo) - i + 1))}"
               if cell_times else "")
        log(f"[sweep] cell {i}/{len(todo)} {cell.id} (elapsed "
            f"{fmt_time(time.perf_counter() - start)}{eta})")
        t0 = time.perf_counter()
        with tracking.open_writer(loggers, logdir=out / "cells" / cell.id / "logs",
                                  run=cell.id, group=out.resolve().name,
                                  config={**cell.as_dict(), **s.as_dict()}) as writer:
            row = study.run_cell(cell, out / "cells" / cell.id, writer)
            writer.summary(row["metrics"])
        sweep.write_row(out, cell.id, row)
        cell_times.append(time.perf_counter() - t0)
        m = row["metrics"]
        log(f"[sweep] {cell.id}: ratio {row['compression_ratio']:.2f}, in-domain acc "
            f"{m['in_domain_accuracy']:.3f}" + (f", general {m['general_score']:.3f}"
                                                 if "general_score" in m else "")
            + f" ({fmt_time(cell_times[-1])})")
    return len(todo)
