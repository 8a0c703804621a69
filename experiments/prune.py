"""Prune an HF checkpoint to a target size: score, choose, slice, (repeat), export.

  python -m experiments.prune --model=DIR --out=DIR --compression=2.0 --axes=mlp,heads,hidden \
      --importance=activation --calib_data=FILE --calib_samples=256

Writes OUT/ (an HF checkpoint of the pruned model), OUT/pruning_report.json, and per step
OUT/importance_step{k}.png and OUT/scores_step{k}.npz.
"""

import time

import jax
import numpy as np
from absl import app, flags

import jdistill
from experiments import cli
from experiments import flags as common
from jdistill import pruning, sharding
from jdistill.data import io as data
from jdistill.pruning import report
from jdistill.utils import files

MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory of the model to prune")
OUT = flags.DEFINE_string("out", None, "output directory for the pruned checkpoint")
COMPRESSION = flags.DEFINE_float("compression", None,
                                 "teacher params / student params (2.0 = half the size)")
DIMS = flags.DEFINE_string("dims", None, "explicit target instead of --compression, e.g. "
                           "hidden=512,ffn=1024,heads=6,kv_heads=3,layers=24 (omitted = keep)")
AXES = flags.DEFINE_list("axes", ["mlp", "heads", "hidden"],
                         f"axes --compression may shrink, of {list(pruning.masks.AXES)}")
KV_GROUPS = flags.DEFINE_bool("kv_groups", False, "prune whole KV groups instead of query "
                              "heads inside every group")
IMPORTANCE = flags.DEFINE_enum("importance", "activation", list(pruning.importance.IMPORTANCE),
                               "width importance method")
DEPTH = flags.DEFINE_enum("depth", "block", list(pruning.importance.DEPTH),
                          "layer importance: block (1-cos), skip_loss, contiguous (drop one block)")
CALIB_DATA = flags.DEFINE_string("calib_data", None, "plain-text (.txt) or task data file "
                                 "(.csv/.jsonl/.parquet with a text column)")
TEXT_COLUMN = flags.DEFINE_string("text_column", None, "text column of a tabular --calib_data")
CALIB_SAMPLES = flags.DEFINE_integer("calib_samples", 256, "calibration examples")
SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "tokens per calibration example")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "calibration batch size")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer directory if --model has none")
SCHEDULE = flags.DEFINE_enum("schedule", "one_shot", list(pruning.schedule.KINDS),
                             "one-shot or iterative ratio schedule")
STEPS = flags.DEFINE_integer("steps", 1, "steps of an iterative schedule")
DTYPE = common.define_dtype()
SEED = flags.DEFINE_integer("seed", 0, "calibration sampling seed")
flags.mark_flags_as_required(["model", "out", "calib_data"])


def parse_dims(spec, config):
    full = pruning.Dims.of(config).as_dict()
    try:
        given = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    except ValueError:
        raise app.UsageError(f"--dims={spec!r}: expected name=int pairs, e.g. hidden=512,ffn=1024")
    unknown = set(given) - set(full)
    if unknown:
        raise app.UsageError(f"--dims: unknown names {sorted(unknown)}; use {sorted(full)}")
    return pruning.Dims(**{**full, **given})


def summary(scores):
    return {k: {"min": float(np.min(v)), "mean": float(np.mean(v)), "max": float(np.max(v))}
            for k, v in scores.items()}


