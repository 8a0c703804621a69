"""The forward on a (data=2, fsdp=2, tensor=2) mesh of 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdistill
from jdistill import sharding
from jdistill.models.decoder import jit_forward
from tests.hf_models import padded_batch

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS)")


@needs_8
@pytest.mark.parametrize("variant", ["llama3", "qwen2_untied"])
def test_sharded_forward_equals_single_device(variant, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    single = jdistill.load_pretrained(ckpt.path)
    sharded = jdistill.load_pretrained(ckpt.path, mesh=mesh)
    ids, mask = padded_batch(batch=4)
    f1, s1 = jit_forward(single)
    f8, s8 = jit_forward(sharded, mesh)
    ref = np.asarray(f1(s1, jnp.asarray(ids), jnp.asarray(mask)))
    out = f8(s8, jnp.asarray(ids), jnp.asarray(mask))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


@needs_8
def test_parameters_are_really_split(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen2_untied")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = jdistill.load_pretrained(ckpt.path, mesh=mesh)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    # [embed=32, heads=4, head_dim=12]: embed over fsdp, heads over tensor
    assert {s.data.shape for s in attn.q_proj[...].addressable_shards} == {(16, 2, 12)}
    assert {s.data.shape for s in mlp.down_proj[...].addressable_shards} == {(24, 16)}
    assert {s.data.shape for s in attn.q_bias[...].addressable_shards} == {(2, 12)}
    # vocab 97 is not divisible by tensor=2: that dim is replicated, embed still split
    assert {s.data.shape for s in model.embed_tokens[...].addressable_shards} == {(97, 16)}
    assert len(attn.q_proj[...].sharding.device_set) == 8


@needs_8
def test_rules_replicate_what_does_not_divide():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    spec = sharding.spec_for(("embed", "heads", "head_dim"), (32, 6, 12), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", None, None)
    spec = sharding.spec_for(("embed", "heads", "head_dim"), (32, 8, 12), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_bad_mesh_shape_is_explained():
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh(data=3, fsdp=2, tensor=2, devices=jax.devices()[:8])


def test_single_process_distributed_init_is_a_no_op(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("JDISTILL_DISTRIBUTED", raising=False)
    assert sharding.initialize_distributed() is False
