"""Evaluate a checkpoint: in-domain classification, general benchmarks, perplexity.

  python -m experiments.evaluate --model=DIR_OR.gguf --task=twitter_topics --split=test \
      --limit=200 --general=arc_easy,hellaswag,piqa --general_limit=100 --perplexity --out=DIR

--harness_tasks runs lm-evaluation-harness tasks on the same loaded model (jdistill's
registered "jdistill" LM; --harness_include=DIR adds local task YAMLs); their metrics go
into the row's metrics.harness.TASK.

Appends one results row to OUT/results.jsonl and writes, for the in-domain task,
OUT/confusion_{task}_{split}.{json,npy,png} and OUT/predictions_{task}_{split}.jsonl.
--task takes a shipped task name, a labelled .csv/.jsonl/.json/.parquet file (a `text`
or `headline` column and a `label` column; --label_names when labels are integers), or a
Hugging Face data set (hub name, e.g. nvidia/FinHeadlineMix, or a save_to_disk folder;
--split names its split); --task= (empty) skips the in-domain part.
"""

import json
import math
import time
from pathlib import Path

import jax
from absl import app, flags

import jdistill
from experiments import cli
from experiments import flags as common
from jdistill import sharding
from jdistill.data import io as data
from jdistill.data import tasks
from jdistill.eval import benchmarks as bench
from jdistill.eval import classify, metrics
from jdistill.eval import scoring as evaluate
from jdistill.utils import files
from jdistill.utils import tracking

MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory or a llama.cpp .gguf file")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer directory if --model has none")
DTYPE = common.define_dtype()
TASK = flags.DEFINE_string("task", tasks.DEFAULT_TASK,
                           f"in-domain task: one of {sorted(tasks.TASKS)}, a labelled data "
                           "file, a Hugging Face hub name or save_to_disk folder, or empty "
                           "to skip")
SPLIT = flags.DEFINE_string("split", "test", "split of --task to evaluate")
LABEL_NAMES = flags.DEFINE_string("label_names", None, "for a --task file with integer "
                                  "labels: a file with one class name a line, or a comma list")
LIMIT = flags.DEFINE_integer("limit", None, "in-domain examples (stratified, seeded subset)")
MODE = flags.DEFINE_enum("mode", "loglik", ["loglik", "generate"],
                         "in-domain scoring: label log-likelihood, or greedy generation and "
                         "parsing the last label named (CoT students)")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "generation length (--mode=generate)")
GENERAL = flags.DEFINE_list("general", [], f"benchmarks, of {sorted(bench.BENCHMARKS)}")
GENERAL_LIMIT = flags.DEFINE_integer("general_limit", None, "items per benchmark (seeded subset)")
PERPLEXITY = flags.DEFINE_bool("perplexity", False, "perplexity on held-out corpus slices")
PPL_FILES = flags.DEFINE_list("ppl_files",
                              ["tinystories_valid_subset.txt", "pride_and_prejudice.txt"],
                              "corpus files (names under the shipped corpus/ or paths); the "
                              "last --ppl_fraction of each is scored")
PPL_FRACTION = flags.DEFINE_float("ppl_fraction", 0.1, "held-out tail fraction of each file")
PPL_WINDOW = flags.DEFINE_integer("ppl_window", 512, "perplexity window (tokens)")
PPL_STRIDE = flags.DEFINE_integer("ppl_stride", 256, "perplexity stride (tokens)")
PPL_MAX_TOKENS = flags.DEFINE_integer("ppl_max_tokens", 4096, "tokens scored per file at most")
HARNESS_TASKS = flags.DEFINE_list("harness_tasks", [], "lm-evaluation-harness tasks or "
                                  "groups to run on the model too (pip install -e "
                                  "\".[harness]\"), e.g. arc_easy,mmlu_pro")
HARNESS_INCLUDE = flags.DEFINE_string("harness_include", None, "folder of extra harness task "
                                      "YAMLs (local data sets, custom prompts)")
HARNESS_LIMIT = flags.DEFINE_integer("harness_limit", None, "first N documents per harness "
                                     "task (the harness's --limit)")
MAX_LENGTH = flags.DEFINE_integer("max_length", None, "longest scored input; longer contexts "
                                  "lose tokens on the left (default: the model's "
                                  "max_position_embeddings)")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "items per batch (each with all its choices)")
SEED = flags.DEFINE_integer("seed", 0, "subset seed")
OUT = flags.DEFINE_string("out", None, "output directory (results.jsonl, confusion, predictions)")
flags.mark_flags_as_required(["model", "out"])


