"""Ctrl-C in `deeplab`: "deeplab: interrupted" and status 130, wherever the interrupt lands.

The interrupt is raised at a controlled point: by a stand-in subcommand registered on the
real group, run the way `python -m deeplab_cli` runs (CPython's `-m` path is the one that
checks its own "unhandled KeyboardInterrupt" flag after the program has exited), and by a
SIGINT sent while the CPU CRF's loops are being compiled.
"""

from __future__ import annotations

import json
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
    # the warm-up ran to its end with the signal held (all its runs); the real run never started
    warm_up_runs = len(handlers)
    assert warm_up_runs >= 1 and cpu._warm
    assert all(h is not signal.default_int_handler for h in handlers)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # later runs: no warm-up, and Ctrl-C is not held back
    out = cpu.dense_crf_cpu(images[0], probs[0], DEEPLAB)
    assert handlers[warm_up_runs:] == [signal.default_int_handler]
    assert out.shape == probs[0].shape and np.allclose(out.sum(0), 1, atol=1e-5)


WARM_UP_COVERAGE = '''
import json

import numba
import numpy as np

from deeplab_cli.crf import CRFParams, cpu

def compiled():
    return {name: len(f.signatures) for name, f in vars(cpu).items()
            if isinstance(f, numba.core.registry.CPUDispatcher)}

rng = np.random.default_rng(1)
image = rng.integers(0, 256, (40, 57, 3), dtype=np.uint8)
probs = rng.random((21, 40, 57), dtype=np.float32) + np.float32(0.01)
probs /= probs.sum(axis=0)
cpu._warm_up()
after_warm_up = compiled()
tiny = CRFParams(bi_xy_std=1, bi_rgb_std=0.05)
for threads in (1, 2):
    cpu.dense_crf_cpu(image, probs, CRFParams(), threads=threads)
    cpu.dense_crf_cpu(image, probs[:2] / probs[:2].sum(axis=0), CRFParams(normalization="after"),
                      threads=threads)
    list(cpu.dense_crf_cpu_each(image, probs, [CRFParams(), tiny, CRFParams(bi_w=5)], threads=threads))
wide = cpu._vertex_coding(cpu.bilateral_features(image, tiny), cpu.scale_factors(5))[0].shape[0]
print(json.dumps({"warm_up": after_warm_up, "after": compiled(), "wide": wide}))
'''


def test_the_warm_up_compiles_every_loop_a_run_uses():
    # What the warm-up leaves out compiles later, where a Ctrl-C is lost again: so after it,
    # runs on one thread (the blur sweeps) and on two, with 2 and 21 labels, both
    # normalizations, several settings and tiny σ (codes of two words) compile nothing.
    proc = subprocess.run([sys.executable, "-c", WARM_UP_COVERAGE], capture_output=True,
                          timeout=600, env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    seen = json.loads(proc.stdout)
    assert seen["wide"] > 1  # the tiny-σ setting did take the wide-code build
    assert seen["after"] == seen["warm_up"]
