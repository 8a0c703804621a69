"""The package's architecture holds: imports run one way between its folders, and
`import jdistill` (and the analysis side: report, plan, fit) loads no JAX."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# higher may import lower, never the reverse; equal ranks may not import each other
RANK = {"experiments": 7, "study": 6, "eval": 5, "distill": 4, "pruning": 4, "checkpoints": 3,
        "models": 2, "data": 2, "scaling": 2, "sharding": 1, "utils": 1}


def _folder(module: str):
    parts = module.split(".")
    if parts[0] == "experiments":
        return "experiments"
    return parts[1] if parts[0] == "jdistill" and len(parts) > 1 and parts[1] in RANK else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            if node.module == "jdistill":
                yield from (f"jdistill.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_imports_run_one_way():
    bad = []
    for path in sorted([*(REPO / "jdistill").rglob("*.py"), *(REPO / "experiments").glob("*.py")]):
        me = _folder(".".join(path.relative_to(REPO).with_suffix("").parts))
        if me is None:
            continue
        for target in _imports(path):
            other = _folder(target)
            if other is not None and other != me and RANK[other] >= RANK[me]:
                bad.append(f"{path.relative_to(REPO)} ({me}) imports {target} ({other})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _python_ok(code: str) -> None:
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("modules", ["jdistill", "jdistill.study, jdistill.scaling",
                                     "experiments.report", "experiments.plan",
                                     "experiments.fit"])
def test_analysis_side_imports_no_jax(modules):
    code = (f"import sys; import {modules}; "
            "bad = [m for m in ('jax', 'flax', 'optax', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    _python_ok(code)


def test_public_names_load_on_first_use():
    code = ("import jdistill, sys; assert 'jax' not in sys.modules; "
            "assert callable(jdistill.load_pretrained) and callable(jdistill.generate); "
            "assert jdistill.losses.fused_forward_kl is jdistill.fused_forward_kl; "
            "assert jdistill.losses.forward_kl is jdistill.forward_kl; "
            "from jdistill import ModelConfig, Decoder, save_pretrained, BlendWeights")
    _python_ok(code)


def test_the_dtype_flag_lists_what_checkpoints_load():
    from experiments import flags as common
    from jdistill.checkpoints import hf

    assert set(common.PARAM_DTYPES) == set(hf.DTYPES)
