"""Teacher correction: fine-tune the teacher on the task before pruning.

Why (Minitron, Sreenivas et al. 2024): the pruning scores and the KL targets should come from
a teacher that has seen the task's distribution.

  python -m experiments.correct_teacher --teacher=DIR_or_GGUF --data=train.jsonl \
      --format=label --steps=200 --out=runs/teacher_corrected

Cached by its inputs: the output directory records a key over (teacher files, data file
contents, every training setting) in correction.json; rerunning with the same inputs prints
"cached" and does nothing, different inputs retrain (and resume if a run was killed).
"""

import hashlib
import json
from pathlib import Path

import jax
from absl import flags

import jdistill
from experiments import cli
from experiments import flags as common
from jdistill import checkpoints
from jdistill.data import batching as packing
from jdistill.data import io as data
from jdistill.distill import formats, supervision, train
from jdistill.utils import files

TEACHER = flags.DEFINE_string("teacher", None, "HF checkpoint directory or .gguf of the teacher")
DATA = flags.DEFINE_string("data", None, "task records (.jsonl: prompt, answer[, reasoning])")
OUT = flags.DEFINE_string("out", None, "output directory for the corrected teacher")
FORMAT = flags.DEFINE_enum("format", "label", ["label", "cot"], "supervision: CE on the answer "
                           "(label) or on reasoning + answer (cot)")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "packed rows per step (several short "
                                  "examples share a row; each computes as alone)")
SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "tokens per sequence")
# the optimisation's flags are DistillConfig's (their help lives there), but the format and
# the KL terms': a correction is cross-entropy on the task alone
CONFIG = common.define_config_flags(
    train.DistillConfig, skip=("format", "kind", "temperature", "beta", "lam"),
    defaults={"steps": 100, "learning_rate": 2e-5, "warmup_steps": 10})
flags.mark_flags_as_required(["teacher", "data", "out"])


def correction_key(teacher_dir: Path, data_file: Path, settings: dict) -> str:
    h = hashlib.sha256(json.dumps({"teacher": supervision.model_identity(teacher_dir),
                                   "settings": settings}, sort_keys=True).encode())
    h.update(data_file.read_bytes())
    return h.hexdigest()


def main(argv):
    del argv
    mesh = common.setup()
    out = cli.output_dir(OUT.value)
    teacher_dir = checkpoints.resolve(TEACHER.value)
    optimisation = common.config_values(CONFIG)
    # remat trades memory for compute, not results: changing it must not retrain
    settings = {"format": FORMAT.value, **{k: v for k, v in optimisation.items() if k != "remat"},
                "batch_size": BATCH_SIZE.value, "seq_len": SEQ_LEN.value, "packed": True}
    key = correction_key(teacher_dir, Path(DATA.value), settings)
    done = out / "correction.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        print(f"cached: {out} is this teacher corrected on these data and settings")
        return
    cfg = train.DistillConfig(format=FORMAT.value, **optimisation)
    model = jdistill.load_pretrained(teacher_dir, mesh=mesh)
    tokenizer = data.load_tokenizer(teacher_dir)
    records = data.read_examples(DATA.value)
    encoded = supervision.encode_records(tokenizer, records, model.config,
                                         with_reasoning=formats.get(FORMAT.value).with_trace)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batcher = packing.PackedBatcher(encoded, batch_size=BATCH_SIZE.value,
                                    seq_len=SEQ_LEN.value, seed=cfg.seed, pad_id=pad)
    workdir = Path(f"{out}.run-{key[:12]}")  # a resumable run per input key
    result = train.train(model, None, batcher, cfg, workdir=workdir, mesh=mesh)
    if jax.process_index() == 0:
        jdistill.save_pretrained(result.student, out)
        files.atomic_write_json(done, {
            **files.run_metadata(), "key": key, "teacher": str(teacher_dir),
            "data": DATA.value, "examples": len(records), "settings": settings,
            "final_metrics": result.final_metrics, "seconds": result.seconds})
    print(f"corrected teacher written to {out} ({result.steps_run} steps, "
          f"{result.seconds:.1f}s, final loss {result.final_metrics['loss']:.4f})")


if __name__ == "__main__":
    cli.run(main)
