"""General-knowledge multiple-choice benchmarks: the shipped items, their prompt formats
(`BENCHMARKS`) and their scores.

Scoring follows EleutherAI lm-evaluation-harness (v0.4, github.com/EleutherAI/
lm-evaluation-harness): `acc` = argmax of summed log-likelihood, `acc_norm` = argmax of
log-likelihood / len(choice) in characters (`process_results`' `completion_len`, the choice
text without the leading space); standard errors are `metrics.mean_stderr`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from jdistill.data import io as data
from jdistill.eval.metrics import mc_metrics
from jdistill.eval.scoring import choice_logliks, encode_pair


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: a context, the continuation texts (each scored with the
    harness's target delimiter ' ' in front) and the gold index."""

    context: str
    choices: tuple
    gold: int


def _jsonl(root, name):
    return [json.loads(x) for x in data.read_text(data.find_file(root, name)).splitlines()
            if x.strip()]


def _arc(root, name):
    """Harness arc_easy / arc_challenge: 'Question: {q}\\nAnswer:', ' {choice}'."""
    items = []
    for d in _jsonl(root, f"arc/ARC-{name}-Test.jsonl"):
        labels = [c["label"] for c in d["question"]["choices"]]
        items.append(MCItem(f"Question: {d['question']['stem']}\nAnswer:",
                            tuple(c["text"] for c in d["question"]["choices"]),
                            labels.index(d["answerKey"].strip())))
    return items


