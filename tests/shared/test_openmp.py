import subprocess
import sys

from shared.openmp import OPENMP_ENV, set_openmp_waits


def test_defaults_fill_gaps_and_never_override():
    env = {"GOMP_SPINCOUNT": "0"}
    set_openmp_waits(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    env = {}
    set_openmp_waits(env)
    assert env == OPENMP_ENV


def test_the_cli_sets_them_before_torch_loads():
    code = (
        "import os, sys\n"
        "import services.cli\n"
        "assert 'torch' not in sys.modules, 'the CLI module must not load torch before the env is set'\n"
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in OPENMP_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "10000"]
