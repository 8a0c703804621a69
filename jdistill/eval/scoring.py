"""Log-likelihood scoring: one batched, jitted core for every evaluation, and perplexity.

Everything is log-likelihood scoring with one batched, jitted core (`choice_logliks`):
a batch of contexts is run once with a KV cache, and all candidate continuations of a
context run on top of it packed into one row (each attends to the shared context and to
its own earlier tokens only, with its own positions), so a context shared by 20 labels (or
4 answers) is computed once and no continuation pays for another's padding. Padding never
changes a score: contexts are left-padded and packed continuations right-padded to length
buckets (multiples of `CTX_BUCKET` / `CONT_BUCKET`, to limit recompiles), padded keys are
masked, and the per-token log-probs (f32, chunked over tokens: no [B, T, V] logits) are
summed over each continuation's real tokens only. A trace format's student is scored after
its own greedy trace on the same cache (`traced_choice_logliks`): context, trace and
continuations are each computed once.

Tokenization follows EleutherAI lm-evaluation-harness (v0.4): `encode_pair` is
`HFLM._encode_pair` (trailing context spaces move into the continuation; the continuation
is the tail of encode(context + continuation) after len(encode(context)) tokens; tokens are
encoded without special tokens, as HFLM does for causal models by default).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill import sharding as sharding_lib
from jdistill.data import io as data
from jdistill.distill import fused
from jdistill.models.decoder import KVCache, stacked_layers
from jdistill.utils.progress import Progress

CTX_BUCKET = 32  # contexts pad to multiples of this many tokens
CONT_BUCKET = 16  # packed continuations likewise
LOGIT_CHUNK = 1024  # tokens whose logits exist at once ([chunk, V] f32)


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


def _predictors(model, layers, cache, last, cont, choice, offset, length):
    """Hidden states predicting every token of the packed continuations cont [B, T] run on
    top of `cache` (each continuation attends to the cached prefix and its own tokens, at
    positions length + offset); last [B, D] is the prefix's last hidden state."""
    mask = choice >= 0
    h, _ = model.forward(cont, attention_mask=mask, positions=length[:, None] + offset,
                         cache=cache, documents=choice, layers=layers)
    # token j is predicted by token j - 1 of its own continuation, or the prefix's last
    prev = jnp.concatenate([last[:, None], h[:, :-1]], axis=1)
    return jnp.where((offset == 0)[..., None], last[:, None], prev)


