"""The study report: law fits with bootstrap bands, findings and plots from a sweep's rows.

  python -m experiments.report --results=OUT/results.jsonl --out=OUT/report

Writes OUT/report.md (findings table, fitted parameters, raw results), OUT/fits.json
(``jdistill.study.summary``) and PNG plots; every file atomically. The analysis is
``jdistill.study.analyze``, the rendering ``jdistill.study.report``.
"""

from __future__ import annotations


from absl import app, flags

from experiments import cli
from jdistill import study as sd
from jdistill.study import report

FLAGS = flags.FLAGS


def define_flags():
    """Defines the main's flags; called only when run as a main, so importing this
    module (e.g. for its functions) never collides with the importer's flags."""
    flags.DEFINE_string("results", None, "Results JSONL written by the sweep.")
    flags.DEFINE_string("out", None, "Output directory (report.md, fits.json, *.png).")
    flags.DEFINE_integer("n_boot", 200, "Bootstrap resamples per fit (0 = no intervals).")
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
    flags.DEFINE_string("method", "full", "Baseline method of the per-format law fits.")
    flags.DEFINE_string("schedule", None, "Baseline pruning schedule of the law fits "
                        "(default: the one measured at the most ratios).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.results:
        raise app.UsageError("--results is required")
    cli.output_dir(FLAGS.out)
    an = sd.analyze(sd.load_study(FLAGS.results), method=FLAGS.method,
                    schedule=FLAGS.schedule, n_boot=FLAGS.n_boot, seed=FLAGS.seed)
    path = report.write_report(an, FLAGS.results, FLAGS.out)
    print(report.findings_text(an))
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
