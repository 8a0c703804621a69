"""The study's grid: cells, shards, per-cell row files and their merge.

A cell is one (compression ratio, supervision format, method, pruning schedule, dataset size,
seed). An *iterative* cell is one student along a chain: the grid's ratios in rising order
are the chain (the paper's keep-fractions 79/58/37/16 % are `paper_ratios()`), each step
prunes the previous step's recovered student (re-scored) to the next ratio and recovers it
by distillation, and every step is a row (the runner caches each step, so the cells of one
chain share its prefix). A *one-shot* cell prunes the teacher to its ratio at once and
recovers with as many steps as the chain spent reaching that ratio, so the two schedules
compare at equal training compute. A grid is either the full product of its axes (`design="factorial"`, the paper's
sweep) or a *star* (`design="star"`): the product ratios x formats x methods at the
baseline schedule and dataset size (the first value of each), plus, for every other
schedule / dataset size, the formats at the `contrast_ratios` with only that one axis
changed. The star keeps every comparison the study's findings need (format vs format and
full vs LoRA along the whole chain; iterative vs one-shot, small vs large data at matched
cells) at a fraction of the factorial's cost, which is what a CPU can afford.

Each finished cell writes OUT/rows/CELL_ID.jsonl atomically (temp file + rename), so a
killed cell leaves nothing and a rerun skips exactly the finished cells; concurrent shards
write disjoint files and `merge_rows` combines them into OUT/results.jsonl.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from jdistill.distill import formats
from jdistill.utils import files

METHODS = ("full", "lora")
SCHEDULES = ("one_shot", "iterative")
DESIGNS = ("star", "factorial")


@dataclasses.dataclass(frozen=True)
class Cell:
    ratio: float
    format: str
    method: str
    schedule: str
    examples: int
    seed: int = 0
    prune_steps: int = 1
    chain: tuple = ()  # the chain's ratios up to and including `ratio` (see the module doc)

    @property
    def id(self) -> str:
        sched = "oneshot" if self.schedule == "one_shot" else f"iter{self.prune_steps}"
        return (f"r{self.ratio:g}-{self.format}-{self.method}-{sched}-n{self.examples}"
                f"-s{self.seed}")

    def as_dict(self) -> dict:
        return {"id": self.id, **dataclasses.asdict(self)}

    @property
    def recovery_rounds(self) -> int:
        """Recovery runs of `Settings.steps` behind this student (its chain's length)."""
        return max(1, len(self.chain))


def paper_ratios(steps: int = 4, final_keep: float = 0.16) -> tuple:
    """Compression ratios of the paper's schedule: keep-fractions falling in constant
    percentage-point steps to `final_keep` (4 steps to 16 %: 79, 58, 37, 16 %)."""
    if not 0 < final_keep < 1 or steps < 1:
        raise ValueError(f"need 0 < final_keep < 1 and steps >= 1, got {final_keep}, {steps}")
    keeps = [1.0 - (1.0 - final_keep) * t / steps for t in range(1, steps + 1)]
    return tuple(round(1.0 / k, 4) for k in keeps)


@dataclasses.dataclass(frozen=True)
class Grid:
    ratios: tuple = (1.5, 2.0, 3.0)
    formats: tuple = ("label", "blended")
    methods: tuple = ("full", "lora")
    schedules: tuple = ("one_shot", "iterative")
    examples: tuple = (128,)
    seeds: tuple = (0,)
    design: str = "star"
    contrast_ratios: tuple = (2.0,)
    contrast_formats: tuple | None = None  # star: formats of the contrasts (None: all)

    def __post_init__(self):
        for name, allowed in (("formats", formats.NAMES), ("methods", METHODS),
                              ("schedules", SCHEDULES)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"grid {name}: {bad or 'empty'} not allowed; use a non-empty "
                                 f"subset of {list(allowed)}")
        if not self.ratios or any(not r > 1.0 for r in self.ratios):
            raise ValueError(f"grid ratios {list(self.ratios)}: each must be > 1 (teacher "
                             "params / student params); the teacher itself is always measured")
        if not self.examples or any(n < 1 for n in self.examples):
            raise ValueError(f"grid examples {list(self.examples)}: need sizes >= 1")
        if self.design not in DESIGNS:
            raise ValueError(f"grid design {self.design!r}: use one of {list(DESIGNS)}")
        if len(set(self.ratios)) != len(self.ratios):
            raise ValueError(f"grid ratios {list(self.ratios)}: each ratio once")
        extra = set(self.contrast_formats or ()) - set(self.formats)
        if extra:
            raise ValueError(f"contrast_formats {sorted(extra)} are not among the formats")
        if self.design == "star" and not self.contrast_ratios:
            raise ValueError("a star grid needs contrast_ratios (where LoRA / iterative / "
                             "other data sizes are compared)")

    def chain(self, ratio) -> tuple:
        """The grid's ratios in rising order, up to and including `ratio`."""
        return tuple(float(r) for r in sorted(self.ratios) if r <= ratio)

    def cell(self, ratio, fmt, method, schedule, examples, seed) -> Cell:
        chain = self.chain(ratio)
        steps = len(chain) if schedule == "iterative" else 1
        return Cell(float(ratio), fmt, method, schedule, int(examples), int(seed), steps,
                    chain)

    def cells(self) -> list[Cell]:
        """Every cell of the grid, in a fixed order (cheap, shared stages first; along a
        chain in rising ratio, so each cell adds one step to the cached ones before it)."""
        base = (self.schedules[0], self.examples[0])
        axes = []
        if self.design == "factorial":
            axes = [(r, f, m, s, n) for m in self.methods for s in self.schedules
                    for n in self.examples for r in sorted(self.ratios) for f in self.formats]
        else:
            axes = [(r, f, m) + base for m in self.methods for r in sorted(self.ratios)
                    for f in self.formats]
            for r in self.contrast_ratios:
                for f in self.contrast_formats or self.formats:
                    axes += [(r, f, self.methods[0], s, base[1]) for s in self.schedules[1:]]
                    axes += [(r, f, self.methods[0], base[0], n) for n in self.examples[1:]]
        out, seen = [], set()
        for seed in self.seeds:
            for a in axes:
                c = self.cell(*a, seed)
                if c.id not in seen:
                    seen.add(c.id)
                    out.append(c)
        return out

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PAPER_RATIOS = paper_ratios()  # keep 79 / 58 / 37 / 16 % of the teacher

PRESETS = {
    # the README's demo: the paper's chain for label vs blended CoT, every step a row (a
    # curve to fit and a held-out ratio to check it on); 1–4.5 minutes per row on a 2-core
    # CPU. Its budget goes to evidence: contrasts (LoRA, one-shot, data size, seeds) are the
    # study's. A chain step's 10 steps of 4 packed 256-token rows see ~135 label examples
    # (157 blended records were kept of 192 traces): a larger pool would only cost teacher
    # traces nobody trains on.
    "demo": Grid(ratios=PAPER_RATIOS, formats=("label", "blended"), methods=("full",),
                 schedules=("iterative",), examples=(192,), design="star",
                 contrast_ratios=(PAPER_RATIOS[1],)),
    # an install check: every stage (label-CE correction, a two-step chain and one-shot
    # pruning, CoT traces, full and LoRA KD, both scorings, report, plan) once; no evidence
    "smoke": Grid(ratios=(1.5, 2.0), formats=("blended",), methods=("full", "lora"),
                  schedules=("iterative", "one_shot"), examples=(16,), design="star",
                  contrast_ratios=(2.0,)),
    # the study (issue 18): the chain for label and blended, full and LoRA, and (label only)
    # one-shot pruning and a 4x smaller data set as contrasts at 58 %; 18 rows a seed,
    # about 47 min a seed on a 2-core CPU, 2.65 h in all (run seeds as `--seeds=0`, then
    # `--seeds=0,1`...: finished rows are kept)
    "study": Grid(ratios=PAPER_RATIOS, formats=("label", "blended"), methods=("full", "lora"),
                  schedules=("iterative", "one_shot"), examples=(512, 128), seeds=(0, 1, 2),
                  design="star", contrast_ratios=(PAPER_RATIOS[1],),
                  contrast_formats=("label",)),
    # the paper's grid (hours on a CPU; meant for accelerators)
    "paper": Grid(ratios=PAPER_RATIOS, formats=formats.NAMES, methods=METHODS,
                  schedules=SCHEDULES, examples=(250, 1000, 4000), seeds=(0, 1, 2),
                  design="factorial", contrast_ratios=(2.0,)),
}
# the study's grid at the paper's sizes, on a GPU: its recoveries (200 steps of 32 packed
# 256-token rows, ~22k label examples a chain step) would see the study's 512-example pool
# ~40 times, so the pools are the paper's small end (6k-400k examples) instead
PRESETS["paper_gpu"] = dataclasses.replace(PRESETS["study"], examples=(8192, 2048))

# the paper prunes depth and width together
WIDTH_AND_DEPTH = ("mlp", "heads", "hidden", "layers")
# the general score: the mean of these (MMLU as letters and as cloze)
GENERAL = ("mmlu", "mmlu_cloze", "arc_easy", "arc_challenge", "piqa", "hellaswag")

# each grid preset's run settings (`runner.Settings` fields); demo-sized: minutes per cell on
# a 2-core CPU with the 135M teacher
SETTINGS_PRESETS = {
    # (label examples are ~66 tokens: a 128-token row packs 1.4 of them, 71 % full, a
    # 256-token row 3.4, 86 % full, at the same step cost on a CPU. 52 correction steps of
    # 4 x 256 reached 0.649 ± 0.033, as 64 steps of 8 x 128 did, in 243 s instead of 276)
    # (evaluation sizes are whole batches of eval_batch_size=16: a part batch costs a full one.
    # General: ARC-Easy alone, 96 items: the stderr of 48 ARC-Easy + 48 PIQA (~0.05) at 3/4
    # of the cost, PIQA's two long solutions an item being the dearest items here)
    "demo": dict(eval_examples=208, general=("arc_easy",), general_limit=96,
                 correction_steps=52, correction_examples=2048,
                 correction_learning_rate=2e-4, steps=10, batch_size=4,
                 seq_len=256, calib_samples=32, trace_max_new_tokens=24,
                 axes=WIDTH_AND_DEPTH),
    "smoke": dict(eval_examples=16, general=("arc_easy",), general_limit=16,
                  correction_steps=2, correction_examples=32, correction_learning_rate=1e-4,
                  steps=2, batch_size=2, seq_len=128, calib_samples=8, trace_max_new_tokens=8),
    # (correction: 64 steps at 2e-4 reached 0.65, 160 at 1.5e-4 0.806 on 320 items. The
    # general score is ARC-Easy alone at 320 items: 304 + 320 items a row keep every stderr
    # <= 0.03; 160 of PIQA beside 160 of ARC-Easy cost ~35 s a row more, ~30 % of a row)
    "study": dict(eval_examples=304, general=("arc_easy",), general_limit=320,
                  correction_steps=160, correction_examples=4096,
                  correction_learning_rate=1.5e-4, steps=16, batch_size=8,
                  seq_len=128, calib_samples=64, trace_max_new_tokens=24,
                  trace_temperature=0.6, trace_top_p=0.95, axes=WIDTH_AND_DEPTH),
    "paper_gpu": dict(eval_examples=1024, general=GENERAL, general_limit=512,
                      correction_steps=300, correction_examples=4096,
                      correction_learning_rate=1e-4, steps=200, batch_size=32,
                      seq_len=256, calib_samples=512, trace_max_new_tokens=96,
                      trace_temperature=0.6, trace_top_p=0.95, eval_batch_size=64,
                      trace_batch_size=256, compute_dtype="bfloat16", axes=WIDTH_AND_DEPTH),
    "paper": dict(eval_examples=1008, general=GENERAL + ("boolq", "openbookqa"),
                  general_limit=500, correction_steps=300, correction_examples=4000,
                  steps=500, batch_size=32, seq_len=256, calib_samples=512,
                  trace_max_new_tokens=96, trace_temperature=0.6, trace_top_p=0.95,
                  compute_dtype="bfloat16", axes=WIDTH_AND_DEPTH),
}


def grid_from(preset: str | None, config_file: str | None = None, **overrides) -> Grid:
    """A grid: the preset's (or the defaults), then a JSON config file's keys, then flags
    (`overrides` whose value is not None)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown grid preset {preset!r}; use one of {sorted(PRESETS)}")
    fields = dataclasses.asdict(PRESETS[preset]) if preset else {}
    if config_file:
        try:
            given = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"grid config {config_file}: {e}") from None
        unknown = set(given) - {f.name for f in dataclasses.fields(Grid)}
        if unknown:
            raise ValueError(f"grid config {config_file}: unknown keys {sorted(unknown)}; use "
                             f"{[f.name for f in dataclasses.fields(Grid)]}")
        fields.update(given)
        if "formats" in given and "contrast_formats" not in given:
            fields["contrast_formats"] = None
    given = {k: v for k, v in overrides.items() if v is not None}
    fields.update(given)
    if "formats" in given and "contrast_formats" not in given:
        fields["contrast_formats"] = None  # the preset's contrast formats may be gone
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return Grid(**fields)


def shard(cells: list, num_shards: int, shard_index: int) -> list:
    """The cells of one shard: round-robin, so every shard gets a mix of cheap and costly."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} of {num_shards}: need 0 <= shard_index < "
                         "num_shards")
    return cells[shard_index::num_shards]


