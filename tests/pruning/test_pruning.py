"""Structured pruning: masked == sliced, planted structure found, targets, export, errors."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jdistill
from jdistill import pruning, sharding
from jdistill.models import config as model_config
from jdistill.models.decoder import init_model, jit_forward
from jdistill.pruning import report
from tests.hf_models import (hf_logits, make_hf_model, padded_batch, save_hf_model,
                             save_tokenizer)

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS)")
FAMILIES = ["llama3", "qwen2_tied", "qwen3"]


def _batches(vocab, seed=0, n=2):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, (4, 12))
        mask = np.ones((4, 12), bool)
        mask[1, :4] = False  # left padding
        mask[2, 8:] = False  # right padding
        out.append((jnp.asarray(ids), jnp.asarray(mask)))
    return out


def _random_masks(config, dims, seed=0):
    rng = np.random.default_rng(seed)
    scores = {"heads": rng.random((config.num_layers, config.num_heads)),
              "mlp": rng.random((config.num_layers, config.intermediate_size)),
              "hidden": rng.random(config.hidden_size), "layers": rng.random(config.num_layers)}
    return pruning.select_masks(scores, config, dims, kv_groups=dims.kv_heads < config.num_kv_heads)


CASES = {
    "heads": dict(heads=2),
    "mlp": dict(ffn=20),
    "hidden": dict(hidden=20),
    "depth": dict(layers=1),
    "kv_groups": dict(heads=2, kv_heads=1),
    "all": dict(heads=2, ffn=20, hidden=20, layers=1),
}


@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_equals_sliced(variant, case, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    model = jdistill.load_pretrained(ckpt.path)
    c = model.config
    dims = pruning.Dims.of(c)
    dims = pruning.Dims(**{**dims.as_dict(), **CASES[case]})
    masks = _random_masks(c, dims)
    small = pruning.slice_model(model, masks)
    assert pruning.Dims.of(small.config) == dims
    ids, mask = padded_batch()
    masked = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), masks=masks))
    sliced = np.asarray(small(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(masked - sliced)[real].max() <= 1e-5


@needs_8
@pytest.mark.parametrize("variant", FAMILIES)
def test_masked_equals_sliced_sharded(variant, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = jdistill.load_pretrained(ckpt.path, mesh=mesh)
    c = model.config
    dims = pruning.Dims(**{**pruning.Dims.of(c).as_dict(), **CASES["all"]})
    batches = [tuple(sharding.shard_batch(a, mesh) for a in b) for b in _batches(c.vocab_size)]
    scores = pruning.compute_scores(model, batches)
    single = jdistill.load_pretrained(ckpt.path)
    ref = pruning.compute_scores(single, _batches(c.vocab_size))
    for k in ("heads", "mlp", "hidden", "layers"):
        np.testing.assert_allclose(np.asarray(scores[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-6)
    masks = pruning.select_masks(scores, c, dims)
    small = pruning.slice_model(model, masks, mesh=mesh)
    assert small.layers[0].mlp.gate_proj[...].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor")
    ids, mask = padded_batch(batch=4)
    f, s = jit_forward(small, mesh)
    sliced = np.asarray(f(s, jnp.asarray(ids), jnp.asarray(mask)))
    masked = np.asarray(single(jnp.asarray(ids), attention_mask=jnp.asarray(mask), masks=masks))
    assert np.abs(masked - sliced)[mask.astype(bool)].max() <= 1e-5


def _planted_model():
    """MHA Llama where head 1, neurons 3 and 7, hidden channel 5 and layer 2 are shrunk."""
    c = jdistill.ModelConfig(family="llama", vocab_size=64, hidden_size=24, intermediate_size=32,
                             num_layers=4, num_heads=4, num_kv_heads=4, head_dim=8,
                             rms_norm_eps=1e-5)
    model = init_model(c, seed=3)
    tiny = 1e-3
    for lay in model.layers:
        at, ml = lay.self_attn, lay.mlp
        at.q_proj[...] = at.q_proj[...].at[:, 1].multiply(tiny)
        at.v_proj[...] = at.v_proj[...].at[:, 1].multiply(tiny)
        at.o_proj[...] = at.o_proj[...].at[1].multiply(tiny)
        for f in (3, 7):
            ml.gate_proj[...] = ml.gate_proj[...].at[:, f].multiply(tiny)
            ml.up_proj[...] = ml.up_proj[...].at[:, f].multiply(tiny)
            ml.down_proj[...] = ml.down_proj[...].at[f].multiply(tiny)
    # hidden channel 5: tiny everywhere it enters or leaves the residual stream
    model.embed_tokens[...] = model.embed_tokens[...].at[:, 5].multiply(tiny)
    model.lm_head[...] = model.lm_head[...].at[5].multiply(tiny)
    model.norm[...] = model.norm[...].at[5].multiply(tiny)
    for lay in model.layers:
        for p in (lay.input_layernorm, lay.post_attention_layernorm):
            p[...] = p[...].at[5].multiply(tiny)
        at, ml = lay.self_attn, lay.mlp
        for p in (at.q_proj, at.k_proj, at.v_proj, ml.gate_proj, ml.up_proj):
            p[...] = p[...].at[5].multiply(tiny)
        at.o_proj[...] = at.o_proj[...].at[:, :, 5].multiply(tiny)
        ml.down_proj[...] = ml.down_proj[...].at[:, 5].multiply(tiny)
    # layer 2: every weight scaled down, so it is close to the identity on the residual
    lay = model.layers[2]
    for p in (lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj,
              lay.self_attn.o_proj, lay.mlp.gate_proj, lay.mlp.up_proj, lay.mlp.down_proj):
        p[...] = p[...] * 0.01
    return model


@pytest.mark.parametrize("importance", ["activation", "magnitude", "taylor"])
def test_planted_structure_is_pruned_first(importance):
    model = _planted_model()
    batches = _batches(model.config.vocab_size)
    scores = pruning.compute_scores(model, batches, importance)
    heads = np.asarray(scores["heads"])
    assert (heads.argmin(axis=1) == 1).all()
    assert all(set(np.argsort(row)[:2]) == {3, 7} for row in np.asarray(scores["mlp"]))
    assert int(np.argmin(scores["hidden"])) == 5
    if importance == "activation":  # depth by block importance comes with every method
        assert int(np.argmin(scores["layers"])) == 2


def test_layer_skip_and_contiguous_block_find_the_planted_layer():
    model = _planted_model()
    batches = _batches(model.config.vocab_size)
    # Skipping a layer of a random model can even lower the loss; the planted layer changes it
    # least in magnitude.
    assert int(np.argmin(np.abs(pruning.layer_skip_scores(model, batches)))) == 2
    scores = pruning.compute_scores(model, batches, depth="contiguous")
    keep = pruning.contiguous_block_mask(scores["block_distance"], 4, 1)
    np.testing.assert_array_equal(keep, [True, True, False, True])


def test_padding_never_counts():
    model = _planted_model()
    ids, mask = _batches(model.config.vocab_size)[0]
    garbage = jnp.where(mask, ids, 63)  # different tokens at padded positions only
    a = pruning.activation_scores(model, [(ids, mask)])
    b = pruning.activation_scores(model, [(garbage, mask)])
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-7)


SMOL = jdistill.ModelConfig(family="llama", vocab_size=49152, hidden_size=576,
                            intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                            head_dim=64, tie_word_embeddings=True)


@pytest.mark.parametrize("ratio", [1.2, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("axes", [("mlp",), ("mlp", "heads", "hidden"), ("hidden", "layers"),
                                  ("mlp", "heads", "hidden", "layers")])
def test_ratio_reached_within_one_structural_unit(ratio, axes):
    if axes == ("mlp",) and ratio == 3.0:  # beyond what the MLP alone holds (max 2.45)
        with pytest.raises(ValueError, match=r"max ratio 2\.45"):
            pruning.dims_for_ratio(SMOL, ratio, axes)
        return
    dims = pruning.dims_for_ratio(SMOL, ratio, axes)
    target = SMOL.num_params() / ratio
    reached = dims.apply(SMOL).num_params()
    unit = {"mlp": 3 * SMOL.hidden_size * SMOL.num_layers,
            "hidden": SMOL.num_params() / SMOL.hidden_size * dims.heads,  # Llama: multiples of heads
            "heads": 2 * SMOL.hidden_size * SMOL.head_dim * SMOL.num_kv_heads * SMOL.num_layers,
            "layers": SMOL.num_params() / SMOL.num_layers}
    assert abs(reached - target) <= min(unit[a] for a in axes)
    pruning.check_dims(SMOL, dims)


def test_infeasible_targets_explain_what_is_feasible():
    with pytest.raises(ValueError, match="must be > 1"):
        pruning.dims_for_ratio(SMOL, 1.0, ["mlp"])
    with pytest.raises(ValueError, match=r"infeasible on axes \['layers'\].*max ratio"):
        pruning.dims_for_ratio(SMOL.replace(num_layers=2), 10.0, ["layers"])
    with pytest.raises(ValueError, match="non-empty subset"):
        pruning.dims_for_ratio(SMOL, 2.0, ["neurons"])
    full = pruning.Dims.of(SMOL)
    with pytest.raises(ValueError, match=r"heads=12 is infeasible: the model has 9"):
        pruning.check_dims(SMOL, pruning.Dims(**{**full.as_dict(), "heads": 12}))
    with pytest.raises(ValueError, match=r"not a multiple of kv_heads=3; feasible heads: multiples of 3"):
        pruning.check_dims(SMOL, pruning.Dims(**{**full.as_dict(), "heads": 7}))
    with pytest.raises(ValueError, match="multiple of num_attention_heads; feasible hidden: multiples of 9"):
        pruning.check_dims(SMOL, pruning.Dims(**{**full.as_dict(), "hidden": 500}))
    with pytest.raises(ValueError, match="kv_groups=True"):
        pruning.check_dims(SMOL, pruning.Dims(**{**full.as_dict(), "heads": 6, "kv_heads": 2}))


def test_schedules():
    assert pruning.compression_schedule(3.0, 1, "linear") == [3.0]
    assert pruning.compression_schedule(3.0, 4, "one_shot") == [3.0]
    lin = pruning.compression_schedule(4.0, 3, "linear")
    np.testing.assert_allclose([1 - 1 / r for r in lin], [0.25, 0.5, 0.75])
    geo = pruning.compression_schedule(8.0, 3, "geometric")
    np.testing.assert_allclose(geo, [2.0, 4.0, 8.0])
    cub = pruning.compression_schedule(4.0, 4, "cubic")
    s = [1 - 1 / r for r in cub]  # Zhu & Gupta with s_i = 0, s_f = 0.75
    np.testing.assert_allclose(s, [0.75 * (1 - (1 - t / 4) ** 3) for t in range(1, 5)])
    assert all(a < b for a, b in zip(cub, cub[1:]))
    with pytest.raises(ValueError, match="unknown schedule"):
        pruning.compression_schedule(2.0, 2, "exponential")


def test_iterative_prune_rescores_and_calls_the_step_hook():
    c = jdistill.ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)
    model = init_model(c, seed=0)
    batches = _batches(64)
    seen, asked = [], []
    axes = ["mlp", "heads", "hidden"]

    def prune(student, ratio):  # ratio: vs the original; each ratio's one architecture
        asked.append(ratio)
        scores = pruning.compute_scores(student, batches)
        dims = pruning.dims_within(c, ratio, axes, pruning.Dims.of(student.config))
        return pruning.slice_model(student, pruning.select_masks(scores, student.config, dims))

    def after(student):
        seen.append(student.config)
        return student

    ratios = pruning.compression_schedule(2.0, 3, "linear")
    final = pruning.iterative_prune(model, ratios, prune, after_step=after)
    assert asked == ratios and len(seen) == 3
    for r, cfg in zip(ratios, seen):
        assert c.num_params() / cfg.num_params() == pytest.approx(r, rel=0.03)
        # the chain's student has the one-shot student's shape
        assert pruning.Dims.of(cfg) == pruning.dims_for_ratio(c, r, axes)
    assert final.config == seen[-1]
    # shrinking the student by the remaining factor instead keeps the heads (rounded up at
    # each step) and takes the hidden width: another shape than one-shot's
    relative = c
    for r in ratios:
        relative = pruning.dims_for_ratio(
            relative, relative.num_params() / (c.num_params() / r), axes).apply(relative)
    assert pruning.Dims.of(relative) != pruning.Dims.of(final.config)


def test_a_shape_that_does_not_fit_the_student_is_cut_to_it_and_resolved():
    # at a heads step the homogeneous shrink widens the MLP to make up the parameters, so
    # the shape of 2.0 (ffn 38) does not fit inside the shape of 1.5 (ffn 34)
    c = model_config.from_hf_dict(make_hf_model("llama3").config.to_dict())
    axes = ["mlp", "heads", "hidden"]
    at15, at20 = (pruning.dims_for_ratio(c, r, axes) for r in (1.5, 2.0))
    assert at20.ffn > at15.ffn and at20.heads < at15.heads
    d = pruning.dims_within(c, 2.0, axes, at15)
    assert d.at_most(at15) == d and d.heads == at20.heads  # fits; the coarse axis as one-shot's
    assert c.num_params() / d.apply(c).num_params() == pytest.approx(2.0, rel=0.05)
    assert pruning.dims_within(c, 2.0, axes, pruning.Dims.of(c)) == at20  # the teacher: as is


@pytest.mark.parametrize("variant", ["llama3", "mistral", "qwen2_tied", "qwen2_untied", "qwen3"])
def test_pruned_export_opens_in_transformers(variant, tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(variant)
    model = jdistill.load_pretrained(ckpt.path)
    dims = pruning.Dims(**{**pruning.Dims.of(model.config).as_dict(), **CASES["all"]})
    small = pruning.slice_model(model, _random_masks(model.config, dims))
    jdistill.save_pretrained(small, tmp_path / "student")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert hf.num_parameters() == small.config.num_params()
    ids, mask = padded_batch()
    ours = np.asarray(small(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(hf_logits(hf, ids, mask) - ours)[mask.astype(bool)].max() <= 1e-4


def test_inhomogeneous_masks_are_rejected():
    c = jdistill.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=8,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    model = init_model(c)
    with pytest.raises(ValueError, match="homogeneous"):
        pruning.slice_model(model, {"mlp": jnp.array([[1, 1, 0, 0, 0, 0, 0, 0],
                                                      [1, 1, 1, 0, 0, 0, 0, 0]], bool)})
    with pytest.raises(ValueError, match="per KV group"):
        pruning.slice_model(model, {"heads": jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)})


def test_scores_round_trip_and_plot(tmp_path):
    model = _planted_model()
    scores = pruning.compute_scores(model, _batches(64))
    report.save_scores(tmp_path / "s.npz", scores)
    back = report.load_scores(tmp_path / "s.npz")
    for k in scores:
        np.testing.assert_array_equal(back[k], np.asarray(scores[k]))
    report.plot_scores(back, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_prune_main_end_to_end(tmp_path):
    save_hf_model("qwen3", tmp_path / "teacher")
    calib = tmp_path / "calib.csv"
    calib.write_text("text,label\n" + "".join(
        f"markets rally as the fed holds rates {i},1\nthe quick brown fox {i},0\n"
        for i in range(20)))
    cmd = [sys.executable, "-m", "experiments.prune", f"--model={tmp_path / 'teacher'}",
           f"--out={tmp_path / 'student'}", "--compression=1.6", "--axes=mlp,heads,hidden",
           f"--calib_data={calib}", "--calib_samples=16", "--seq_len=16", "--batch_size=4",
           "--schedule=linear", "--steps=2"]
    no_tok = subprocess.run(cmd, capture_output=True, text=True)
    assert no_tok.returncode != 0 and "--tokenizer=DIR" in no_tok.stderr
    save_tokenizer(tmp_path / "teacher")
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rep = json.loads((tmp_path / "student" / "pruning_report.json").read_text())
    assert rep["compression_ratio"] == pytest.approx(1.6, rel=0.05)
    assert len(rep["steps"]) == 2 and rep["teacher"]["params"] > rep["student"]["params"]
    assert (tmp_path / "student" / "importance_step1.png").exists()
    assert (tmp_path / "student" / "tokenizer.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert hf.num_parameters() == rep["student"]["params"]
