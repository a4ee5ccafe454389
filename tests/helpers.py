"""Helpers shared by several test modules: random checkpoints, a loopback HTTP server, a tiny
VOC-layout dataset, damaged TIFFs, the check that a command failed with one line, and
hand-made temporary names of killed writers."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import struct
import subprocess
import sys
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_cli.labels import palette_for
from deeplab_cli.model import build_model

N_CLASSES = 3

# Two images with known labels and predictions (255 = ignore).
LABELS = {
    "a": np.array([[0, 0, 0, 1, 1],
                   [0, 0, 1, 1, 1],
                   [255, 255, 2, 2, 2]], dtype=np.uint8),
    "b": np.array([[2, 2, 0],
                   [2, 255, 0]], dtype=np.uint8),
}


def random_state(n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A full state dict with every tensor random (BN statistics included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = build_model(n_classes).state_dict()
    # One draw for everything is several times faster than one per tensor.
    flat = torch.randn(sum(v.numel() for v in shapes.values()), generator=gen) * 0.05
    state, offset = {}, 0
    for key, meta in shapes.items():
        chunk = flat[offset:offset + meta.numel()].view(meta.shape).clone()
        offset += meta.numel()
        if key.endswith("num_batches_tracked"):
            chunk = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            chunk = 0.5 + chunk.abs() * 20
        state[key] = chunk
    return state


class Server:
    """A loopback HTTP server: serves `files` by name; `mode` can break the transfer
    ("404", "truncate", or "loop": every request redirected to itself)."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.mode = "ok"
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                if server.mode == "loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.files.get(self.path.lstrip("/"))
                if path is None or server.mode == "404":
                    self.send_error(404, "Not Found")
                    return
                size = path.stat().st_size
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                with open(path, "rb") as fh:
                    if server.mode == "truncate":
                        self.wfile.write(fh.read(size // 2))
                        self.close_connection = True
                    else:
                        shutil.copyfileobj(fh, self.wfile)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [c for rgb in palette_for(256) for c in rgb]
    im.putpalette(flat)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_voc(root: Path, labels: dict[str, np.ndarray], *, split: str = "val") -> Path:
    """A VOC-layout folder: a JPEG per label map (same size), palette PNGs, a split file."""
    rng = np.random.default_rng(1)
    for name, lab in labels.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        rgb = rng.integers(0, 256, (*lab.shape, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        write_palette_png(root / "SegmentationClass" / f"{name}.png", lab)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in labels))
    return root


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    """`im` saved as `fmt` (PIL's save options `kw`), in memory."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def damaged_tiffs() -> dict[str, bytes]:
    """Two broken TIFFs whose decoders talk on their own: "lzw.tif", LZW codes overwritten
    with noise (libtiff prints its decode error to stderr from C), and "samples.tif", a
    SamplesPerPixel of 25859 (PIL logs an error before refusing the header)."""
    rng = np.random.default_rng(3)
    pixels = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    lzw = bytearray(encode(pixels, "TIFF", compression="tiff_lzw"))
    lzw[40:400] = rng.integers(0, 256, 360, dtype=np.uint8).tobytes()  # the strip follows the 8-byte header
    plain = bytearray(encode(pixels, "TIFF"))
    entry = struct.pack("<HHI", 277, 3, 1)  # tag SamplesPerPixel, type SHORT, count 1, then the value
    at = plain.index(entry) + len(entry)
    plain[at:at + 2] = struct.pack("<H", 25859)
    return {"lzw.tif": bytes(lzw), "samples.tif": bytes(plain)}


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # Progress notes ("deeplab: ...") may come first; the error is one last line.
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert all(line.startswith("deeplab: ") for line in lines[:-1]), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# Temporary names of deeplab_cli.fsutil, written by hand (independent of fsutil).
def host_tag_for(hostname: str, pid_namespace: int | None) -> str:
    """The writer tag of a host name and pid namespace inode (None: no /proc)."""
    ident = hostname if pid_namespace is None else f"{hostname}\0pid:{pid_namespace}"
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


def own_pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


HOST = host_tag_for(socket.gethostname(), own_pid_namespace())  # this process's tag
OTHER_HOST = ("0" if HOST[0] != "0" else "1") + HOST[1:]


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):  # not yet reused by another process
        os.kill(proc.pid, 0)
    return proc.pid


def temp_name(target: str, pid: int, host: str = HOST, rand: str = "ab_cd123") -> str:
    """A temporary name in the current format, written by hand (independent of fsutil)."""
    return f".{target}.dl-{pid:x}-{host}-{rand}.part"


class Evil:
    """A pickled Evil would, when unpickled, run a shell command creating `flag`: what a
    malicious checkpoint does. Tests check that `flag` never appears."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))