def label_names_flag(value):
    if value is None:
        return None
    if Path(value).is_file():
        return [x.strip() for x in Path(value).read_text().splitlines() if x.strip()]
    return [x.strip() for x in value.split(",") if x.strip()]


def corpus_path(name):
    p = Path(name)
    return p if p.exists() else data.data_file(f"corpus/{name}")


def in_domain_inputs():
    """(task, examples) of --task / --split (read before any model work: bad input fails
    before anything is computed or written)."""
    task = tasks.get_task(TASK.value, split=SPLIT.value,
                          label_names=label_names_flag(LABEL_NAMES.value))
    examples = tasks.load_split(task, SPLIT.value)
    if LIMIT.value is not None and LIMIT.value < len(examples):
        examples = tasks.subsample(examples, LIMIT.value, SEED.value)
    return task, examples


def in_domain(model, tokenizer, mesh, task, examples):
    """-> (metrics r, predictions, generated outputs or None)."""
    desc = f"{task.name}/{SPLIT.value}"
    if MODE.value == "loglik":
        r = classify.evaluate_classification(model, tokenizer, task, examples,
                                             batch_size=BATCH_SIZE.value, mesh=mesh,
                                             max_length=MAX_LENGTH.value, progress=desc)
        return r, r["predictions"].tolist(), None
    gen = classify.generate_and_parse(model, tokenizer, task, [t for t, _ in examples],
                                      max_new_tokens=MAX_NEW_TOKENS.value,
                                      batch_size=BATCH_SIZE.value, progress=desc)
    labels = [y for _, y in examples]
    preds = [-1 if p is None else p for _, p in gen]
    r = {**metrics.classification_metrics(labels, preds),
         "confusion": metrics.confusion_matrix(labels, preds, task.num_classes)}
    return r, preds, [g for g, _ in gen]


def write_in_domain(out_dir, task, examples, r, preds, outputs) -> dict:
    """The confusion matrix and per-example predictions; returns their paths."""
    stem = f"{task.name}_{SPLIT.value}"
    paths = metrics.save_confusion(r["confusion"], task.label_names, out_dir,
                                    f"confusion_{stem}")
    lines = [json.dumps({"text": t, "label": task.label_names[y],
                         "pred": task.label_names[p] if p >= 0 else None,
                         **({"output": outputs[i]} if outputs else {})}, ensure_ascii=False)
             for i, ((t, y), p) in enumerate(zip(examples, preds))]
    paths["predictions"] = str(files.atomic_write(
        Path(out_dir) / f"predictions_{stem}.jsonl", "\n".join(lines) + "\n"))
    return paths


def _metrics(r) -> dict:
    return {"in_domain_accuracy": r["accuracy"], "in_domain_accuracy_stderr": r["accuracy_stderr"],
            "in_domain_macro_f1": r["macro_f1"], "in_domain_unparsed": r["unparsed"]}


def _info(task, examples) -> dict:
    return {"task": task.name, "split": SPLIT.value, "examples": len(examples),
            "limit": LIMIT.value, "mode": MODE.value, "classes": task.num_classes}


def harness_inputs():
    """The harness's task index, with --harness_tasks checked against it (before any model
    work)."""
    try:
        from jdistill.eval import harness
    except ImportError as e:
        raise ValueError(f"--harness_tasks needs lm-evaluation-harness ({e}); install it with "
                         "pip install -e \".[harness]\"") from None
    manager = harness.task_manager(HARNESS_INCLUDE.value)
    harness.check_tasks(manager, HARNESS_TASKS.value)
    return manager


def general(model, tokenizer, mesh, benchmarks: dict):
    return {name: bench.evaluate_mc(model, tokenizer, items, batch_size=BATCH_SIZE.value,
                                       mesh=mesh, max_length=MAX_LENGTH.value, progress=name)
            for name, items in benchmarks.items()}


def perplexities(model, tokenizer, mesh, paths):
    by_file, nll, count = {}, 0.0, 0
    for path in paths:
        text = evaluate.held_out_text(path, PPL_FRACTION.value)
        r = evaluate.perplexity(model, tokenizer, text, window=PPL_WINDOW.value,
                                stride=PPL_STRIDE.value, max_tokens=PPL_MAX_TOKENS.value,
                                batch_size=BATCH_SIZE.value, mesh=mesh,
                                progress=f"perplexity {path.name}")
        by_file[path.name] = r
        nll += r["nll"] * r["tokens"]
        count += r["tokens"]
    return math.exp(nll / count), by_file


