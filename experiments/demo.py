"""The end-to-end demo (README's main job): teacher -> sweep -> scaling-law fits -> report.

  python -m experiments.demo                     # SmolLM2-135M-Instruct, Twitter topics
  python -m experiments.demo --preset=paper      # the full grid (hours on CPU; for GPUs)
  python -m experiments.demo --teacher=DIR --task=train=train.csv,test=test.csv --out=runs/mine

Every `experiments.sweep` flag works here; the demo only sets defaults (--preset=demo,
--out=runs/demo). It runs the sweep (cached and resumable: rerunning skips what is done),
merges the rows into OUT/results.jsonl, fits the laws once and writes OUT/report/report.md
with its plots, then prints a compression plan for a default set of constraints
(OUT/report/plan.json).
"""

import time

from absl import flags

from experiments import cli, sweep_flags
from jdistill import study as sd
from jdistill.study import report
from jdistill.utils import files
from jdistill.utils.progress import fmt_time

flags.FLAGS.set_default("preset", "demo")
flags.FLAGS.set_default("out", "runs/demo")
flags.FLAGS.set_default("original_teacher", False)  # a minute the 20-minute budget lacks
N_BOOT = flags.DEFINE_integer("n_boot", 200, "bootstrap resamples of the law fits")
# the plan's quality budget: 95% of the teacher's in-domain accuracy, <= 10 general points lost
MIN_IN_DOMAIN_REL, MAX_GENERAL_DROP = 0.95, 0.10


def main(argv):
    del argv
    start = time.perf_counter()
    out = sweep_flags.run()
    if out is None:  # --dry_run, --merge, one shard or one cell: no report of the whole grid
        return
    results = out / "results.jsonl"
    print(f"[demo] fitting laws on {results} (n_boot={N_BOOT.value}) and writing the report",
          flush=True)
    an = sd.analyze(sd.load_study(results), n_boot=N_BOOT.value)
    path = report.write_report(an, results, out / "report")
    print(report.findings_text(an))
    print(f"wrote {path}")
    plan = sd.plan(an, min_in_domain_rel=MIN_IN_DOMAIN_REL, max_general_drop=MAX_GENERAL_DROP)
    files.atomic_write_json(out / "report" / "plan.json", plan, indent=1)
    print(sd.plan_text(plan))
    print(f"[demo] done in {fmt_time(time.perf_counter() - start)}; report: {path}")


if __name__ == "__main__":
    cli.run(main)
