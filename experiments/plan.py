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
from jdistill.utils import files as results
from jdistill import study as sd

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
    flags.DEFINE_string("schedule", "one_shot",
                        "Pruning schedule whose cells the laws are fitted on.")
    flags.DEFINE_string("out", None, "Write the plan as JSON here (optional).")


def text(p: dict) -> str:
    """The plan as a few readable lines."""
    c = p["constraints"]
    lines = [f"status: {p['status']}", p["message"], "",
             f"constraints: in-domain accuracy >= {c['min_in_domain_accuracy']:.4f} "
             f"({c['min_in_domain_rel']:g} x teacher {c['teacher_in_domain_accuracy']:.4f})"
             + (f"; general score >= {c['min_general_score']:.4f} (teacher "
                f"{c['teacher_general_score']:.4f} - {c['max_general_drop']:g})"
                if c["min_general_score"] is not None else "")
             + (f"; <= {c['max_examples']} examples" if c["max_examples"] else "")
             + (" (lower band edges)" if c["conservative"] else "")]
    lines.append(f"laws fitted on method={p['method']}, schedule={p['schedule']} cells")
    lines.append("best per format:")
    for f in p["per_format"]:
        if f is None:
            continue
        if f["ratio"] is None:
            lines.append(f"  {f['format']:>8} D={f['examples']}: cannot meet ({f['binding']})")
        else:
            acc = f["in_domain_accuracy"]
            gen = f.get("general_score")
            lines.append(f"  {f['format']:>8} D={f['examples']}: ratio {f['ratio']:.3g}, "
                         f"in-domain {acc['value']:.4f}"
                         + (f", general {gen['value']:.4f}" if gen else ""))
    ext = p.get("extrapolation") or {}
    for w in ext.get("warnings", []):
        lines.append(f"WARNING: {w}")
    for n in p["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


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
        results.atomic_write(out, json.dumps(p, indent=1))
    print(text(p))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