def table(row) -> str:
    m = row["metrics"]
    lines = [f"model {row['model']['path']} ({row['model']['params']:,} params)"]
    if "in_domain_accuracy" in m:
        d = row["data"]
        lines.append(f"  {d['task']}/{d['split']} (n={d['examples']}): accuracy "
                     f"{m['in_domain_accuracy']:.4f} ± {m['in_domain_accuracy_stderr']:.4f}"
                     f"  macro-F1 {m['in_domain_macro_f1']:.4f}")
    for name, r in m.get("general", {}).items():
        lines.append(f"  {name:<15} n={r['n']:<6} acc {r['acc']:.4f} ± {r['stderr']:.4f}  "
                     f"acc_norm {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}")
    for name, r in m.get("harness", {}).items():
        lines.append(f"  harness {name:<12} " + "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if "perplexity" in m:
        lines.append(f"  perplexity {m['perplexity']:.3f}  " + "  ".join(
            f"{k}: {v['perplexity']:.3f} ({v['tokens']} tok)"
            for k, v in m["perplexity_by_file"].items()))
    lines.append(f"  wall time {row['wall_time_s']:.1f}s")
    return "\n".join(lines)


def main(argv):
    del argv
    for name in GENERAL.value:
        if name not in bench.BENCHMARKS:
            raise app.UsageError(f"--general: unknown benchmark {name!r}; use "
                                 f"{sorted(bench.BENCHMARKS)}")
    out_dir = cli.output_dir(OUT.value)
    mesh = common.setup()
    start = time.perf_counter()
    # every input is read before the first forward: bad input costs no compute, writes nothing
    task, examples = in_domain_inputs() if TASK.value else (None, None)
    benchmarks = {name: bench.load_benchmark(name, limit=GENERAL_LIMIT.value,
                                                seed=SEED.value) for name in GENERAL.value}
    ppl_paths = [corpus_path(name) for name in PPL_FILES.value] if PERPLEXITY.value else []
    harness_manager = harness_inputs() if HARNESS_TASKS.value else None
    model = jdistill.load_pretrained(MODEL.value, dtype=DTYPE.value, mesh=mesh)
    tokenizer = data.load_tokenizer(model.source_path, TOKENIZER.value)
    c = model.config
    metrics, info, paths, timings = {}, {}, {}, {}
    if task is not None:
        t = time.perf_counter()
        scored = in_domain(model, tokenizer, mesh, task, examples)
        metrics.update(_metrics(scored[0]))
        info = _info(task, examples)
        timings["in_domain"] = time.perf_counter() - t
    if benchmarks:
        t = time.perf_counter()
        metrics["general"] = general(model, tokenizer, mesh, benchmarks)
        timings["general"] = time.perf_counter() - t
    if ppl_paths:
        t = time.perf_counter()
        metrics["perplexity"], metrics["perplexity_by_file"] = perplexities(model, tokenizer,
                                                                            mesh, ppl_paths)
        timings["perplexity"] = time.perf_counter() - t
    if harness_manager is not None:
        from jdistill.eval import harness

        t = time.perf_counter()
        lm = harness.JDistillLM.from_model(model, tokenizer, mesh=mesh,
                                           batch_size=BATCH_SIZE.value,
                                           max_length=MAX_LENGTH.value)
        metrics["harness"] = harness.run_tasks(lm, HARNESS_TASKS.value,
                                               manager=harness_manager,
                                               limit=HARNESS_LIMIT.value)
        timings["harness"] = time.perf_counter() - t
    # writes only now, when every part has run
    if task is not None and sharding.is_writer():  # every process has the same metrics
        paths = write_in_domain(out_dir, task, examples, *scored)
    row = {
        **files.run_metadata(), "main": "evaluate",
        "model": {"path": MODEL.value, "params": c.num_params(), "dtype": model.dtype.name,
                  "dims": {"hidden": c.hidden_size, "ffn": c.intermediate_size,
                           "heads": c.num_heads, "kv_heads": c.num_kv_heads,
                           "layers": c.num_layers, "vocab": c.vocab_size}},
        "data": {**info, "general": GENERAL.value, "general_limit": GENERAL_LIMIT.value,
                 "perplexity_files": PPL_FILES.value if PERPLEXITY.value else [],
                 "harness_tasks": HARNESS_TASKS.value, "harness_limit": HARNESS_LIMIT.value},
        "seed": SEED.value, "metrics": metrics, "outputs": paths,
        "devices": jax.device_count(), "timings_s": timings,
        "wall_time_s": time.perf_counter() - start,
    }
    if sharding.is_writer():
        files.append_row(out_dir / "results.jsonl", row)
        print(table(row))
    with tracking.open_writer(common.LOGGERS.value, logdir=out_dir / "tensorboard",
                              run=out_dir.resolve().name,
                              config={"model": MODEL.value, **row["data"]}) as writer:
        writer.summary(metrics)


if __name__ == "__main__":
    cli.run(main)
