"""Worker threads that stop spinning soon on a busy machine (issue 26): `vlcp` sets the OpenMP wait before torch
is imported, a user's own setting wins, and the in-process test suite runs with the same setting
(benchmarks/busy_machine.py measures the effect)."""
from __future__ import annotations

import os
import subprocess
import sys

from vlcp.cli.threads import SPIN, USER_CHOICES, WAIT, calm_threads


def test_calm_threads_sets_the_wait_unless_the_user_chose(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh `vlcp` process
    env = {"PATH": "/bin"}
    assert calm_threads(env) == WAIT == {"GOMP_SPINCOUNT": "1000"} and env == {"PATH": "/bin", **WAIT}
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}, {SPIN: "1"}):
        before = dict(mine)
        assert calm_threads(mine) == {} and mine == before


def test_calm_threads_is_a_no_op_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (the runtime has read its settings: changing them now would only mislead)

    env: dict[str, str] = {}
    assert calm_threads(env) == {} and env == {}


PROBE = """
import os, sys
import click
import vlcp.cli.main as m

@click.command()
def probe():
    print("torch before:", "torch" in sys.modules)
    import torch  # noqa: F401
    print(" ".join(f"{k}={os.environ.get(k)}" for k in sorted(%r)))

m.cli = probe
m.main()
"""


def test_main_sets_the_wait_before_a_command_imports_torch():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", SPIN))}
    code = PROBE % (sorted(WAIT),)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["torch before: False", " ".join(f"{k}={v}" for k, v in sorted(WAIT.items()))]
    out = subprocess.run([sys.executable, "-c", code], env={**env, SPIN: "1"}, capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[1] == " ".join(f"{k}=None" for k in sorted(WAIT))


def test_the_suite_runs_with_the_same_waits():
    """conftest.py calls calm_threads before anything imports torch (else it would have set nothing): some wait
    is chosen, by the user or by vlcp, unless the user asked for the libraries' defaults."""
    if os.environ.get(SPIN) == "1":
        return
    assert any(os.environ.get(k) for k in USER_CHOICES)
