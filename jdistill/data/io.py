"""Text in, token batches out: the shipped data, tokenizers, plain-text and tabular readers,
calibration batches."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
from pathlib import Path

import numpy as np

TEXT_COLUMNS = ("text", "headline")
DATA_ENV = "JDISTILL_DATA"  # another copy of the shipped data (same layout)
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


# ------------------------------------------------------------------ the shipped data


def data_root() -> Path:
    """The data folder installed with the package (shipped_data/, see its MANIFEST.md), or
    $JDISTILL_DATA. Read at every call, never from the working directory."""
    env = os.environ.get(DATA_ENV)
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "shipped_data"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{DATA_ENV}={env} is not a directory; point it at a copy of the shipped data or "
            "unset it" if env else f"the shipped data folder {root} is missing; reinstall "
            "jdistill (pip install -e .)")
    return root


def find_file(folder, name: str) -> Path:
    """`folder/name` as stored: the file itself or `name` + .xz / .gz / .bz2."""
    folder = Path(folder)
    for suffix in ("", *COMPRESSED):
        path = folder / (name + suffix)
        if path.is_file():
            return path
    raise FileNotFoundError(f"data file {folder / name} does not exist (nor compressed: "
                            f"{', '.join(COMPRESSED)})")


def data_file(name: str) -> Path:
    """A shipped data file by its path inside the data folder, e.g.
    'finance/reuters21578/reuters21578_titles_topics.csv' (stored compressed or not)."""
    return find_file(data_root(), name)


def format_suffix(path) -> str:
    """The file format's suffix, a compression suffix removed: 'a.csv.xz' -> '.csv'."""
    path = Path(path)
    if path.suffix.lower() in COMPRESSED:
        path = path.with_suffix("")
    return path.suffix.lower()


def open_text(path, newline: str | None = None):
    """A UTF-8 text file handle, decompressing by suffix (newline="" for csv)."""
    path = Path(path)
    opener = COMPRESSED.get(path.suffix.lower())
    if opener is None:
        return path.open(newline=newline, encoding="utf-8")
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", newline=newline)


def read_text(path) -> str:
    """A whole text file (decompressed by suffix)."""
    with open_text(path) as f:
        return f.read()


# ------------------------------------------------------------------ tokenizers and readers


def load_tokenizer(model_dir, tokenizer_dir=None):
    """A `tokenizers.Tokenizer` from tokenizer.json in `tokenizer_dir` or `model_dir`."""
    from tokenizers import Tokenizer

    where = Path(tokenizer_dir or model_dir)
    path = where / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no tokenizer.json in {where}; pass --tokenizer=DIR pointing at the directory of "
            "the model's tokenizer (e.g. the original checkpoint's)")
    return Tokenizer.from_file(str(path))


def read_texts(path, text_column: str | None = None) -> list[str]:
    """Texts from a .txt file (one per blank-line-separated paragraph) or a .csv / .jsonl /
    .json / .parquet file (the `text_column`, else a `text` or `headline` column)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if format_suffix(path) == ".txt":
        paragraphs = [p.strip() for p in read_text(path).split("\n\n")]
        texts = [p for p in paragraphs if p]
    else:
        rows = read_rows(path)
        if not rows:
            raise ValueError(f"{path} has no rows")
        names = [text_column] if text_column else list(TEXT_COLUMNS)
        column = next((n for n in names if n in rows[0]), None)
        if column is None:
            raise ValueError(f"{path} has no text column (looked for {names}; columns: "
                             f"{sorted(rows[0])}); name it with text_column / --text_column")
        texts = [str(r[column]) for r in rows]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def _read_csv(path: Path) -> list[dict]:
    with open_text(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i}: not JSON ({e.msg}); each line must be "
                                 "one JSON object") from None
    return rows


def _read_json(path: Path) -> list[dict]:
    data = json.loads(read_text(path))
    return data if isinstance(data, list) else [data]


def _read_parquet(path: Path) -> list[dict]:
    # pyarrow directly (what `datasets` reads parquet with): no cache directory is written.
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json,
           ".parquet": _read_parquet}


def read_rows(path) -> list[dict]:
    """All rows of a .csv / .jsonl / .json / .parquet file as dicts (the one tabular reader:
    task files, supervision records and text columns all come through here)."""
    path = Path(path)
    reader = READERS.get(format_suffix(path))
    if reader is None:
        raise ValueError(f"unsupported data file {path}: use one of {sorted(READERS)} "
                         f"(optionally compressed: {', '.join(COMPRESSED)})")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return reader(path)


def calibration_batches(tokenizer, texts: list[str], *, num_samples: int, seq_len: int,
                        batch_size: int, seed: int = 0, pad_id: int = 0):
    """[(tokens [B, T] int32, mask [B, T] bool)] from `num_samples` seeded-random texts, each
    truncated to `seq_len` tokens and right-padded. The last batch may be smaller."""
    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError("need num_samples >= 1, seq_len >= 2 and batch_size >= 1")
    order = np.random.default_rng(seed).permutation(len(texts))[:num_samples]
    encoded = [ids[:seq_len] for ids in
               (e.ids for e in tokenizer.encode_batch([texts[i] for i in order]))]
    encoded = [ids for ids in encoded if ids]
    if not encoded:
        raise ValueError("every calibration text tokenised to nothing")
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        tokens = np.full((len(chunk), seq_len), pad_id, np.int32)
        mask = np.zeros((len(chunk), seq_len), bool)
        for row, ids in enumerate(chunk):
            tokens[row, :len(ids)] = ids
            mask[row, :len(ids)] = True
        batches.append((tokens, mask))
    return batches


PROMPT, TRACE, ANSWER = 0, 1, 2  # segment ids of a record's tokens (the blended loss's too)


def encode_example(tokenizer, prompt: str, answer: str, reasoning: str | None = None, *,
                   bos_id: int | None = None, eos_id: int | None = None):
    """(ids, segment ids): prompt (0), optional reasoning trace (1), answer + EOS (2)."""
    parts = [(prompt, PROMPT)] + ([(reasoning, TRACE)] if reasoning else []) + [(answer, ANSWER)]
    ids, segs = ([bos_id], [PROMPT]) if bos_id is not None else ([], [])
    for text, seg in parts:
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        segs += [seg] * len(piece)
    if eos_id is not None:
        ids.append(eos_id)
        segs.append(ANSWER)
    return np.asarray(ids, np.int32), np.asarray(segs, np.int32)


def read_examples(path) -> list[dict]:
    """Supervision records from a .jsonl file: {"prompt", "answer", optional "reasoning"}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = read_rows(path)
    for i, row in enumerate(rows):
        missing = {"prompt", "answer"} - set(row)
        if missing:
            raise ValueError(f"{path} row {i}: missing {sorted(missing)}; each record needs "
                             "'prompt' and 'answer' (and optionally 'reasoning')")
    if not rows:
        raise ValueError(f"{path} has no records")
    return rows


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a pure function of (n, seed, epoch), so any epoch can
    be rebuilt on resume without replaying the ones before it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def supervised_positions(rows: dict, capacity: int) -> np.ndarray:
    """[..., seq_len] rows -> [..., capacity] int32 supervised positions, -1 padded."""
    keep = rows["loss_mask"] & (rows["segments"] != PROMPT)
    flat = keep.reshape(-1, keep.shape[-1])
    out = np.full((flat.shape[0], capacity), -1, np.int32)
    for r, row in enumerate(flat):
        at = np.flatnonzero(row)
        if len(at) > capacity:  # supervised_capacity is a bound; this is its guard
            raise AssertionError(f"a row has {len(at)} supervised positions, more "
                                 f"than the capacity {capacity}")
        out[r, :len(at)] = at
    return out.reshape(keep.shape[:-1] + (capacity,))


