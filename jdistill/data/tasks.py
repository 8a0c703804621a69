"""In-domain classification tasks: small declarative specs, loading, subsampling, prompts.

A task is a `TaskSpec` (frozen dataclass): where each split's rows live, which columns hold
the text and the label, the label names, the prompt template and how an answer is written.
Everything else is a pure function of a spec:

  load_split(task, "test")          -> [(text, label_index)]
  subsample(examples, n, seed)      -> stratified, seeded, nested subset
  prompt(task, text), answer(task, i), to_records(task, examples) -> {"prompt", "answer"}
    records, the JSONL format `jdistill.data.io.read_examples` reads and `experiments.distill
    --data` consumes.

Shipped specs: `twitter_topics` (default, 20 classes) and `reuters35` (35 classes); any
labelled headline file (FinHeadlineMix-shaped: a `text` or `headline` column and a `label`
column; .csv / .jsonl / .json / .parquet, optionally .xz / .gz / .bz2) becomes a task with
`task_from_file`, and any Hugging Face data set — a hub name such as `nvidia/FinHeadlineMix`
or `zeroshot/twitter-financial-news-topic`, a `save_to_disk` folder or one of its .arrow
files — with `task_from_hf`
(label names from its ClassLabel feature). `get_task` takes any of these.

Readers (why two): HF `datasets` reads hub data and its own folders; our CSV / JSONL readers
stay for plain files because they return every field as the exact string in the file, number
the failing row in their errors, and write no Arrow cache under ~/.cache for each file read
(`datasets`' CSV builder needs `keep_default_na=False` to keep an "NA" headline; see
BUILD_NOTES, issue 15).

Prompt choice (why): prompts are short plain text ending in "Topic:" and the answer is
" <label name>". The label names are *not* listed by default: for 35 classes the list costs
~100 tokens per example in every distillation step, and log-likelihood scoring restricts
the output to the label set anyway. A template may list them with a `{labels}` field
(comma-separated names) where a zero-shot, generating teacher needs them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np

# the one tabular reader for every file is data.io's
from jdistill.data.io import READERS, TEXT_COLUMNS, data_file, format_suffix, read_rows
from jdistill.utils import files


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """One split's rows: a data file, optionally only the rows where column == value for
    every (column, value) pair in `where` (e.g. Reuters' ModApte split column). With
    `hf_split`, `path` is a Hugging Face data set (hub name or `save_to_disk` folder) and
    the rows are its split of that name."""

    path: str
    where: tuple = ()
    hf_split: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A text classification task.

    Attributes:
      name: short identifier (results rows, file names).
      splits: split name -> `SplitFile`.
      label_names: the classes, in index order. A file's label may be an int (or a string of
        digits) indexing this list, or the name itself.
      text_field: the text column; None = the first of `text`, `headline` present.
      label_field: the label column.
      template: prompt template with a `{text}` field (and optionally `{labels}`).
      answer_prefix: what precedes the label name in the answer (" " after "Topic:").
      filter_rows: the files hold more than the task: rows with an empty text or a label
        outside `label_names` are skipped (otherwise they are errors).
      description: one line for humans.
    """

    name: str
    splits: dict
    label_names: tuple
    text_field: str | None = None
    label_field: str = "label"
    template: str = "Classify the topic of this financial news headline.\nHeadline: {text}\nTopic:"
    answer_prefix: str = " "
    filter_rows: bool = False
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        if not self.label_names:
            raise ValueError(f"task {self.name!r}: label_names is empty")
        dupes = [n for n, c in collections.Counter(self.label_names).items() if c > 1]
        if dupes:
            raise ValueError(f"task {self.name!r}: duplicate label names {dupes}")
        if any(not n.strip() for n in self.label_names):
            raise ValueError(f"task {self.name!r}: a label name is blank")
        check_template(self.template)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def check_template(template: str) -> None:
    """Raises unless `template` has a `{text}` field and no fields besides text / labels."""
    if "{text}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{text}} field; write where "
                         "the input goes, e.g. 'Headline: {text}\\nTopic:'")
    try:
        template.format(text="", labels="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"prompt template {template!r}: {e!r}; only {{text}} and {{labels}} "
                         "may appear (write literal braces as {{ and }})") from None