def _summed(nll, choice, n_choices):
    """Per-token NLL [B, T] -> summed log-likelihood of each continuation [B, C]."""
    picks = jax.nn.one_hot(choice, n_choices, dtype=jnp.float32)  # -1 -> all zeros
    return -jnp.einsum("bt,btc->bc", jnp.where(choice >= 0, nll, 0.0), picks)


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10))
def _choice_logliks(graphdef, state, layers, ctx, ctx_mask, cont, choice, offset, n_choices,
                    single_tokens, with_greedy):
    """ctx/ctx_mask [B, S] (left-padded, last token real); cont [B, T] the continuations of
    each context packed in one row, choice [B, T] their index (-1: padding), offset [B, T]
    each token's position within its continuation -> (summed log-prob of each [B, C] f32,
    and with `with_greedy` whether greedy decoding yields each [B, C] bool, else None).
    single_tokens: every continuation is one token (no second forward is needed)."""
    model = nnx.merge(graphdef, state)
    b, s = ctx.shape
    t = cont.shape[1]
    cache = KVCache.create(model.config, b, s + (0 if single_tokens else t), model.dtype)
    hidden, cache = model.forward(ctx, attention_mask=ctx_mask, cache=cache, layers=layers)
    last = hidden[:, -1]  # predicts the first token of every continuation
    if single_tokens:
        predictors = jnp.broadcast_to(last[:, None], (b, t, last.shape[-1]))
    else:
        predictors = _predictors(model, layers, cache, last, cont, choice, offset,
                                 ctx_mask.sum(axis=1))
    _, nll = fused.fused_token_terms(predictors, model.unembed_weight(), targets=cont,
                                      chunk_size=LOGIT_CHUNK)
    ll = _summed(nll, choice, n_choices)
    if not with_greedy:
        return ll, None
    picks = jax.nn.one_hot(choice, n_choices, dtype=jnp.float32)
    missed = (choice >= 0) & ~greedy_tokens(predictors, model.unembed_weight(), cont)
    return ll, jnp.einsum("bt,btc->bc", missed.astype(jnp.float32), picks) == 0


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11, 12))
def _traced_choice_logliks(graphdef, state, layers, ctx, ctx_mask, cont, choice, offset,
                           n_choices, max_new_tokens, eos, separator, pad_id):
    """The greedy trace after each context, then its continuations scored after context +
    trace, on one KV cache (no second pass over context and trace).

    ctx/ctx_mask/cont/choice/offset as `_choice_logliks`. The trace stops at an id in `eos`
    (not part of the trace) or at a one-token `separator` (its last token), after
    `max_new_tokens` at most; a trace that did not end with the separator gets it appended.
    -> (generated ids [B, max_new_tokens], pad after the stop; summed log-prob of each
    continuation [B, C] f32)."""
    model = nnx.merge(graphdef, state)
    b, s = ctx.shape
    n_sep = len(separator)
    cache = KVCache.create(model.config, b, s + max_new_tokens + n_sep + cont.shape[1],
                           model.dtype)
    positions = jnp.maximum(jnp.cumsum(ctx_mask, axis=1) - 1, 0)
    hidden, cache = model.forward(ctx, attention_mask=ctx_mask, positions=positions,
                                  cache=cache, layers=layers)
    eos_ids = jnp.array(eos or (-1,), jnp.int32)
    sep_stop = jnp.array(separator if n_sep == 1 else (-1,), jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[4])

    def body(carry):
        step, cache, last, length, done, ended_sep, out = carry
        token = jnp.where(done, pad_id, jnp.argmax(model.unembed(last), axis=-1)
                          .astype(jnp.int32))
        out = out.at[:, step].set(token)
        kept = ~done & ~jnp.isin(token, eos_ids)  # an EOS is not part of the trace
        is_sep = kept & jnp.isin(token, sep_stop)
        h, cache = model.forward(token[:, None], attention_mask=kept[:, None],
                                 positions=length[:, None], cache=cache, layers=layers)
        last = jnp.where(kept[:, None], h[:, -1], last)
        return (step + 1, cache, last, length + kept, done | ~kept | is_sep,
                ended_sep | is_sep, out)

    carry = (jnp.zeros((), jnp.int32), cache, hidden[:, -1], ctx_mask.sum(axis=1),
             jnp.zeros(b, bool), jnp.zeros(b, bool), out)
    _, cache, last, length, _, ended_sep, out = jax.lax.while_loop(cond, body, carry)
    if n_sep:  # the answer starts a line even where an EOS or the budget ended the trace
        need = ~ended_sep
        sep = jnp.broadcast_to(jnp.array(separator, jnp.int32), (b, n_sep))
        h, cache = model.forward(sep, attention_mask=jnp.broadcast_to(need[:, None], sep.shape),
                                 positions=length[:, None] + jnp.arange(n_sep), cache=cache,
                                 layers=layers)
        last = jnp.where(need[:, None], h[:, -1], last)
        length = length + need * n_sep
    predictors = _predictors(model, layers, cache, last, cont, choice, offset, length)
    _, nll = fused.fused_token_terms(predictors, model.unembed_weight(), targets=cont,
                                      chunk_size=LOGIT_CHUNK)
    return out, _summed(nll, choice, n_choices)


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
def _token_nll(graphdef, state, layers, tokens, mask, targets):
    """Plain forward (right-padded rows) -> per-token NLL of `targets` [B, T] f32."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.forward(tokens, attention_mask=mask, layers=layers)
    _, nll = fused.fused_token_terms(hidden, model.unembed_weight(), targets=targets,
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
    prepared = _prepared(requests, max_length or model.config.max_position_embeddings)
    n_choices = max((len(c) for _, c in prepared), default=1)
    single_tokens = all(len(x) == 1 for _, conts in prepared for x in conts)
    graphdef, state = _split(model, mesh)
    layers = stacked_layers(graphdef, state)
    out = [None] * len(prepared)
    bar = Progress(len(prepared), progress or "", enabled=progress is not None)
    for idx, arrays in _batches(prepared, batch_size, pad_id):
        ll, is_greedy = _choice_logliks(graphdef, state, layers, *_place(arrays, mesh),
                                        n_choices, single_tokens, greedy)
        # to_host: a collective gather when the batch is split over several processes
        ll = sharding_lib.to_host(ll).astype(np.float64)
        is_greedy = None if is_greedy is None else sharding_lib.to_host(is_greedy)
        for r, i in enumerate(idx):
            k = len(prepared[i][1])
            out[i] = (ll[r, :k], None if is_greedy is None else is_greedy[r, :k])
        bar.update(len(idx))
    return out


def traced_choice_logliks(model, requests, *, max_new_tokens: int, eos_ids, separator,
                          batch_size: int = 8, mesh=None, pad_id: int = 0,
                          progress: str | None = None) -> list[tuple[list[int], np.ndarray]]:
    """Per request (context ids, [continuation ids, ...]): the model's greedy trace after
    the context and the summed log-likelihood of every continuation after context + trace,
    in one pass (one KV cache; `_traced_choice_logliks`).

    The trace ends at its first id in `eos_ids` (dropped) or at `separator` when that is one
    token (kept), after `max_new_tokens` at most; a trace that does not end with the
    separator's ids gets them appended, so the continuations always start after it. Returns
    per request (trace ids including the separator, float64 log-likelihoods).
    """
    eos, separator = tuple(int(x) for x in eos_ids), tuple(int(x) for x in separator)
    reserve = max_new_tokens + len(separator)  # the trace shares the context's length
    limit = model.config.max_position_embeddings - reserve
    if limit < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a context in "
                         f"{model.config.max_position_embeddings} positions")
    prepared = _prepared(requests, limit)
    n_choices = max((len(c) for _, c in prepared), default=1)
    graphdef, state = _split(model, mesh)
    layers = stacked_layers(graphdef, state)
    stops = eos + (separator if len(separator) == 1 else ())
    out = [None] * len(prepared)
    bar = Progress(len(prepared), progress or "", enabled=progress is not None)
    for idx, arrays in _batches(prepared, batch_size, pad_id):
        new, ll = _traced_choice_logliks(graphdef, state, layers, *_place(arrays, mesh),
                                         n_choices, max_new_tokens, eos, separator, pad_id)
        new, ll = sharding_lib.to_host(new), sharding_lib.to_host(ll).astype(np.float64)
        for r, i in enumerate(idx):
            ids = new[r].tolist()
            cut = next((j for j, x in enumerate(ids) if x in stops), None)
            if cut is not None and ids[cut] not in eos:  # ended by the separator
                trace = ids[:cut + 1]
            else:
                trace = ids[:cut if cut is not None else len(ids)] + list(separator)
            out[i] = (trace, ll[r, :len(prepared[i][1])])
        bar.update(len(idx))
    return out


def _prepared(requests, max_length: int) -> list:
    """Checked requests, each context cut on the left to fit max_length with its longest
    continuation (as the harness truncates)."""
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
    return prepared


def _batches(prepared, batch_size: int, pad_id: int):
    """(request indices, (ctx, ctx_mask, cont, choice, offset)) per batch: contexts
    left-padded, each context's continuations packed in its row, both to length buckets;
    longest contexts first (less padding)."""
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
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
        yield idx, (ctx, ctx_mask, cont, choice, offset)


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
    layers = stacked_layers(graphdef, state)
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
        nll = sharding_lib.to_host(_token_nll(graphdef, state, layers, *_place(
            (tokens, mask, targets), mesh))).astype(np.float64)
        total += float(nll[scored].sum())
        count += int(scored.sum())
        bar.update(len(chunk))
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}
