"""The end-to-end demo (README's main job): teacher -> sweep -> scaling-law fits -> report.

  python -m experiments.demo                     # SmolLM2-135M-Instruct, Twitter topics
  python -m experiments.demo --preset=paper      # the full grid (hours on CPU; for GPUs)
  python -m experiments.demo --teacher=DIR --task=train=train.csv,test=test.csv --out=runs/mine

Every `experiments.sweep` flag works here; the demo only sets defaults (--preset=demo,
--out=runs/demo). It runs the sweep (cached and resumable: rerunning skips what is done),
merges the rows into OUT/results.jsonl, fits the laws and writes OUT/report/report.md with
its plots, then prints a compression plan for a default set of constraints.
"""

import subprocess
import sys
import time
from pathlib import Path

from absl import flags

from experiments import cli
from experiments import sweep as sweep_main
from jdistill.study import sweep

flags.FLAGS.set_default("preset", "demo")
flags.FLAGS.set_default("out", "runs/demo")
flags.FLAGS.set_default("original_teacher", False)  # a minute the 20-minute budget lacks
N_BOOT = flags.DEFINE_integer("n_boot", 200, "bootstrap resamples of the law fits")


def run_mains(*mains: tuple) -> None:
    """Runs other mains, each as its own process (its flags are its own), side by side (the
    report and the plan each fit the laws on one core), then prints their output in order;
    fails loudly if any failed."""
    cmds = [[sys.executable, "-m", *m] for m in mains]
    procs = []
    for cmd in cmds:
        print(f"[demo] {' '.join(cmd)}", flush=True)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate()[0] for p in procs]
    for cmd, p, output in zip(cmds, procs, outputs):
        print(output, end="", flush=True)
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, cmd, output)


def main(argv):
    del argv
    start = time.perf_counter()
    sweep_main.main([])
    if sweep_main.DRY_RUN.value or sweep_main.MERGE.value:
        return
    out = Path(sweep_main.OUT.value)
    results, n = sweep.merge_rows(out)
    print(f"[demo] {n} rows in {results}; fitting laws and writing the report")
    run_mains(("experiments.report", f"--results={results}", f"--out={out / 'report'}",
               f"--n_boot={N_BOOT.value}"),
              ("experiments.plan", f"--results={results}", "--min_in_domain_rel=0.95",
               "--max_general_drop=0.10", f"--n_boot={N_BOOT.value}",
               f"--out={out / 'report' / 'plan.json'}"))
    print(f"[demo] done in {sweep_main.fmt_time(time.perf_counter() - start)}; report: "
          f"{out / 'report' / 'report.md'}")


if __name__ == "__main__":
    cli.run(main)
