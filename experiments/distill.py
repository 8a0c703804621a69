"""Distil a (pruned) student from its teacher under one supervision format.

  python -m experiments.distill --teacher=DIR --student=DIR --data=FILE.jsonl \
      --format=blended --loss=forward --lora_rank=0 --steps=200 --out=DIR

--data holds {"prompt", "answer", optional "reasoning"} records (formats cot and blended
need the reasoning: `python -m experiments.supervise --mode=traces` writes it); with
--topk=FILE (from `experiments.supervise --mode=topk`) the KL term comes from the cached
teacher top-k log-probs and the teacher is never loaded. --pack puts several short examples
in each --seq_len row (each attends only to itself), so fewer positions are padding.

Rerunning a killed command resumes from the last checkpoint in --workdir (default
OUT.run/). Writes OUT/ (the trained student as an HF checkpoint; LoRA adapters merged),
OUT.run/metrics.jsonl and one results row to OUT.run/results.jsonl (and to --results).
"""

import dataclasses
from pathlib import Path

import jax
from absl import app, flags

import jdistill
from experiments import cli
from experiments import flags as common
from jdistill import checkpoints
from jdistill.data import batching as packing
from jdistill.data import io as data
from jdistill.distill import formats, losses, supervision, train
from jdistill.models.config import load_hf_config
from jdistill.study import rows
from jdistill.utils import files
from jdistill.utils import tracking

TEACHER = flags.DEFINE_string("teacher", None, "HF checkpoint directory (or .gguf) of the teacher")
STUDENT = flags.DEFINE_string("student", None, "HF checkpoint directory of the student to train")
DATA = flags.DEFINE_string("data", None, "training records (.jsonl: prompt, answer, reasoning)")
OUT = flags.DEFINE_string("out", None, "output directory for the trained student")
WEIGHTS = flags.DEFINE_string("weights", None, "blend weights overriding the format's, e.g. "
                              "trace_kl=1,trace_ce=0.5,answer_kl=1,answer_ce=1")
TOPK = flags.DEFINE_string("topk", None, "cached teacher top-k log-probs (offline KD)")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "sequences per micro-batch")
ACCUM = flags.DEFINE_integer("accum", 1, "micro-batches per optimizer step")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "tokens per sequence (longer are cut)")
PACK = flags.DEFINE_bool("pack", False, "pack several short examples into each seq_len row "
                         "(each attends only to itself; fewer padded positions per step)")
# the optimisation's flags are DistillConfig's fields (their defaults and help live there)
CONFIG = common.define_config_flags(train.DistillConfig, names={"kind": "loss"},
                                    defaults={"steps": 100})
DTYPE = common.define_dtype("float32", "parameter dtype", choices=sorted(train.DTYPES))
WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints + metrics (default OUT.run)")
CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 50, "steps between checkpoints")
KEEP = flags.DEFINE_integer("keep_checkpoints", 3, "checkpoints kept")
LOG_EVERY = flags.DEFINE_integer("log_every", 10, "steps between progress lines")
RESULTS = flags.DEFINE_string("results", None, "also append the results row to this file")
flags.mark_flags_as_required(["student", "data", "out"])


def parse_weights(spec: str | None):
    if spec is None:
        return None
    try:
        given = {k: float(v) for k, v in (kv.split("=") for kv in spec.split(","))}
        return losses.BlendWeights(**given)
    except (ValueError, TypeError) as e:
        raise app.UsageError(f"--weights={spec!r}: {e}; expected e.g. "
                             "trace_kl=1,trace_ce=0.5,answer_kl=1,answer_ce=1")


def encode(tokenizer, records, fmt: str, config):
    """Token ids + segments per record, by `supervision.encode_records` — the encoding
    `supervise --mode=topk` caches top-k on, so a top-k file always aligns; cot/blended put
    the teacher's reasoning in between."""
    with_reasoning = formats.get(fmt).with_trace  # as supervise --mode=topk --format=FMT
    if with_reasoning and not any(r.get("reasoning") for r in records):
        raise app.UsageError(f"--format={fmt} needs 'reasoning' in the records; generate it "
                             "with `python -m experiments.supervise --mode=traces`")
    return supervision.encode_records(tokenizer, records, config, with_reasoning=with_reasoning)


def make_batcher(encoded, config, seed):
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    kw = dict(batch_size=BATCH_SIZE.value, seq_len=SEQ_LEN.value, seed=seed, accum=ACCUM.value,
              pad_id=pad)
    if TOPK.value:
        return supervision.TopkBatcher(encoded, supervision.load_topk(TOPK.value), **kw)
    if PACK.value:
        return packing.PackedBatcher(encoded, **kw)
    return data.Batcher(encoded, **kw)


