"""Teacher supervision built once, before training: chain-of-thought traces and cached top-k
log-probabilities for offline logit distillation.

Traces (`generate_traces`, `cached_traces`, `write_traces`)
  The teacher continues each task prompt, wrapped by a *recipe* (default `DEFAULT_RECIPE`,
  which appends "Think step by step, then give the label."). A trace record is
  ``{"prompt": <the recipe prompt the teacher saw>, "task_prompt": <the original prompt>,
  "reasoning": <the teacher's decoded continuation, cut before its EOS>, "answer": <the
  caller's label>}``: `data.read_examples` reads it as is, and `data.encode_example` turns it
  into prompt (0) / trace (1) / answer (2) segments. The record keeps the recipe prompt so the
  student (and a teacher KL term during training) sees the context the trace was generated in.

Top-k (`compute_topk`, `save_topk`, `load_topk`, `TopkBatcher`)
  For each encoded example (ids, segments) the teacher's forward pass at temperature 1 gives,
  at every position t that predicts a real next token, the k largest entries of
  ``log_softmax(logits[t])`` in f32 (the format `losses.topk_kl` expects: cache at the
  temperature you distil at). Alignment is that of `data.Batcher`: entry t is the teacher's
  distribution over ``ids[t + 1]``, i.e. over ``targets[t]`` of a batch row. Rows always start
  at token 0 (`TopkBatcher` does not pack; `packing.PackedBatcher` has no top-k), so an
  example stores a contiguous range of positions ``[start, m)`` with ``m = min(len(ids) - 1,
  seq_len)`` and, by default (``skip_prompt=True``), ``start`` = the first position whose
  target is not a prompt token (prompt targets are never supervised; for classification
  prompts that is most tokens).

  Storage (one safetensors file, written atomically): ``logprobs`` [N, k] float16, ``ids``
  [N, k] uint16 when the vocabulary has <= 65536 ids, else int32, ``offsets`` [n + 1] int64
  (example i owns rows offsets[i]:offsets[i+1]), ``starts`` [n] int64 (its first position),
  and JSON metadata (k, vocab size, seq_len, teacher, a digest of the examples).
  Bytes per stored token: ``k * (2 + 2)`` (uint16 ids) or ``k * (2 + 4)`` (int32 ids), e.g.
  256 B at k = 64 with a 32k or 50k vocabulary; plus 16 B per example for offsets/starts.
  float16 keeps ~3 significant digits (|error| <= |logp| * 2**-11), fine for the KL target.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill import sharding
from jdistill.data import io as data
from jdistill.models.decoder import stacked_layers
from jdistill.models.generate import eos_ids, generate
from jdistill.utils import files

DEFAULT_RECIPE = "{prompt}\nThink step by step, then give the label.\n"
TOPK_FORMAT = "jdistill-topk-v1"
TRACE_FORMAT = "jdistill-traces-v1"
F16_MIN = float(np.finfo(np.float16).min)


# ----------------------------------------------------------------------------- helpers


def reasoning_prompt(prompt: str, recipe: str = DEFAULT_RECIPE) -> str:
    """The prompt the teacher continues: `recipe` with ``{prompt}`` replaced by the task
    prompt. The default appends "Think step by step, then give the label." on its own line;
    pass ``"{prompt}"`` to generate from the bare prompt."""
    if "{prompt}" not in recipe:
        raise ValueError(f"recipe {recipe!r} lacks the '{{prompt}}' placeholder")
    return recipe.replace("{prompt}", prompt)


def _bucket(n: int, cap: int | None = None, floor: int = 16) -> int:
    """Next power of two >= n (at least `floor`, at most `cap`): few distinct shapes, so few
    compilations, at under 2x padding."""
    b = max(floor, 1 << max(0, n - 1).bit_length())
    return b if cap is None else min(b, cap)


def _eta(done: int, total: int, elapsed: float) -> str:
    return f"{(total - done) * elapsed / max(done, 1):,.0f}s"


# ----------------------------------------------------------------------------- traces


@dataclasses.dataclass(frozen=True)
class TraceSettings:
    """What decides a trace (and so the cache key). temperature 0 is greedy; sampled traces
    depend on `seed` and on `batch_size` (one random stream per batch)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    recipe: str = DEFAULT_RECIPE

    def key_fields(self) -> dict:
        fields = dataclasses.asdict(self)
        if self.temperature == 0.0:  # greedy output does not depend on these
            fields.pop("batch_size")
            fields.pop("seed")
        return fields


