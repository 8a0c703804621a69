"""Text in, token batches out: tokenizers, plain-text and tabular readers, calibration batches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

TEXT_COLUMNS = ("text", "headline")


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
    suffix = path.suffix.lower()
    if suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        texts = [p for p in paragraphs if p]
    else:
        rows = _read_rows(path, suffix)
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


def _read_rows(path: Path, suffix: str) -> list[dict]:
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else [data]
    if suffix == ".parquet":
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    raise ValueError(f"unsupported data file {path}: use .txt, .csv, .jsonl, .json or .parquet")


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
