"""Ctrl-C in `deeplab`: "deeplab: interrupted" and status 130, wherever the interrupt lands.

The interrupt is raised at a controlled point: by a stand-in subcommand registered on the
real group, run the way `python -m deeplab_cli` runs (CPython's `-m` path is the one that
checks its own "unhandled KeyboardInterrupt" flag after the program has exited), and by a
SIGINT sent while the CPU CRF's loops are being compiled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from test_crf_cuda import DEEPLAB, case_inputs

RUNNER = '''
import click

import deeplab_cli.cli as group


@click.command()
@click.argument("where")
def interrupt(where):
    if where == "exec":
        # As when Ctrl-C lands while dataclasses, namedtuple or torch generate code with
        # exec() of source text (it does, during their imports).
        exec("raise KeyboardInterrupt")
    raise KeyboardInterrupt


group.COMMANDS["interrupt"] = "interrupt_runner:interrupt"

if __name__ == "__main__":
    group.main()
'''


@pytest.mark.parametrize("where", ["plain", "exec"])
def test_interrupt_exits_130_under_python_m(tmp_path, where):
    (tmp_path / "interrupt_runner.py").write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(tmp_path)) if p))
    proc = subprocess.run([sys.executable, "-m", "interrupt_runner", "interrupt", where],
                          cwd=tmp_path, env=env, capture_output=True, timeout=60)
    # Without the fix the "exec" case dies by SIGINT (-2) after printing the line.
    assert proc.returncode == 130, (proc.returncode, proc.stderr.decode())
    assert proc.stderr.decode().splitlines() == ["deeplab: interrupted"]


def test_ctrl_c_while_the_cpu_crf_compiles_is_held_until_that_is_done(monkeypatch):
    # numba compiles inside llvmlite callbacks that drop a KeyboardInterrupt raised there (the
    # run then failed later with "no compiled object yet"), so the first run in a process
    # compiles on a tiny image with SIGINT held back, and raises it once that is done.
    from deeplab_cli.crf import cpu

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    images, probs = case_inputs([("chelsea.jpg", 100, 100, 9, 11)], 3, seed=0)
    monkeypatch.setattr(cpu, "_warm", False)
    real, handlers = cpu._mean_field, []

    def mean_field(image, unary, params, kernels, **kw):
        if not handlers:  # the warm-up: Ctrl-C lands in the middle of it
            os.kill(os.getpid(), signal.SIGINT)
        handlers.append(signal.getsignal(signal.SIGINT))
        return real(image, unary, params, kernels, **kw)

    monkeypatch.setattr(cpu, "_mean_field", mean_field)
    with pytest.raises(KeyboardInterrupt):
        cpu.dense_crf_cpu(images[0], probs[0], DEEPLAB)
    # the warm-up ran to its end with the signal held; the real run never started
    assert len(handlers) == 1 and handlers[0] is not signal.default_int_handler and cpu._warm
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # later runs: no warm-up, and Ctrl-C is not held back
    out = cpu.dense_crf_cpu(images[0], probs[0], DEEPLAB)
    assert handlers[1:] == [signal.default_int_handler]
    assert out.shape == probs[0].shape and np.allclose(out.sum(0), 1, atol=1e-5)
