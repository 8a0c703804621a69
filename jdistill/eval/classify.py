"""In-domain evaluation of a classification task: label log-likelihoods after the prompt,
or a generated answer (with its trace) parsed back to a label.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jdistill.data import tasks as tasks_lib
from jdistill.data.tasks import parse_label
from jdistill.eval.metrics import (classification_metrics, confusion_matrix,
                                   probabilistic_metrics)
from jdistill.eval.scoring import (CTX_BUCKET, bucket, choice_logliks, encode, encode_pair,
                                    traced_choice_logliks)
from jdistill.models.decoder import stacked_layers
from jdistill.models.generate import eos_ids, generate
from jdistill.utils.progress import Progress


def label_logliks(model, tokenizer, task, texts, *, batch_size: int = 8, mesh=None,
                  max_length=None, progress: str | None = None) -> np.ndarray:
    """[N, K] log-likelihood of every label's answer string given each text's prompt."""
    requests = []
    for text in texts:
        p = tasks_lib.prompt(task, text)
        pairs = [encode_pair(tokenizer, p, tasks_lib.answer(task, k))
                 for k in range(task.num_classes)]
        requests.append((pairs[0][0], [c for _, c in pairs]))
    return np.stack(choice_logliks(model, requests, batch_size=batch_size, mesh=mesh,
                                   max_length=max_length, progress=progress))


def evaluate_classification(model, tokenizer, task, examples, *, batch_size: int = 8,
                            mesh=None, max_length=None, progress: str | None = None) -> dict:
    """Log-likelihood classification: accuracy, macro-F1, gold-label NLL and Brier score over
    the label distribution (each with its stderr), confusion matrix, predictions."""
    texts = [t for t, _ in examples]
    y_true = np.array([y for _, y in examples])
    ll = label_logliks(model, tokenizer, task, texts, batch_size=batch_size, mesh=mesh,
                       max_length=max_length, progress=progress)
    return scored(y_true, ll, task.num_classes)


def scored(y_true, ll, num_classes: int) -> dict:
    """The metrics of label log-likelihoods ll [N, K]: accuracy, macro-F1, NLL, Brier (with
    stderrs), confusion matrix, predictions (argmax) and labels."""
    y_pred = ll.argmax(axis=1)
    return {**classification_metrics(y_true, y_pred), **probabilistic_metrics(y_true, ll),
            "confusion": confusion_matrix(y_true, y_pred, num_classes),
            "predictions": y_pred, "labels": y_true}


def left_padded(chunk: list[list[int]], batch_size: int, pad_id: int):
    """(tokens, mask) [batch_size, bucketed length]: `chunk`'s rows left-padded for
    `generate`; filler rows hold one real pad token (their output is dropped)."""
    s = bucket(max(len(c) for c in chunk), CTX_BUCKET)
    tokens = np.full((batch_size, s), pad_id, np.int32)
    mask = np.zeros((batch_size, s), bool)
    mask[:, -1] = True
    for r, c in enumerate(chunk):
        tokens[r, s - len(c):], mask[r, s - len(c):] = c, True
    return tokens, mask


def generate_batched(model, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                     eos_token_id, pad_id: int, progress: str | None = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, `batch_size` at a time (left-padded, KV
    cache): per prompt, the max_new_tokens ids generated (pad after an EOS)."""
    out = []
    bar = Progress(len(prompts), progress or "", enabled=progress is not None)
    layers = stacked_layers(*nnx.split(model))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        new = np.asarray(generate(model, *left_padded(chunk, batch_size, pad_id),
                                  max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  pad_token_id=pad_id, layers=layers))
        out += [new[r].tolist() for r in range(len(chunk))]
        bar.update(len(chunk))
    return out


def generate_and_parse(model, tokenizer, task, texts, *, max_new_tokens: int = 64,
                       batch_size: int = 8, eos_token_id=None, pad_id: int = 0,
                       progress: str | None = None) -> list[tuple[str, int | None]]:
    """Greedy generation (`jdistill.models.generate`, batched, KV cache) for each text's prompt,
    then `parse_label` on the output: [(generated text, label index or None)]. For CoT
    models, whose answer follows a reasoning trace."""
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = set(eos_ids(eos_token_id))
    prompts = [encode(tokenizer, tasks_lib.prompt(task, t)) for t in texts]
    out = []
    for ids in generate_batched(model, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, eos_token_id=eos_token_id,
                                pad_id=pad_id, progress=progress):
        cut = next((i for i, x in enumerate(ids) if x in eos), len(ids))
        text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        out.append((text, parse_label(text, task.label_names)))
    return out


def evaluate_after_trace(model, tokenizer, task, examples, *, max_new_tokens: int,
                         batch_size: int = 8, mesh=None, separator: str = "\n",
                         progress: str | None = None) -> dict:
    """CoT scoring, the way a trace format trains: the student writes its greedy trace after
    its prompt (encoded as `data.encode_example` encodes it: BOS, then the prompt), up to
    and including the separator that ends a trace in training (an EOS or the token budget
    ends it too, and the separator is appended), then every label's answer is scored after
    prompt + trace; one KV cache for both (`scoring.traced_choice_logliks`). The metrics of
    `evaluate_classification`, plus the mean trace length in tokens."""
    y_true = np.array([y for _, y in examples])
    cfg = model.config
    eos = eos_ids(cfg.eos_token_id)
    bos = [] if cfg.bos_token_id is None else [cfg.bos_token_id]
    answers = [encode(tokenizer, tasks_lib.answer(task, k)) for k in range(task.num_classes)]
    requests = [(bos + encode(tokenizer, tasks_lib.prompt(task, t)), answers)
                for t, _ in examples]
    out = traced_choice_logliks(model, requests, max_new_tokens=max_new_tokens, eos_ids=eos,
                                separator=encode(tokenizer, separator), batch_size=batch_size,
                                mesh=mesh, pad_id=cfg.pad_token_id or 0, progress=progress)
    ll = np.stack([scores for _, scores in out])
    return {**scored(y_true, ll, task.num_classes),
            "trace_tokens": float(np.mean([len(trace) for trace, _ in out]))}