def hellaswag_preprocess(text: str) -> str:
    """The harness's hellaswag `preprocess` (WikiHow bracket artifacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _capitalize_last_sentence(ctx: str) -> str:
    # The shipped file stores ctx_a + " " + ctx_b joined; the harness capitalises ctx_b. ctx_b
    # is the fragment after ctx_a's last sentence, so capitalise its first letter (recovers
    # "... on a roof. He"; str.capitalize's lowercasing of the rest is not recoverable).
    cut = ctx.rfind(". ") + 2 if ". " in ctx else 0
    tail = ctx[cut:]
    return ctx[:cut] + tail[:1].upper() + tail[1:] if tail[:1].islower() else ctx


def _hellaswag(root):
    """Harness hellaswag: query = preprocess(activity_label + ': ' + ctx), choices =
    preprocess(ending). The file has 6 lines per item: 'label: context', gold, 4 endings."""
    lines = data.read_text(data.find_file(root, "hellaswag/hellaswag_val_full.txt")).split("\n")
    items = []
    for i in range(0, len(lines) - 5, 6):
        head, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
        items.append(MCItem(hellaswag_preprocess(_capitalize_last_sentence(head)),
                            tuple(hellaswag_preprocess(e) for e in endings), gold))
    return items


def _piqa(root):
    """Harness piqa: 'Question: {goal}\\nAnswer:', choices sol1 / sol2."""
    labels = data.read_text(data.find_file(root, "piqa/valid-labels.lst")).split()
    docs = _jsonl(root, "piqa/valid.jsonl")
    if len(labels) != len(docs):
        raise ValueError(f"{root / 'piqa'}: {len(docs)} items but {len(labels)} labels")
    return [MCItem(f"Question: {d['goal']}\nAnswer:", (d["sol1"], d["sol2"]), int(y))
            for d, y in zip(docs, labels)]


def _boolq(root):
    """Harness boolq (super_glue): '{passage}\\nQuestion: {question}?\\nAnswer:', ' no' / ' yes'."""
    return [MCItem(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ("no", "yes"),
                   int(str(d["answer"]).strip().lower() == "true"))
            for d in _jsonl(root, "boolq/dev.jsonl")]


def split_options(question: str, options: str) -> tuple[str, list[str], list[str]]:
    """(question, letters, option texts) from the shipped OpenBookQA / CommonsenseQA
    re-format ({question, options "A. ..\nB. ..", answer "B. text"}). A few CSQA rows
    (validation rows 103, 363, 1208) have the split misplaced (options A-B inside the
    question, or a stray "." line): the question and options are re-joined and split at
    the first "A. " line."""
    lines = (question + "\n" + options).split("\n")
    first = next((i for i, x in enumerate(lines) if re.match(r"^\s*A\.\s", x)), None)
    if first is None:
        raise ValueError(f"no 'A. ' option line in {options!r}")
    q = " ".join(x.strip() for x in lines[:first] if x.strip() not in ("", "."))
    letters, texts = [], []
    for x in lines[first:]:
        if not x.strip():
            continue
        m = re.match(r"^\s*([A-Z])\.\s?(.*)$", x)
        if m is None or m.group(1) != chr(ord("A") + len(letters)):
            raise ValueError(f"option line {x!r} of {options!r} is not the next 'X. text'")
        letters.append(m.group(1))
        texts.append(m.group(2).strip())
    return q, letters, texts


def _openbookqa(root):
    """Harness openbookqa: context = question_stem, choices = the option texts."""
    items = []
    for d in _jsonl(root, "openbookqa/test.jsonl"):
        q, letters, texts = split_options(d["question"], d["options"])
        items.append(MCItem(q, tuple(texts), letters.index(d["answer"].strip()[0])))
    return items


def _commonsense_qa(root):
    """Harness commonsense_qa: 'Question: {q}\\nA. ..\\n...E. ..\\nAnswer:', ' A' .. ' E'."""
    items = []
    for d in _jsonl(root, "commonsenseqa/validation.jsonl"):
        q, letters, texts = split_options(d["question"], d["options"])
        body = "\n".join(f"{k}. {t}" for k, t in zip(letters, texts))
        items.append(MCItem(f"Question: {q}\n{body}\nAnswer:", tuple(letters),
                            letters.index(d["answer"].strip()[0])))
    return items


def _mmlu_rows(root):
    for path in sorted((root / "mmlu/test").glob("*_test.csv*")):  # some are .csv.xz
        subject = path.name[:path.name.index("_test.csv")].replace("_", " ")
        with data.open_text(path, newline="") as f:
            for row in csv.DictReader(f):
                yield subject, row


def _mmlu(root):
    """Harness mmlu (default, zero-shot): description 'The following are multiple choice
    questions (with answers) about {subject}.\\n\\n' + '{q}\\nA. ..\\nD. ..\\nAnswer:',
    choices ' A' .. ' D'."""
    items = []
    for subject, r in _mmlu_rows(root):
        opts = [r[f"choice{k}"] for k in range(4)]
        body = "\n".join(f"{L}. {t}" for L, t in zip("ABCD", opts))
        items.append(MCItem(f"The following are multiple choice questions (with answers) "
                            f"about {subject}.\n\n{r['question'].strip()}\n{body}\nAnswer:",
                            ("A", "B", "C", "D"), int(r["answer"])))
    return items


def _mmlu_cloze(root):
    """MMLU scoring each answer's *text* (cloze form, as OLMES / lighteval's mmlu cloze):
    'Question: {q}\\nAnswer:', ' {choice}' — not a harness task; small models sit at chance
    on the lettered form (see data MANIFEST.md)."""
    return [MCItem(f"Question: {r['question'].strip()}\nAnswer:",
                   tuple(r[f"choice{k}"] for k in range(4)), int(r["answer"]))
            for _, r in _mmlu_rows(root)]


BENCHMARKS = {
    "arc_easy": lambda root: _arc(root, "Easy"),
    "arc_challenge": lambda root: _arc(root, "Challenge"),
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "boolq": _boolq,
    "openbookqa": _openbookqa,
    "commonsense_qa": _commonsense_qa,
    "mmlu": _mmlu,
    "mmlu_cloze": _mmlu_cloze,
}


def load_benchmark(name: str, *, limit: int | None = None, seed: int = 0,
                   root=None) -> list[MCItem]:
    """A benchmark's items (from `root`, default the shipped general/ folder); with `limit`,
    a fixed seeded subset (kept in file order)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; use one of {sorted(BENCHMARKS)}")
    items = BENCHMARKS[name](Path(root) if root is not None else data.data_root() / "general")
    if limit is not None and limit < len(items):
        keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:limit])
        items = [items[i] for i in keep]
    return items


def evaluate_mc(model, tokenizer, items: list[MCItem], *, batch_size: int = 8, mesh=None,
                max_length=None, progress: str | None = None) -> dict:
    """Zero-shot log-likelihood multiple choice: {acc, acc_norm, stderr, acc_norm_stderr,
    n}. Each choice is scored as the continuation ' ' + choice (harness target delimiter)."""
    requests = []
    for it in items:
        pairs = [encode_pair(tokenizer, it.context, " " + c) for c in it.choices]
        requests.append((pairs[0][0], [c for _, c in pairs]))
    ll = choice_logliks(model, requests, batch_size=batch_size, mesh=mesh,
                        max_length=max_length, progress=progress)
    return mc_metrics(ll, [it.choices for it in items], [it.gold for it in items])