# ------------------------------------------------------------------ shipped tasks

TWITTER_LABELS = (
    "Analyst Update", "Fed | Central Banks", "Company | Product News",
    "Treasuries | Corporate Debt", "Dividend", "Earnings", "Energy | Oil", "Financials",
    "Currencies", "General News | Opinion", "Gold | Metals | Materials", "IPO",
    "Legal | Regulation", "M&A | Investments", "Macro", "Markets", "Politics",
    "Personnel Change", "Stock Commentary", "Stock Movement")

# The 35 most frequent single-topic ModApte topics, most frequent first (MANIFEST.md).
REUTERS_LABELS = (
    "earn", "acq", "crude", "trade", "money-fx", "interest", "money-supply", "ship", "sugar",
    "coffee", "gold", "gnp", "cpi", "cocoa", "grain", "alum", "reserves", "jobs", "copper",
    "ipi", "rubber", "iron-steel", "nat-gas", "bop", "veg-oil", "tin", "cotton", "wpi",
    "orange", "retail", "pet-chem", "gas", "livestock", "housing", "strategic-metal")


def twitter_topics() -> TaskSpec:
    """Twitter financial news topics, 20 classes (the default in-domain task; shipped).

    "test" is the published validation file (the data set has no other held-out split).
    """
    d = "finance/twitter_financial_news_topic/"
    return TaskSpec(
        name="twitter_topics",
        splits={"train": SplitFile(str(data_file(d + "topic_train.csv"))),
                "test": SplitFile(str(data_file(d + "topic_valid.csv")))},
        label_names=TWITTER_LABELS, text_field="text",
        template="Classify the topic of this financial news tweet.\nTweet: {text}\nTopic:",
        description="zeroshot/twitter-financial-news-topic: 16,990 train / 4,117 test tweets")


def reuters35() -> TaskSpec:
    """Reuters-21578 headlines, ModApte split, single-topic, 35 most frequent topics
    (6,415 train / 2,505 test; shipped). Labels are the Reuters topic codes (e.g. 'acq')."""
    f = str(data_file("finance/reuters21578/reuters21578_titles_topics.csv"))
    return TaskSpec(
        name="reuters35",
        splits={s: SplitFile(f, (("topics_attr", "YES"), ("lewissplit", s.upper())))
                for s in ("train", "test")},
        label_names=REUTERS_LABELS, text_field="title", label_field="topics",
        template="Classify the topic of this Reuters news headline.\nHeadline: {text}\nTopic:",
        filter_rows=True,
        description="Reuters-21578 ModApte titles, 35 topics (earn/acq ~70%)")


TASKS = {"twitter_topics": twitter_topics, "reuters35": reuters35}
DEFAULT_TASK = "twitter_topics"


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name on the HF hub


def get_task(name_or_path: str, *, split: str = "test", label_names=None) -> TaskSpec:
    """A shipped task by name; `task_from_file` for a path to a data file (it becomes split
    `split`); `task_from_hf` for a `save_to_disk` folder or a hub name (owner/name)."""
    if name_or_path in TASKS:
        return TASKS[name_or_path]()
    path = Path(name_or_path)
    if path.is_dir():
        return task_from_hf(name_or_path, label_names=label_names)
    if path.suffix.lower() == ".arrow":  # one Arrow file of a data set: it becomes `split`
        task = task_from_hf(name_or_path, label_names=label_names)
        return dataclasses.replace(task, splits={split: task.splits["train"]})
    if format_suffix(name_or_path) in READERS:
        return task_from_file(name_or_path, label_names, split=split)
    if HUB_NAME.match(name_or_path) and not path.exists():
        return task_from_hf(name_or_path, label_names=label_names)
    raise ValueError(f"unknown task {name_or_path!r}: use one of {sorted(TASKS)}, a labelled "
                     f"{'/'.join(READERS)} or .arrow file, a datasets save_to_disk folder or "
                     "a Hugging Face hub name (owner/name)")


