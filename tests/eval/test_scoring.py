"""Evaluation: log-likelihoods vs transformers, padding invariance, acc/acc_norm by brute
force, macro-F1, perplexity, label parsing, generation, benchmark loaders, the main."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import jdistill
from jdistill import sharding
from jdistill.data import io as data
from jdistill.data import tasks
from jdistill.eval import benchmarks, classify, metrics
from jdistill.eval import scoring as ev

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ck = tiny_checkpoint("llama3", tokenizer=True)
    return ck.path, ck.hf_model, data.load_tokenizer(ck.path), jdistill.load_pretrained(ck.path)


def torch_loglik(hf, ctx, cont):
    """Brute force: one transformers forward of ctx + cont, summed log-probs of cont."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ctx + cont])).logits.float()
    lp = torch.log_softmax(logits, -1)[0]
    return sum(lp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))


ITEMS = [  # (context, choices, gold): constructed so lengths and tokenisations differ
    benchmarks.MCItem("Question: the quick brown fox\nAnswer:", ("jumps over", "the lazy dog", "fox"), 1),
    benchmarks.MCItem("markets rally as the fed", ("holds rates", "dog", "quick brown fox jumps"), 0),
    benchmarks.MCItem("the lazy dog", ("jumps", "rally as the fed holds rates steady"), 1),
    benchmarks.MCItem("fox over the", ("lazy dog", "markets", "brown", "the fed"), 3),
]


def test_encode_pair_follows_the_harness(tiny):
    _, _, tok, _ = tiny
    ctx, cont = ev.encode_pair(tok, "the quick bro", "wn fox")  # merges across the boundary
    assert ctx == ev.encode(tok, "the quick bro")
    assert cont == ev.encode(tok, "the quick brown fox")[len(ctx):]
    assert ev.encode_pair(tok, "the quick  ", "fox") == ev.encode_pair(tok, "the quick", "  fox")


def test_continuation_logliks_match_transformers(tiny):
    _, hf, tok, model = tiny
    requests = [(ev.encode_pair(tok, it.context, " " + it.choices[0])[0],
                 [ev.encode_pair(tok, it.context, " " + c)[1] for c in it.choices])
                for it in ITEMS]
    ours = ev.choice_logliks(model, requests, batch_size=2)  # shapes shared with the acc test
    for (ctx, conts), ll in zip(requests, ours):
        ref = [torch_loglik(hf, ctx, c) for c in conts]
        np.testing.assert_allclose(ll, ref, atol=1e-4, rtol=1e-5)


def test_padding_never_changes_a_score(tiny):
    _, _, tok, model = tiny
    short = (ev.encode(tok, "the fed"), [ev.encode(tok, " holds"), ev.encode(tok, " dog")])
    # Longer contexts (> one bucket), more packed continuation tokens (> one bucket) and
    # more choices.
    long_ctx = ev.encode(tok, "the quick brown fox jumps over the lazy dog " * 6)
    long = (long_ctx, [ev.encode(tok, " markets rally as the fed holds rates " * 2)] * 4)
    assert len(long_ctx) > ev.CTX_BUCKET and 4 * len(long[1][0]) > 2 * ev.CONT_BUCKET
    alone = ev.choice_logliks(model, [short], batch_size=1)[0]
    padded = ev.choice_logliks(model, [long, short, long], batch_size=4)[1]
    np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=0)


def test_sharded_scoring_equals_unsharded(tiny):
    _, _, tok, model = tiny
    requests = [(ev.encode_pair(tok, it.context, " " + it.choices[0])[0],
                 [ev.encode_pair(tok, it.context, " " + c)[1] for c in it.choices])
                for it in ITEMS]
    mesh = sharding.make_mesh()  # 8 simulated CPU devices (conftest)
    plain = ev.choice_logliks(model, requests, batch_size=2)  # compiled by an earlier test
    sharded = ev.choice_logliks(model, requests, batch_size=8, mesh=mesh)
    for a, b in zip(plain, sharded):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_acc_and_acc_norm_against_brute_force(tiny):
    _, hf, tok, model = tiny
    got = benchmarks.evaluate_mc(model, tok, ITEMS, batch_size=2)
    acc, acc_norm = [], []
    for it in ITEMS:
        ll = []
        for c in it.choices:
            # Independent of encode_pair: tokenise context and ' ' + choice the harness way.
            whole = ev.encode(tok, it.context + " " + c)
            ctx = ev.encode(tok, it.context)
            ll.append(torch_loglik(hf, ctx, whole[len(ctx):]))
        acc.append(float(np.argmax(ll) == it.gold))
        acc_norm.append(float(np.argmax([v / len(c) for v, c in zip(ll, it.choices)]) == it.gold))
    assert got["acc"] == pytest.approx(np.mean(acc))
    assert got["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert got["stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)))
    assert got["n"] == len(ITEMS)