def main(argv):
    del argv
    out = cli.output_dir(OUT.value)
    mesh = common.setup()
    workdir = Path(WORKDIR.value or f"{out}.run")
    cfg = train.DistillConfig(**common.config_values(CONFIG),
                              weights=parse_weights(WEIGHTS.value))
    if TOPK.value and PACK.value:
        raise app.UsageError("--pack with --topk is not supported: the top-k file stores "
                             "each example's positions unpacked; drop --pack (or --topk and "
                             "distil from the online --teacher)")
    if TOPK.value:  # before any model loads (train.train checks it too)
        try:
            train.check_topk_temperature(cfg)
        except ValueError as e:
            raise app.UsageError(str(e))
    if cfg.needs_teacher and not (TEACHER.value or TOPK.value):
        raise app.UsageError(f"--format={cfg.format} has a KL term: give --teacher (or "
                             "--topk for offline KD)")
    student = jdistill.load_pretrained(STUDENT.value, dtype=DTYPE.value, mesh=mesh)
    t_dir = teacher_dir(TEACHER.value)
    online_teacher = cfg.needs_teacher and not TOPK.value
    teacher = (jdistill.load_pretrained(t_dir, dtype=DTYPE.value, mesh=mesh)
               if online_teacher else None)
    teacher_params = (load_hf_config(t_dir / "config.json").num_params()
                      if t_dir is not None else None)
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise app.UsageError(f"teacher vocabulary {teacher.config.vocab_size} != student "
                             f"{student.config.vocab_size}: logit distillation needs one "
                             "tokenizer")
    tokenizer = tokenizer_for(STUDENT.value, t_dir)
    records = data.read_examples(DATA.value)
    encoded = encode(tokenizer, records, cfg.format, student.config)
    batcher = make_batcher(encoded, student.config, cfg.seed)
    n_s = student.config.num_params()
    packed = ""
    if PACK.value:
        rows = batcher.epoch_rows(0)
        packed = (f" packed: {len(records) / len(rows):.1f} examples/row, "
                  f"{packing.packing_efficiency(encoded, rows, SEQ_LEN.value):.0%} real tokens;")
    print(f"student {n_s:,} params; {len(records)} records; format {cfg.format}, loss "
          f"{cfg.kind}, {'LoRA rank %d' % cfg.lora_rank if cfg.lora_rank else 'full'};"
          f"{packed} {cfg.steps} steps x {batcher.rows_per_step} x {SEQ_LEN.value} tokens")
    with tracking.open_writer(common.LOGGERS.value, logdir=workdir / "tensorboard",
                              run=out.name, config=dataclasses.asdict(cfg)) as writer:
        result = train.train(student, teacher, batcher, cfg, workdir=workdir, mesh=mesh,
                             checkpoint_every=CHECKPOINT_EVERY.value,
                             keep_checkpoints=KEEP.value, log_every=LOG_EVERY.value,
                             writer=writer)
        # every process takes part (the export gathers sharded tensors collectively); only
        # process 0 writes files
        jdistill.save_pretrained(result.student, out)
        row = results_row(cfg, result, n_s, teacher_params, len(records))
        writer.summary(row["metrics"])
    if jax.process_index() == 0:
        files.append_row(workdir / "results.jsonl", row)
        if RESULTS.value:
            files.append_row(RESULTS.value, row)
    print(f"trained {result.steps_run} steps in {result.seconds:.1f}s "
          f"(final loss {result.final_metrics.get('loss', float('nan')):.4f}); wrote {out}")


def teacher_dir(path: str | None) -> Path | None:
    """The teacher's HF directory (a .gguf file is converted once, into the cache)."""
    return None if path is None else checkpoints.resolve(path)


def tokenizer_for(*dirs):
    """The first of the checkpoints' tokenizers that exists (pruned students carry one)."""
    for d in dirs:
        if d is not None and Path(d, "tokenizer.json").exists():
            return data.load_tokenizer(d)
    return data.load_tokenizer(dirs[0])  # raises, naming the fix


def results_row(cfg, result, student_params: int, teacher_params, n_records: int) -> dict:
    weights, normalize = cfg.blend
    ratio = teacher_params / student_params if teacher_params else None
    cell = {"id": Path(OUT.value).name, "ratio": ratio, "format": cfg.format,
            "method": "lora" if cfg.lora_rank else "full", "schedule": "none",
            "examples": n_records, "seed": cfg.seed, "prune_steps": 0}
    return rows.new_row(
        "distill", cell, teacher_params=teacher_params, student_params=student_params,
        metrics={f"train_{k}": v for k, v in result.final_metrics.items()},
        teacher={"path": TEACHER.value, "params": teacher_params},
        student={"path": STUDENT.value, "out": OUT.value, "params": student_params},
        supervision_format=cfg.format, loss=cfg.kind, temperature=cfg.temperature,
        weights=dataclasses.asdict(weights), normalize=normalize, offline_topk=TOPK.value,
        packed=PACK.value, lora_rank=cfg.lora_rank or None,
        data={"file": DATA.value, "examples": n_records, "tokens_seen": result.tokens_seen},
        optimizer={"steps": cfg.steps, "learning_rate": cfg.learning_rate,
                   "warmup_steps": cfg.warmup_steps, "batch_rows": BATCH_SIZE.value * ACCUM.value,
                   "seq_len": SEQ_LEN.value, "compute_dtype": cfg.compute_dtype},
        seed=cfg.seed, resumed_from=result.resumed_from, wall_time_s=result.seconds,
        tokens_per_s=result.steps_run * BATCH_SIZE.value * ACCUM.value * SEQ_LEN.value
        / max(result.seconds, 1e-9), throughput=result.throughput)

if __name__ == "__main__":
    cli.run(main)
