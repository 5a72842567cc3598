"""The program examples run as scripts and check their own answers."""
import os
import subprocess
import sys

import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, expected", [
    ("square.py", "1000 jobs, 1000 callbacks, sum of squares 332833500"),
    ("executor.py", "2000 numbers from 1000000: 152 primes"),
    ("pool_primes.py", "17984 primes below 200000, in 20 blocks"),
])
def test_example_runs_and_checks_its_answer(script, expected, tmp_path):
    env = helpers.no_master_env(tmp_path)   # no master named, nor a launcher's, nor SLURM's
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, env=env, timeout=120, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert expected in completed.stdout
    assert "Traceback" not in completed.stderr
