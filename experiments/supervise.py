"""Build teacher supervision once, before distillation: CoT traces or cached top-k log-probs.

  python -m experiments.supervise --mode=traces --teacher=DIR --data=FILE.jsonl \
      --out=TRACES.jsonl --max_new_tokens=256 --temperature=0
  python -m experiments.supervise --mode=topk --teacher=DIR --data=FILE.jsonl \
      --out=TOPK.safetensors --k=64 --seq_len=256 --format=logits

traces: every {"prompt", "answer", ...} record of --data comes back with the teacher's
"reasoning" (generated from the prompt wrapped by --recipe), "prompt" set to that wrapped
prompt and the original kept as "task_prompt"; feed --out to `experiments.distill
--format=cot|blended`. Generations are cached in --cache_dir keyed by teacher, prompts and
settings, so a rerun with the same inputs generates nothing.
topk: the teacher's top-k log-probs (temperature 1) at every supervised position of the
examples `experiments.distill --format=F --seq_len=S` trains on; pass --out there as
--topk=FILE (the teacher is then never loaded). --format and --seq_len must match the
training run's (the file records a digest of the examples; distill refuses a mismatch).
"""

import os
import time
from pathlib import Path

import jax
from absl import app, flags

import jdistill
from experiments import cli
from experiments import flags as common
from jdistill import checkpoints
from jdistill.data import io as data
from jdistill.distill import formats, supervision
from jdistill.models.config import load_hf_config
from jdistill.utils import files

TEACHER = flags.DEFINE_string("teacher", None, "HF checkpoint directory (or .gguf) of the teacher")
DATA = flags.DEFINE_string("data", None, "records (.jsonl: prompt, answer, optional reasoning)")
MODE = flags.DEFINE_enum("mode", None, ["traces", "topk"], "what to build")
OUT = flags.DEFINE_string("out", None, "output file: .jsonl (traces) or .safetensors (topk)")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer directory if --teacher has none")
DTYPE = common.define_dtype(help="teacher parameter dtype (default: as stored)")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "prompts / examples per teacher batch")
# traces
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "longest trace, in tokens")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)")
TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
RECIPE = flags.DEFINE_string("recipe", supervision.DEFAULT_RECIPE,
                             "how the teacher's prompt is built; {prompt} is the task prompt")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "trace cache (default "
                                "$JDISTILL_CACHE/traces or ~/.cache/jdistill/traces)")
# top-k
K = flags.DEFINE_integer("k", 64, "teacher log-probs kept per position")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "tokens per sequence, as in the distill run")
FORMAT = flags.DEFINE_enum("format", "logits", list(formats.NAMES),
                           "the distill run's format: cot / blended include the reasoning")
flags.mark_flags_as_required(["teacher", "data", "mode", "out"])


def teacher_dir(path: str) -> Path:
    """The teacher's HF directory (a .gguf file is converted once, into the cache)."""
    return checkpoints.resolve(path)


def cache_dir() -> Path:
    if CACHE_DIR.value:
        return Path(CACHE_DIR.value)
    return files.cache_dir("traces")


def run_traces(t_dir: Path, records: list[dict], mesh):
    settings = supervision.TraceSettings(
        max_new_tokens=MAX_NEW.value, temperature=TEMPERATURE.value, top_p=TOP_P.value,
        seed=SEED.value, batch_size=BATCH_SIZE.value, recipe=RECIPE.value)
    tokenizer = data.load_tokenizer(t_dir, TOKENIZER.value)
    prompts = [str(r["prompt"]) for r in records]
    traced, cached = supervision.cached_traces(
        cache_dir(), t_dir, prompts, settings, answers=[str(r["answer"]) for r in records],
        tokenizer=tokenizer, mesh=mesh, dtype=DTYPE.value)
    out = [{**r, **t} for r, t in zip(records, traced)]  # keep the input's other fields
    if jax.process_index() == 0:
        supervision.write_traces(OUT.value, out, settings,
                                 key=supervision.trace_key(t_dir, prompts, settings),
                                 model=str(t_dir))
    chars = sum(len(r["reasoning"]) for r in out) / len(out)
    return f"{len(out)} traces (mean {chars:.0f} chars; cache {cached})"


def run_topk(t_dir: Path, records: list[dict], mesh):
    config = load_hf_config(t_dir / "config.json")
    tokenizer = data.load_tokenizer(t_dir, TOKENIZER.value)
    encoded = supervision.encode_records(tokenizer, records, config,
                                         with_reasoning=formats.get(FORMAT.value).with_trace)
    teacher = jdistill.load_pretrained(t_dir, dtype=DTYPE.value, mesh=mesh)
    try:
        cache = supervision.compute_topk(teacher, encoded, k=K.value, seq_len=SEQ_LEN.value,
                                         batch_size=BATCH_SIZE.value, mesh=mesh,
                                         teacher_path=str(TEACHER.value))
    except ValueError as e:
        raise app.UsageError(str(e))
    if jax.process_index() == 0:
        supervision.save_topk(OUT.value, cache)
    n = len(cache.logprobs)
    size = os.path.getsize(OUT.value) if jax.process_index() == 0 else 0
    return (f"top-{cache.k} of {n:,} positions ({cache.bytes_per_token} B/token stored, "
            f"{size / max(n, 1):.1f} B/token on disk, {size / 2**20:.1f} MiB)")


def main(argv):
    del argv
    mesh = common.setup()
    start = time.perf_counter()
    t_dir = teacher_dir(TEACHER.value)
    records = data.read_examples(DATA.value)
    what = (run_traces if MODE.value == "traces" else run_topk)(t_dir, records, mesh)
    print(f"{what}; {time.perf_counter() - start:.1f}s; wrote {OUT.value}")


if __name__ == "__main__":
    cli.run(main)
