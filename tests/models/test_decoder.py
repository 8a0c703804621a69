"""Our logits and greedy generations equal transformers' on the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jdistill
from tests.hf_models import VARIANTS, hf_logits, padded_batch


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    hf = ckpt.hf_model
    ours = jdistill.load_pretrained(ckpt.path, dtype="float32")
    ids, mask = padded_batch()
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert got.shape == ref.shape
    assert np.abs(got - ref)[real].max() <= 1e-4


@pytest.mark.parametrize("variant", ["llama3", "qwen2_tied", "qwen3", "mistral"])
def test_greedy_generation_matches_transformers(variant, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    hf = ckpt.hf_model
    ours = jdistill.load_pretrained(ckpt.path)
    ids = np.random.default_rng(1).integers(3, 97, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation needs
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ref_new = ref[:, ids.shape[1]:].numpy()
    got = np.asarray(jdistill.generate(ours, ids, mask, max_new_tokens=16))
    np.testing.assert_array_equal(got, ref_new)


def test_generation_stops_at_eos_and_pads(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama3")
    model = jdistill.load_pretrained(ckpt.path)
    ids = np.array([[5, 6, 7, 8]])
    free = np.asarray(jdistill.generate(model, ids, max_new_tokens=8))[0]
    eos = int(free[2])  # make the third generated token an EOS
    stopped = np.asarray(jdistill.generate(model, ids, max_new_tokens=8, eos_token_id=eos,
                                           pad_token_id=0))[0]
    first = int(np.argmax(free == eos))
    np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
    assert (stopped[first + 1:] == 0).all()


def test_sampling_is_seeded_and_top_p_limits_support(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen3")
    model = jdistill.load_pretrained(ckpt.path)
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    kw = dict(max_new_tokens=12, temperature=1.0)
    a = np.asarray(jdistill.generate(model, ids, rng=jax.random.key(3), **kw))
    b = np.asarray(jdistill.generate(model, ids, rng=jax.random.key(3), **kw))
    c = np.asarray(jdistill.generate(model, ids, rng=jax.random.key(4), **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    greedy = np.asarray(jdistill.generate(model, ids, max_new_tokens=12))
    nucleus = np.asarray(jdistill.generate(model, ids, rng=jax.random.key(5),
                                           max_new_tokens=12, temperature=1.0, top_p=1e-6))
    np.testing.assert_array_equal(nucleus, greedy)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95])
def test_nucleus_keeps_what_transformers_top_p_keeps(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    from jdistill.models.generate import nucleus
    rs = np.random.RandomState(0)
    # the sampler's operating points: flat, moderate and peaked distributions over 49k tokens
    logits = np.concatenate([rs.randn(4, 49152) * s for s in (0.5, 3.0, 10.0)]).astype(np.float32)
    ours = np.asarray(nucleus(jnp.asarray(logits), top_p))
    theirs = np.isfinite(TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy())
    np.testing.assert_array_equal(ours, theirs)
    assert ours.sum(-1).min() >= 1


def test_nucleus_keeps_ties_at_its_edge():
    from jdistill.models.generate import nucleus
    kept = np.asarray(nucleus(jnp.array([[2.0, 1.0, 1.0, 1.0, -1.0]]), 0.5))
    np.testing.assert_array_equal(kept, [[True, True, True, True, False]])


def test_generate_rejects_right_padding(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen3")
    model = jdistill.load_pretrained(ckpt.path)
    with pytest.raises(ValueError, match="left padding"):
        jdistill.generate(model, np.array([[5, 6, 0]]), np.array([[1, 1, 0]]), max_new_tokens=2)


def test_bfloat16_load_tracks_float32(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen2_untied")
    hf = ckpt.hf_model
    ours = jdistill.load_pretrained(ckpt.path, dtype="bfloat16")
    assert ours.embed_tokens[...].dtype == jnp.bfloat16
    ids, mask = padded_batch()
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float32)
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() < 0.1 * np.abs(ref).max()
