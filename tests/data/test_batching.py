"""Packed rows compute exactly what each example computes alone."""

import numpy as np
import pytest

import jdistill
from jdistill.data import batching as packing
from jdistill.models.decoder import document_positions
from tests.hf_models import hf_logits, make_hf_model


def _examples(seed=0, lengths=(5, 9, 3, 7, 12, 4)):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 97, n).astype(np.int32),
             np.array([0] * (n // 2) + [2] * (n - n // 2), np.int32)) for n in lengths]


def test_rows_respect_length_and_targets_never_cross_documents():
    enc = _examples()
    rows = packing.pack_rows(enc, seq_len=16)
    assert sorted(i for r in rows for i in r) == list(range(len(enc)))
    for members in rows:
        row = packing.build_row(enc, members, 16)
        assert sum(len(enc[i][0]) - 1 for i in members) <= 16
        for doc, i in enumerate(members, start=1):
            at = row["documents"] == doc
            np.testing.assert_array_equal(row["tokens"][at], enc[i][0][:-1])
            np.testing.assert_array_equal(row["targets"][at], enc[i][0][1:])
            np.testing.assert_array_equal(row["segments"][at], enc[i][1][1:])
        assert not row["loss_mask"][row["documents"] == packing.PAD_DOCUMENT].any()
    assert 0.5 < packing.packing_efficiency(enc, rows, 16) <= 1.0


def test_document_positions_restart():
    docs = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(document_positions(docs), [[0, 1, 2, 0, 1, 0, 0, 1]])


@pytest.mark.parametrize("variant", ["llama3", "mistral", "qwen3"])
def test_packed_logits_equal_each_example_alone(variant, tmp_path):
    hf = make_hf_model(variant)
    hf.save_pretrained(tmp_path)
    model = jdistill.load_pretrained(tmp_path)
    enc = _examples(lengths=(5, 9, 3, 7))
    members = packing.pack_rows(enc, seq_len=24)[0]
    assert len(members) == 4
    row = packing.build_row(enc, members, 24)
    packed = np.asarray(model(row["tokens"][None], attention_mask=row["mask"][None],
                              documents=row["documents"][None]))[0]
    for doc, i in enumerate(members, start=1):
        ids = enc[i][0][:-1][None]
        alone = hf_logits(hf, ids, np.ones_like(ids))[0]  # transformers, the example alone
        np.testing.assert_allclose(packed[row["documents"] == doc], alone, atol=1e-4)


def test_documents_on_a_cache_need_positions(tmp_path):
    """Continuations packed on a cached context (evaluation) must say where they start."""
    from jdistill.models.decoder import KVCache
    make_hf_model("llama3").save_pretrained(tmp_path)
    model = jdistill.load_pretrained(tmp_path)
    cache = KVCache.create(model.config, 1, 8, model.dtype)
    with pytest.raises(ValueError, match="need explicit positions"):
        model.forward(np.ones((1, 4), np.int32), documents=np.ones((1, 4), np.int32),
                      cache=cache)


# ------------------------------------------------------------------ the packed batcher


def _many(n=23, seed=1):
    """Examples of 2..14 tokens (one single-token example, which has nothing to predict)."""
    rng = np.random.default_rng(seed)
    out = [(rng.integers(3, 97, m).astype(np.int32), np.full(m, 2, np.int32))
           for m in rng.integers(2, 15, n - 1)]
    return out + [(np.array([5], np.int32), np.array([2], np.int32))]


def test_packed_batches_are_a_pure_function_of_seed_and_step():
    enc = _many()
    kw = dict(batch_size=3, seq_len=16, seed=7, accum=2)
    run = packing.PackedBatcher(enc, **kw)
    seen = {s: run.batch(s) for s in range(12)}  # an uninterrupted run, step after step
    for step in (11, 5, 0, 8):  # a resumed run: a fresh batcher asked for one step first
        again = packing.PackedBatcher(enc, **kw).batch(step)
        assert again.keys() == seen[step].keys() >= {"tokens", "targets", "documents"}
        for k in again:
            np.testing.assert_array_equal(again[k], seen[step][k], err_msg=f"{k} {step}")
            assert again[k].shape == (2, 3, 16)
    other = packing.PackedBatcher(enc, **{**kw, "seed": 8})
    assert not all(np.array_equal(other.batch(s)["tokens"], seen[s]["tokens"]) for s in range(3))
    # a run that continues another's stream from step 4 sees its steps 4, 5, ...
    later = packing.PackedBatcher(enc, **kw, first_step=4)
    for step in (0, 3, 7):
        np.testing.assert_array_equal(later.batch(step)["tokens"], seen[4 + step]["tokens"])
    # one process's rows are those rows of the whole batch
    for rows in ([0, 2], [1]):
        part = packing.PackedBatcher(enc, **kw).batch(9, rows=rows)
        for k in part:
            np.testing.assert_array_equal(part[k], seen[9][k][:, rows])


def test_every_example_appears_once_per_epoch():
    enc = _many()
    b = packing.PackedBatcher(enc, batch_size=2, seq_len=16, seed=3)
    epochs = [b.epoch_rows(e) for e in range(3)]
    real = [i for i, (ids, _) in enumerate(enc) if len(ids) >= 2]
    for rows in epochs:
        assert sorted(i for r in rows for i in r) == real
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    stream = [m for rows in epochs for m in rows]
    steps = len(stream) // 2
    got = [m for s in range(steps) for m in b.members(s)]
    assert got == stream[:2 * steps]  # steps walk the epochs' rows in order, straddling
    for s in range(steps):  # and each row holds its members' tokens, document by document
        batch = b.batch(s)
        for r, members in enumerate(b.members(s)):
            for doc, i in enumerate(members, start=1):
                at = batch["documents"][0, r] == doc
                np.testing.assert_array_equal(batch["tokens"][0, r][at], enc[i][0][:-1])
                np.testing.assert_array_equal(batch["targets"][0, r][at], enc[i][0][1:])
    assert 0.6 < packing.packing_efficiency(enc, epochs[0], 16) <= 1.0


def test_packed_batcher_explains_bad_input():
    with pytest.raises(ValueError, match="no examples"):
        packing.PackedBatcher([], batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="nothing to predict"):
        packing.PackedBatcher([(np.array([3]), np.array([2]))], batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="first_step >= 0"):
        packing.PackedBatcher(_many(), batch_size=1, seq_len=8, first_step=-1)


def test_supervised_positions_are_exactly_the_supervised_targets_within_capacity():
    # every target a loss can see (segment not PROMPT, real token) is listed, once, in row
    # order; the capacity bounds every row of several epochs, and an over-long example
    # (cut to a row of its own) sets the bound by what its kept targets hold
    rng = np.random.default_rng(1)
    enc = [(rng.integers(3, 97, n).astype(np.int32),
            np.array([0] * (n - k) + [1] * (k // 2) + [2] * (k - k // 2), np.int32))
           for n, k in zip(rng.integers(8, 15, 40), rng.integers(1, 4, 40))]
    enc.append((np.arange(3, 33, dtype=np.int32), np.array([0] * 4 + [2] * 26, np.int32)))
    b = packing.PackedBatcher(enc, batch_size=3, seq_len=16, seed=2)
    assert b.capacity == 13  # the long example's first 16 targets: 3 prompt, 13 answer
    short = packing.PackedBatcher(enc[:-1], batch_size=3, seq_len=16, seed=2)
    dens = max(np.sum(s[1:] != 0) / (len(i) - 1) for i, s in enc[:-1])
    assert short.capacity == int(np.ceil(16 * dens)) < 16
    for batcher in (b, short):
        for step in range(30):
            batch = batcher.batch(step)
            for row in range(3):
                at = batch["supervised"][0, row]
                want = np.flatnonzero(batch["loss_mask"][0, row]
                                      & (batch["segments"][0, row] != 0))
                np.testing.assert_array_equal(at[:len(want)], want)
                assert (at[len(want):] == -1).all()
