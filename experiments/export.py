"""Load an HF checkpoint, print its summary, run a forward, export it, and verify the export.

  python -m experiments.export                            # a tiny random Llama, made here
  python -m experiments.export --checkpoint=DIR --out=OUT  # your own checkpoint
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import jdistill
from experiments import cli
from experiments import flags as common
from jdistill.models.decoder import describe, jit_forward

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint directory; unset: a tiny "
                                 "random Llama is written to OUT/tiny-llama first")
OUT = flags.DEFINE_string("out", "runs/export", "output directory")
DTYPE = common.define_dtype()
TINY = jdistill.ModelConfig(family="llama", vocab_size=512, hidden_size=64,
                            intermediate_size=160, num_layers=4, num_heads=4, num_kv_heads=2,
                            head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def main(argv):
    del argv
    mesh = common.setup()
    out = cli.output_dir(OUT.value)
    source = CHECKPOINT.value
    if source is None:
        source = out / "tiny-llama"
        jdistill.save_pretrained(jdistill.init_model(TINY, seed=0), source)
        print(f"wrote a tiny random Llama checkpoint to {source}")
    start = time.perf_counter()
    model = jdistill.load_pretrained(source, dtype=DTYPE.value, mesh=mesh)
    print(f"loaded {source} in {time.perf_counter() - start:.2f}s\n{describe(model)}")

    batch = max(mesh.shape["data"] * mesh.shape["fsdp"], 4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, model.config.vocab_size, (batch, 128)), jnp.int32)
    forward, state = jit_forward(model, mesh)
    mask = jnp.ones_like(tokens)
    logits = forward(state, tokens, mask).block_until_ready()  # compile
    start = time.perf_counter()
    logits = forward(state, tokens, mask).block_until_ready()
    print(f"forward {tokens.size / (time.perf_counter() - start):,.0f} tokens/s "
          f"(batch {batch} x 128, {jax.device_count()} device(s))")

    exported = out / "exported"
    jdistill.save_pretrained(model, exported)
    again = jdistill.load_pretrained(exported, mesh=mesh)
    forward2, state2 = jit_forward(again, mesh)
    diff = float(jnp.max(jnp.abs(forward2(state2, tokens, mask) - logits)))
    print(f"exported to {exported}; reloaded logits differ by at most {diff:.2e}")
    if diff != 0.0:
        raise SystemExit("export round trip changed the logits")


if __name__ == "__main__":
    cli.run(main)
