"""Packed rows compute exactly what each example computes alone."""

import numpy as np
import pytest

import jdistill
from jdistill import packing
from jdistill.model import document_positions
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


def test_documents_refuse_a_cache(tmp_path):
    from jdistill.model import KVCache
    make_hf_model("llama3").save_pretrained(tmp_path)
    model = jdistill.load_pretrained(tmp_path)
    cache = KVCache.create(model.config, 1, 8, model.dtype)
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model.forward(np.ones((1, 4), np.int32), documents=np.ones((1, 4), np.int32),
                      cache=cache)
