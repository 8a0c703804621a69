"""Compression planner: the largest ratio, data size and format the fitted laws allow.

  python -m experiments.plan --results=OUT/results.jsonl --min_in_domain_rel=0.95 \
      --max_general_drop=0.10 --max_examples=1000 --out=plan.json

Fits the study's laws (``jdistill.study.analyze``) and searches them (``jdistill.study.plan``):
ratios log-spaced from 1 to 4x the largest observed, data sizes up to the budget. Prints a
plain answer, says so when the constraints cannot be met, and warns (with factors) when the
answer extrapolates beyond the measured ratios or data sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from experiments import cli
from jdistill import study as sd
from jdistill.utils import files

FLAGS = flags.FLAGS


def define_flags():
    """Defines the main's flags; called only when run as a main, so importing this
    module (e.g. for its functions) never collides with the importer's flags."""
    flags.DEFINE_string("results", None, "Results JSONL written by the sweep.")
    flags.DEFINE_float("min_in_domain_rel", 0.95,
                       "Predicted in-domain accuracy must be >= this fraction of the teacher's.")
    flags.DEFINE_float("max_general_drop", None, "Predicted general score may fall at most this "
                       "much (absolute, 0.10 = 10 points) below the teacher's; unset: no limit.")
    flags.DEFINE_integer("max_examples", None, "Distillation data budget (examples); unset: the "
                         "observed data sizes.")
    flags.DEFINE_list("formats", None, "Supervision formats to consider (default: all measured).")
    flags.DEFINE_bool("conservative", False, "Test the bootstrap band's lower edge instead of the "
                      "point prediction.")
    flags.DEFINE_integer("n_boot", 200, "Bootstrap resamples per fit (intervals).")
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
    flags.DEFINE_string("method", "full", "Method whose cells the laws are fitted on.")
    flags.DEFINE_string("schedule", None,
                        "Pruning schedule whose cells the laws are fitted on (default: the "
                        "one measured at the most ratios).")
    flags.DEFINE_string("out", None, "Write the plan as JSON here (optional).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.results:
        raise app.UsageError("--results is required")
    an = sd.analyze(sd.load_study(FLAGS.results), method=FLAGS.method,
                    schedule=FLAGS.schedule, n_boot=FLAGS.n_boot, seed=FLAGS.seed)
    p = sd.plan(an, min_in_domain_rel=FLAGS.min_in_domain_rel,
                max_general_drop=FLAGS.max_general_drop, max_examples=FLAGS.max_examples,
                formats=FLAGS.formats, conservative=FLAGS.conservative)
    if FLAGS.out:
        out = Path(FLAGS.out)
        files.atomic_write(out, json.dumps(p, indent=1))
    print(sd.plan_text(p))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
