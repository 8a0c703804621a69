"""The study report: law fits with bootstrap bands, findings and plots, rendered from an
``Analysis`` (``jdistill.study.analyze``).

Writes report.md (findings table, fitted parameters, raw results), fits.json
(``study.summary``) and PNG plots; every file atomically. ``experiments.report`` is its main.
"""

from __future__ import annotations

import datetime
import io
import json
import math
from pathlib import Path

import numpy as np

from jdistill.study.analysis import Analysis, at_least_chance
from jdistill.study.findings import summary as findings_summary
from jdistill.study.statistics import Z
from jdistill.utils import files


def write_report(an: Analysis, results_path, out_dir) -> Path:
    """Writes report.md, fits.json, plots and results.jsonl (the rows of `results_path`,
    whose analysis `an` is) under `out_dir`; returns the path of report.md. The folder is
    self-contained and machine-independent (`files.portable_paths`), so it can be
    committed or shared as it is."""
    out = Path(out_dir)
    rows = [json.loads(line) for line in Path(results_path).read_text().splitlines()
            if line.strip()]
    plots = render_plots(an, out)
    # the folder's own copy of the rows is the source it names, wherever they were read
    summary = files.portable_paths({**findings_summary(an), "plots": plots,
                                    "source": "results.jsonl"})
    files.atomic_write(out / "fits.json", json.dumps(summary, indent=1))
    files.atomic_write(out / "results.jsonl", "".join(
        json.dumps(files.portable_paths(r)) + "\n" for r in rows))
    path = out / "report.md"
    files.atomic_write(path, markdown(an, summary, plots, source="results.jsonl"))
    return path


