"""Evaluation: in-domain classification, multiple-choice general knowledge, perplexity.

Everything is log-likelihood scoring with one batched, jitted core (`choice_logliks`):
a batch of contexts is run once with a KV cache, and all candidate continuations of a
context run on top of it packed into one row (each attends to the shared context and to
its own earlier tokens only, with its own positions), so a context shared by 20 labels (or
4 answers) is computed once and no continuation pays for another's padding. Padding never
changes a score: contexts are left-padded and packed continuations right-padded to length
buckets (multiples of `CTX_BUCKET` / `CONT_BUCKET`, to limit recompiles), padded keys are
masked, and the per-token log-probs (f32, chunked over tokens: no [B, T, V] logits) are
summed over each continuation's real tokens only.

Scoring follows EleutherAI lm-evaluation-harness (v0.4, github.com/EleutherAI/
lm-evaluation-harness): `encode_pair` is `HFLM._encode_pair` (trailing context spaces move
into the continuation; the continuation is the tail of encode(context + continuation) after
len(encode(context)) tokens; tokens are encoded without special tokens, as HFLM does for
causal models by default); `acc` = argmax of summed log-likelihood, `acc_norm` = argmax of
log-likelihood / len(choice) in characters (`process_results`' `completion_len`, the choice
text without the leading space); standard errors are `mean_stderr` (sample std, ddof 1,
/ sqrt(n)). Prompt formats per benchmark are in `BENCHMARKS`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.data import io as data
from jdistill.distill import losses
from jdistill.utils import files as results
from jdistill import sharding as sharding_lib
from jdistill.data import tasks as tasks_lib
from jdistill.models.decoder import KVCache

CTX_BUCKET = 32  # contexts pad to multiples of this many tokens
CONT_BUCKET = 16  # packed continuations likewise
LOGIT_CHUNK = 1024  # tokens whose logits exist at once ([chunk, V] f32)


# ------------------------------------------------------------------ progress


class Progress:
    """Prints `desc: done/total items, rate items/s, ETA` to stderr every `every_s` seconds."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every_s: float = 10.0):
        self.total, self.desc, self.enabled, self.every_s = total, desc, enabled, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.done}/{self.total} items, {rate:.1f} items/s, "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ tokenization


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (a `tokenizers.Tokenizer`)."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as the harness's `HFLM._encode_pair`.

    Trailing whitespace of the context moves to the continuation; the continuation tokens
    are the tail of encode(context + continuation) after len(encode(context)) tokens, so a
    merge across the boundary is handled as the harness handles it (the model input is
    encode(context) + that tail).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def bucket(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (at least `multiple`)."""
    return max(multiple, -(-n // multiple) * multiple)


# ------------------------------------------------------------------ core scoring


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _choice_logliks(graphdef, state, ctx, ctx_mask, cont, choice, offset, n_choices,
                    single_tokens, with_greedy):
    """ctx/ctx_mask [B, S] (left-padded, last token real); cont [B, T] the continuations of
    each context packed in one row, choice [B, T] their index (-1: padding), offset [B, T]
    each token's position within its continuation -> (summed log-prob of each [B, C] f32,
    and with `with_greedy` whether greedy decoding yields each [B, C] bool, else None).
    single_tokens: every continuation is one token (no second forward is needed)."""
    model = nnx.merge(graphdef, state)
    b, s = ctx.shape
    t = cont.shape[1]
    mask = choice >= 0
    cache = KVCache.create(model.config, b, s + (0 if single_tokens else t), model.dtype)
    hidden, cache = model.forward(ctx, attention_mask=ctx_mask, cache=cache)
    last = hidden[:, -1:]  # predicts the first token of every continuation
    if single_tokens:
        predictors = jnp.broadcast_to(last, (b, t, last.shape[-1]))
    else:
        positions = ctx_mask.sum(axis=1, keepdims=True) + offset
        h, _ = model.forward(cont, attention_mask=mask, positions=positions, cache=cache,
                             documents=choice)
        # token j is predicted by token j - 1 of its own continuation, or the context's last
        prev = jnp.concatenate([last, h[:, :-1]], axis=1)
        predictors = jnp.where((offset == 0)[..., None], last, prev)
    _, nll = losses.fused_token_terms(predictors, model.unembed_weight(), targets=cont,
                                      chunk_size=LOGIT_CHUNK)
    picks = jax.nn.one_hot(choice, n_choices, dtype=jnp.float32)  # -1 -> all zeros
    ll = -jnp.einsum("bt,btc->bc", jnp.where(mask, nll, 0.0), picks)
    if not with_greedy:
        return ll, None
    missed = mask & ~greedy_tokens(predictors, model.unembed_weight(), cont)
    return ll, jnp.einsum("bt,btc->bc", missed.astype(jnp.float32), picks) == 0


def greedy_tokens(hidden, lm_head, targets, chunk_size: int = LOGIT_CHUNK):
    """[B, T] bool: whether targets[b, t] is the argmax of hidden[b, t] @ lm_head (a tie
    counts), the logits formed a chunk of positions at a time (no [B, T, V] array)."""
    b, t, d = hidden.shape
    c = max(1, min(t, chunk_size // max(b, 1)))
    pad = (-t) % c
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, c).swapaxes(0, 1)

    def chunk(args):
        h_c, y_c = args
        logits = jnp.einsum("bcd,dv->bcv", h_c, lm_head, preferred_element_type=jnp.float32)
        return jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0] >= logits.max(-1)

    return jax.lax.map(chunk, (h, y)).swapaxes(0, 1).reshape(b, -1)[:, :t]


@functools.partial(jax.jit, static_argnums=(0,))
def _token_nll(graphdef, state, tokens, mask, targets):
    """Plain forward (right-padded rows) -> per-token NLL of `targets` [B, T] f32."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.forward(tokens, attention_mask=mask)
    _, nll = losses.fused_token_terms(hidden, model.unembed_weight(), targets=targets,
                                      chunk_size=LOGIT_CHUNK)
    return nll


