"""Teacher correction main: fine-tunes on the task, is cached by its inputs."""

import json
import os
import subprocess
import sys

import jdistill
from jdistill.data import io as data
from jdistill.distill import losses, supervision
from tests.hf_models import make_hf_model, save_tokenizer


def _answer_ce(model_dir, records):
    model = jdistill.load_pretrained(model_dir)
    tok = data.load_tokenizer(model_dir)
    enc = supervision.encode_records(tok, records, model.config, with_reasoning=False)
    batch = {k: v[0] for k, v in data.Batcher(enc, batch_size=len(enc), seq_len=16).batch(0).items()}
    logits = model(batch["tokens"], attention_mask=batch["mask"])
    answer = batch["loss_mask"] * (batch["segments"] == losses.ANSWER)
    return float(losses.cross_entropy(logits, batch["targets"], answer)[0])


def test_correction_fits_the_task_and_is_cached(tmp_path):
    make_hf_model("llama3").save_pretrained(tmp_path / "teacher")
    save_tokenizer(tmp_path / "teacher")
    records = [{"prompt": f"the fed holds rates {w}", "answer": "rates"} for w in ("as", "the")] + \
              [{"prompt": f"the quick brown fox {w}", "answer": "fox"} for w in ("as", "the")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cmd = [sys.executable, "-m", "experiments.correct_teacher", f"--teacher={tmp_path / 'teacher'}",
           f"--data={tmp_path / 'd.jsonl'}", f"--out={tmp_path / 'corrected'}", "--steps=30",
           "--batch_size=4", "--seq_len=16", "--learning_rate=3e-2", "--warmup_steps=0",
           "--mesh=data=1,fsdp=1,tensor=1"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    meta = json.loads((tmp_path / "corrected" / "correction.json").read_text())
    assert meta["examples"] == 4 and meta["settings"]["format"] == "label"
    before = _answer_ce(tmp_path / "teacher", records)
    after = _answer_ce(tmp_path / "corrected", records)
    assert after < 0.3 * before  # the corrected teacher predicts the task's labels
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "cached" in again.stdout
    rematerialised = subprocess.run(cmd + ["--remat=full"], env=env, capture_output=True,
                                    text=True)  # memory, not results: no retraining
    assert rematerialised.returncode == 0 and "cached" in rematerialised.stdout
    changed = subprocess.run(cmd[:-4] + ["--steps=2"] + cmd[-3:], env=env, capture_output=True,
                             text=True)
    assert changed.returncode == 0 and "cached" not in changed.stdout
