"""No process the project starts takes the repository's ``kernels/`` folder for the top-level package ``kernels``.

That folder is installed as ``llamactl.kernels``; a top-level ``kernels`` is Hugging Face's package, which
transformers imports when it is installed (a fresh clone once failed every test at collection that way). Each way
the project starts Python is checked from the repository root, where the folder would be found first: this pytest
process, the children the tests start (with the environment tests/conftest.py gives them), torchrun's ranks, and
the processes of the Makefile and of each recipe. The first test shows the probe finds the folder when nothing
guards against it, so the others can fail.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV

ROOT = Path(__file__).resolve().parent.parent
OURS = str(ROOT / "kernels" / "__init__.py")
PROBE = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"


def unguarded_env() -> dict:
    return {k: v for k, v in ENV.items() if k != "PYTHONSAFEPATH"}


def probe(argv: list[str], env: dict, **kw) -> list[str]:
    """What ``kernels`` resolves to in the process(es) ``argv`` starts from the root: one origin per line printed."""
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.endswith(".py") or line == "None"]
    assert lines, f"the probe printed nothing: {proc.stdout!r} {proc.stderr!r}"
    return lines


def test_the_probe_finds_our_folder_without_a_guard():
    assert os.path.isfile(OURS)
    assert probe([sys.executable, "-c", PROBE], unguarded_env()) == [OURS]


def test_this_process():
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin != OURS, f"'import kernels' here would load {spec.origin}"
    assert ROOT not in {Path(p or os.curdir).resolve() for p in sys.path}


def test_children_of_the_tests():
    assert probe([sys.executable, "-c", PROBE], ENV) != [OURS]


def test_torchrun_ranks(tmp_path):
    """torchrun starts each rank as ``python -u -m MODULE`` in the working directory (recipes run llamactl so)."""
    (tmp_path / "kernels_probe.py").write_text(PROBE + "\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
            "kernels_probe"]  # fmt: skip
    origins = probe(argv, env)
    assert len(origins) == 1 and OURS not in origins, origins
    assert probe(argv, {k: v for k, v in env.items() if k != "PYTHONSAFEPATH"}) == [OURS]


@pytest.mark.parametrize("makefile", ["Makefile", "recipes/demo.mk", "recipes/llama2-chat.mk"])
def test_make_and_the_recipes(makefile):
    """Every process make starts from these files inherits the guard, whatever the caller's environment."""
    rule = f'kernels-probe: ; @{sys.executable} -c "{PROBE}"'
    argv = ["make", "-s", "--no-print-directory", "-f", makefile, "--eval", rule, "kernels-probe"]
    assert OURS not in probe(argv, unguarded_env())
