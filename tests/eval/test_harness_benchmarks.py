"""jdistill's built-in multiple-choice evaluation equals lm-evaluation-harness on the shipped
benchmarks, with the real default teacher (slow: ~minutes).

The reference is the harness itself: its own task YAMLs (arc_easy, arc_challenge, piqa, boolq,
openbookqa, commonsense_qa, mmlu_<subject>), included unchanged but for the data source — the
shipped files written in the hub data set's schema — and its own HF PyTorch model (HFLM) on
the teacher's HF checkpoint. HellaSwag: the shipped file joins ctx_a and ctx_b, so the split
is taken at the last ". " (as the built-in reader does) and only items whose ctx_b has no
capital after its first letter are compared (there the harness's `ctx_b.capitalize()` is
exact); `mmlu_cloze` is no harness task.
"""

import json
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from jdistill.data import io as data
from jdistill.eval import scoring as evaluate
from jdistill.eval import benchmarks
from jdistill.checkpoints import gguf  # noqa: E402

N = 20  # first items of each benchmark
HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"


def _arc(name):
    rows = [json.loads(x) for x in data.read_text(
        data.data_file(f"general/arc/ARC-{name}-Test.jsonl")).splitlines() if x.strip()]
    return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}}
            for r in rows]


def _jsonl(name):
    return [json.loads(x) for x in data.read_text(data.data_file(name)).splitlines() if x.strip()]


def _piqa():
    labels = data.read_text(data.data_file("general/piqa/valid-labels.lst")).split()
    return [{**d, "label": int(y)} for d, y in zip(_jsonl("general/piqa/valid.jsonl"), labels)]


def _boolq():
    return [{"passage": d["passage"], "question": d["question"],
             "label": int(str(d["answer"]).strip().lower() == "true")}
            for d in _jsonl("general/boolq/dev.jsonl")]


def _lettered(name, stem_key):
    out = []
    for d in _jsonl(name):
        q, letters, texts = benchmarks.split_options(d["question"], d["options"])
        out.append({stem_key: q, "choices": {"text": texts, "label": letters},
                    "answerKey": d["answer"].strip()[0]})
    return out


def _hellaswag_items():
    """(our item index, the hub-schema doc) for items the harness's format is exact on."""
    lines = data.read_text(data.data_file("general/hellaswag/hellaswag_val_full.txt")).split("\n")
    out = []
    for k, i in enumerate(range(0, len(lines) - 5, 6)):
        label, ctx = lines[i].split(": ", 1)
        cut = ctx.rfind(". ") + 2 if ". " in ctx else 0
        ctx_a, ctx_b = ctx[:cut].rstrip(), ctx[cut:]
        if not ctx_a or ctx_b[1:] != ctx_b[1:].lower():
            continue
        out.append((k, {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                        "endings": lines[i + 2:i + 6], "label": lines[i + 1]}))
    return out


def _mmlu(subject):
    import csv

    with data.open_text(data.data_file(f"general/mmlu/test/{subject}_test.csv"), newline="") as f:
        return [{"question": r["question"], "choices": [r[f"choice{k}"] for k in range(4)],
                 "answer": int(r["answer"])} for r in csv.DictReader(f)]


# ours -> (the harness's task YAML, its docs in the hub schema, which of our items)
CASES = {
    "arc_easy": ("arc/arc_easy.yaml", lambda: _arc("Easy"), slice(0, N)),
    "arc_challenge": ("arc/arc_challenge.yaml", lambda: _arc("Challenge"), slice(0, N)),
    "piqa": ("piqa/piqa.yaml", _piqa, slice(0, N)),
    "boolq": ("super_glue/boolq/default.yaml", _boolq, slice(0, N)),
    "openbookqa": ("openbookqa/openbookqa.yaml",
                   lambda: _lettered("general/openbookqa/test.jsonl", "question_stem"),
                   slice(0, N)),
    "commonsense_qa": ("commonsense_qa/default.yaml",
                       lambda: _lettered("general/commonsenseqa/validation.jsonl", "question"),
                       slice(0, N)),
    # our mmlu is every subject in file-name order: abstract_algebra comes first
    "mmlu": ("mmlu/default/mmlu_abstract_algebra.yaml", lambda: _mmlu("abstract_algebra"),
             slice(0, N)),
    "hellaswag": ("hellaswag/hellaswag.yaml", lambda: [d for _, d in _hellaswag_items()],
                  slice(0, N)),
}
# which of our items each harness doc is (all but hellaswag: the first N, in order)
OUR_ITEMS = {"hellaswag": lambda: [k for k, _ in _hellaswag_items()][:N]}


def _task_yaml(root: Path, name: str, harness_yaml: str, docs: list) -> str:
    """A local task: the harness's YAML included as is, the data source replaced."""
    (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / f"local_{name}.yaml").write_text(
        f"include: {HARNESS_TASKS / harness_yaml}\n"
        f"task: local_{name}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / (name + '.jsonl')}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: null\n")
    return f"local_{name}"


@pytest.mark.slow
def test_builtin_mc_equals_the_harness_on_the_shipped_benchmarks(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import jdistill

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    teacher = gguf.cached_import(gguf.default_teacher_path())
    names = {name: _task_yaml(tmp_path, name, y, docs()[sl])
             for name, (y, docs, sl) in CASES.items()}
    ref = HFLM(pretrained=str(teacher), batch_size=8, dtype="float32", device="cpu")
    out = lm_eval.simple_evaluate(model=ref, tasks=list(names.values()),
                                  task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True)
    model = jdistill.load_pretrained(teacher)
    tok = data.load_tokenizer(teacher)
    for name, task in names.items():
        everything = benchmarks.load_benchmark(name)
        items = ([everything[k] for k in OUR_ITEMS[name]()] if name in OUR_ITEMS
                 else everything[CASES[name][2]])
        ours = benchmarks.evaluate_mc(model, tok, items, batch_size=8)
        theirs = out["results"][task]
        assert ours["n"] == N == out["n-samples"][task]["effective"], name
        assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12), name
        if "acc_norm,none" in theirs:
            assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12), name
        # the same prompts: per-choice log-likelihoods agree (torch vs XLA float32)
        requests = [evaluate.encode_pair(tok, it.context, " " + c)
                    for it in items for c in it.choices]
        mine = np.concatenate(evaluate.choice_logliks(
            model, [(ctx, [cont]) for ctx, cont in requests], batch_size=8))
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        harness_ll = [float(r[0][0]) for s in samples for r in s["resps"]]
        np.testing.assert_allclose(mine, harness_ll, atol=5e-3, rtol=0, err_msg=name)
        # and the harness's first context is ours, character for character
        assert samples[0]["arguments"][0][0] == items[0].context, name