def task_from_file(path, label_names=None, *, split: str = "test", name: str | None = None,
                   template: str | None = None, text_field: str | None = None,
                   label_field: str = "label", answer_prefix: str = " ") -> TaskSpec:
    """A task from a user's labelled file(s), e.g. FinHeadlineMix.

    Args:
      path: one file (it becomes split `split`) or a dict split -> file.
      label_names: the classes in index order. None: the sorted distinct string labels of
        all the files (integer labels then need names: an error says so).
      text_field: None = `text`, else `headline`.
    """
    paths = {split: path} if isinstance(path, (str, Path)) else dict(path)
    if not paths:
        raise ValueError("task_from_file: no files given")
    if label_names is None:
        label_names = infer_label_names(paths.values(), label_field)
    first = Path(next(iter(paths.values())))
    return TaskSpec(
        name=name or first.stem, splits={s: SplitFile(str(p)) for s, p in paths.items()},
        label_names=tuple(label_names), text_field=text_field, label_field=label_field,
        template=template or TaskSpec.template, answer_prefix=answer_prefix,
        description=f"user file(s) {sorted(str(p) for p in paths.values())}")


def infer_label_names(paths, label_field: str = "label") -> tuple:
    """Sorted distinct labels of the files; integer labels cannot name themselves."""
    def labels():
        for p in paths:
            for i, row in enumerate(read_rows(p), 1):
                if label_field not in row:
                    raise ValueError(f"{p} row {i}: no {label_field!r} column (columns: "
                                     f"{sorted(row)}); pass label_field=")
                yield f"{p} row {i}", row[label_field]

    return label_names_of(labels(), [str(p) for p in paths])


def label_names_of(labels, source) -> tuple:
    """Sorted distinct string labels of the (where, label) pairs (`where` names the row in
    errors; `source`, the data, when there is none); an integer label cannot name itself."""
    seen = set()
    for where, v in labels:
        if isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().isdigit()):
            raise ValueError(f"{where}: label {v!r} is an integer index; pass label_names "
                             "(the class names in index order, e.g. --label_names=names.txt "
                             "with one name a line)")
        seen.add(str(v).strip())
    if not seen:
        raise ValueError(f"no labels in {source}")
    return tuple(sorted(seen))


# ------------------------------------------------------------------ Hugging Face datasets

LABEL_COLUMNS = ("label", "labels", "topic", "category", "class")


@functools.lru_cache(maxsize=4)
def load_hf(source: str):
    """A `datasets.DatasetDict` from a `save_to_disk` folder (a single saved `Dataset`
    becomes split "train"), an Arrow file (split "train"; memory-mapped, no cache) or a hub
    name. Without network, a hub name not in the local HF cache is one error saying how to
    pass a local copy."""
    import datasets

    path = Path(source)
    if path.is_file():
        return datasets.DatasetDict({"train": datasets.Dataset.from_file(str(path))})
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(f"{path} is not a datasets save_to_disk folder (no "
                             "dataset_dict.json / dataset_info.json); pass a data file or a "
                             "folder written by Dataset(Dict).save_to_disk") from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else \
            datasets.DatasetDict({"train": loaded})
    try:
        return datasets.load_dataset(source)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"cannot load the Hugging Face data set {source!r} ({first}); on a machine with "
            f"network run: python -c \"import datasets; datasets.load_dataset('{source}')"
            ".save_to_disk('DIR')\", copy DIR here and pass it instead of the hub name") from None


