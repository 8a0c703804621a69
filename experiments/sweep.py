"""The study's sweep: one results row per cell of data size x ratio x format x method x seed.

The grid's axes: dataset size x compression ratio x supervision format x method x pruning
schedule x seed.

  python -m experiments.sweep --out=runs/sweep --preset=paper
  python -m experiments.sweep --out=runs/sweep --ratios=1.5,2,4 --formats=label,blended \
      --methods=full --schedules=one_shot --examples=256,1024 --design=factorial
  python -m experiments.sweep ... --dry_run           # one command per cell, run them anywhere
  python -m experiments.sweep ... --num_shards=16 --shard_index=$SLURM_ARRAY_TASK_ID
  python -m experiments.sweep ... --merge             # OUT/rows/*.jsonl -> OUT/results.jsonl

Resumable: a finished cell has OUT/rows/CELL.jsonl and is skipped; a killed cell leaves no
row and resumes from its last training checkpoint under OUT/cells/CELL/. Shared stages
(teacher correction, importance scores, CoT traces, pruned models, the teacher's own
evaluation) are cached by their inputs under --cache_dir, so shards and reruns compute each
once. Grid axes come from --preset, then --config (JSON with Grid's keys), then flags;
settings (steps, evaluation sizes, ...) likewise from the preset, then --set / flags.
"""

import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import cli
from experiments import flags as common
from jdistill.study import runner as pipeline
from jdistill.utils import files as results
from jdistill.study import sweep
from jdistill.utils import tracking
from jdistill.distill import formats

OUT = flags.DEFINE_string("out", None, "sweep directory (rows/, cells/, results.jsonl)")
PRESET = flags.DEFINE_enum("preset", None, sorted(sweep.PRESETS),
                           "grid + settings preset (demo: minutes on a CPU; smoke: every "
                           "stage once, an install check; paper: the full grid, meant for "
                           "accelerators)")
CONFIG = flags.DEFINE_string("config", None, "JSON file with grid keys (ratios, formats, "
                             "methods, schedules, examples, seeds, iterative_steps, design, "
                             "contrast_ratios)")
RATIOS = flags.DEFINE_list("ratios", None, "compression ratios (teacher / student params)")
FORMATS = flags.DEFINE_list("formats", None, f"supervision formats, of {formats.NAMES}")
METHODS = flags.DEFINE_list("methods", None, f"distillation methods, of {sweep.METHODS}")
SCHEDULES = flags.DEFINE_list("schedules", None, f"pruning schedules, of {sweep.SCHEDULES}")
EXAMPLES = flags.DEFINE_list("examples", None, "training set sizes (stratified, nested)")
SEEDS = flags.DEFINE_list("seeds", None, "seeds")
ITERATIVE_STEPS = flags.DEFINE_integer("iterative_steps", None, "steps of iterative pruning")
DESIGN = flags.DEFINE_enum("design", None, list(sweep.DESIGNS),
                           "factorial: every combination; star: ratios x formats at the "
                           "baseline, other methods/schedules/sizes at --contrast_ratios")
CONTRAST = flags.DEFINE_list("contrast_ratios", None, "star design: ratios of the contrasts")
TEACHER = flags.DEFINE_string("teacher", None, "teacher: HF directory or .gguf (default: the "
                              "shipped SmolLM2-135M-Instruct)")
TASK = flags.DEFINE_string("task", None, "shipped task name, train=FILE,test=FILE, a "
                          "Hugging Face hub name or a datasets save_to_disk folder")
SET = flags.DEFINE_list("set", [], "settings overrides NAME=VALUE (names: "
                        + ", ".join(f.name for f in dataclasses.fields(pipeline.Settings))
                        + "); tuples as a|b|c")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "stage cache (default $JDISTILL_CACHE/"
                                "stages or ~/.cache/jdistill/stages)")
ORIGINAL_TEACHER = flags.DEFINE_bool("original_teacher", True, "also evaluate the teacher "
                                     "before correction (a reference row)")
NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "split the grid into this many shards")
SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "the shard this process runs")
CELL = flags.DEFINE_string("cell", None, "run only the cell with this id")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "print one command per cell and exit")
MERGE = flags.DEFINE_bool("merge", False, "only merge OUT/rows into OUT/results.jsonl")

# demo-sized settings: minutes per cell on a 2-core CPU with the 135M teacher
SETTINGS_PRESETS = {
    # (rows of 128 tokens pack two ~60-token prompts + answers: 4 rows ~ 8 examples a step)
    # (evaluation sizes are whole batches of eval_batch_size=16: a part batch costs a full one)
    "demo": dict(eval_examples=48, general=("arc_easy", "piqa"), general_limit=16,
                 correction_steps=10, correction_examples=256,
                 correction_learning_rate=1e-4, steps=6, batch_size=4,
                 seq_len=128, calib_samples=32, trace_max_new_tokens=24),
    "smoke": dict(eval_examples=16, general=("arc_easy",), general_limit=16,
                  correction_steps=2, correction_examples=32, correction_learning_rate=1e-4,
                  steps=2, batch_size=2, seq_len=128, calib_samples=8, trace_max_new_tokens=8),
    "paper": dict(eval_examples=1000, general=("arc_easy", "arc_challenge", "hellaswag",
                                               "piqa", "boolq", "openbookqa", "mmlu"),
                  general_limit=500, correction_steps=300, correction_examples=4000,
                  steps=500, batch_size=32, seq_len=256, calib_samples=512,
                  trace_max_new_tokens=96),
}