def generate_traces(model, tokenizer, prompts: list[str], *, max_new_tokens: int,
                    temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                    seed: int = 0, eos_token_id=None, pad_id: int = 0,
                    bos_id: int | None = None, recipe: str = DEFAULT_RECIPE,
                    log: Callable[[str], None] = print) -> list[str]:
    """The teacher's continuation of each prompt, decoded (special tokens skipped), cut
    before the first EOS. Returned in the order of `prompts`.

    Each prompt is `reasoning_prompt(prompt, recipe)` (by default the prompt, a newline and
    "Think step by step, then give the label."), encoded like `data.encode_example` does
    (optional `bos_id`, then ``tokenizer.encode(text, add_special_tokens=False)``). Prompts
    run longest first, `batch_size` at a time, left-padded to a power-of-two length; the
    last batch is filled up with repeats (one batch dimension). Batch i samples with
    ``fold_in(key(seed), i)``.
    """
    if not prompts:
        raise ValueError("no prompts to generate traces for")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need batch_size >= 1 and max_new_tokens >= 1, got {batch_size}, "
                         f"{max_new_tokens}")
    texts = [reasoning_prompt(p, recipe) for p in prompts]
    prefix = [] if bos_id is None else [bos_id]
    encoded = [prefix + e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts {empty[:5]} encode to no tokens; give a bos_id or drop them")
    eos = eos_ids(eos_token_id)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    traces: list[str | None] = [None] * len(prompts)
    n_batches = -(-len(order) // batch_size)
    t0, new_tokens = time.perf_counter(), 0
    layers = stacked_layers(*nnx.split(model))
    for b in range(n_batches):
        rows = order[b * batch_size:(b + 1) * batch_size]
        chunk = [encoded[i] for i in rows]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # a fixed batch dim: fewer compiles
        width = _bucket(max(len(ids) for ids in chunk))
        tokens = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for r, ids in enumerate(chunk):  # left padding: generation continues at the right
            tokens[r, width - len(ids):], mask[r, width - len(ids):] = ids, True
        out = np.asarray(generate(
            model, tokens, mask, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, rng=jax.random.fold_in(jax.random.key(seed), b),
            eos_token_id=list(eos) or None, pad_token_id=pad_id, layers=layers))
        for r, i in enumerate(rows):
            ids = out[r].tolist()
            cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            new_tokens += cut
            traces[i] = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        elapsed = time.perf_counter() - t0
        log(f"traces: batch {b + 1}/{n_batches} ({min((b + 1) * batch_size, len(order))}/"
            f"{len(order)} prompts), {new_tokens / max(elapsed, 1e-9):,.0f} new tok/s, "
            f"ETA {_eta(b + 1, n_batches, elapsed)}")
    return traces


def trace_records(prompts: list[str], traces: list[str], answers: list[str] | None,
                  recipe: str, student_prompts: list[str] | None = None) -> list[dict]:
    """Records `data.read_examples` accepts: the prompt the student trains on (by default the
    recipe prompt the teacher saw), the teacher's prompt, trace, answer.

    `student_prompts` differ from the teacher's when the teacher was shown more than the
    student may see, e.g. the gold label in a rationalisation recipe.
    """
    answers = [""] * len(prompts) if answers is None else list(answers)
    student = ([reasoning_prompt(p, recipe) for p in prompts] if student_prompts is None
               else list(student_prompts))
    if not len(prompts) == len(traces) == len(answers) == len(student):
        raise ValueError(f"{len(prompts)} prompts, {len(traces)} traces, {len(answers)} "
                         f"answers, {len(student)} student prompts")
    return [{"prompt": sp, "task_prompt": p, "reasoning": t, "answer": a}
            for p, t, a, sp in zip(prompts, traces, answers, student)]


def _meta_path(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")


def write_traces(path, records: list[dict], settings: TraceSettings, *, key: str | None = None,
                 model: str | None = None) -> Path:
    """Writes `records` as JSONL (one record a line, what `data.read_examples` reads) and,
    beside it, STEM.meta.json with the settings, model and cache key. Both atomically; the
    metadata goes last, so it marks a complete file."""
    path = Path(path)
    files.atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                     for r in records))
    meta = {"format": TRACE_FORMAT, "key": key, "model": model, "count": len(records),
            "settings": dataclasses.asdict(settings)}
    files.atomic_write(_meta_path(path), json.dumps(meta, indent=2))
    return path


def model_identity(model_path) -> dict:
    """What identifies a checkpoint for caching: its absolute path and the name, size and
    mtime of its config / weight / tokenizer files (a retrained model in place changes it)."""
    path = Path(model_path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    parts = sorted(p for p in ([path] if path.is_file() else path.iterdir())
                   if p.suffix in (".json", ".safetensors", ".gguf", ".model"))
    return {"path": str(path),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in parts]}


def trace_key(model_path, prompts: list[str], settings: TraceSettings) -> str:
    """sha256 over (model identity, prompts, the settings that change the output)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": TRACE_FORMAT, "model": model_identity(model_path),
                         "settings": settings.key_fields()}, sort_keys=True).encode())
    for p in prompts:
        h.update(len(p.encode()).to_bytes(8, "little") + p.encode())
    return h.hexdigest()


def cached_traces(cache_dir, model_path, prompts: list[str], settings: TraceSettings, *,
                  answers: list[str] | None = None, student_prompts: list[str] | None = None,
                  model=None, tokenizer=None, mesh=None, dtype=None,
                  log: Callable[[str], None] = print) -> tuple[list[dict], Path]:
    """(trace records, their file): read from CACHE_DIR/traces-KEY.jsonl when an earlier call
    had the same model, prompts and settings (see `trace_key`), else generated and stored.

    `model` / `tokenizer` default to loading `model_path` (an HF directory; with `mesh` and
    `dtype` as in `load_pretrained`), and only on a cache miss. The answers do not enter the
    key (traces do not depend on labels): the returned records carry this call's `answers`
    (and `student_prompts`, see `trace_records`), and the file is rewritten if they differ.
    bos / eos / pad ids come from the model's config.json.
    """
    from jdistill.models.config import load_hf_config

    key = trace_key(model_path, prompts, settings)
    path = Path(cache_dir) / f"traces-{key[:20]}.jsonl"
    meta_file = _meta_path(path)
    if meta_file.exists() and path.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key and meta.get("count") == len(prompts):
            records = data.read_examples(path)
            fresh = trace_records(prompts, [r["reasoning"] for r in records],
                                  [r["answer"] for r in records] if answers is None else answers,
                                  settings.recipe, student_prompts)
            if fresh != records:
                records = fresh
                write_traces(path, records, settings, key=key, model=str(model_path))
            log(f"traces: reusing {path} ({len(records)} records)")
            return records, path
    config = load_hf_config(Path(model_path) / "config.json")
    if model is None:
        from jdistill.checkpoints.hf import load_pretrained
        model = load_pretrained(model_path, dtype=dtype, mesh=mesh)
    tokenizer = tokenizer or data.load_tokenizer(model_path)
    traces = generate_traces(
        model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p,
        batch_size=settings.batch_size, seed=settings.seed, eos_token_id=config.eos_token_id,
        pad_id=config.pad_token_id if config.pad_token_id is not None else 0,
        bos_id=config.bos_token_id, recipe=settings.recipe, log=log)
    records = trace_records(prompts, traces, answers, settings.recipe, student_prompts)
    if jax.process_index() == 0:
        write_traces(path, records, settings, key=key, model=str(model_path))
    return records, path


def encode_records(tokenizer, records: list[dict], config, *, with_reasoning: bool):
    """`data.encode_example` of every record with the config's bos / first eos id; the
    records' reasoning goes in between only `with_reasoning` (formats cot / blended). The
    top-k file must be computed on exactly the examples training batches."""
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, tuple) else eos
    if with_reasoning and not any(r.get("reasoning") for r in records):
        raise ValueError("no record has 'reasoning'; generate traces first "
                         "(python -m experiments.supervise --mode=traces)")
    return [data.encode_example(tokenizer, r["prompt"], r["answer"],
                                r.get("reasoning") if with_reasoning else None,
                                bos_id=config.bos_token_id, eos_id=eos) for r in records]


# ----------------------------------------------------------------------------- top-k


def ids_dtype(vocab_size: int):
    """uint16 holds ids < 65536; larger vocabularies need int32."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def examples_digest(encoded: list) -> str:
    """sha256 of the (ids, segments) examples: ties a top-k file to the data it came from."""
    h = hashlib.sha256(len(encoded).to_bytes(8, "little"))
    for ids, segs in encoded:
        ids, segs = np.asarray(ids, np.int32), np.asarray(segs, np.int32)
        h.update(len(ids).to_bytes(8, "little") + ids.tobytes() + segs.tobytes())
    return h.hexdigest()


def supervised_range(ids, segs, seq_len: int, skip_prompt: bool = True) -> tuple[int, int]:
    """[start, m): the positions of an example whose top-k is stored (see module doc)."""
    m = max(0, min(len(ids) - 1, seq_len))
    if not skip_prompt:
        return 0, m
    later = np.flatnonzero(np.asarray(segs)[1:m + 1] != data.PROMPT)  # segment of target t
    return (int(later[0]) if later.size else m), m


@dataclasses.dataclass
class TopkCache:
    """Teacher top-k log-probs of a list of examples (see the module doc for the layout)."""

    logprobs: np.ndarray   # [N, k] float16
    ids: np.ndarray        # [N, k] uint16 or int32
    offsets: np.ndarray    # [n + 1] int64
    starts: np.ndarray     # [n] int64
    vocab_size: int
    seq_len: int
    digest: str
    teacher: str = ""
    skip_prompt: bool = True

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[1])

    @property
    def num_examples(self) -> int:
        return int(self.starts.shape[0])

    @property
    def bytes_per_token(self) -> int:
        return self.k * (self.logprobs.itemsize + self.ids.itemsize)

    def example(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(first position, logprobs [n, k], ids [n, k]) of example i."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return int(self.starts[i]), self.logprobs[s:e], self.ids[s:e]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _teacher_topk(graphdef, state, tokens, mask, k: int, chunk: int):
    """(log-probs, ids) [B, T, k]: top-k of the f32 log-softmax at every position, computed
    `chunk` positions at a time so only a [chunk, B, V] slab of logits exists at once."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.forward(tokens, attention_mask=mask)
    w = model.unembed_weight()

    def one(h):  # [B, D] -> top-k [B, k]
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)

    vals, idx = jax.lax.map(one, jnp.swapaxes(hidden, 0, 1), batch_size=chunk)
    return jnp.swapaxes(vals, 0, 1), jnp.swapaxes(idx, 0, 1).astype(jnp.int32)


def compute_topk(teacher, encoded: list, *, k: int, seq_len: int, batch_size: int = 8,
                 mesh=None, skip_prompt: bool = True, teacher_path: str = "",
                 chunk_tokens: int = 2048, log: Callable[[str], None] = print) -> TopkCache:
    """Runs the teacher over `encoded` [(ids, segments)] (what `data.Batcher` takes) and keeps
    the top-k teacher log-probs (temperature 1, f32 log-softmax, stored float16) of the
    positions `supervised_range` names.

    Examples run longest first, `batch_size` at a time, right-padded to a power-of-two
    length <= seq_len (causal attention: padding never changes a real position). With a
    `mesh` the params go to their rule-table shardings and batches split over the batch axes.
    `chunk_tokens` bounds the f32 logits alive at once (chunk_tokens x vocab).
    """
    vocab = teacher.config.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} must be in [1, vocab size {vocab}]")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
    if not encoded:
        raise ValueError("no examples to compute top-k for")
    graphdef, state = nnx.split(teacher)
    if mesh is not None:
        state = sharding.shard_state(state, mesh)
    ranges = [supervised_range(ids, segs, seq_len, skip_prompt) for ids, segs in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -ranges[i][1])
    per_lp: list = [None] * len(encoded)
    per_ids: list = [None] * len(encoded)
    id_type = ids_dtype(vocab)
    n_batches = -(-len(order) // batch_size)
    t0, done_tokens = time.perf_counter(), 0
    for b in range(n_batches):
        rows = order[b * batch_size:(b + 1) * batch_size]
        width = _bucket(max(1, max(ranges[i][1] for i in rows)), cap=seq_len)
        tokens = np.zeros((batch_size, width), np.int32)  # short last batch: padded rows
        mask = np.zeros((batch_size, width), bool)
        for r, i in enumerate(rows):
            m = ranges[i][1]
            tokens[r, :m], mask[r, :m] = np.asarray(encoded[i][0][:m]), True
        mask[:, 0] = True  # an all-padding row still needs one key to attend to
        if mesh is not None:
            tokens, mask = sharding.shard_batch(tokens, mesh), sharding.shard_batch(mask, mesh)
        chunk = max(1, chunk_tokens // batch_size)
        vals, idx = _teacher_topk(graphdef, state, tokens, mask, k, chunk)
        vals, idx = sharding.to_host(vals), sharding.to_host(idx)
        for r, i in enumerate(rows):
            start, m = ranges[i]
            per_lp[i] = np.maximum(vals[r, start:m], F16_MIN).astype(np.float16)
            per_ids[i] = idx[r, start:m].astype(id_type)
            done_tokens += m
        elapsed = time.perf_counter() - t0
        log(f"top-k: batch {b + 1}/{n_batches}, {done_tokens / max(elapsed, 1e-9):,.0f} tok/s, "
            f"ETA {_eta(b + 1, n_batches, elapsed)}")
    counts = np.array([len(x) for x in per_lp], np.int64)
    return TopkCache(
        logprobs=np.concatenate(per_lp).reshape(-1, k),
        ids=np.concatenate(per_ids).reshape(-1, k),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        starts=np.array([s for s, _ in ranges], np.int64), vocab_size=vocab,
        seq_len=seq_len, digest=examples_digest(encoded), teacher=str(teacher_path),
        skip_prompt=skip_prompt)


def save_topk(path, cache: TopkCache) -> Path:
    """Writes `cache` to one safetensors file, atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    meta = {"format": TOPK_FORMAT, "k": cache.k, "vocab_size": cache.vocab_size,
            "seq_len": cache.seq_len, "num_examples": cache.num_examples,
            "digest": cache.digest, "teacher": cache.teacher, "skip_prompt": cache.skip_prompt,
            "temperature": 1.0, "bytes_per_token": cache.bytes_per_token}
    tensors = {"logprobs": np.ascontiguousarray(cache.logprobs, np.float16),
               "ids": np.ascontiguousarray(cache.ids),
               "offsets": np.ascontiguousarray(cache.offsets, np.int64),
               "starts": np.ascontiguousarray(cache.starts, np.int64)}
    metadata = {"jdistill": json.dumps(meta)}  # safetensors metadata is str -> str
    files.atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_topk(path) -> TopkCache:
    """Reads a file `save_topk` wrote (checks its layout)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no top-k file at {path}; compute it with `python -m "
                                "experiments.supervise --mode=topk --teacher=DIR --data=FILE "
                                f"--out={path}`")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("jdistill", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path} is not a top-k file ({e}); recompute it with "
                         "experiments.supervise --mode=topk") from e
    if meta.get("format") != TOPK_FORMAT or set(tensors) != {"logprobs", "ids", "offsets",
                                                             "starts"}:
        raise ValueError(f"{path} is not a {TOPK_FORMAT} file (metadata {meta}, tensors "
                         f"{sorted(tensors)}); recompute it with experiments.supervise "
                         "--mode=topk")
    cache = TopkCache(logprobs=tensors["logprobs"], ids=tensors["ids"],
                      offsets=tensors["offsets"], starts=tensors["starts"],
                      vocab_size=int(meta["vocab_size"]), seq_len=int(meta["seq_len"]),
                      digest=meta["digest"], teacher=meta.get("teacher", ""),
                      skip_prompt=bool(meta.get("skip_prompt", True)))
    n = cache.num_examples
    if (cache.offsets.shape != (n + 1,) or cache.offsets[-1] != len(cache.logprobs)
            or cache.ids.shape != cache.logprobs.shape or cache.k != int(meta["k"])):
        raise ValueError(f"{path} is inconsistent (offsets / shapes / k); recompute it")
    return cache


class TopkBatcher(data.Batcher):
    """`data.Batcher` plus the cached teacher top-k of every position: `.batch(step)` adds
    ``topk_logprobs`` [A, B, T, k] float32 and ``topk_ids`` [A, B, T, k] int32, entry t
    aligned with ``targets[..., t]``. Positions without a stored entry (prompt targets,
    padding) hold log-prob 0 and id 0; they are outside the supervised mask
    (``loss_mask & segments != PROMPT``), and `losses.topk_kl` ignores them.

    `encoded` must be the examples the cache was computed on (checked by digest), and
    `seq_len` at most the cache's (positions beyond it were not stored).
    """

    def __init__(self, encoded: list, topk: TopkCache, *, batch_size: int, seq_len: int,
                 seed: int = 0, accum: int = 1, pad_id: int = 0):
        super().__init__(encoded, batch_size=batch_size, seq_len=seq_len, seed=seed,
                         accum=accum, pad_id=pad_id)
        if topk.num_examples != len(encoded):
            raise ValueError(f"the top-k file holds {topk.num_examples} examples but there "
                             f"are {len(encoded)}; recompute it for this data file")
        if seq_len > topk.seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds the top-k file's {topk.seq_len}: "
                             "later positions were not stored; recompute it with "
                             f"--seq_len={seq_len} or train with --seq_len<={topk.seq_len}")
        if topk.digest != examples_digest(encoded):
            raise ValueError("the top-k file was computed on other examples (different text, "
                             "order, tokenizer, bos/eos or reasoning); recompute it for this "
                             "data with the same encoding as training")
        self.topk = topk

    def batch(self, step: int, rows=None) -> dict:
        """`data.Batcher.batch` plus the top-k arrays; with `rows` (indices along the batch
        axis) only those rows of every micro-batch, as one process of a multi-process run
        loads them."""
        out = super().batch(step, rows)
        t, k = self.seq_len, self.topk.k
        picked = self.indices(step).reshape(self.accum, self.batch_size)
        if rows is not None:
            picked = picked[:, np.asarray(rows)]
        logprobs = np.zeros((picked.size, t, k), np.float32)
        ids = np.zeros((picked.size, t, k), np.int32)
        for r, i in enumerate(picked.ravel()):
            start, lp, ix = self.topk.example(int(i))
            n = max(0, min(len(lp), t - start))
            logprobs[r, start:start + n] = lp[:n]
            ids[r, start:start + n] = ix[:n]
        shape = picked.shape + (t, k)
        return {**out, "topk_logprobs": logprobs.reshape(shape), "topk_ids": ids.reshape(shape)}