def row_capacity(encoded, seq_len: int) -> int:
    """The most supervised positions (target segment not PROMPT) one example puts in a row of
    `seq_len` positions (at least 1, so the arrays never have a zero-size axis)."""
    return max(1, max(int((np.asarray(seg[1:seq_len + 1]) != PROMPT).sum())
                      for _, seg in encoded))


class Batcher:
    """Deterministic, resumable batches: the batch at `step` is a pure function of
    (examples, seed, step), so the data position of a run is its step count.

    Each epoch is a fresh seeded permutation. A batch is [accum, batch, seq_len] arrays:
      tokens, mask (real tokens), targets (next token), segments (segment of the target),
      loss_mask (target is a real token), and supervised [accum, batch, capacity]: the
      positions whose target is not the prompt, -1 padded, where the trainer forms logits.
    """

    def __init__(self, encoded: list, *, batch_size: int, seq_len: int, seed: int = 0,
                 accum: int = 1, pad_id: int = 0):
        if not encoded:
            raise ValueError("no examples to batch")
        self.encoded, self.batch_size, self.seq_len = encoded, batch_size, seq_len
        self.seed, self.accum, self.pad_id = seed, accum, pad_id
        self.capacity = row_capacity(encoded, seq_len)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.accum

    def indices(self, step: int) -> np.ndarray:
        n, k = len(self.encoded), self.rows_per_step
        flat = np.arange(step * k, (step + 1) * k)
        epochs = flat // n
        out = np.empty(k, np.int64)
        for epoch in np.unique(epochs):
            perm = epoch_permutation(n, self.seed, int(epoch))
            sel = epochs == epoch
            out[sel] = perm[flat[sel] % n]
        return out

    def batch(self, step: int, rows=None) -> dict:
        """The step's batch; with `rows` (indices along the batch axis) only those rows of
        every micro-batch, [accum, len(rows), seq_len] — what one process of a multi-process
        run loads (the rows its devices hold)."""
        t = self.seq_len
        picked = self.indices(step).reshape(self.accum, self.batch_size)
        if rows is not None:
            picked = picked[:, np.asarray(rows)]
        examples = [self.encoded[i] for i in picked.ravel()]
        tokens = np.full((len(examples), t + 1), self.pad_id, np.int32)
        segs = np.zeros((len(examples), t + 1), np.int32)
        real = np.zeros((len(examples), t + 1), bool)
        for r, (ids, seg) in enumerate(examples):
            n = min(len(ids), t + 1)
            tokens[r, :n], segs[r, :n], real[r, :n] = ids[:n], seg[:n], True
        out = {"tokens": tokens[:, :-1], "mask": real[:, :-1], "targets": tokens[:, 1:],
               "segments": segs[:, 1:], "loss_mask": real[:, 1:] & real[:, :-1]}
        out = {k: v.reshape(picked.shape + (t,)) for k, v in out.items()}
        return {**out, "supervised": supervised_positions(out, self.capacity)}
