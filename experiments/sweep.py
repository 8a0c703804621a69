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

from experiments import cli, sweep_flags


def main(argv):
    del argv
    sweep_flags.run()


if __name__ == "__main__":
    cli.run(main)
