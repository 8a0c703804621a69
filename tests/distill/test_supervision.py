"""Teacher supervision: CoT traces against transformers' generate, the trace cache, top-k
log-probs against torch's log_softmax of transformers' logits, the top-k batcher and offline
KD against the online teacher KL."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jdistill
from jdistill import sharding
from jdistill.data import io as data
from jdistill.distill import supervision, train
from jdistill.models.decoder import jit_forward
from tests.hf_models import VOCAB, save_hf_model

REPO = Path(__file__).resolve().parents[2]
INSTRUCTION = ["Think", "step", "by", ",", "then", "give", "the", "label", "."]
BOS, EOS = 1, 2


def save_word_tokenizer(path):
    """A word-level tokenizer with exactly VOCAB ids ([PAD] [BOS] [EOS], the default recipe's
    words, w0..): every id a random model emits decodes to one word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[BOS]", "[EOS]"] + INSTRUCTION
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[PAD]", "[BOS]", "[EOS]"])
    tok.save(str(Path(path) / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    hf = save_hf_model("qwen3", path)
    tok = save_word_tokenizer(path)
    return path, hf, jdistill.load_pretrained(path, dtype="float32"), tok


# prompts of different lengths, not in length order (the batches run longest first)
PROMPTS = ["w20 w21 w22 w23 w24", "w30", "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50"]


def hf_continuation(hf, tok, prompt, max_new, eos):
    ids = [BOS] + tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                          dtype=torch.long), max_new_tokens=max_new, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[:new.index(eos)] if eos in new else new


def test_greedy_traces_match_transformers(teacher):
    _, hf, model, tok = teacher
    free = hf_continuation(hf, tok, PROMPTS[0], 8, eos=None)
    eos = next(t for t in free[2:] if t > EOS)  # a token the first prompt emits: EOS cuts it
    ref_ids = [hf_continuation(hf, tok, p, 8, eos) for p in PROMPTS]
    assert len(ref_ids[0]) < 8  # the cut happened
    ref = [tok.decode(ids, skip_special_tokens=True) for ids in ref_ids]
    kw = dict(max_new_tokens=8, eos_token_id=eos, pad_id=0, bos_id=BOS, recipe="{prompt}",
              log=lambda s: None)
    batched = supervision.generate_traces(model, tok, PROMPTS, batch_size=3, **kw)
    assert batched == ref  # input order, not length order
    # one prompt at a time (its batch filled with repeats: the same compiled shape)
    single = [supervision.generate_traces(model, tok, [p], batch_size=3, **kw)[0]
              for p in PROMPTS]
    assert single == ref


def test_trace_cache_reuses_and_regenerates(teacher, tmp_path, monkeypatch):
    path, _, model, tok = teacher
    calls = []
    real = supervision.generate_traces
    monkeypatch.setattr(supervision, "generate_traces",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    lines = []
    # sampled, so the seed matters; one batch shape for every call below (one compilation)
    settings = supervision.TraceSettings(max_new_tokens=4, temperature=1.0, batch_size=4)
    kw = dict(model=model, tokenizer=tok, log=lines.append)
    recs, file = supervision.cached_traces(tmp_path, path, PROMPTS, settings,
                                           answers=["a", "b", "c"], **kw)
    assert len(calls) == 1 and any("ETA" in line for line in lines)
    mtime = file.stat().st_mtime_ns
    again, file2 = supervision.cached_traces(tmp_path, path, PROMPTS, settings,
                                             answers=["a", "b", "c"], **kw)
    assert len(calls) == 1 and file2 == file and file.stat().st_mtime_ns == mtime
    assert again == recs
    # the file is what data.read_examples / encode_example take
    back = data.read_examples(file)
    assert back == recs and [r["answer"] for r in back] == ["a", "b", "c"]
    assert back[1]["task_prompt"] == PROMPTS[1]
    assert back[1]["prompt"] == supervision.reasoning_prompt(PROMPTS[1])
    assert back[1]["prompt"].rstrip().endswith("Think step by step, then give the label.")
    assert all(r["reasoning"] for r in back)
    ids, segs = data.encode_example(tok, back[0]["prompt"], back[0]["answer"],
                                    back[0]["reasoning"], bos_id=BOS, eos_id=EOS)
    assert set(segs.tolist()) == {data.PROMPT, data.TRACE, data.ANSWER}
    meta = json.loads(file.with_name(file.stem + ".meta.json").read_text())
    assert meta["settings"] == dataclasses.asdict(settings) and meta["count"] == 3
    # new labels: no generation, answers refreshed
    relabelled, _ = supervision.cached_traces(tmp_path, path, PROMPTS, settings,
                                              answers=["x", "y", "z"], **kw)
    assert len(calls) == 1 and [r["answer"] for r in relabelled] == ["x", "y", "z"]
    assert [r["reasoning"] for r in relabelled] == [r["reasoning"] for r in recs]
    # a changed setting or prompt list regenerates, into another file
    _, file3 = supervision.cached_traces(
        tmp_path, path, PROMPTS, dataclasses.replace(settings, seed=1), **kw)
    assert len(calls) == 2 and file3 != file
    supervision.cached_traces(tmp_path, path, PROMPTS[:2], settings, **kw)
    assert len(calls) == 3


def test_trace_key_covers_what_changes_the_output(teacher):
    path = teacher[0]
    key = lambda **kw: supervision.trace_key(path, PROMPTS, supervision.TraceSettings(**kw))
    assert key(batch_size=2, seed=1) == key(batch_size=3, seed=2)  # greedy: irrelevant
    assert key(temperature=1.0, batch_size=2) != key(temperature=1.0, batch_size=3)
    assert key() != key(max_new_tokens=5) != key(recipe="{prompt}")
    assert key() != supervision.trace_key(path, PROMPTS[::-1], supervision.TraceSettings())
    before, config = key(), path / "config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # rewritten in place
    try:
        assert key() != before
    finally:
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))


