"""The emulated CUDA kernels again, built and run under AddressSanitizer and
UndefinedBehaviorSanitizer.

The plain emulation survives a read outside an array whose value is then weighted by 0, or a
store into memory nobody reads back; on a GPU either can fault or corrupt another buffer.
Here each such access, each float2/float4/int2 access off its 8- or 16-byte alignment (a
fault on the GPU; tests/cuda_emulation.h aligns the vector types as CUDA does) and each undefined
operation (a signed overflow, a shift too far) stops the run. Most of these kernels have run on a GPU only some sessions, some never.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The modules that run kernels through tests/emulation.py (the nvcc build needs no sanitizer).
EMULATED = ("test_crf_cuda.py", "test_crf_edges.py", "test_crf_stencil.py", "test_crf_each.py")


def sanitizer_runtimes() -> list[str]:
    """The compiler's ASan and UBSan runtimes, to preload into Python (skips without them)."""
    cxx = shutil.which("g++")
    if sys.platform != "linux" or cxx is None:
        pytest.skip("sanitized emulation needs g++ on Linux")
    found = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path):  # g++ echoes the bare name when it has no such runtime
            pytest.skip(f"g++ has no {name}")
        found.append(path)
    return found


@pytest.mark.slow
def test_emulated_kernels_are_clean_under_sanitizers(tmp_path):
    env = dict(os.environ, DEEPLAB_EMU_SANITIZE="address,undefined", LD_PRELOAD=" ".join(sanitizer_runtimes()),
               ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    # faulthandler and output capture off, so a bad access ends with ASan's report on stderr;
    # run from tmp_path, so the package imported is the installed one, as in the plain run.
    args = ["-q", "-x", "-s", "-p", "no:faulthandler", "-p", "no:cacheprovider", "-k", "not nvcc",
            *(str(HERE / name) for name in EMULATED)]
    proc = subprocess.run([sys.executable, "-c", "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "AddressSanitizer" not in report and "runtime error" not in report, report