def test_mc_metrics_normalise_by_characters():
    # Choice 1 has the higher total, choice 0 the higher per-character log-likelihood.
    m = metrics.mc_metrics([np.array([-4.0, -3.0])], [("abcdefgh", "ab")], [0])
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0


def test_macro_f1_and_confusion():
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 3]  # class 3 only predicted: counts, with F1 0
    # Per class F1 = 2TP / (2TP + FP + FN): 0: 2/4, 1: 4/5, 2: 2/4, 3: 0/1.
    expected = np.mean([0.5, 0.8, 0.5, 0.0])
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(expected)
    from sklearn.metrics import f1_score  # the reference (test extra)

    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    cm = metrics.confusion_matrix(y_true, y_pred, 4)
    assert cm.sum() == 7 and cm[2, 0] == 1 and cm[0, 0] == 1 and cm[1, 1] == 2
    # Unparsed generations (-1) are wrong and leave the confusion matrix.
    m = metrics.classification_metrics([0, 1], [0, -1])
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1 and m["macro_f1"] == pytest.approx(0.5)
    assert metrics.confusion_matrix([0, 1], [0, -1], 2).sum() == 1


def test_classification_and_saved_confusion(tiny, tmp_path):
    _, _, tok, model = tiny
    task = tasks.TaskSpec(name="toy", splits={}, label_names=("dog", "fed rates", "fox"),
                          template="{text}\nTopic:")
    examples = [("the lazy", 0), ("markets rally as the", 1), ("quick brown", 2)]
    r = classify.evaluate_classification(model, tok, task, examples, batch_size=2)
    ll = classify.label_logliks(model, tok, task, [t for t, _ in examples], batch_size=2)
    assert ll.shape == (3, 3)
    np.testing.assert_array_equal(r["predictions"], ll.argmax(1))
    paths = metrics.save_confusion(r["confusion"], task.label_names, tmp_path, "cm")
    np.testing.assert_array_equal(np.load(paths["npy"]), r["confusion"])
    assert json.loads(Path(paths["json"]).read_text())["labels"] == list(task.label_names)
    assert Path(paths["png"]).read_bytes()[:4] == b"\x89PNG"


def test_label_nll_and_brier_against_sklearn():
    from sklearn.metrics import brier_score_loss, log_loss  # references (test extra)

    rng = np.random.default_rng(0)
    ll = rng.normal(size=(40, 3)) * 3 - 20  # log-likelihoods: unnormalised over labels
    y = rng.integers(0, 3, 40)
    m = metrics.probabilistic_metrics(y, ll)
    p = metrics.label_probabilities(ll)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert m["nll"] == pytest.approx(log_loss(y, p, labels=[0, 1, 2]))
    # multi-class Brier = sum over classes of the one-vs-rest squared errors
    brier = sum(brier_score_loss(y == k, p[:, k]) for k in range(3))
    assert m["brier"] == pytest.approx(brier)
    per_item = np.sum((p - np.eye(3)[y]) ** 2, 1)
    assert m["brier_stderr"] == pytest.approx(np.std(per_item, ddof=1) / np.sqrt(40))
    # a certain, right model: NLL 0, Brier 0
    sure = metrics.probabilistic_metrics([0, 1], np.log([[1.0, 1e-30], [1e-30, 1.0]]))
    assert sure["nll"] == pytest.approx(0, abs=1e-12) and sure["brier"] == pytest.approx(0)


def test_macro_f1_stderr_is_a_seeded_bootstrap():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 4, 300))
    se = metrics.macro_f1_stderr(y, pred)
    assert se == metrics.macro_f1_stderr(y, pred)  # reproducible
    # of the order of a binomial stderr at this accuracy and n, not 0, not 1
    assert 0.01 < se < 0.06
    assert metrics.macro_f1_stderr(y[:100], pred[:100]) > se  # fewer items, wider


