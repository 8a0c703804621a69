"""The sweep's flag group, shared by the sweep and demo mains (the demo sets other defaults).

Grid axes come from --preset, then --config (JSON with Grid's keys), then flags; settings
(steps, evaluation sizes, ...) likewise from the preset, then --set / flags. The grid,
presets and the run itself are the library's (`jdistill.study.sweep`, `.runner`).
"""

import dataclasses
import shlex
import sys
from pathlib import Path

from absl import app, flags

from experiments import cli
from experiments import flags as common
from jdistill.distill import formats
from jdistill.study import runner, sweep
from jdistill.utils import files

OUT = flags.DEFINE_string("out", None, "sweep directory (rows/, cells/, results.jsonl)")
PRESET = flags.DEFINE_enum("preset", None, sorted(sweep.PRESETS),
                           "grid + settings preset (demo: minutes on a CPU; smoke: every "
                           "stage once, an install check; paper: the full grid, meant for "
                           "accelerators)")
CONFIG = flags.DEFINE_string("config", None, "JSON file with grid keys (ratios, formats, "
                             "methods, schedules, examples, seeds, design, "
                             "contrast_ratios)")
RATIOS = flags.DEFINE_list("ratios", None, "compression ratios (teacher / student params); "
                           "in rising order they are the iterative schedule's chain")
FORMATS = flags.DEFINE_list("formats", None, f"supervision formats, of {formats.NAMES}")
METHODS = flags.DEFINE_list("methods", None, f"distillation methods, of {sweep.METHODS}")
SCHEDULES = flags.DEFINE_list("schedules", None, f"pruning schedules, of {sweep.SCHEDULES}")
EXAMPLES = flags.DEFINE_list("examples", None, "training set sizes (stratified, nested)")
SEEDS = flags.DEFINE_list("seeds", None, "seeds")
DESIGN = flags.DEFINE_enum("design", None, list(sweep.DESIGNS),
                           "factorial: every combination; star: ratios x formats at the "
                           "baseline, other methods/schedules/sizes at --contrast_ratios")
CONTRAST = flags.DEFINE_list("contrast_ratios", None, "star design: ratios of the contrasts")
TEACHER = flags.DEFINE_string("teacher", None, "teacher: HF directory or .gguf (default: the "
                              "shipped SmolLM2-135M-Instruct)")
TASK = flags.DEFINE_string("task", None, "shipped task name, train=FILE,test=FILE, a "
                          "Hugging Face hub name or a datasets save_to_disk folder")
SET = flags.DEFINE_list("set", [], "settings overrides NAME=VALUE (names: "
                        + ", ".join(f.name for f in dataclasses.fields(runner.Settings))
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

def parse_value(name: str, text: str):
    field = {f.name: f for f in dataclasses.fields(runner.Settings)}.get(name)
    if field is None:
        raise app.UsageError(f"--set {name}=...: no such setting; use one of "
                             f"{[f.name for f in dataclasses.fields(runner.Settings)]}")
    default = field.default
    try:
        if isinstance(default, tuple):
            return tuple(x for x in text.split("|") if x)
        return type(default)(text)
    except ValueError:
        raise app.UsageError(f"--set {name}={text!r}: expected a {type(default).__name__}")


def settings() -> runner.Settings:
    given = dict(sweep.SETTINGS_PRESETS.get(PRESET.value, {}))
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
    return runner.Settings(teacher=teacher, **given)


def grid() -> sweep.Grid:
    def nums(values, kind):
        return None if values is None else [kind(v) for v in values]

    try:
        return sweep.grid_from(
            PRESET.value, CONFIG.value, ratios=nums(RATIOS.value, float), formats=FORMATS.value,
            methods=METHODS.value, schedules=SCHEDULES.value,
            examples=nums(EXAMPLES.value, int), seeds=nums(SEEDS.value, int),
            design=DESIGN.value,
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


def cache_dir() -> Path:
    return Path(CACHE_DIR.value) if CACHE_DIR.value else files.cache_dir("stages")


def run() -> Path | None:
    """The sweep these flags ask for (the body of the sweep and demo mains): lists the cells
    (--dry_run), merges rows (--merge) or runs this shard's cells. Returns the sweep folder
    when every cell of the grid has been run here and its rows merged, else None."""
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
    cache = cache_dir()
    runner.enable_compilation_cache(cache.parent / "xla")
    mesh = common.setup()
    sweep.check_out_dir(out, g, s.as_dict())
    runner.run_sweep(out, g, s, cells, cache_dir=cache, mesh=mesh, loggers=common.LOGGERS.value,
                     original_teacher=ORIGINAL_TEACHER.value)
    if NUM_SHARDS.value == 1 and not CELL.value:
        path, n = sweep.merge_rows(out)
        print(f"[sweep] {n} rows in {path}")
        return out
    return None

