"""Metrics of scored predictions, with their standard errors, and the confusion matrix
written as JSON, .npy and PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jdistill.utils import files


def mean_stderr(values) -> float:
    """The harness's `mean_stderr`: sample standard deviation (ddof 1) / sqrt(n)."""
    v = np.asarray(values, np.float64)
    return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def mc_metrics(logliks: list, choices: list, gold) -> dict:
    """acc / acc_norm (and stderrs) as the harness's multiple_choice `process_results`:
    argmax of log-likelihood, and of log-likelihood / len(choice text in characters)."""
    gold = np.asarray(gold)
    pred = np.array([int(np.argmax(ll)) for ll in logliks])
    pred_norm = np.array([int(np.argmax(np.asarray(ll) / np.array([float(len(c)) for c in ch])))
                          for ll, ch in zip(logliks, choices)])
    acc, acc_norm = (pred == gold).astype(float), (pred_norm == gold).astype(float)
    return {"acc": float(acc.mean()), "acc_norm": float(acc_norm.mean()),
            "stderr": mean_stderr(acc), "acc_norm_stderr": mean_stderr(acc_norm),
            "n": int(len(gold))}


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[K, K] int counts: rows are true labels, columns predictions. Unparsed predictions
    (-1, from `generate_and_parse`) are not in it; `classification_metrics` counts them."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ok = y_pred >= 0
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true[ok], y_pred[ok]), 1)
    return cm


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the labels present in y_true or y_pred (sklearn's
    f1_score(average='macro') default label set). Unparsed predictions (-1) count as
    wrong for their true class and form no class of their own."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.union1d(y_true, y_pred[y_pred >= 0])
    f1 = []
    for k in labels:
        tp = np.sum((y_true == k) & (y_pred == k))
        fp = np.sum((y_true != k) & (y_pred == k))
        fn = np.sum((y_true == k) & (y_pred != k))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1)) if f1 else float("nan")


def macro_f1_stderr(y_true, y_pred, n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap stderr of macro-F1 (items resampled; seeded, so rows are reproducible):
    macro-F1 is not a mean of per-item scores, so it has no closed-form stderr."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) < 2:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, len(y_true), (n_boot, len(y_true)))
    return float(np.std([macro_f1(y_true[i], y_pred[i]) for i in idx], ddof=1))


def label_probabilities(logliks) -> np.ndarray:
    """[N, K] the model's distribution over the K labels: softmax of each label's answer
    log-likelihood (the paper's probabilistic scores read this distribution)."""
    ll = np.asarray(logliks, np.float64)
    z = ll - ll.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def probabilistic_metrics(y_true, logliks) -> dict:
    """Gold-label NLL (-log p(gold), nats) and the multi-class Brier score
    (sum_k (p_k - [k = gold])^2, in [0, 2]), each a mean over items with its stderr."""
    y_true = np.asarray(y_true)
    p = label_probabilities(logliks)
    gold = p[np.arange(len(y_true)), y_true]
    nll = -np.log(np.maximum(gold, 1e-300))
    onehot = np.eye(p.shape[1])[y_true]
    brier = np.sum((p - onehot) ** 2, axis=1)
    return {"nll": float(nll.mean()), "nll_stderr": mean_stderr(nll),
            "brier": float(brier.mean()), "brier_stderr": mean_stderr(brier)}


def classification_metrics(y_true, y_pred) -> dict:
    """accuracy (+ stderr), macro-F1, n, and how many predictions were unparsed (-1)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {"accuracy": float(np.mean(y_true == y_pred)),
            "accuracy_stderr": mean_stderr((y_true == y_pred).astype(float)),
            "macro_f1": macro_f1(y_true, y_pred),
            "macro_f1_stderr": macro_f1_stderr(y_true, y_pred), "n": int(len(y_true)),
            "unparsed": int(np.sum(y_pred < 0))}


def save_confusion(cm: np.ndarray, label_names, out_dir, stem: str = "confusion") -> dict:
    """OUT/stem.json (labels + counts), .npy and .png (row-normalised colours, counts
    written in the cells). Returns the paths."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{stem}.json", "npy": out_dir / f"{stem}.npy",
             "png": out_dir / f"{stem}.png"}
    files.atomic_write(paths["json"], json.dumps(
        {"labels": list(label_names), "rows": "true label", "columns": "predicted label",
         "counts": cm.tolist()}, indent=1))
    buf = io.BytesIO()
    np.save(buf, cm)
    files.atomic_write(paths["npy"], buf.getvalue())
    k = len(label_names)
    size = max(6.0, 0.35 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = cm.sum(axis=1, keepdims=True)
    ax.imshow(cm / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), label_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), label_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in zip(*np.nonzero(cm)):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                color="white" if cm[i, j] > 0.5 * rows[i, 0] else "black")
    ax.set_title(f"{stem} (row-normalised; counts in cells)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    files.atomic_write(paths["png"], buf.getvalue())
    return {k: str(v) for k, v in paths.items()}