def test_scores_after_the_students_own_trace_match_transformers(tiny):
    _, hf, tok, model = tiny
    task = tasks.TaskSpec(name="toy", splits={}, label_names=("dog", "fed rates", "fox"),
                          template="{text}\nTopic:")
    examples = [("the lazy", 0), ("markets rally as the", 1), ("quick brown", 2)]
    r = classify.evaluate_after_trace(model, tok, task, examples, max_new_tokens=6,
                                      batch_size=2)
    cfg = model.config
    bos = [] if cfg.bos_token_id is None else [cfg.bos_token_id]
    sep = ev.encode(tok, "\n")
    stops = {cfg.eos_token_id} | (set(sep) if len(sep) == 1 else set())
    for (text, gold), pred in zip(examples, r["predictions"]):
        ctx = bos + ev.encode(tok, tasks.prompt(task, text))
        # the reference trace: transformers' greedy decoding, stopped as ours stops
        with torch.no_grad():
            out = hf.generate(torch.tensor([ctx]), max_new_tokens=6, do_sample=False,
                              eos_token_id=sorted(stops), pad_token_id=0)
        trace = out[0, len(ctx):].tolist()
        cut = next((i for i, t in enumerate(trace) if t in stops), None)
        trace = (trace[:cut + 1] if cut is not None and trace[cut] in sep
                 else trace[:cut] + sep)
        ref = [torch_loglik(hf, ctx + trace, ev.encode(tok, tasks.answer(task, k)))
               for k in range(3)]
        assert pred == int(np.argmax(ref))
    for k in ("accuracy", "macro_f1", "nll", "brier", "nll_stderr", "brier_stderr"):
        assert np.isfinite(r[k]), k


def greedy_reference(hf, ctx, max_new, eos, separator):
    """transformers' greedy trace, stopped and completed as a trace is: ids in `eos` end it
    (dropped), a one-token separator ends it (kept), else the separator is appended."""
    stops = sorted(set(eos) | (set(separator) if len(separator) == 1 else set()))
    with torch.no_grad():
        out = hf.generate(torch.tensor([ctx]), max_new_tokens=max_new, do_sample=False,
                          eos_token_id=stops or None, pad_token_id=0)
    new = out[0, len(ctx):].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    if cut is not None and new[cut] not in eos:
        return new[:cut + 1], "separator"
    return new[:cut if cut is not None else len(new)] + list(separator), \
        "eos" if cut is not None else "budget"


@pytest.mark.parametrize("sep_len", [1, 2])
def test_traced_logliks_match_transformers_generate_then_score(tiny, sep_len):
    _, hf, tok, model = tiny
    ctxs = [ev.encode(tok, t) for t in ("the quick brown fox", "markets rally as the fed",
                                        "the lazy", "fox over the lazy dog and")]
    conts = [ev.encode(tok, c) for c in (" dog", " holds rates", " fox")]
    with torch.no_grad():  # free-running continuations pick stop ids that end traces
        free = [hf.generate(torch.tensor([c]), max_new_tokens=6, do_sample=False,
                            pad_token_id=0)[0, len(c):].tolist() for c in ctxs]
    separator = free[0][2:2 + sep_len]
    eos = [next(t for t in free[1][1:] if t not in separator)]
    refs = [greedy_reference(hf, c, 6, eos, separator) for c in ctxs]
    ends = {end for _, end in refs}
    assert "eos" in ends and ("separator" in ends or sep_len > 1), ends  # paths exercised
    ours = ev.traced_choice_logliks(model, [(c, conts) for c in ctxs], max_new_tokens=6,
                                    eos_ids=eos, separator=separator, batch_size=3)
    for c, (trace, _), (our_trace, ll) in zip(ctxs, refs, ours):
        assert our_trace == trace
        np.testing.assert_allclose(ll, [torch_loglik(hf, c + trace, x) for x in conts],
                                   rtol=1e-4, atol=1e-4)
    if sep_len == 1:  # the batch split over 8 simulated devices (conftest): the same
        sharded = ev.traced_choice_logliks(model, [(c, conts) for c in ctxs], max_new_tokens=6,
                                           eos_ids=eos, separator=separator, batch_size=8,
                                           mesh=sharding.make_mesh())
        for (trace, ll), (s_trace, s_ll) in zip(ours, sharded):
            assert s_trace == trace
            np.testing.assert_allclose(s_ll, ll, atol=1e-5)


def test_parse_label_finds_the_last_label_named():
    names = tasks.TWITTER_LABELS
    assert tasks.parse_label("It mentions earnings but is about a Dividend.", names) == 4
    assert tasks.parse_label("Not Markets... final answer: stock movement", names) == 19
    assert tasks.parse_label("Topic: Gold | Metals | Materials", names) == 10
    assert tasks.parse_label("Answer: M&A | Investments", names) == 13
    assert tasks.parse_label("Macroeconomic news", names) is None  # whole words only
    assert tasks.parse_label("nothing here", names) is None
    # a '|'-separated part names its label too; whole words, case-insensitive, last wins
    assert tasks.parse_label("the Central Banks moved", names) == 1
    assert tasks.parse_label("M&A deal", names) == 13
    assert tasks.parse_label("this is about earnings, not markets", names) == 15
    assert tasks.parse_label("supermarkets opened", names) is None
    assert tasks.label_aliases("Fed | Central Banks") == ["Fed | Central Banks", "Fed",
                                                       "Central Banks"]


