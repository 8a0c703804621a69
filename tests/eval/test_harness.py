"""jdistill inside lm-evaluation-harness: our registered LM against the harness's own HF
model (HFLM, PyTorch) on one tiny random checkpoint — per-request log-likelihoods, greedy
flags, rolling log-likelihoods, generations and a local YAML task's acc / acc_norm."""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")  # the [harness] extra (in the test extra too)

from lm_eval.api.instance import Instance  # noqa: E402

from jdistill.eval import harness  # noqa: E402  (registers "jdistill")
from tests.hf_models import make_hf_model  # noqa: E402

CONTEXTS = ["the quick brown fox", "markets rally as the ", "the fed holds rates", ""]
CONTINUATIONS = [" jumps over", " fed", " lazy dog", " quick brown fox jumps"]


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """(our LM, the harness's HFLM) on the same weights and tokenizer."""
    import transformers
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer

    ck = tiny_checkpoint("llama_mqa", tokenizer=True, max_position_embeddings=48)
    model, path = ck.hf_model, ck.path
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(path / "tokenizer.json")))
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    # the checkpoint's bos (1) and eos (2) ids, as HFLM reads them from the tokenizer
    tok.bos_token, tok.eos_token = raw.id_to_token(1), raw.id_to_token(2)
    tok.pad_token = raw.id_to_token(0)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=48)
    ours = lm_eval.api.registry.get_model("jdistill").create_from_arg_string(
        f"pretrained={path},batch_size=4,max_length=48")
    return ours, ref, path


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered_under_jdistill():
    assert lm_eval.api.registry.get_model("jdistill") is harness.JDistillLM


def test_loglikelihood_and_greedy_equal_hflm(pair):
    ours, ref, _ = pair
    # every context with every continuation: shared contexts are packed into one row
    args = [(c, x) for c in CONTEXTS for x in CONTINUATIONS]
    a = ours.loglikelihood(_requests("loglikelihood", args))
    b = ref.loglikelihood(_requests("loglikelihood", args))
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=0)
    assert [g for _, g in a] == [g for _, g in b]
    # the tokens greedy decoding produces are flagged greedy; one changed token is not
    import jdistill

    ids = ours.tok_encode("the quick brown")
    new = np.asarray(jdistill.generate(ours.model, np.array([ids]), max_new_tokens=3))[0]
    other = new.copy()
    other[1] = (other[1] + 1) % 97
    (_, greedy), (_, not_greedy) = ours._loglikelihood_tokens(
        [(None, ids, new.tolist()), (None, ids, other.tolist())])
    assert greedy and not not_greedy


def test_rolling_loglikelihood_equals_hflm_across_windows(pair):
    ours, ref, _ = pair
    texts = ["the quick brown fox jumps over the lazy dog " * 12,  # > max_length tokens
             "markets rally as the fed holds rates"]
    assert len(ours.tok_encode(texts[0])) > 2 * ours.max_length  # several windows
    a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    b = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_generate_until_stops_like_hflm(pair):
    ours, ref, _ = pair
    args = [(c, {"until": ["fox", "\n"], "max_gen_toks": 12, "do_sample": False})
            for c in CONTEXTS[:3]] + [(CONTEXTS[0], {"until": "dog", "max_gen_toks": 6})]
    a = ours.generate_until(_requests("generate_until", args))
    b = ref.generate_until(_requests("generate_until", args))
    assert a == b
    assert all("fox" not in x for x in a[:3])


def test_arg_string_mesh_and_bad_args(pair):
    ours, _, model_dir = pair
    sharded = harness.JDistillLM.create_from_arg_string(
        f"pretrained={model_dir},batch_size=8,max_length=48,mesh=1x-1x1,dtype=float32")
    assert sharded.mesh.shape["fsdp"] >= 1
    args = [(c, x) for c in CONTEXTS[:2] for x in CONTINUATIONS]
    a = [x for x, _ in ours.loglikelihood(_requests("loglikelihood", args))]
    b = [x for x, _ in sharded.loglikelihood(_requests("loglikelihood", args))]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="DATAxFSDPxTENSOR"):
        harness.parse_mesh("data=2")
    with pytest.raises(ValueError, match="unknown model_args"):
        harness.JDistillLM.create_from_arg_string(f"pretrained={model_dir},colour=red")