def task_from_hf(source, *, splits=None, label_names=None, text_field: str | None = None,
                 label_field: str | None = None, name: str | None = None,
                 template: str | None = None, answer_prefix: str = " ") -> TaskSpec:
    """A task from a Hugging Face data set: a hub name (e.g. "nvidia/FinHeadlineMix") or a
    `save_to_disk` folder.

    Args:
      splits: the data set's splits to use (default all of them), by name; the task's split
        names are the data set's ("train", "validation", "test", ...).
      label_names: the classes in index order. None: the names of the label column's
        ClassLabel feature, else the sorted distinct string labels.
      text_field / label_field: None = the first of `text`, `headline` / of LABEL_COLUMNS.
    """
    source = str(source)
    dd = load_hf(source)
    chosen = list(dd) if splits is None else list(splits)
    missing = [s for s in chosen if s not in dd]
    if missing or not chosen:
        raise ValueError(f"data set {source!r} has splits {sorted(dd)}; asked for {chosen}")
    features = dd[chosen[0]].features
    label_field = label_field or next((c for c in LABEL_COLUMNS if c in features), None)
    if label_field is None or label_field not in features:
        raise ValueError(f"data set {source!r}: no label column (looked for "
                         f"{[label_field] if label_field else list(LABEL_COLUMNS)}; columns: "
                         f"{sorted(features)}); pass label_field=")
    if label_names is None:
        names = getattr(features[label_field], "names", None)  # a ClassLabel feature
        label_names = names or label_names_of(
            ((f"{source} split {s} row {i}", row[label_field]) for s in chosen
             for i, row in enumerate(dd[s], 1)), source)
    return TaskSpec(
        name=name or Path(source).name,
        splits={s: SplitFile(source, hf_split=s) for s in chosen},
        label_names=tuple(label_names), text_field=text_field, label_field=label_field,
        template=template or TaskSpec.template, answer_prefix=answer_prefix,
        description=f"Hugging Face data set {source} ({', '.join(chosen)})")


def read_split_rows(source: SplitFile) -> list[dict]:
    """The rows of one split: a data file's, or a Hugging Face data set split's."""
    if source.hf_split is None:
        return read_rows(source.path)
    return load_hf(source.path)[source.hf_split].to_list()


# ------------------------------------------------------------------ reading


def label_index(value, names: tuple) -> int | None:
    """A file's label -> index: the name itself first, then an int (or digit string) index.
    None when it is neither."""
    if isinstance(value, str):
        v = value.strip()
        if v in names:
            return names.index(v)
        if v.lstrip("-").isdigit():
            value = int(v)
        else:
            return None
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)) and 0 <= value < len(names):
        return int(value)
    if isinstance(value, float) and value.is_integer() and 0 <= value < len(names):
        return int(value)
    return None


def load_split(task: TaskSpec, split: str) -> list[tuple[str, int]]:
    """[(text, label_index)] of one split, in file order.

    Errors name the file and the 1-based data row (header excluded) and the fix: a missing
    text or label column, a label outside the label list, an empty text, an empty split.
    With `task.filter_rows`, empty texts and unlisted labels are skipped instead.
    """
    if split not in task.splits:
        raise ValueError(f"task {task.name!r} has no split {split!r}; it has "
                         f"{sorted(task.splits)}")
    source = task.splits[split]
    rows = read_split_rows(source)
    for column, value in source.where:
        if rows and column not in rows[0]:
            raise ValueError(f"{source.path}: no column {column!r} to select split {split!r}")
    out = []
    text_field = None
    for i, row in enumerate(rows, 1):
        if any(str(row.get(c)) != v for c, v in source.where):
            continue
        if text_field is None:
            text_field = _text_field(task, row, source.path, i)
        if task.label_field not in row:
            raise ValueError(f"{source.path} row {i}: no label column {task.label_field!r} "
                             f"(columns: {sorted(row)})")
        text = row.get(text_field)
        text = "" if text is None else str(text).strip()
        idx = label_index(row[task.label_field], task.label_names)
        if task.filter_rows and (not text or idx is None):
            continue
        if idx is None:
            raise ValueError(
                f"{source.path} row {i}: label {row[task.label_field]!r} is not one of the "
                f"{task.num_classes} label names of task {task.name!r} nor an index < "
                f"{task.num_classes}; fix the row or pass the full label list")
        if not text:
            raise ValueError(f"{source.path} row {i}: empty {text_field!r}; remove the row")
        out.append((text, idx))
    if not out:
        raise ValueError(f"split {split!r} of task {task.name!r} ({source.path}"
                         f"{' where ' + str(dict(source.where)) if source.where else ''}) "
                         "has no examples")
    return out