def test_generate_and_parse_runs(tiny):
    _, _, tok, model = tiny
    task = tasks.TaskSpec(name="toy", splits={}, label_names=("dog", "fox"),
                          template="{text}\nTopic:")
    out = classify.generate_and_parse(model, tok, task, ["the lazy", "quick brown", "fed"],
                                max_new_tokens=5, batch_size=2, eos_token_id=2)
    assert len(out) == 3
    for text, label in out:
        assert isinstance(text, str) and (label is None or label in (0, 1))
        assert label == tasks.parse_label(text, task.label_names)


def test_perplexity_matches_transformers_and_scores_each_token_once(tiny):
    _, hf, tok, model = tiny
    text = "the quick brown fox jumps over the lazy dog " * 2
    ids = ev.encode(tok, text)
    r = ev.perplexity(model, tok, text, window=64, stride=64)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]))
    assert r["tokens"] == len(ids) - 1
    assert r["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    sliding = ev.perplexity(model, tok, text * 3, window=16, stride=8, batch_size=4)
    assert sliding["tokens"] == len(ev.encode(tok, text * 3)) - 1


def test_held_out_text_is_the_tail(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = ev.held_out_text(p, 0.1)
    assert tail.startswith("line 9") and tail.endswith("line 99\n") and len(tail) < 100


@pytest.mark.parametrize("name,n,n_choices", [
    ("arc_easy", 2376, {3, 4, 5}), ("arc_challenge", 1172, {3, 4, 5}),
    ("hellaswag", 10042, {4}), ("piqa", 1838, {2}), ("boolq", 3270, {2}),
    ("openbookqa", 500, {4}), ("commonsense_qa", 1221, {5}), ("mmlu", 14042, {4})])
def test_benchmark_loaders(name, n, n_choices):
    items = benchmarks.load_benchmark(name)
    assert len(items) == n
    assert {len(it.choices) for it in items} == n_choices
    assert all(0 <= it.gold < len(it.choices) for it in items)


def test_benchmark_limit_is_a_fixed_seeded_subset():
    sub = benchmarks.load_benchmark("piqa", limit=20, seed=1)
    assert len(sub) == 20 and sub == benchmarks.load_benchmark("piqa", limit=20, seed=1)
    assert sub != benchmarks.load_benchmark("piqa", limit=20, seed=2)
    full = benchmarks.load_benchmark("piqa")
    assert all(it in full for it in sub)


def test_benchmark_prompt_formats():
    arc = benchmarks.load_benchmark("arc_easy")[0]
    assert arc.context.startswith("Question: Which statement") and arc.context.endswith("\nAnswer:")
    hs = benchmarks.load_benchmark("hellaswag")[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    # As the harness: strip first, so a leading bracket tag leaves a leading space.
    assert benchmarks.hellaswag_preprocess("[header] How to x [title] Do y.  Now") == " How to x. Do y. Now"
    bq = benchmarks.load_benchmark("boolq")[0]
    assert bq.context.endswith("\nQuestion: does ethanol take more energy make that produces?"
                               "\nAnswer:") and bq.choices == ("no", "yes") and bq.gold == 0
    mmlu = benchmarks.load_benchmark("mmlu")[0]
    assert mmlu.context.startswith("The following are multiple choice questions (with answers) "
                                   "about abstract algebra.\n\n")
    assert mmlu.context.endswith("\nD. 6\nAnswer:") and mmlu.choices == ("A", "B", "C", "D")
    csqa = benchmarks.load_benchmark("commonsense_qa")
    assert csqa[102].context.startswith("Question: When learning about the world")
    assert "\nA. newness\nB. loss of innocence\nC. enlightenment" in csqa[102].context
    assert csqa[102].gold == 3


def test_main_end_to_end(tiny, tmp_path):
    model_dir = tiny[0]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--model={model_dir}", "--limit=6",
           "--general=boolq", "--general_limit=4", "--perplexity",
           "--ppl_files=tinyshakespeare.txt", "--ppl_max_tokens=200", "--ppl_window=64",
           "--ppl_stride=32", "--max_length=4096", f"--out={out}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # faster
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "boolq" in proc.stdout and "items/s" in proc.stderr
    (row,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    m = row["metrics"]
    assert row["main"] == "evaluate" and row["model"]["params"] > 0 and row["run_id"]
    assert 0 <= m["in_domain_accuracy"] <= 1 and 0 <= m["in_domain_macro_f1"] <= 1
    assert set(m["general"]) == {"boolq"} and m["general"]["boolq"]["n"] == 4
    assert set(m["general"]["boolq"]) >= {"acc", "acc_norm", "stderr"}
    assert m["perplexity"] > 1 and row["data"]["examples"] == 6
    for suffix in ("json", "npy", "png"):
        assert (out / f"confusion_twitter_topics_test.{suffix}").exists()
    assert len((out / "predictions_twitter_topics_test.jsonl").read_text().splitlines()) == 6
