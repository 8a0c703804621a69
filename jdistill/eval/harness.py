"""jdistill models inside EleutherAI lm-evaluation-harness (`pip install -e ".[harness]"`).

Importing this module registers the model name "jdistill" with the harness, so its hundreds
of tasks (MMLU-Pro, the Open LLM Leaderboard sets, ...) run on a jdistill checkpoint, a
pruned or distilled student, or a llama.cpp .gguf file:

  import jdistill.eval.harness, lm_eval
  lm_eval.simple_evaluate(model="jdistill", model_args="pretrained=DIR,dtype=bfloat16",
                          tasks=["arc_easy"])

or `python -m experiments.evaluate --model=DIR --harness_tasks=arc_easy,mmlu_pro`.

The requests go through jdistill's own batched scoring core (`eval.scoring.choice_scores`:
contexts with a KV cache, the continuations of a context packed into one row, length
buckets to bound recompiles) and `generate`, sharded on a mesh. Scoring follows the
harness's HF model (`HFLM`): the same context/continuation split (`TemplateLM._encode_pair`),
the BOS (else EOS) token as the context of an empty one, the same rolling windows for
perplexity, stop sequences cut from greedy generations. Tokens are encoded without special
tokens (as `scoring.encode`); the tests check per-request log-likelihoods equal HFLM's.
"""

from __future__ import annotations

import collections

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

import jdistill
from jdistill import sharding as sharding_lib
from jdistill.data import io as data
from jdistill.eval import scoring as ev

MAX_GEN_TOKS = 256  # the harness's default generation length


def parse_mesh(spec):
    """`mesh=DxFxT` (data x fsdp x tensor; one may be -1): commas separate the harness's
    model args, so the mesh is written with x."""
    if spec is None or spec == "":
        return None
    try:
        sizes = [int(v) for v in str(spec).split("x")]
        data_, fsdp, tensor = sizes
    except ValueError:
        raise ValueError(f"mesh={spec!r}: expected DATAxFSDPxTENSOR, e.g. mesh=1x-1x1 (one "
                         "size may be -1)") from None
    return sharding_lib.make_mesh(data=data_, fsdp=fsdp, tensor=tensor)


