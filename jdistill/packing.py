"""Packing short examples into fixed-length rows without cross-talk.

Task examples (a headline prompt + a label) are far shorter than a training row; padding
each to `seq_len` wastes most of the compute. Packing concatenates several examples into a
row and gives every token a document id: `Decoder.forward(..., documents=...)` lets a token
attend only to its own document and restarts positions at 0 in each, so a packed example
computes exactly what it computes alone (tested against the unpacked forward).

Each example contributes its own (input, target) pairs — targets never cross a document
boundary — so no loss position has to be masked at the seams.
"""

from __future__ import annotations

import numpy as np

PAD_DOCUMENT = 0  # document id of padding; real documents are 1, 2, ... within a row


def pack_rows(encoded, seq_len: int, order=None) -> list[list[int]]:
    """Greedy next-fit: example indices per row, in `order`, each row ≤ seq_len positions.

    An example of n tokens takes n - 1 positions (inputs ids[:-1], targets ids[1:]); one
    longer than seq_len + 1 tokens is cut to fit a row of its own.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    order = range(len(encoded)) if order is None else order
    rows, current, used = [], [], 0
    for i in order:
        need = min(len(encoded[i][0]) - 1, seq_len)
        if need < 1:
            continue  # a single token has nothing to predict
        if used + need > seq_len and current:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += need
    if current:
        rows.append(current)
    return rows


def build_row(encoded, members, seq_len: int, pad_id: int = 0) -> dict:
    """One packed row: tokens, mask, targets, segments, loss_mask, documents [seq_len]."""
    out = {"tokens": np.full(seq_len, pad_id, np.int32),
           "targets": np.full(seq_len, pad_id, np.int32),
           "segments": np.zeros(seq_len, np.int32),
           "documents": np.full(seq_len, PAD_DOCUMENT, np.int32)}
    at = 0
    for doc, i in enumerate(members, start=1):
        ids, segs = encoded[i]
        n = min(len(ids) - 1, seq_len - at)
        out["tokens"][at:at + n] = ids[:n]
        out["targets"][at:at + n] = ids[1:n + 1]
        out["segments"][at:at + n] = segs[1:n + 1]
        out["documents"][at:at + n] = doc
        at += n
    out["mask"] = out["documents"] != PAD_DOCUMENT
    out["loss_mask"] = out["mask"].copy()
    return out


def packing_efficiency(encoded, rows, seq_len: int) -> float:
    """Real positions / row positions: how much of the compute is not padding."""
    real = sum(min(len(encoded[i][0]) - 1, seq_len) for row in rows for i in row)
    return real / max(len(rows) * seq_len, 1)