def findings_text(an: Analysis) -> str:
    """One line per finding: its status, id and claim (what the report and demo mains print)."""
    return "\n".join(f"{f['status']:>15}  {f['id']}: {f['claim']}"
                     for f in findings_summary(an)["findings"])


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def render_plots(an: Analysis, out: Path) -> list[str]:
    """in_domain.png, general.png (when measured) and comparisons.png; returns names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    metrics = [("in_domain_accuracy", "in_domain_error", "in_domain.png",
                "in-domain accuracy", an.study.in_domain_chance)]
    if an.study.has_general:
        metrics.append(("general_score", "general_collapse", "general.png",
                        "general score (mean acc_norm)", an.study.general_chance))
    fmts = [f for f in an.study.formats if an.study.baseline(f, an.method, an.schedule)]
    for metric, fit_key, name, label, chance in metrics:
        if not fmts:
            break
        fig, axes = plt.subplots(1, len(fmts), figsize=(5.2 * len(fmts), 4.2), squeeze=False,
                                 sharey=True)
        teacher, _ = an.study.teacher_value(metric)
        for ax, fmt in zip(axes[0], fmts):
            _panel(ax, an, fmt, metric, an.fit_for(fmt, fit_key), teacher, chance)
            ax.set_title(f"{fmt} ({an.method}, {an.schedule})")
            ax.set_xlabel("compression ratio r (teacher / student params)")
        axes[0][0].set_ylabel(label)
        axes[0][-1].legend(fontsize=7, loc="best")
        files.atomic_write(out / name, _png(fig))
        plt.close(fig)
        written.append(name)
    comp = [(f, p) for f in an.findings if f["id"] != "smooth_degradation"
            for p in f["parts"] if "mean" in p and "stderr" in p and p.get("n")]
    if comp:
        fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(comp) + 1.5))
        labels, means, errs = [], [], []
        for f, p in comp:
            labels.append(f"{p.get('a', '')} - {p.get('b', '')}: {p['metric']}")
            means.append(p["mean"])
            errs.append(Z * p["stderr"] if math.isfinite(p["stderr"]) else 0.0)
        yy = np.arange(len(comp))
        colors = ["C2" if m - e > 0 else "C3" if m + e < 0 else "C7"
                  for m, e in zip(means, errs)]
        for m, e, y, c in zip(means, errs, yy, colors):
            ax.errorbar([m], [y], xerr=[e], fmt="o", color=c, capsize=3)
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(yy, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"mean paired difference (bars: +-{Z:g} stderr)")
        ax.set_title("matched-cell comparisons")
        files.atomic_write(out / "comparisons.png", _png(fig))
        plt.close(fig)
        written.append("comparisons.png")
    return written


def _panel(ax, an, fmt, metric, cf, teacher, chance):
    import matplotlib.ticker
    base = an.study.baseline(fmt, an.method, an.schedule)
    other = [c for c in an.study.cells if c.format == fmt and c not in base]
    ds = sorted({c.examples for c in base})
    for i, d in enumerate(ds):
        pts = [c for c in base if c.examples == d and math.isfinite(c.value(metric)[0])]
        if pts:
            v = np.array([c.value(metric) for c in pts])
            ax.errorbar([c.r for c in pts], v[:, 0], yerr=np.nan_to_num(v[:, 1]), fmt="o",
                        color=f"C{i}", ms=4, capsize=2, label=f"D={d}")
    pts = [c for c in other if math.isfinite(c.value(metric)[0])]
    if pts:
        ax.scatter([c.r for c in pts], [c.value(metric)[0] for c in pts], s=18,
                   facecolors="none", edgecolors="grey", label="other method/schedule")
    if cf is not None:
        rg = np.geomspace(1.0, max(c.r for c in base) * 1.15, 120)
        curve_ds = [None] if cf.D_range is None else ds
        for i, d in enumerate(curve_ds):
            color = f"C{i}" if d is not None else "k"
            ax.plot(rg, at_least_chance(cf.predict(rg, d), chance), color=color, lw=1.5,
                    label=f"{cf.law.name}" + (f" D={d}" if d is not None else ""))
            band = cf.band(rg, d)
            if band is not None:  # accuracies and scores live in [chance, 1]; so does the band
                band = np.minimum(at_least_chance(band, chance), 1.0)
                ax.fill_between(rg, band[0], band[1], color=color, alpha=0.18)
        if "r0" in cf.params():
            r0 = cf.params()["r0"]
            if r0 <= rg[-1]:
                ax.axvline(r0, color="grey", ls=":", lw=1, label=f"r0 = {r0:.3g}")
    if math.isfinite(teacher):
        ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher {teacher:.3f}")
    if math.isfinite(chance):
        ax.axhline(chance, color="r", ls=":", lw=1, label=f"chance {chance:.3g}")
    ax.set_xscale("log")
    ticks = sorted({1.0, *(round(c.ratio, 2) for c in base)})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")


# ----------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(v, nd=4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}g}"


def _pm(v, se) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:.4f}" + (f" ± {se:.4f}" if math.isfinite(se) else "")


def markdown(an: Analysis, summary: dict, plots: list[str], *, source: str) -> str:
    """report.md: header, findings, plots, fitted parameters, extrapolation, raw rows.
    `source`: the results file as the report names it."""
    st = an.study
    t_acc, t_acc_se = st.teacher_value("in_domain_accuracy")
    t_gen, t_gen_se = st.teacher_value("general_score")
    t0 = st.teachers[0]
    times = sorted(r.time for r in (*st.teachers, *st.cells) if r.time)
    tasks = sorted({r.task for r in (*st.teachers, *st.cells) if r.task})
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# Compression study report", "",
        f"- Results: `{source}` — {len(st.cells)} student cells, {len(st.teachers)} teacher "
        f"row(s); formats {', '.join(st.formats)}",
        f"- Task: {', '.join(tasks) or 'unknown'}; teacher: "
        + (f"`{Path(t0.name).name}`, " if t0.name else "")  # a path of one machine: its name
        + f"{t0.teacher_params or '?'} parameters",
        f"- Teacher in-domain accuracy {_pm(t_acc, t_acc_se)} (chance "
        f"{_num(st.in_domain_chance)}); general score "
        + (f"{_pm(t_gen, t_gen_se)} (chance {_num(st.general_chance)})" if st.has_general
           else "not measured"),
        *[f"- Original teacher (before correction, context only): in-domain accuracy "
          f"{_pm(o.acc, o.acc_se)}, general score {_pm(o.general, o.general_se)}"
          for o in st.original_teachers],
        f"- Runs from {times[0] if times else '?'} to {times[-1] if times else '?'}; report "
        f"generated {now}",
        "- In-domain scores the findings use, per format: " + "; ".join(
            f"{fmt} {'/'.join(sorted({c.scoring for c in st.cells if c.format == fmt}))}"
            for fmt in st.formats) + " (after_trace: the student's own greedy trace, then "
        "the labels; direct: the labels after the prompt; both are in every trace row)",
        f"- Law fits use the baseline method `{an.method}`, schedule `{an.schedule}`, plus the "
        f"teacher at r = 1; bootstrap: {an.n_boot} resamples, {int(an.level * 100)}% "
        f"percentile intervals, seed {an.seed}", "",
        "## Findings", "",
        "| # | finding | claim | status | evidence |", "|---|---|---|---|---|"]
    for f in an.findings:
        lines.append(f"| {f['number']} | {f['id']} | {_cell(f['claim'])} | **{f['status']}** | "
                     f"{_cell(f['evidence'])} |")
    lines += ["", "Decision rules:", ""]
    lines += [f"- {f['number']} `{f['id']}`: {f['rule']}" for f in an.findings]
    lines += ["", "A finding is stated only as strongly as these numbers allow: *inconclusive* "
              "means the data neither support nor contradict it at this precision.", ""]
    if plots:
        lines += ["## Plots", ""]
        captions = {"in_domain.png": "In-domain accuracy vs compression ratio (points: measured "
                    "± stderr; lines: fitted law; bands: bootstrap interval; dashed: teacher)",
                    "general.png": "General-knowledge score vs compression ratio (dotted red: "
                    "chance; dotted grey: fitted collapse point r0)",
                    "comparisons.png": f"Matched-cell differences (± {Z:g} stderr)"}
        for p in plots:
            lines += [f"![{p}]({p})", "", f"*{captions.get(p, p)}*", ""]
    level = f"{int(an.level * 100)}%"
    lines += ["## Fitted laws", "",
              f"| format | quantity | law | points | parameters: value [{level} interval] |",
              "|---|---|---|---|---|"]
    for fd in summary["fits"]:
        iv = fd["intervals"]
        ps = "; ".join(f"{k} = {_num(v)}" + (f" [{_num(iv[k][0])}, {_num(iv[k][1])}]"
                                              if k in iv else "")
                       for k, v in fd["params"].items())
        lines.append(f"| {fd['format']} | {fd['metric']} | `{fd['law']}` | {fd['n_points']} | "
                     f"{ps} |")
    if not summary["fits"]:
        lines.append("| - | - | no law could be fitted (see notes) | - | - |")
    lines += ["", "Why each law: " if summary["fits"] else ""]
    lines += [f"- {fd['format']} / {fd['metric']}: {_cell(fd['choice'])}"
              for fd in summary["fits"]]
    lines += ["", "Formulas: " + "; ".join(sorted({f"`{fd['law']}`: {fd['formula']}"
                                                    for fd in summary["fits"]})), "",
              "## Held-out extrapolation (in-domain accuracy)", "",
              "| format | law | fit on ratio <= | held-out ratio | mean abs err | max abs err | "
              "tolerance |", "|---|---|---|---|---|---|---|"]
    for fmt, ex in sorted(an.extrapolations.items()):
        if "skipped" in ex:
            lines.append(f"| {fmt} | - | - | {_num(ex.get('held_out_ratio'))} | skipped: "
                         f"{_cell(ex['skipped'])} | - | - |")
        else:
            lines.append(f"| {fmt} | {ex['law']} | {ex['train_max_ratio']:g} | "
                         f"{ex['held_out_ratio']:g} | {ex['mean_abs_err']:.4f} | "
                         f"{ex['max_abs_err']:.4f} | {ex['tolerance']:.4f} |")
    lines += held_out_each_lines(an)
    if an.notes:
        lines += ["", "## Notes", ""] + [f"- {_cell(n)}" for n in an.notes]
    lines += ["", "## Raw results", "",
              "In-domain metrics are scored as each student was trained (`scoring`: "
              "`after_trace` = the student's own greedy trace, then the labels; `direct` = "
              "the labels right after the prompt). Stderrs are the larger of the measurement "
              "stderr and the between-seed sd where a cell has several seeds.", "",
              "| cell | r (actual) | format | method | schedule | examples | seed | scoring | "
              "in-domain acc | macro-F1 | gold NLL | Brier | general score |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(st.cells, key=lambda c: (c.format, c.method, c.schedule, c.examples,
                                            c.ratio, c.seed))
    for c in (*st.teachers, *order):
        lines.append(f"| {_cell(c.cell_id)} | {c.r:.3f} | {c.format} | {c.method} | "
                     f"{c.schedule} | {c.examples or '-'} | {c.seed} | {c.scoring} | "
                     f"{_pm(c.acc, c.acc_se)} | {_pm(c.macro_f1, c.macro_f1_se)} | "
                     f"{_pm(c.nll, c.nll_se)} | {_pm(c.brier, c.brier_se)} | "
                     f"{_pm(c.general, c.general_se)} |")
    lines.append("")
    return "\n".join(lines)


def held_out_each_lines(an: Analysis) -> list[str]:
    """The leave-one-ratio-out table (``analysis.hold_out_each_ratio``) and its tallies."""
    entries = [(fmt, e) for fmt, es in sorted(an.held_out_each.items()) for e in es]
    if not entries:
        return []
    lines = ["", "## Each ratio held out in turn (in-domain accuracy; a diagnostic)", "",
             "Both in-domain laws are fitted on the teacher and every other ratio, then "
             "predict the held-out ratio's rows (the error law floored at chance). Finding 1 "
             "holds out only the largest ratio; this table shows the laws between the ratios "
             "too. No finding reads it.", "",
             "| format | held-out ratio | rows | measured | error law: predicted (mean abs "
             "err) | collapse law: predicted (mean abs err) | tolerance |",
             "|---|---|---|---|---|---|---|"]

    def cell(fit):
        if "skipped" in fit:
            return f"skipped: {_cell(fit['skipped'])}"
        mark = "" if fit["within_tolerance"] else " **over**"
        return (f"`{fit['law']}` {fit['predicted']:.3f} ({fit['mean_abs_err']:.3f}{mark})")

    for fmt, e in entries:
        lines.append(f"| {fmt} | {e['held_out_ratio']:g} | {e['n_test']} | "
                     f"{e['observed']:.3f} | {cell(e['laws']['error'])} | "
                     f"{cell(e['laws']['collapse'])} | {e['tolerance']:.3f} |")
    lines.append("")
    for fmt, es in sorted(an.held_out_each.items()):
        tally = {kind: sum(e["laws"][kind].get("within_tolerance", False) for e in es)
                 for kind in ("error", "collapse")}
        lines.append(f"- {fmt}: within tolerance at {tally['error']} of {len(es)} held-out "
                     f"ratios with the error law, {tally['collapse']} of {len(es)} with the "
                     "collapse law")
    return lines