def _text_field(task: TaskSpec, row: dict, path, i: int) -> str:
    names = [task.text_field] if task.text_field else list(TEXT_COLUMNS)
    found = next((n for n in names if n in row), None)
    if found is None:
        raise ValueError(f"{path} row {i}: no text column (looked for {names}; columns: "
                         f"{sorted(row)}); rename it or pass text_field=")
    return found


# ------------------------------------------------------------------ subsampling


def subsample(examples: list, n: int, seed: int = 0) -> list:
    """A stratified, seeded subset of `n` examples (dataset size is a swept knob).

    Per-class proportional allocation by systematic sampling: within each class the examples
    are shuffled (seeded) and the j-th gets the key (j + 0.5) / n_class; the n smallest keys
    are kept (ties broken by a seeded draw). So every class gets n * n_class / N examples up
    to rounding (within ±1), a fixed seed is deterministic, and subsets are *nested*: the
    subset of size n is a prefix of the one of size n' > n, so a data-size sweep adds data
    rather than redrawing it. Returned in key order (classes interleaved).

    n larger than len(examples) is an error, not a silent cap: a sweep point labelled with
    a size it did not use would corrupt the data-size axis of the fitted laws.
    """
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    if n > len(examples):
        raise ValueError(f"asked for {n} examples but only {len(examples)} are available; "
                         f"use n <= {len(examples)}")
    rng = np.random.default_rng(seed)
    by_class = collections.defaultdict(list)
    for i, (_, label) in enumerate(examples):
        by_class[label].append(i)
    index, key = [], []
    for label in sorted(by_class):
        members = np.asarray(by_class[label])[rng.permutation(len(by_class[label]))]
        index.extend(members.tolist())
        key.extend(((np.arange(len(members)) + 0.5) / len(members)).tolist())
    tiebreak = rng.random(len(index))
    order = np.lexsort((tiebreak, np.asarray(key)))[:n]
    return [examples[index[k]] for k in order]


# ------------------------------------------------------------------ prompts and records


def prompt(task: TaskSpec, text: str) -> str:
    """The prompt for one input text."""
    return task.template.format(text=text, labels=", ".join(task.label_names))


def answer(task: TaskSpec, label: int) -> str:
    """The answer string for label index `label` (e.g. ' Earnings')."""
    return task.answer_prefix + task.label_names[label]


def to_records(task: TaskSpec, examples: list) -> list[dict]:
    """[{"prompt", "answer"}] supervision records (label format)."""
    return [{"prompt": prompt(task, text), "answer": answer(task, label)}
            for text, label in examples]


def write_records(path, records: list[dict]) -> Path:
    """Writes records as JSONL atomically (temp file + rename)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return files.atomic_write(path, text)


# ------------------------------------------------------------------ label names in text


def label_aliases(name: str) -> list[str]:
    """Ways a text may name a label: the full name and each '|'-separated part
    ('Fed | Central Banks' -> ['Fed | Central Banks', 'Fed', 'Central Banks'])."""
    parts = [p.strip() for p in name.split("|")]
    return [name.strip()] + [p for p in parts if p and p != name.strip()]


def parse_label(text: str, label_names) -> int | None:
    """The index of the label named last in `text`, or None: the one parser of generated
    answers and of teacher traces (`distill.records.drop_disagreeing`), so no trace that evaluation
    would read as another label than the gold one is trained on.

    A label is named by its full name or any '|'-separated part (`label_aliases`),
    case-insensitive, as whole words (no word character either side, so 'markets' is not
    in 'supermarkets'). Of mentions ending at the same place the longest wins, so 'Stock
    Movement' beats 'Movement' and 'Gold | Metals | Materials' beats 'Materials'; on a full
    tie the earlier label."""
    best, best_key = None, (-1, 0)
    for i, name in enumerate(label_names):
        for alias in label_aliases(name):
            for m in re.finditer(r"(?<!\w)" + re.escape(alias) + r"(?!\w)", text, re.I):
                key = (m.end(), len(alias))
                if key > best_key:
                    best, best_key = i, key
    return best
