"""The `jdistill` command: one subcommand per main, listed with one line each; a subcommand
runs its main with the same flags and the same one-line bad-input contract."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import cli

REPO = Path(__file__).resolve().parents[2]


def test_every_main_is_a_subcommand():
    mains = sorted(p.stem for p in (REPO / "experiments").glob("*.py")
                   if "\nif __name__ == \"__main__\":" in p.read_text())
    assert sorted(cli.MAINS) == mains


def test_help_lists_each_command_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.console(["jdistill", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in cli.MAINS:
        line, = [x for x in out.splitlines() if x.split()[:1] == [name.replace("_", "-")]]
        assert len(line.split(None, 1)[1]) > 20  # a real description
    with pytest.raises(SystemExit) as e:
        cli.console(["jdistill", "nope"])
    assert e.value.code == 2 and "unknown command 'nope'" in capsys.readouterr().err


def _jdistill(*args):
    exe = shutil.which("jdistill")  # the installed console script (pip install -e .)
    cmd = [exe] if exe else [sys.executable, "-c", "from experiments.cli import console; console()"]
    return subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_subcommand_runs_its_main(tmp_path):
    rows = "".join(f'{{"N": {n}, "D": {d}, "loss": {1.7 + 400 / n ** 0.34 + 400 / d ** 0.28}}}\n'
                   for n, d in [(1e6, 1e8), (3e6, 1e9), (1e7, 3e8), (3e7, 1e10), (1e8, 1e9),
                                (3e8, 3e10), (1e9, 1e10), (3e6, 3e10)])
    (tmp_path / "rows.jsonl").write_text(rows)
    ok = _jdistill("fit", f"--data={tmp_path / 'rows.jsonl'}", "--law=chinchilla", "--x=N,D",
                   "--y=loss", f"--out={tmp_path / 'fit'}", "--n_boot=0", "--refine=2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "fit" / "fit.json").exists()
    bad = _jdistill("fit", "--law=chinchilla", f"--data={tmp_path / 'nope.jsonl'}", "--x=N,D",
                    "--y=loss", f"--out={tmp_path / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("jdistill fit: error: ")
    assert not (tmp_path / "bad").exists()
