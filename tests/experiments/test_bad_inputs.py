"""Bad input to the mains: one line naming the problem and the fix, exit code 2, no traceback,
and nothing written (no output file or folder appears, an existing one is unchanged).

One table, each case a real `python -m experiments.MAIN` process on tiny checkpoints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from tests.hf_models import make_hf_model, save_hf_model, save_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs, good and bad, shared by every case."""
    import gguf

    from tests.checkpoints.test_gguf import _copy_with, write_gguf

    w = tmp_path_factory.mktemp("world")
    save_hf_model("llama_mqa", w / "model")
    save_tokenizer(w / "model")
    save_hf_model("llama_mqa", w / "notok")
    make_hf_model("llama_mqa", vocab_size=128).save_pretrained(w / "vocab2")
    save_tokenizer(w / "vocab2", vocab=128)
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=97).save_pretrained(
        w / "gpt2")
    (w / "empty_dir").mkdir()
    write_gguf(make_hf_model("llama_mqa"), w / "m.gguf")
    _copy_with(w / "m.gguf", w / "k.gguf", "blk.0.extra.weight", np.zeros((1, 210), np.uint8),
               gguf.GGMLQuantizationType.Q6_K)
    (w / "m.gguf").unlink()
    (w / "records.jsonl").write_text("".join(
        json.dumps({"prompt": f"markets rally {i}", "answer": " the fed"}) + "\n"
        for i in range(8)))
    (w / "calib.txt").write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 8))
    (w / "bad_label.csv").write_text("text,label\nfed holds,up\nrates fall,sideways\n")
    (w / "empty.csv").write_text("text,label\n")
    rng = np.random.default_rng(0)
    n, d = 10 ** rng.uniform(6, 9, 12), 10 ** rng.uniform(8, 11, 12)
    rows = [{"N": a, "D": b, "loss": 1.7 + 400 / a ** 0.34 + 400 / b ** 0.28}
            for a, b in zip(n, d)]
    (w / "fit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (w / "fit_nan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) +
                                     '{"N": 1e8, "D": 1e9, "loss": NaN}\n')
    (w / "fit_few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (w / "bad_rows.jsonl").write_text('{"main": "distill"}\n{"main": "distill", oops\n')
    (w / "a_file").write_text("not a folder")
    # a checkpointed run, for the resume-with-other-settings case
    proc = _main("distill", [f"--student={w / 'model'}", f"--teacher={w / 'model'}",
                             f"--data={w / 'records.jsonl'}", f"--out={w / 'trained'}",
                             "--format=logits", "--steps=2", "--batch_size=8", "--seq_len=16",
                             "--checkpoint_every=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return w


def _main(name, args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env.pop("JDISTILL_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


DISTILL = ["--student={w}/model", "--teacher={w}/model", "--data={w}/records.jsonl",
           "--out={t}/out", "--format=logits", "--steps=1", "--batch_size=8", "--seq_len=16"]
EVALUATE = ["--model={w}/model", "--out={t}/out", "--limit=4"]
FIT = ["--data={w}/fit.jsonl", "--law=chinchilla", "--x=N,D", "--y=loss", "--out={t}/out",
       "--n_boot=0"]


def _with(base, *changes):
    """`base` with flags replaced by (or added from) `changes`."""
    args = {a.split("=", 1)[0]: a for a in base}
    args.update({c.split("=", 1)[0]: c for c in changes})
    return list(args.values())


# (case, main, args, what the one line must say)
CASES = [
    ("missing checkpoint dir", "distill", _with(DISTILL, "--student={w}/nope"),
     r"nope"),
    ("not a checkpoint dir", "distill", _with(DISTILL, "--student={w}/empty_dir"),
     r"config\.json"),
    ("unknown architecture", "export", ["--checkpoint={w}/gpt2", "--out={t}/out"], r"gpt2"),
    ("unsupported GGUF quant type", "import_gguf", ["--gguf={w}/k.gguf", "--out={t}/out"],
     r"unsupported tensor type\(s\) \['Q6_K'\]"),
    ("missing tokenizer", "evaluate", _with(EVALUATE, "--model={w}/notok"),
     r"no tokenizer\.json .*--tokenizer"),
    ("teacher/student vocabulary mismatch", "distill", _with(DISTILL, "--teacher={w}/vocab2",
                                                              "--format=logits"),
     r"vocabulary 128 != student 97"),
    ("unknown task", "evaluate", _with(EVALUATE, "--task=nope"), r"unknown task 'nope'"),
    ("unknown split", "evaluate", _with(EVALUATE, "--split=dev"),
     r"has no split 'dev'; it has \['test', 'train'\]"),
    ("label outside the label set", "evaluate", _with(EVALUATE, "--task={w}/bad_label.csv",
                                                       "--label_names=up,down"),
     r"row 2: label 'sideways' is not one of the 2 label names"),
    ("empty split", "evaluate", _with(EVALUATE, "--task={w}/empty.csv", "--label_names=a,b"),
     r"has no examples"),
    ("hub data set without network", "evaluate", _with(EVALUATE, "--task=nvidia/FinHeadlineMix"),
     r"save_to_disk\('DIR'\)"),
    ("unknown benchmark", "evaluate", _with(EVALUATE, "--task=", "--general=nope"),
     r"unknown benchmark 'nope'"),
    ("infeasible compression target", "prune", ["--model={w}/model", "--out={t}/out",
                                                 "--compression=1000",
                                                 "--calib_data={w}/calib.txt"],
     r"compression"),
    ("malformed mesh", "distill", _with(DISTILL, "--mesh=data=two"),
     r"--mesh='data=two'.*expected e\.g\. data=2,fsdp=2,tensor=2"),
    ("mesh not dividing the devices", "distill", _with(DISTILL, "--mesh=data=3,fsdp=1,tensor=1"),
     r"needs 3 devices but 8 are available"),
    ("batch not a multiple of data x fsdp", "distill",
     _with(DISTILL, "--mesh=data=2,fsdp=2,tensor=2", "--batch_size=3"),
     r"batch size 3 is not a multiple of .* \(data x fsdp = 4\)"),
    ("unknown loss", "distill", _with(DISTILL, "--loss=bogus"), r"--loss.*forward"),
    ("unknown format", "distill", _with(DISTILL, "--format=bogus"), r"--format.*blended"),
    ("unknown law", "fit", _with(FIT, "--law=bogus"), r"bogus"),
    ("NaN rows in fit data", "fit", _with(FIT, "--data={w}/fit_nan.jsonl"),
     r"(?i)non-finite|nan"),
    ("too few points for a law", "fit", _with(FIT, "--data={w}/fit_few.jsonl"),
     r"5 parameters but only 3 usable points"),
    ("--out is an existing file (fit)", "fit", _with(FIT, "--out={w}/a_file"), r"a_file"),
    ("--out is an existing file (distill)", "distill", _with(DISTILL, "--out={w}/a_file"),
     r"a_file.* not a directory"),
    ("--out is an existing file (evaluate)", "evaluate", _with(EVALUATE, "--out={w}/a_file"),
     r"a_file.* not a directory"),
    ("results file with a malformed row", "report", ["--results={w}/bad_rows.jsonl",
                                                     "--out={t}/out"], r"bad_rows\.jsonl.*2"),
    ("plan without results", "plan", ["--results={w}/nope.jsonl"], r"nope\.jsonl"),
    ("resumed run with other settings", "distill",
     _with(DISTILL, "--out={w}/trained", "--format=logits", "--learning_rate=0.5",
           "--checkpoint_every=1"),
     r"other settings \(config\.learning_rate: 0\.0001 -> 0\.5\)"),
    ("missing training data", "distill", _with(DISTILL, "--data={w}/nope.jsonl"),
     r"nope\.jsonl does not exist"),
    ("missing required flag", "distill", [a for a in DISTILL if not a.startswith("--student")],
     r"--student"),
    ("unknown flag", "evaluate", _with(EVALUATE, "--colour=blue"), r"colour"),
    ("unknown logger", "distill", _with(DISTILL, "--loggers=tensorboard,mlflow"),
     r"unknown logger\(s\) \['mlflow'\]"),
    ("unknown training dtype of a study", "sweep",
     ["--out={t}/sweep", "--preset=smoke", "--teacher={w}/model", "--set=compute_dtype=float16"],
     r"compute_dtype='float16': use one of \['bfloat16', 'float32'\]"),
    ("unknown harness task", "evaluate", _with(EVALUATE, "--task=", "--harness_tasks=nope_task"),
     r"unknown lm-evaluation-harness task\(s\) \['nope_task'\]"),
]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(root).rglob("*")}


@pytest.mark.parametrize("case,main,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path, case, main, args,
                                                          message):
    import re

    before = _snapshot(world)
    proc = _main(main, [a.format(w=world, t=tmp_path) for a in args])
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in err.splitlines() if x.strip() and not _noise(x)]
    assert len(lines) == 1, f"{case}: expected one line, got\n{err}"
    assert lines[0].startswith(f"{main}: error: "), lines[0]
    assert re.search(message, lines[0]), f"{case}: {lines[0]!r} lacks {message!r}"
    assert list(tmp_path.iterdir()) == [], f"{case} wrote {list(tmp_path.iterdir())}"
    assert _snapshot(world) == before, f"{case} changed the inputs' folder"


def _noise(line: str) -> bool:
    """Lines other libraries print on their own at start-up (not ours to silence)."""
    return line.startswith(("WARNING: All log messages before absl::InitializeLog",
                            "E0000 ", "W0000 ", "I0000 "))


def test_the_table_is_large_enough():
    assert len(CASES) >= 20 and len({c[1] for c in CASES}) >= 6