def make_examples(tok):
    """(ids, segments) of records with and without reasoning; some longer than SEQ_LEN."""
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(12, VOCAB - 12, n))
    return [data.encode_example(tok, words(p), words(a), words(r) if r else None,
                                bos_id=BOS, eos_id=EOS)
            for p, r, a in [(4, 0, 2), (7, 3, 1), (2, 6, 2), (9, 0, 3), (3, 0, 1), (12, 4, 2)]]


SEQ = 12


def test_topk_matches_transformers_and_round_trips(teacher, tmp_path):
    _, hf, model, tok = teacher
    encoded = make_examples(tok)
    k = 5
    cache = supervision.compute_topk(model, encoded, k=k, seq_len=SEQ, batch_size=4,
                                     log=lambda s: None)
    assert cache.logprobs.dtype == np.float16 and cache.ids.dtype == np.uint16
    for i, (ids, segs) in enumerate(encoded):
        start, lp, ix = cache.example(i)
        m = min(len(ids) - 1, SEQ)
        first_target = int(np.argmax(segs[1:] != data.PROMPT))  # first supervised position
        assert start == min(first_target, m) and len(lp) == m - start
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids[:m].tolist()])).logits[0].float()
        ref_lp, ref_ix = torch.topk(torch.log_softmax(logits, -1), k)
        ref_lp = ref_lp[start:m].numpy()
        f16_tol = np.abs(ref_lp) * 2.0 ** -11 + 1e-4
        assert np.all(np.abs(lp.astype(np.float32) - ref_lp) <= f16_tol)
        full = torch.log_softmax(logits, -1).numpy()[start:m]
        np.testing.assert_allclose(np.take_along_axis(full, ix.astype(np.int64), -1),
                                   lp.astype(np.float32), atol=2e-3, rtol=0)
        assert (np.sort(ix, -1) == np.sort(ref_ix[start:m].numpy(), -1)).all()
    path = supervision.save_topk(tmp_path / "t.safetensors", cache)
    back = supervision.load_topk(path)
    for name in ("logprobs", "ids", "offsets", "starts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cache, name))
        assert getattr(back, name).dtype == getattr(cache, name).dtype
    assert (back.k, back.vocab_size, back.seq_len, back.digest) == (k, VOCAB, SEQ, cache.digest)
    # bytes per stored token: k * (2 + 2), plus 16 B per example and the header
    n_tok = len(cache.logprobs)
    assert cache.bytes_per_token == k * 4
    overhead = os.path.getsize(path) - n_tok * k * 4
    assert 16 * len(encoded) <= overhead <= 16 * len(encoded) + 1024
    # sharded over 8 devices (batch over data x fsdp, heads / vocab over tensor): the same
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = supervision.compute_topk(model, encoded, k=k, seq_len=SEQ, batch_size=4,
                                       mesh=mesh, log=lambda s: None)
    np.testing.assert_array_equal(sharded.ids, cache.ids)
    np.testing.assert_allclose(sharded.logprobs.astype(np.float32),
                               cache.logprobs.astype(np.float32), rtol=2e-3)
    # skip_prompt=False stores every position with a target
    full = supervision.compute_topk(model, encoded, k=k, seq_len=SEQ, batch_size=4,
                                    skip_prompt=False, log=lambda s: None)
    assert (full.starts == 0).all() and len(full.logprobs) > n_tok


def test_ids_widen_to_int32_past_uint16(tmp_path):
    assert supervision.ids_dtype(65536) == np.uint16
    assert supervision.ids_dtype(65537) == np.int32
    rng = np.random.default_rng(0)
    cache = supervision.TopkCache(
        logprobs=rng.normal(-5, 1, (7, 3)).astype(np.float16),
        ids=rng.integers(0, 151_936, (7, 3)).astype(np.int32),
        offsets=np.array([0, 4, 7]), starts=np.array([2, 0]), vocab_size=151_936, seq_len=16,
        digest="d")
    assert cache.bytes_per_token == 3 * (2 + 4)
    back = supervision.load_topk(supervision.save_topk(tmp_path / "w.safetensors", cache))
    assert back.ids.dtype == np.int32
    np.testing.assert_array_equal(back.ids, cache.ids)


@pytest.fixture(scope="module")
def full_topk(teacher):
    """k = vocab size: the cached distribution is the teacher's whole distribution."""
    _, _, model, tok = teacher
    encoded = make_examples(tok)
    return encoded, supervision.compute_topk(model, encoded, k=VOCAB, seq_len=SEQ,
                                             batch_size=4, log=lambda s: None)


def test_topk_batcher_aligns_with_targets(teacher, full_topk):
    _, _, model, _ = teacher
    encoded, cache = full_topk
    forward, state = jit_forward(model)
    kw = dict(batch_size=2, seq_len=SEQ, seed=3, accum=2)
    tb, plain = supervision.TopkBatcher(encoded, cache, **kw), data.Batcher(encoded, **kw)
    for step in (0, 1, 2):
        batch, ref = tb.batch(step), plain.batch(step)
        for name in ref:
            np.testing.assert_array_equal(batch[name], ref[name])
        assert batch["topk_logprobs"].shape == (2, 2, SEQ, VOCAB)
        assert batch["topk_logprobs"].dtype == np.float32 and batch["topk_ids"].dtype == np.int32
        tokens = batch["tokens"].reshape(4, SEQ)
        mask = batch["mask"].reshape(4, SEQ)
        logp = np.asarray(jax.nn.log_softmax(forward(state, tokens, mask)))
        lp = batch["topk_logprobs"].reshape(4, SEQ, VOCAB)
        ix = batch["topk_ids"].reshape(4, SEQ, VOCAB)
        sup = (batch["loss_mask"] & (batch["segments"] != data.PROMPT)).reshape(4, SEQ)
        assert sup.any() and (~sup).any()
        # at a supervised position t: the teacher's distribution over targets[t]
        got = np.take_along_axis(logp, ix, -1)
        assert np.abs(got - lp)[sup].max() < 5e-3
        targets = batch["targets"].reshape(4, SEQ)
        t_lp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        stored_t = np.where(ix == targets[..., None], lp, 0).sum(-1)  # k = V: always present
        assert np.abs(t_lp - stored_t)[sup].max() < 5e-3
        assert (lp[~sup] == 0).all() and (ix[~sup] == 0).all()


def test_topk_batcher_rows_are_those_rows_of_the_whole_batch(full_topk):
    # a process of a multi-process run loads only its rows (train._batch_loader)
    encoded, cache = full_topk
    tb = supervision.TopkBatcher(encoded, cache, batch_size=3, seq_len=SEQ, seed=2, accum=2)
    for step in (0, 3):
        whole = tb.batch(step)
        for rows in ([0, 2], [1]):
            part = tb.batch(step, rows=rows)
            assert part.keys() == whole.keys()
            for k in whole:
                np.testing.assert_array_equal(part[k], whole[k][:, rows], err_msg=k)


def test_topk_refuses_a_temperature_it_was_not_cached_at(teacher, full_topk, tmp_path):
    _, _, model, _ = teacher
    encoded, cache = full_topk
    cfg = train.DistillConfig(steps=1, format="logits", temperature=2.0)
    batcher = supervision.TopkBatcher(encoded, cache, batch_size=2, seq_len=SEQ)
    with pytest.raises(ValueError, match="temperature-1 log-probs.*--temperature=1"):
        train.train(model, None, batcher, cfg, workdir=tmp_path, log=lambda _: None)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything started
    graphdef, params = nnx.split(model)[0], train.pure_params(model)
    micro = {k: jnp.asarray(v[0]) for k, v in batcher.batch(0).items()}
    with pytest.raises(ValueError, match="temperature-1 log-probs"):
        train.batch_loss(params, None, micro, s_graphdef=graphdef, t_graphdef=None, cfg=cfg)


def test_offline_topk_kd_equals_online_teacher_kl(teacher, full_topk, tiny_checkpoint):
    t_path, _, t_model, _ = teacher
    encoded, cache = full_topk
    ckpt = tiny_checkpoint("qwen3", seed=1)
    student = jdistill.load_pretrained(ckpt.path, dtype="float32")
    cfg = train.DistillConfig(steps=1, format="logits")
    s_graphdef, _ = nnx.split(student)
    t_graphdef, _ = nnx.split(t_model)
    s_params, t_params = train.pure_params(student), train.pure_params(t_model)
    s_params["norm"] = s_params["norm"] * 16.0  # a sharper student: a KL well above f16 noise
    batch = supervision.TopkBatcher(encoded, cache, batch_size=6, seq_len=SEQ).batch(0)
    micro = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    online_batch = {k: v for k, v in micro.items() if not k.startswith("topk_")}
    loss = jax.jit(functools.partial(train.batch_loss, s_graphdef=s_graphdef,
                                     t_graphdef=t_graphdef, cfg=cfg))
    offline, _ = loss(s_params, None, micro)
    online, _ = loss(s_params, train.teacher_inputs(t_params, cfg), online_batch)
    assert float(online) > 0.3
    assert abs(float(offline) - float(online)) < 1e-3


def test_bad_inputs_name_the_fix(teacher, full_topk, tmp_path):
    _, _, model, tok = teacher
    encoded, cache = full_topk
    with pytest.raises(ValueError, match="vocab size 97"):
        supervision.compute_topk(model, encoded, k=VOCAB + 1, seq_len=SEQ)
    with pytest.raises(FileNotFoundError, match="--mode=topk"):
        supervision.load_topk(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a top-k file"):
        supervision.load_topk(tmp_path / "junk.safetensors")
    kw = dict(batch_size=2, seq_len=SEQ)
    with pytest.raises(ValueError, match="holds 6 examples but there are 5"):
        supervision.TopkBatcher(encoded[:5], cache, **kw)
    with pytest.raises(ValueError, match="--seq_len=16"):
        supervision.TopkBatcher(encoded, cache, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="other examples"):
        supervision.TopkBatcher(encoded[::-1], cache, **kw)
    supervision.TopkBatcher(encoded, cache, batch_size=2, seq_len=SEQ - 4)  # shorter is fine
    with pytest.raises(ValueError, match="placeholder"):
        supervision.reasoning_prompt("x", "no placeholder")
    with pytest.raises(ValueError, match="no prompts"):
        supervision.generate_traces(model, tok, [], max_new_tokens=2)


def test_supervise_main_both_modes(teacher, tmp_path):
    t_path, _, _, tok = teacher
    records = [{"prompt": "w10 w11 w12", "answer": "w3", "reasoning": "w20 w21", "id": 0},
               {"prompt": "w13", "answer": "w4", "reasoning": "w22", "id": 1}]
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    base = [sys.executable, "-m", "experiments.supervise", f"--teacher={t_path}",
            f"--data={src}", "--batch_size=2"]
    runs = [base + ["--mode=traces", f"--out={tmp_path / 'traces.jsonl'}", "--max_new_tokens=3",
                    f"--cache_dir={tmp_path / 'cache'}"],
            base + ["--mode=topk", f"--out={tmp_path / 'topk.safetensors'}", "--k=4",
                    "--seq_len=32", "--format=blended"]]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in runs]  # in parallel
    (t_out, t_err), (k_out, k_err) = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0, t_err[-3000:]
    assert procs[1].returncode == 0, k_err[-3000:]
    out = data.read_examples(tmp_path / "traces.jsonl")
    assert [r["id"] for r in out] == [0, 1] and [r["answer"] for r in out] == ["w3", "w4"]
    assert out[0]["task_prompt"] == "w10 w11 w12"
    assert all(r["reasoning"] and r["reasoning"] != records[0]["reasoning"] for r in out)
    assert "16 B/token stored" in k_out
    cache = supervision.load_topk(tmp_path / "topk.safetensors")
    config = jdistill.models.config.load_hf_config(t_path / "config.json")
    encoded = supervision.encode_records(tok, records, config, with_reasoning=True)
    batcher = supervision.TopkBatcher(encoded, cache, batch_size=2, seq_len=32)
    lp = batcher.batch(0)["topk_logprobs"][0]
    assert lp.shape == (2, 32, 4)
    for row, i in enumerate(batcher.indices(0)):  # the prompt targets are not stored
        first = 1 + len(tok.encode(records[i]["prompt"]).ids) - 1
        assert cache.starts[i] == first
        assert (lp[row, :first] == 0).all() and (lp[row, first] < 0).all()