def main(argv):
    del argv
    if (COMPRESSION.value is None) == (DIMS.value is None):
        raise app.UsageError("give exactly one of --compression and --dims")
    out = cli.output_dir(OUT.value)
    mesh = common.setup()
    start = time.perf_counter()
    tokenizer = data.load_tokenizer(MODEL.value, TOKENIZER.value)
    texts = data.read_texts(CALIB_DATA.value, TEXT_COLUMN.value)
    batches = data.calibration_batches(tokenizer, texts, num_samples=CALIB_SAMPLES.value,
                                       seq_len=SEQ_LEN.value, batch_size=BATCH_SIZE.value,
                                       seed=SEED.value)
    model = jdistill.load_pretrained(MODEL.value, dtype=DTYPE.value, mesh=mesh)
    n_tokens = int(sum(m.sum() for _, m in batches))
    # every process builds the same (small) host batches; each places only its own rows
    batches = [tuple(sharding.shard_batch(a, mesh) for a in b) for b in batches]
    teacher_config = model.config
    teacher_params = teacher_config.num_params()
    print(f"teacher {teacher_params:,} params; calibration {len(batches)} batches, "
          f"{n_tokens:,} tokens")

    steps, step_scores = [], []

    def prune(student, ratio):
        k = len(steps) + 1
        t0 = time.perf_counter()
        scores = pruning.compute_scores(student, batches, IMPORTANCE.value, DEPTH.value)
        # to numpy on every process (a collective gather where scores are sharded): the
        # choice of what to keep is then the same everywhere
        scores = jax.tree_util.tree_map(sharding.to_host, scores)
        t_score = time.perf_counter() - t0
        config = student.config
        if DIMS.value is not None:
            dims = parse_dims(DIMS.value, config)
        else:
            # each ratio's one architecture (pruning.dims_within says why)
            dims = pruning.dims_within(teacher_config, ratio, AXES.value,
                                       pruning.Dims.of(config), kv_groups=KV_GROUPS.value)
        layer_mask = None
        if DEPTH.value == "contiguous" and dims.layers < config.num_layers:
            layer_mask = pruning.contiguous_block_mask(scores["block_distance"],
                                                       config.num_layers,
                                                       config.num_layers - dims.layers)
        masks = pruning.select_masks(scores, config, dims, layer_mask=layer_mask,
                                     kv_groups=KV_GROUPS.value)
        smaller = pruning.slice_model(student, masks, mesh=mesh)
        step_scores.append(jax.tree_util.tree_map(np.asarray, scores))
        n = smaller.config.num_params()
        steps.append({"step": k, "target_ratio_vs_teacher": ratio,
                      "dims": dims.as_dict(), "params": n,
                      "ratio_vs_teacher": teacher_params / n, "scoring_seconds": t_score,
                      "kept": {key: np.flatnonzero(np.asarray(m)).tolist() if m.ndim == 1 else
                               [np.flatnonzero(r).tolist() for r in np.asarray(m)]
                               for key, m in masks.items()},
                      "scores": summary({k2: v for k2, v in scores.items()})})
        print(f"step {k}: dims {dims.as_dict()} -> {n:,} params "
              f"(ratio {teacher_params / n:.3f} vs teacher; scoring {t_score:.1f}s)")
        return smaller

    if DIMS.value is not None:
        student = prune(model, 1.0)
    else:
        ratios = pruning.compression_schedule(COMPRESSION.value, STEPS.value, SCHEDULE.value)
        student = pruning.iterative_prune(model, ratios, prune)
    # every process joins the export (it gathers sharded tensors); only process 0 writes
    jdistill.save_pretrained(student, out)  # replaces `out` whole: artefacts go in after
    if not sharding.is_writer():
        return
    for k, scores in enumerate(step_scores, 1):
        report.save_scores(out / f"scores_step{k}.npz", scores)
        report.plot_scores(scores, out / f"importance_step{k}.png",
                           title=f"{IMPORTANCE.value} importance, step {k}")
    result = {
        "teacher": {"path": MODEL.value, "params": teacher_params},
        "student": {"path": str(out), "params": student.config.num_params(),
                    "dims": pruning.Dims.of(student.config).as_dict()},
        "compression_ratio": teacher_params / student.config.num_params(),
        "requested": {"compression": COMPRESSION.value, "dims": DIMS.value,
                      "axes": AXES.value, "kv_groups": KV_GROUPS.value},
        "importance": IMPORTANCE.value, "depth": DEPTH.value,
        "schedule": {"kind": SCHEDULE.value, "steps": STEPS.value},
        "calibration": {"file": CALIB_DATA.value, "samples": CALIB_SAMPLES.value,
                        "seq_len": SEQ_LEN.value, "tokens": n_tokens},
        "steps": steps, "seconds": time.perf_counter() - start,
    }
    files.atomic_write_json(out / "pruning_report.json", result)
    print(f"pruned {teacher_params:,} -> {student.config.num_params():,} params "
          f"(compression {result['compression_ratio']:.3f}) in {result['seconds']:.1f}s; "
          f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