def _place(arrays, mesh):
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    return [sharding_lib.shard_batch(np.asarray(a), mesh) for a in arrays]


def _split(model, mesh):
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = sharding_lib.shard_state(state, mesh)
    return graphdef, state


def choice_logliks(model, requests, *, batch_size: int = 8, mesh=None, max_length=None,
                   pad_id: int = 0, progress: str | None = None) -> list[np.ndarray]:
    """Summed log-likelihood of every continuation given its context: `choice_scores`
    without the greedy flags."""
    return [ll for ll, _ in choice_scores(model, requests, batch_size=batch_size, mesh=mesh,
                                          max_length=max_length, pad_id=pad_id,
                                          progress=progress)]


def choice_scores(model, requests, *, batch_size: int = 8, mesh=None, max_length=None,
                  pad_id: int = 0, progress: str | None = None, greedy: bool = False
                  ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Summed log-likelihood of every continuation given its context, and (with `greedy`)
    whether greedy decoding from the context produces it (the harness's `is_greedy`; one
    more chunked lm-head pass).

    Args:
      model: a `Decoder`.
      requests: [(context ids, [continuation ids, ...])] (see `encode_pair`). Every context
        must be non-empty; every continuation non-empty.
      batch_size: contexts per batch (each with all its continuations).
      mesh: shard batches over its batch axes (`sharding.shard_batch`) and the params by
        the rule table.
      max_length: longest model input; longer contexts lose tokens on the left (as the
        harness truncates). None: the config's max_position_embeddings.
      progress: a description to print progress under, or None for quiet.

    Returns:
      per request (float64 log-likelihoods, bool greedy flags or None), one entry per
      continuation.
    """
    max_length = max_length or model.config.max_position_embeddings
    prepared = []
    for i, (ctx, conts) in enumerate(requests):
        if not len(ctx):
            raise ValueError(f"request {i}: empty context; prepend a BOS/EOS token id")
        if not conts or any(len(c) == 0 for c in conts):
            raise ValueError(f"request {i}: a continuation tokenised to nothing")
        longest = max(len(c) for c in conts)
        if longest > max_length:  # the last token is input but predicts nothing
            raise ValueError(f"request {i}: continuation of {longest} tokens does not fit "
                             f"max_length={max_length}")
        prepared.append((list(ctx)[-(max_length + 1 - longest):], [list(c) for c in conts]))
    n_choices = max((len(c) for _, c in prepared), default=1)
    single_tokens = all(len(x) == 1 for _, conts in prepared for x in conts)
    graphdef, state = _split(model, mesh)
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))  # less padding
    out = [None] * len(prepared)
    bar = Progress(len(prepared), progress or "", enabled=progress is not None)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = [prepared[i] for i in idx]
        s = bucket(max(len(c) for c, _ in batch), CTX_BUCKET)
        t = bucket(max(sum(map(len, conts)) for _, conts in batch), CONT_BUCKET)
        ctx = np.full((batch_size, s), pad_id, np.int32)
        ctx_mask = np.zeros((batch_size, s), bool)
        ctx_mask[:, -1] = True  # filler rows: one "real" pad token, results dropped
        cont = np.full((batch_size, t), pad_id, np.int32)
        choice = np.full((batch_size, t), -1, np.int32)
        offset = np.zeros((batch_size, t), np.int32)
        for r, (c, conts) in enumerate(batch):
            ctx[r, s - len(c):], ctx_mask[r, s - len(c):] = c, True
            at = 0
            for j, x in enumerate(conts):
                cont[r, at:at + len(x)], choice[r, at:at + len(x)] = x, j
                offset[r, at:at + len(x)] = np.arange(len(x))
                at += len(x)
        # to_host: a collective gather when the batch is split over several processes
        ll, is_greedy = _choice_logliks(graphdef, state, *_place(
            (ctx, ctx_mask, cont, choice, offset), mesh), n_choices, single_tokens, greedy)
        ll = sharding_lib.to_host(ll).astype(np.float64)
        is_greedy = None if is_greedy is None else sharding_lib.to_host(is_greedy)
        for r, i in enumerate(idx):
            k = len(prepared[i][1])
            out[i] = (ll[r, :k], None if is_greedy is None else is_greedy[r, :k])
        bar.update(len(idx))
    return out


# ------------------------------------------------------------------ metrics


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


def classification_metrics(y_true, y_pred) -> dict:
    """accuracy (+ stderr), macro-F1, n, and how many predictions were unparsed (-1)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {"accuracy": float(np.mean(y_true == y_pred)),
            "accuracy_stderr": mean_stderr((y_true == y_pred).astype(float)),
            "macro_f1": macro_f1(y_true, y_pred), "n": int(len(y_true)),
            "unparsed": int(np.sum(y_pred < 0))}


# ------------------------------------------------------------------ in-domain


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
    """Log-likelihood classification: accuracy, macro-F1, confusion matrix, predictions."""
    texts = [t for t, _ in examples]
    y_true = np.array([y for _, y in examples])
    ll = label_logliks(model, tokenizer, task, texts, batch_size=batch_size, mesh=mesh,
                       max_length=max_length, progress=progress)
    y_pred = ll.argmax(axis=1)
    return {**classification_metrics(y_true, y_pred),
            "confusion": confusion_matrix(y_true, y_pred, task.num_classes),
            "predictions": y_pred, "labels": y_true}


def label_aliases(name: str) -> list[str]:
    """Ways a text may name a label: the full name and each '|'-separated part
    ('Fed | Central Banks' -> ['Fed | Central Banks', 'Fed', 'Central Banks'])."""
    parts = [p.strip() for p in name.split("|")]
    return [name.strip()] + [p for p in parts if p and p != name.strip()]


def parse_label(text: str, label_names) -> int | None:
    """The index of the label named last in `text`, or None: the one parser of generated
    answers and of teacher traces (`formats.drop_disagreeing`), so no trace that evaluation
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


def generate_and_parse(model, tokenizer, task, texts, *, max_new_tokens: int = 64,
                       batch_size: int = 8, eos_token_id=None, pad_id: int = 0,
                       progress: str | None = None) -> list[tuple[str, int | None]]:
    """Greedy generation (`jdistill.models.generate`, batched, KV cache) for each text's prompt,
    then `parse_label` on the output: [(generated text, label index or None)]. For CoT
    models, whose answer follows a reasoning trace."""
    from jdistill.models.generate import generate

    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    out = []
    bar = Progress(len(texts), progress or "", enabled=progress is not None)
    for start in range(0, len(texts), batch_size):
        chunk = [encode(tokenizer, tasks_lib.prompt(task, t))
                 for t in texts[start:start + batch_size]]
        s = bucket(max(len(c) for c in chunk), CTX_BUCKET)
        tokens = np.full((batch_size, s), pad_id, np.int32)
        mask = np.zeros((batch_size, s), bool)
        mask[:, -1] = True
        for r, c in enumerate(chunk):
            tokens[r, s - len(c):], mask[r, s - len(c):] = c, True
        new = np.asarray(generate(model, tokens, mask, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos_token_id, pad_token_id=pad_id))
        for r in range(len(chunk)):
            ids = new[r].tolist()
            eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
            cut = next((i for i, x in enumerate(ids) if x in eos), len(ids))
            text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
            out.append((text, parse_label(text, task.label_names)))
        bar.update(len(chunk))
    return out


# ------------------------------------------------------------------ general benchmarks


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


# ------------------------------------------------------------------ perplexity


def held_out_text(path, fraction: float = 0.1) -> str:
    """The last `fraction` of a text file, starting at a line boundary (the first 90% is
    free for calibration / training)."""
    text = data.read_text(path)
    cut = int(len(text) * (1 - fraction))
    nl = text.find("\n", cut)
    return text[nl + 1 if nl >= 0 else cut:]


def perplexity(model, tokenizer, text: str, *, window: int = 512, stride: int = 256,
               max_tokens: int | None = None, batch_size: int = 8, mesh=None,
               pad_id: int = 0, progress: str | None = None) -> dict:
    """Token-level perplexity with a sliding window (HF's fixed-length-model recipe).

    Windows of `window` tokens start every `stride` tokens; each window scores only the
    tokens the previous one did not, so every token but the first is scored once with at
    least window - stride tokens of context (except in the first window).
    Returns {perplexity, nll (mean per token), tokens (scored)}.
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    ids = encode(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens")
    rows = []  # (window ids, index of the first scored target within the window)
    prev_end = 1  # position 0 has no context: never scored
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        rows.append((ids[begin:end], prev_end - begin))
        prev_end = end
        if end == len(ids):
            break
    graphdef, state = _split(model, mesh)
    total, count = 0.0, 0
    bar = Progress(len(rows), progress or "", enabled=progress is not None)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.full((batch_size, window), pad_id, np.int32)
        mask = np.zeros((batch_size, window), bool)
        scored = np.zeros((batch_size, window), bool)  # scored[r, j]: target ids[j + 1]
        for r, (w, first) in enumerate(chunk):
            tokens[r, :len(w)], mask[r, :len(w)] = w, True
            scored[r, first - 1:len(w) - 1] = True
        targets = np.concatenate([tokens[:, 1:], np.full((batch_size, 1), pad_id, np.int32)], 1)
        nll = sharding_lib.to_host(_token_nll(graphdef, state, *_place(
            (tokens, mask, targets), mesh))).astype(np.float64)
        total += float(nll[scored].sum())
        count += int(scored.sum())
        bar.update(len(chunk))
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}


# ------------------------------------------------------------------ outputs


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
    results.atomic_write(paths["json"], json.dumps(
        {"labels": list(label_names), "rows": "true label", "columns": "predicted label",
         "counts": cm.tolist()}, indent=1))
    buf = io.BytesIO()
    np.save(buf, cm)
    results.atomic_write(paths["npy"], buf.getvalue())
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
    results.atomic_write(paths["png"], buf.getvalue())
    return {k: str(v) for k, v in paths.items()}
