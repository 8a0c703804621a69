"""Round trips through HF checkpoints, sharded files, atomic saves, and bad-input errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import jdistill
from jdistill.checkpoints import safetensors as safetensors_files
from tests.hf_models import hf_logits, padded_batch, save_hf_model


def _logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("variant", ["llama3", "mistral", "qwen2_tied", "qwen2_untied", "qwen3"])
def test_round_trip_opens_in_transformers(variant, tmp_path):
    save_hf_model(variant, tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    ours = jdistill.load_pretrained(tmp_path / "src")
    jdistill.save_pretrained(ours, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch()
    real = mask.astype(bool)
    diff = np.abs(hf_logits(reloaded, ids, mask) - _logits(ours, ids, mask))[real].max()
    assert diff <= 1e-4
    again = jdistill.load_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(_logits(again, ids, mask), _logits(ours, ids, mask))


def test_sharded_checkpoints_load_and_save(tmp_path):
    hf = save_hf_model("qwen3", tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    ours = jdistill.load_pretrained(tmp_path / "src")
    ids, mask = padded_batch()
    real = mask.astype(bool)
    assert np.abs(hf_logits(hf, ids, mask) - _logits(ours, ids, mask))[real].max() <= 1e-4
    jdistill.save_pretrained(ours, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "out" / f).exists() for f in files)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(hf_logits(reloaded, ids, mask) - _logits(ours, ids, mask))[real].max() <= 1e-4


def test_bfloat16_save_keeps_dtype(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama3")
    ours = jdistill.load_pretrained(ckpt.path, dtype="bfloat16")
    jdistill.save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    again = jdistill.load_pretrained(tmp_path / "out")
    assert again.embed_tokens[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(again.embed_tokens[...], np.float32),
                                  np.asarray(ours.embed_tokens[...], np.float32))


def test_crash_mid_save_leaves_previous_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint("qwen3")
    model = jdistill.load_pretrained(ckpt.path)
    jdistill.save_pretrained(model, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = safetensors_files.save_file
    monkeypatch.setattr(safetensors_files, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        jdistill.save_pretrained(model, tmp_path / "out", max_shard_bytes=20_000)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        jdistill.save_pretrained(model, tmp_path / "fresh", max_shard_bytes=20_000)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jdistill.load_pretrained(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        jdistill.load_pretrained(tmp_path)


def test_missing_weights(tmp_path):
    save_hf_model("qwen3", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        jdistill.load_pretrained(tmp_path)


@pytest.mark.parametrize("variant, change, message", [
    ("qwen3", dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     r"unsupported architecture.*llama.*mistral.*qwen2.*qwen3"),
    ("llama3", dict(intermediate_size=64), r"mlp\.(down|gate|up)_proj\.weight has shape"),
    ("llama3", dict(num_hidden_layers=3), r"lacks tensors.*layers\.2"),
], ids=["unsupported_architecture_lists_supported", "shape_mismatch_names_tensor",
        "tensor_names_not_matching_config"])
def test_config_json_not_matching_is_explained(variant, change, message, tmp_path):
    save_hf_model(variant, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        jdistill.load_pretrained(tmp_path)


def test_unknown_dtype(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen3")
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'.*bfloat16"):
        jdistill.load_pretrained(ckpt.path, dtype="float8")


def test_index_naming_missing_file(tmp_path):
    save_hf_model("qwen3", tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        jdistill.load_pretrained(tmp_path)


def test_save_overwrites_existing_directory(tmp_path):
    save_hf_model("qwen3", tmp_path / "src")  # its own: the test deletes it
    model = jdistill.load_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    jdistill.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    shutil.rmtree(tmp_path / "src")  # the export must not depend on the source directory
    jdistill.load_pretrained(tmp_path / "out")


@pytest.mark.parametrize("variant", ["qwen2_tied", "qwen3", "llama3"])
def test_parameter_count_matches_transformers(variant, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    hf = ckpt.hf_model
    ours = jdistill.load_pretrained(ckpt.path)
    n_ours = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(ours, nnx.Param)))
    assert ours.config.num_params() == n_ours == hf.num_parameters()