# ------------------------------------------------------------------ rows


def row_file(out_dir, cell_id: str) -> Path:
    return Path(out_dir) / "rows" / f"{cell_id}.jsonl"


def is_done(out_dir, cell_id: str) -> bool:
    return row_file(out_dir, cell_id).exists()


def write_row(out_dir, cell_id: str, row: dict) -> Path:
    """A cell's row, all or nothing: a killed write leaves no file, so the cell reruns."""
    return files.atomic_write(row_file(out_dir, cell_id), json.dumps(row) + "\n")


def merge_rows(out_dir) -> tuple[Path, int]:
    """OUT/rows/*.jsonl -> OUT/results.jsonl (sorted by file name; rewritten atomically)."""
    lines = []
    for f in sorted((Path(out_dir) / "rows").glob("*.jsonl")):
        for line in filter(str.strip, f.read_text().splitlines()):
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not a JSON row ({e}); delete the file to rerun its "
                                 "cell") from None
            lines.append(line)
    path = files.atomic_write(Path(out_dir) / "results.jsonl",
                              "".join(line + "\n" for line in lines))
    return path, len(lines)


# ------------------------------------------------------------------ stage cache


def stage_key(**inputs) -> str:
    """A digest of a stage's inputs (JSON-able values; files enter by their identity)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def cached_stage(cache_dir, kind: str, key: str, build, log=print) -> Path:
    """CACHE/KIND-KEY (a directory), built by `build(tmp_dir)` on the first call only.

    Built in a temporary sibling and renamed into place, so a killed build leaves nothing
    that looks finished, and two shards building the same stage at once both succeed (the
    second rename loses and its copy is dropped).
    """
    final = Path(cache_dir) / f"{kind}-{key[:16]}"
    if (final / "STAGE.json").exists():
        log(f"[{kind}] cached: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / "STAGE.json").write_text(json.dumps({"kind": kind, "key": key}))
        try:
            os.replace(tmp, final)
        except OSError:  # another shard finished the same stage first
            if not (final / "STAGE.json").exists():
                raise
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_out_dir(out: Path, grid: Grid, settings: dict) -> None:
    """OUT holds rows of one grid + settings only: refuses (ValueError) to mix in rows of
    other settings, then records these in OUT/sweep.json."""
    spec = {"grid": grid.as_dict(), "settings": settings}
    path = Path(out) / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") != json.loads(json.dumps(spec["settings"])):
            diff = sorted(k for k in spec["settings"]
                          if old.get("settings", {}).get(k) != json.loads(
                              json.dumps(spec["settings"][k])))
            raise ValueError(f"{out} holds a sweep with other settings ({diff}); its rows "
                             "would not be comparable. Use another --out, or delete it.")
    files.atomic_write(path, json.dumps(spec, indent=1))
