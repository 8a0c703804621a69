"""Supervision formats: records per format, rationalised traces, disagreement filter."""

import json

import pytest

from jdistill.data import tasks
from jdistill.distill import records, supervision
from tests.hf_models import make_hf_model, save_tokenizer

LABELS = ["Earnings", "Fed | Central Banks", "M&A | Investments", "Markets"]


def test_disagreeing_traces_are_dropped_and_counted():
    recs = [{"reasoning": "because of earnings"}, {"reasoning": "it is about markets"},
            {"reasoning": "no label named"}]
    kept, counts = records.drop_disagreeing(recs, [0, 0, 2], LABELS)
    assert kept == [recs[0], recs[2]]
    assert counts == {"traces": 3, "disagree": 1, "no_label": 1, "agree": 1}
    # the filter reads a trace as evaluation reads a generated answer: one parser, for which
    # a '|'-separated part names its label
    assert records.parse_label is tasks.parse_label
    _, counts = records.drop_disagreeing([{"reasoning": "the Central Banks moved"}], [1], LABELS)
    assert counts["agree"] == 1


def test_label_formats_and_bad_input():
    recs, _ = records.build_records("label", ["p1", "p2"], ["a", "b"])
    assert recs == [{"prompt": "p1", "answer": "a"}, {"prompt": "p2", "answer": "b"}]
    with pytest.raises(ValueError, match="unknown supervision format"):
        records.build_records("kd", ["p"], ["a"])
    with pytest.raises(ValueError, match="needs teacher_dir"):
        records.build_records("cot", ["p"], ["a"])
    with pytest.raises(ValueError, match="lacks the {label} slot"):
        records.rationale_prompt("t", "l", recipe="{text} only")


def test_cot_records_keep_the_label_out_of_the_student_prompt(tmp_path):
    make_hf_model("llama3").save_pretrained(tmp_path / "t")
    save_tokenizer(tmp_path / "t")
    texts = ["the fed holds rates", "markets rally"]
    prompts = [f"Headline: {t}\nTopic:" for t in texts]
    settings = supervision.TraceSettings(max_new_tokens=6, recipe="{prompt}")
    recs, stats = records.build_records("blended", prompts, [" Fed", " Markets"], texts=texts,
                                        gold=[1, 3], label_names=LABELS, teacher_dir=tmp_path / "t",
                                        cache_dir=tmp_path / "c", settings=settings,
                                        log=lambda _: None)
    assert stats["traces"] == 2 and len(recs) == 2 - stats["disagree"]
    for r in recs:
        assert r["prompt"] in prompts and "explain why" not in r["prompt"]
        assert "explain why" in r["task_prompt"]  # the teacher saw the rationale request
        assert r["reasoning"].endswith("\n")
    meta = json.loads(next((tmp_path / "c").glob("*.meta.json")).read_text())
    assert meta["count"] == 2
