"""The CUDA kernels built for the CPU with g++ against tests/cuda_emulation.h, and a CudaCRF
backend that runs them on NumPy arrays: how the tests check the GPU code without a GPU."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from deeplab_cli.crf import cuda


def build_emulated(directory: Path) -> "EmulatedBackend":
    """Compile every kernel file into `directory`/kernels.so and wrap it (skips the test
    when there is no C++ compiler)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernels for the CPU")
    target = Path(directory) / "kernels.so"
    sources = [str(cuda.kernel_dir() / name) for name in cuda.KERNEL_FILES]
    header = Path(__file__).parent / "cuda_emulation.h"
    # DEEPLAB_EMU_SANITIZE: -fsanitize's list (address,undefined or thread), with its runtimes preloaded.
    checks = os.environ.get("DEEPLAB_EMU_SANITIZE")
    sanitize = [f"-fsanitize={checks}", "-fno-sanitize-recover=all", "-g"] if checks else []
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared", *sanitize, "-include",
                    str(header), "-x", "c++", *sources, "-o", str(target)], check=True, capture_output=True)
    return EmulatedBackend(ctypes.CDLL(str(target)))


class EmulatedBackend:
    """CudaCRF's backend interface over NumPy arrays and the kernels compiled for the host.

    With `lanes`, a launch of `width` lanes per row runs as min(width, 32) host threads, one per
    lane, whose warp shuffles meet at a barrier (tests/cuda_emulation.h); else one lane walks all.
    With `warp` too, a launch of fewer than 32 lanes a row runs 32 / width rows of them, a whole
    warp, as on the GPU (its shuffles then name lanes across rows).
    With `rows`, a launch that names its rows per block (block_rows, a kernel with shared memory
    and barriers) runs min(block_rows, rows) host threads, one per row, as one block.
    """

    xp = np

    def __init__(self, library: ctypes.CDLL, free: int = 1 << 40, lanes: bool = False, rows: int = 0,
                 warp: bool = False) -> None:
        self.library = library
        self.free = free
        self.lanes = lanes
        self.warp = warp
        self.rows = rows
        self.captures, self.replays = [], 0  # launches per captured graph, graphs replayed
        self.recording = None  # the launches being captured, if any

    def launch(self, name, n, args, width=1, block_rows=0):
        if self.recording is not None:
            self.recording.append((name, n, args, width, block_rows))
            return
        if n <= 0:
            return
        converted = []
        for a in args:
            if a is None:
                converted.append(ctypes.c_void_p(None))
            elif isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, name
                converted.append(ctypes.c_void_p(a.ctypes.data))
            else:
                kind = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float,
                        np.uint64: ctypes.c_uint64}[type(a)]
                converted.append(kind(a))
        kernel = getattr(self.library, name)
        lanes = min(width, 32) if self.lanes else 1
        rows = min(block_rows, self.rows) if block_rows and self.rows else 1
        if self.warp and lanes > 1 and not block_rows:
            rows = 32 // lanes
        assert lanes == 1 or lanes * rows <= 32, "shuffles are emulated within one warp"
        self.library.emu_set_lanes(lanes)
        self.library.emu_set_rows(rows)
        if lanes == 1 and rows == 1:
            self.library.emu_enter_lane(0)
            self.library.emu_enter_row(0)
            kernel(*converted)
            return

        def thread(i):
            self.library.emu_enter_lane(i % lanes)
            self.library.emu_enter_row(i // lanes)
            kernel(*converted)  # ctypes lets go of the GIL: the threads run at once

        threads = [threading.Thread(target=thread, args=(i,)) for i in range(lanes * rows)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not self.library.emu_shuffle_failed(), f"{name}: a shuffle or barrier that not every thread reached"

    def capture(self, work):
        """Like stream capture: the launches `work()` makes are recorded, not run."""
        self.recording = []
        try:
            work()
            recorded = self.recording
        finally:
            self.recording = None
        self.captures.append(len(recorded))
        return recorded

    def replay(self, recorded):
        self.replays += 1
        for launch in recorded:
            self.launch(*launch)

    def to_host(self, array):
        return np.asarray(array)

    def free_bytes(self):
        return self.free