def cache_dir() -> Path:
    if CACHE_DIR.value:
        return Path(CACHE_DIR.value)
    root = os.environ.get("JDISTILL_CACHE") or Path.home() / ".cache" / "jdistill"
    return Path(root) / "stages"


def parse_value(name: str, text: str):
    field = {f.name: f for f in dataclasses.fields(pipeline.Settings)}.get(name)
    if field is None:
        raise app.UsageError(f"--set {name}=...: no such setting; use one of "
                             f"{[f.name for f in dataclasses.fields(pipeline.Settings)]}")
    default = field.default
    try:
        if isinstance(default, tuple):
            return tuple(x for x in text.split("|") if x)
        return type(default)(text)
    except ValueError:
        raise app.UsageError(f"--set {name}={text!r}: expected a {type(default).__name__}")


def settings() -> pipeline.Settings:
    given = dict(SETTINGS_PRESETS.get(PRESET.value, {}))
    for item in SET.value:
        name, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set {item!r}: expected NAME=VALUE")
        given[name] = parse_value(name, value)
    if TASK.value:
        given["task"] = TASK.value
    teacher = TEACHER.value
    if teacher is None:
        from jdistill.checkpoints import gguf
        teacher = str(gguf.default_teacher_path())
    return pipeline.Settings(teacher=teacher, **given)


def grid() -> sweep.Grid:
    def nums(values, kind):
        return None if values is None else [kind(v) for v in values]

    try:
        return sweep.grid_from(
            PRESET.value, CONFIG.value, ratios=nums(RATIOS.value, float), formats=FORMATS.value,
            methods=METHODS.value, schedules=SCHEDULES.value,
            examples=nums(EXAMPLES.value, int), seeds=nums(SEEDS.value, int),
            iterative_steps=ITERATIVE_STEPS.value, design=DESIGN.value,
            contrast_ratios=nums(CONTRAST.value, float))
    except ValueError as e:
        raise app.UsageError(str(e))


def cell_commands(cells) -> list[str]:
    """One shell command per cell: this command line with --cell=ID instead of sharding."""
    drop = {"dry_run", "num_shards", "shard_index", "cell", "merge"}

    def name(arg):
        n = arg.lstrip("-").split("=")[0]
        return n[2:] if n.startswith("no") and n[2:] in drop else n

    args = [a for a in sys.argv[1:] if name(a) not in drop | {"out", "preset"}]
    # explicit, so commands from the demo (whose defaults differ) mean the same cells
    pinned = [f"--out={OUT.value}"] + ([f"--preset={PRESET.value}"] if PRESET.value else [])
    base = [sys.executable, "-m", "experiments.sweep", *pinned, *args]
    return [shlex.join(base + [f"--cell={c.id}"]) for c in cells]


def check_out_dir(out: Path, g: sweep.Grid, s: pipeline.Settings) -> None:
    """OUT holds rows of one grid + settings only: refuse to mix in other settings."""
    spec = {"grid": g.as_dict(), "settings": s.as_dict()}
    path = out / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") != json.loads(json.dumps(spec["settings"])):
            diff = sorted(k for k in spec["settings"]
                          if old.get("settings", {}).get(k) != json.loads(
                              json.dumps(spec["settings"][k])))
            raise app.UsageError(f"{out} holds a sweep with other settings ({diff}); its rows "
                                 "would not be comparable. Use another --out, or delete it.")
    results.atomic_write(path, json.dumps(spec, indent=1))


def enable_compilation_cache() -> None:
    """Persist XLA executables next to the stage cache: a rerun (or another shard on the same
    file system) skips the minutes a CPU spends compiling a 30-layer step."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir().parent / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def run_sweep(out: Path, g: sweep.Grid, s: pipeline.Settings, cells, *, mesh, log=print):
    """Teacher rows, then every unfinished cell; returns the number of cells run."""
    study = pipeline.Runner(s, cache_dir(), mesh=mesh, log=log)
    start = time.perf_counter()
    refs = [("teacher", True)] + ([("teacher-original", False)]
                                  if ORIGINAL_TEACHER.value and s.correction_steps else [])
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
        with tracking.open_writer(common.LOGGERS.value, logdir=out / "cells" / cell.id / "logs",
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


def main(argv):
    del argv
    if not OUT.value:
        raise app.UsageError("--out is required (the sweep directory)")
    out = cli.output_dir(OUT.value)
    g, s = grid(), settings()
    cells = g.cells()
    if CELL.value:
        cells = [c for c in cells if c.id == CELL.value]
        if not cells:
            raise app.UsageError(f"--cell={CELL.value}: not in this grid; --dry_run lists "
                                 "the cells")
    else:
        try:
            cells = sweep.shard(cells, NUM_SHARDS.value, SHARD_INDEX.value)
        except ValueError as e:
            raise app.UsageError(str(e))
    if DRY_RUN.value:
        print("\n".join(cell_commands(cells)))
        print(shlex.join([sys.executable, "-m", "experiments.sweep",
                          f"--out={out}", "--merge"]))
        return
    if MERGE.value:
        path, n = sweep.merge_rows(out)
        print(f"merged {n} rows into {path}")
        return
    enable_compilation_cache()
    mesh = common.setup()
    check_out_dir(out, g, s)
    run_sweep(out, g, s, cells, mesh=mesh)
    if NUM_SHARDS.value == 1 and not CELL.value:
        path, n = sweep.merge_rows(out)
        print(f"[sweep] {n} rows in {path}")


if __name__ == "__main__":
    cli.run(main)