@register_model("jdistill")
class JDistillLM(TemplateLM):
    """A jdistill `Decoder` as a harness model.

    Args (all may come as strings from `model_args`):
      pretrained: an HF checkpoint directory (ours or transformers') or a .gguf file.
      dtype: parameter dtype (float32, bfloat16, float16); None keeps the checkpoint's.
      mesh: "DxFxT" device mesh (data x fsdp x tensor), or a `jax.sharding.Mesh`; None: one
        device.
      tokenizer: tokenizer directory when the checkpoint has no tokenizer.json.
      batch_size: contexts per scoring batch (each with all its continuations) and rows
        per generation batch.
      max_length: longest model input (default: the config's max_position_embeddings).
      max_gen_toks: default generation length when a task gives none.
    """

    def __init__(self, pretrained, dtype=None, mesh=None, tokenizer=None, batch_size=8,
                 max_length=None, max_gen_toks=MAX_GEN_TOKS, device=None,
                 max_batch_size=None, **unused):
        super().__init__()
        del device, max_batch_size  # the mesh places the model; batches are fixed-size
        if unused:
            raise ValueError(f"jdistill model: unknown model_args {sorted(unused)}; use "
                             "pretrained, dtype, mesh, tokenizer, batch_size, max_length, "
                             "max_gen_toks")
        self.mesh = parse_mesh(mesh) if mesh is None or isinstance(mesh, str) else mesh
        self.model = jdistill.load_pretrained(pretrained, dtype=dtype, mesh=self.mesh)
        self.tokenizer = data.load_tokenizer(self.model.source_path, tokenizer)
        self.batch_size = 8 if batch_size in (None, "auto") else int(
            str(batch_size).split(":")[0])
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.pretrained = str(pretrained)

    @classmethod
    def from_model(cls, model, tokenizer, *, mesh=None, batch_size: int = 8,
                   max_length=None, max_gen_toks: int = MAX_GEN_TOKS) -> "JDistillLM":
        """An LM around a model already loaded (and placed on `mesh`): no second load."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm.mesh, lm.model, lm.tokenizer = mesh, model, tokenizer
        lm.batch_size, lm._max_length, lm.max_gen_toks = int(batch_size), max_length, max_gen_toks
        lm.pretrained = str(getattr(model, "source_path", "jdistill model"))
        return lm

    # ------------------------------------------------------------ tokens

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.config.max_position_embeddings

    @property
    def eot_token_id(self) -> int:
        eos = self.model.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise ValueError(f"{self.pretrained}: the config names no eos_token_id")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        bos = self.model.config.bos_token_id  # as HFLM: BOS, else EOS
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return ev.encode(self.tokenizer, string)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # ------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(strings, context ids, continuation ids)] -> [(log-likelihood, is_greedy)].
        Requests sharing a context are scored in one packed row."""
        by_context = collections.OrderedDict()
        for i, (_, ctx, cont) in enumerate(requests):
            by_context.setdefault(tuple(ctx), []).append((i, list(cont)))
        grouped = [(list(ctx), [c for _, c in items]) for ctx, items in by_context.items()]
        scores = ev.choice_scores(self.model, grouped, batch_size=self.batch_size,
                                  mesh=self.mesh, max_length=self.max_length,
                                  pad_id=self._pad_id(), greedy=True)
        out = [None] * len(requests)
        for (ll, greedy), items in zip(scores, by_context.values()):
            for k, (i, _) in enumerate(items):
                out[i] = (float(ll[k]), bool(greedy[k]))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-likelihood in the harness's disjoint rolling windows of
        max_length tokens, the first conditioned on the prefix token."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = np.zeros(len(requests))
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampling when a task asks for do_sample / temperature),
        cut at the first stop sequence (`until`, and the EOS text)."""
        out = [None] * len(requests)
        groups = collections.defaultdict(list)
        for i, req in enumerate(requests):
            context, kwargs = req.args
            groups[repr(sorted(kwargs.items()))].append((i, context, dict(kwargs)))
        eos_text = self.tok_decode([self.eot_token_id])
        for items in groups.values():
            kwargs = items[0][2]
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until = until + ([eos_text] if eos_text and eos_text not in until else [])
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get(
                "do_sample", False) else 0.0
            keep = self.max_length - max_new
            if keep <= 0:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in "
                                 f"max_length={self.max_length}")
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                for (i, _, _), text in zip(chunk, self._generate(
                        [self.tok_encode(c)[-keep:] for _, c, _ in chunk], max_new,
                        temperature, float(kwargs.get("top_p", 1.0)))):
                    out[i] = cut_at_stops(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _generate(self, contexts, max_new: int, temperature: float, top_p: float):
        width = ev.bucket(max(len(c) for c in contexts), ev.CTX_BUCKET)
        rows = ev.bucket(len(contexts), self.batch_size)  # one compiled shape per width
        tokens = np.full((rows, width), self._pad_id(), np.int32)
        mask = np.zeros((rows, width), bool)
        mask[:, -1] = True  # filler rows: one "real" pad token, outputs dropped
        for r, ids in enumerate(contexts):
            tokens[r, width - len(ids):], mask[r, width - len(ids):] = ids, True
        new = np.asarray(jdistill.generate(self.model, tokens, mask, max_new_tokens=max_new,
                                           temperature=temperature, top_p=top_p,
                                           eos_token_id=self.eot_token_id,
                                           pad_token_id=self._pad_id()))
        texts = []
        for row in new[:len(contexts)]:
            ids = row.tolist()
            if self.eot_token_id in ids:
                ids = ids[:ids.index(self.eot_token_id) + 1]  # the EOS text is a stop
            texts.append(self.tok_decode(ids))
        return texts

    def _pad_id(self) -> int:
        pad = self.model.config.pad_token_id
        return int(pad) if pad is not None else 0


def task_manager(include: str | None = None):
    """The harness's task index (its own tasks, plus the YAMLs under `include`)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include) if include else TaskManager()


def check_tasks(manager, names) -> None:
    """Raises, naming the unknown ones, unless every task (or group) name is indexed."""
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-evaluation-harness task(s) {unknown}; list them with "
                         "`lm_eval ls tasks` (or give --harness_include=DIR of task YAMLs)")


def run_tasks(lm, names, *, manager, limit=None) -> dict:
    """Runs harness tasks on `lm`; returns {task: {metric: value, ..., "n": docs}} with the
    harness's "metric,filter" keys written "metric" (filter "none") or "metric/filter"."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager,
                                  limit=limit, log_samples=False)
    rows = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        n = out.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = int(n.get("effective", n.get("original", 0)))
        rows[task] = row
    return rows


def cut_at_stops(text: str, stops) -> str:
    """`text` up to the first occurrence of any stop sequence (as the harness cuts HF
    generations)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