def test_gguf_as_pretrained(pair, tmp_path):
    from tests.checkpoints.test_gguf import write_gguf

    ours, _, _ = pair
    hf = make_hf_model("llama_mqa")
    write_gguf(hf, tmp_path / "m.gguf")
    lm = harness.JDistillLM.create_from_arg_string(f"pretrained={tmp_path / 'm.gguf'}")
    (ll, _), = lm.loglikelihood(_requests("loglikelihood", [("hello", " world")]))
    assert np.isfinite(ll) and ll < 0


def _mc_task(root):
    """A local multiple-choice YAML task (harness syntax) on a JSON file."""
    docs = [{"q": q, "choices": ch, "gold": g} for q, ch, g in [
        ("the quick brown", ["fox", "rates", "dog"], 0),
        ("markets rally as the", ["fed", "fox jumps"], 0),
        ("the lazy", ["dog", "fed holds rates", "over"], 0),
        ("holds", ["rates", "the quick brown fox"], 1),
        ("jumps over the", ["lazy dog", "markets"], 0),
    ]]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return root


def _rolling_and_generate_tasks(root):
    """Local YAML tasks of the two other request kinds: perplexity (rolling log-likelihood)
    and generation with a stop sequence, scored by exact match."""
    docs = [{"text": "the quick brown fox jumps over the lazy dog " * k, "q": q, "a": a}
            for k, q, a in [(3, "the quick", "brown"), (9, "markets rally", "as"),
                            (1, "the fed", "holds")]]
    (root / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    data_block = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                  f"    test: {root / 'text.jsonl'}\ntest_split: test\n")
    (root / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + data_block + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n")
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data_block + "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        "generation_kwargs:\n  until: [\"fox\", \"\\n\"]\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def test_local_yaml_task_acc_equals_hflm(pair, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    ours, ref, _ = pair
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    manager = TaskManager(include_path=str(_rolling_and_generate_tasks(_mc_task(tmp_path))))
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    results = [lm_eval.simple_evaluate(model=m, tasks=names, task_manager=manager,
                                       log_samples=True)
               for m in (ours, ref)]
    a, b = (r["results"]["tiny_mc"] for r in results)
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    a, b = (r["results"]["tiny_ppl"] for r in results)
    assert a["word_perplexity,none"] == pytest.approx(b["word_perplexity,none"], rel=1e-4)
    assert a["byte_perplexity,none"] == pytest.approx(b["byte_perplexity,none"], rel=1e-4)
    gens = [[s["resps"][0][0] for s in r["samples"]["tiny_gen"]] for r in results]
    assert gens[0] == gens[1] and len(gens[0]) == 3
    assert results[0]["results"]["tiny_gen"]["exact_match,none"] == \
        results[1]["results"]["tiny_gen"]["exact_match,none"]
    # per-choice log-likelihoods, as each model answered the harness's requests
    la, lb = ([float(resp[0][0]) for sample in r["samples"]["tiny_mc"]
               for resp in sample["resps"]] for r in results)
    assert len(la) == 12
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=0)


def test_evaluate_main_writes_harness_metrics_into_the_row(pair, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, _, model_dir = pair
    (tmp_path / "tasks").mkdir()
    tasks_dir = _mc_task(tmp_path / "tasks")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--model={model_dir}", "--task=",
         "--harness_tasks=tiny_mc", f"--harness_include={tasks_dir}", "--harness_limit=4",
         "--max_length=48", f"--out={tmp_path / 'out'}"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    h = row["metrics"]["harness"]["tiny_mc"]
    assert h["n"] == 4 and 0 <= h["acc"] <= 1 and "acc_norm_stderr" in h
    assert "harness tiny_mc" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--model={model_dir}", "--task=",
         "--harness_tasks=no_such_task", f"--out={tmp_path / 'bad'}"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
        timeout=600)
    assert bad.returncode == 2 and "unknown lm-evaluation-harness task(s) ['no_such_task']" \
        in bad.stderr and not (tmp_path / "bad").exists()
