"""Dense CRF speed and memory: our CUDA kernels, our CPU code and pydensecrf on the same inputs.

Inputs are the real photos shipped in tests/data, resized to each size (so say the table), with
21-label probabilities that vary smoothly like an upsampled network output; 10 iterations and
the DeepLab v2 ResNet-101 parameters unless told otherwise.

    python benchmarks/crf.py [--sizes 0.19,1,4] [--repeat 5] [--no-cpu] [--no-pydensecrf] [--breakdown]

--breakdown adds per-kernel GPU times; --ab VARIANT,... times CudaCRF options against each other in one process (see VARIANTS). The
last thing printed is the table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deeplab_cli.crf.params import CRFParams  # noqa: E402

PHOTO_FOR_SIZE = {0.19: "coffee.jpg", 1.0: "rocket.jpg", 4.0: "astronaut.jpg"}
SHAPES = {0.19: (375, 500)}  # 500 x 375, the VOC-sized case


def shape_for(mp_: float) -> tuple[int, int]:
    """(H, W) of about `mp_` megapixels at 4:3, or the VOC size for 0.19."""
    if mp_ in SHAPES:
        return SHAPES[mp_]
    h = int(round((mp_ * 1e6 * 3 / 4) ** 0.5))
    return h, int(round(h * 4 / 3))


def make_inputs(mp_: float, n_labels: int, seed: int = 0,
                photo: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """A resized real photo (H, W, 3) uint8 (`photo`, else the size's own) and smooth
    softmax probabilities (C, H, W)."""
    import cv2
    from PIL import Image

    name = photo or PHOTO_FOR_SIZE.get(mp_, "rocket.jpg")
    h, w = shape_for(mp_)
    with Image.open(ROOT / "tests" / "data" / name) as im:
        photo = np.asarray(im.convert("RGB"))
    image = np.ascontiguousarray(cv2.resize(photo, (w, h), interpolation=cv2.INTER_CUBIC))
    rng = np.random.default_rng(seed)
    coarse = rng.normal(scale=3.0, size=(max(h // 16, 2), max(w // 16, 2), n_labels)).astype(np.float32)
    logits = np.stack([cv2.resize(coarse[..., c], (w, h), interpolation=cv2.INTER_LINEAR) for c in range(n_labels)])
    e = np.exp(logits - logits.max(0, keepdims=True))
    return image, (e / e.sum(0, keepdims=True)).astype(np.float32), name


# ---------------------------------------------------------------------------------------------


def time_gpu(image, probs, params, repeat: int, graph: bool | str, **options) -> dict:
    """Median CUDA-event times (ms) of the lattice build, the iterations and the whole call,
    after a warm-up; peak bytes held by CuPy's memory pool. `graph` as CudaCRF.iterate's.
    `image` and `probs` may be lists: one call on that batch."""
    import cupy as cp

    from deeplab_cli.crf.cuda import CudaCRF

    img = [cp.asarray(x) for x in image] if isinstance(image, list) else [cp.asarray(image)]
    prb = [cp.asarray(x) for x in probs] if isinstance(probs, list) else [cp.asarray(probs)]
    pool = cp.get_default_memory_pool()
    for _ in range(2):  # warm-up: NVRTC compile, module load, pool growth
        CudaCRF(img, prb, params, **options).run(graph=graph)
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    base = pool.total_bytes()
    builds, iters, totals, hosts, host_iters, peak = [], [], [], [], [], 0
    for _ in range(repeat):
        events = [cp.cuda.Event() for _ in range(4)]
        events[0].record()
        t0 = time.perf_counter()
        crf = CudaCRF(img, prb, params, **options)
        crf.prepare()
        hosts.append((time.perf_counter() - t0) * 1e3)  # host time to issue the build (one sync inside)
        events[1].record()
        t0 = time.perf_counter()
        crf.iterate(graph=graph)
        host_iters.append((time.perf_counter() - t0) * 1e3)  # host time to issue the iterations
        events[2].record()
        out = crf.result()
        events[3].record()
        events[3].synchronize()
        builds.append(cp.cuda.get_elapsed_time(events[0], events[1]))
        iters.append(cp.cuda.get_elapsed_time(events[1], events[2]))
        totals.append(cp.cuda.get_elapsed_time(events[0], events[3]))
        peak = max(peak, pool.total_bytes() - base)
        del crf, out
    return {"build": statistics.median(builds), "iters": statistics.median(iters),
            "total": statistics.median(totals), "peak": peak, "labels": None, "host_build": statistics.median(hosts),
            "host_iters": statistics.median(host_iters)}


class _KernelTimer:
    """A CudaCRF backend that wraps each launch in CUDA events, to split time per kernel."""

    def __init__(self, inner) -> None:
        self.inner, self.xp, self.records = inner, inner.xp, []

    def launch(self, name, n, args, width=1, block_rows=0) -> None:
        # rows tell the two lattices apart
        self._timed(f"{name}[{n}]", self.inner.launch, name, n, args, width, block_rows)

    def _timed(self, label, method, *args) -> None:
        import cupy as cp

        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        method(*args)
        end.record()
        self.records.append((label, start, end))

    def to_host(self, array):
        return self.inner.to_host(array)

    def free_bytes(self) -> int:
        return self.inner.free_bytes()

    def summary(self) -> dict[str, tuple[int, float]]:
        import cupy as cp

        cp.cuda.Device().synchronize()
        out: dict[str, tuple[int, float]] = {}
        for name, start, end in self.records:
            count, ms = out.get(name, (0, 0.0))
            out[name] = (count + 1, ms + cp.cuda.get_elapsed_time(start, end))
        return out


def kernel_breakdown(image, probs, params, **options) -> None:
    """Print per-kernel GPU time (summed over launches) of one call, warm."""
    from deeplab_cli.crf import cuda as module
    from deeplab_cli.crf.cuda import CudaCRF

    CudaCRF([image], [probs], params, **options).run()  # warm-up
    timer = _KernelTimer(module.CupyBackend())
    crf = CudaCRF([image], [probs], params, backend=timer, **options)
    crf.run()
    rows = sorted(timer.summary().items(), key=lambda kv: -kv[1][1])
    print(f"  per-kernel time, {image.shape[1]}x{image.shape[0]} (launches, ms): "
          + ", ".join(f"{k} {c}x {ms:.2f}" for k, (c, ms) in rows))
    lat = crf.lattices
    if hasattr(lat, "first"):
        for l, spec in enumerate(lat.specs):
            m = lat.first[l + 1] - lat.first[l]
            print(f"  {spec.name} lattice: {m} vertices ({m / crf.n_pixels:.2f} N)")
        print(f"  {int(lat.n_runs[0])} splat runs over {lat.n_vertices} vertices, {len(timer.records)} launches")


def gpu_labels(image, probs, params) -> np.ndarray:
    import cupy as cp

    from deeplab_cli.crf.cuda import dense_crf_cuda_batch

    return dense_crf_cuda_batch([cp.asarray(image)], [cp.asarray(probs)], params)[0].argmax(0).get()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_worker(kind: str, inputs: str, params: dict, repeat: int, queue) -> None:
    """In a fresh process: time `kind` ('ours' or 'pydensecrf') on the saved inputs and report
    its peak RSS above what it held before the first call."""
    image, probs = np.load(inputs + ".image.npy"), np.load(inputs + ".probs.npy")
    params = CRFParams(**params)
    if kind == "ours":
        from deeplab_cli.crf.cpu import dense_crf_cpu

        dense_crf_cpu(image[:16, :16].copy(), probs[:, :16, :16].copy(), params)  # warm-up (any JIT) untimed
    else:
        import pydensecrf.densecrf as dcrf
    base = _rss()
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        if kind == "ours":
            out = dense_crf_cpu(image, probs, params)
        else:
            c, h, w = probs.shape
            crf = dcrf.DenseCRF2D(w, h, c)
            crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1)))
            norm = dcrf.NORMALIZE_SYMMETRIC if params.normalization == "symmetric" else dcrf.NORMALIZE_AFTER
            crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w, normalization=norm)
            crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=image,
                                     compat=params.bi_w, normalization=norm)
            out = np.asarray(crf.inference(params.iterations)).reshape(c, h, w)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put({"time": statistics.median(times), "peak": peak, "labels": np.asarray(out).argmax(0).astype(np.uint8)})


def time_cpu(kind: str, image, probs, params: CRFParams, repeat: int) -> dict | None:
    import tempfile

    tmp = tempfile.mkdtemp(prefix="crf-bench-")
    inputs = os.path.join(tmp, "in")
    np.save(inputs + ".image.npy", image)
    np.save(inputs + ".probs.npy", probs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_worker, args=(kind, inputs, params.to_dict(), repeat, queue))
    proc.start()
    try:
        result = queue.get(timeout=3600)
    except Exception:
        result = None
    proc.join()
    for suffix in (".image.npy", ".probs.npy"):
        os.unlink(inputs + suffix)
    os.rmdir(tmp)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.19,1,4", help="megapixels, comma separated (default 0.19,1,4)")
    ap.add_argument("--repeat", type=int, default=5, help="timed GPU runs per size (median); CPU runs use fewer")
    ap.add_argument("--labels", type=int, default=21)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-cpu", action="store_true", help="skip our CPU code")
    ap.add_argument("--no-pydensecrf", action="store_true", help="skip pydensecrf")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also print per-kernel GPU times")
    ap.add_argument("--batch", type=int, default=8,
                    help="also time one GPU call on this many photos of each size (per-image time; 1 = skip)")
    ap.add_argument("--ab", default="", help="A/B: comma-separated variants from " + ",".join(VARIANTS))
    args = ap.parse_args()
    if args.ab:
        ab(args, [v for v in args.ab.split(",") if v])
        return
    params = CRFParams(iterations=args.iters)
    sizes = [float(s) for s in args.sizes.split(",")]

    have_gpu = False
    if not args.no_gpu:
        from deeplab_cli.device import cupy_available

        have_gpu = cupy_available()
    have_pyd = False
    if not args.no_pydensecrf:
        try:
            import pydensecrf.densecrf  # noqa: F401

            have_pyd = True
        except ImportError:
            print("pydensecrf not importable: its columns stay empty", file=sys.stderr)

    header = (f"dense CRF, {args.labels} labels, {args.iters} iterations, w2={params.pos_w} "
              f"sg={params.pos_xy_std} w1={params.bi_w} sa={params.bi_xy_std} sb={params.bi_rgb_std}, "
              f"{params.normalization} normalization")
    print(header)
    print("inputs: real photos from tests/data resized to each size (cv2 INTER_CUBIC), "
          "smooth random 21-label softmax maps")
    if have_gpu:
        import cupy as cp

        print(f"GPU: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}, "
              f"CUDA events, median of {args.repeat} after 2 warm-ups; peak = CuPy pool growth")
    import numba

    print(f"CPU: {os.cpu_count()} cores, our CPU code on {numba.get_num_threads()} numba threads "
          "(NUMBA_NUM_THREADS); "
          "pydensecrf single-threaded; peak = max RSS growth of a fresh process")
    rows = []
    for mp_ in sizes:
        image, probs, photo = make_inputs(mp_, args.labels)
        h, w = image.shape[:2]
        row = {"size": f"{w}x{h}", "mp": h * w / 1e6, "photo": photo}
        if have_gpu:
            options = {}
            row["gpu"] = time_gpu(image, probs, params, args.repeat, graph=False, **options)
            row["gpu_graph"] = time_gpu(image, probs, params, args.repeat, graph="iteration", **options)
            row["gpu_labels"] = gpu_labels(image, probs, params)
            if args.batch > 1:  # the shipped photos in turn at this size, each with its own probabilities
                photos = sorted(p.name for p in (ROOT / "tests" / "data").glob("*.jpg"))
                batch = [make_inputs(mp_, args.labels, seed=i, photo=photos[i % len(photos)])
                         for i in range(args.batch)]
                timed = time_gpu([b[0] for b in batch], [b[1] for b in batch], params, args.repeat,
                                 graph="iteration", **options)
                row["gpu_batch"] = timed["total"] / args.batch
            if args.breakdown:
                import cupy as cp

                kernel_breakdown(cp.asarray(image), cp.asarray(probs), params, **options)
        cpu_repeat = max(1, min(args.repeat, 3 if mp_ < 0.5 else 1))
        if not args.no_cpu:
            row["cpu"] = time_cpu("ours", image, probs, params, cpu_repeat)
        if have_pyd:
            row["pyd"] = time_cpu("pydensecrf", image, probs, params, cpu_repeat)
        rows.append(row)
        print_row(row, flush=True)
        print_table(rows, file=sys.stderr)  # so far, in case a later size does not finish
    print()
    print_table(rows)


VARIANTS = {  # CudaCRF options for --ab
    "default": {},
    # the Gaussian lattice's neighbours by indexing its cell grid instead of binary search
    "grid": {"gauss_grid": True},
    # one blur pass a launch instead of two
    "single": {"pair_blur": False},
    # vertices numbered by the key's colour coordinates first instead of by image and spatial tile
    "key-order": {"spatial_order": False},
    # before either: key order, one pass a launch
    "plain": {"spatial_order": False, "pair_blur": False},
    # the Gaussian kernel as per-pixel stencil rows over the previous Q (equal up to rounding)
    "stencil": {"gauss_stencil": True},
    # the stencil's slice with one pixel a lane group, or a strip of 4, instead of 2 (the same result)
    "stencil-k1": {"gauss_stencil": True, "stencil_strip": 1},
    "stencil-k4": {"gauss_stencil": True, "stencil_strip": 4},
    # the slice's lane groups one to each power-of-two slice of a warp, not side by side (the same result)
    "unpacked": {"pack_lanes": False},
    "stencil-unpacked": {"gauss_stencil": True, "pack_lanes": False},
    # the keys argsorted (8-byte keys and indices) instead of slotted keys sorted in place (the same result)
    "argsort": {"slot_keys": False},
    "run8": {"run_min": 8},
    "run64": {"run_min": 64},
}


def ab(args, names: list[str]) -> None:
    """Time CudaCRF variants on the same inputs in one process; check each against the first."""
    import cupy as cp

    from deeplab_cli.crf.cuda import CudaCRF

    params = CRFParams(iterations=args.iters)
    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)['name'].decode()}")
    lines = []
    for mp_ in [float(s) for s in args.sizes.split(",")]:
        image, probs, _ = make_inputs(mp_, args.labels)
        img, prb = cp.asarray(image), cp.asarray(probs)
        ref = None
        for name in names:
            options = dict(VARIANTS[name])
            out = CudaCRF([img], [prb], params, **options).run()[0].get()
            again = CudaCRF([img], [prb], params, **options).run(graph=True)[0].get()
            diff, agree = 0.0, 100.0
            if ref is None:
                ref = out
            else:
                diff = float(np.abs(out - ref).max())
                agree = float((out.argmax(0) == ref.argmax(0)).mean()) * 100
            options = dict(VARIANTS[name])
            plain = time_gpu(image, probs, params, args.repeat, graph=False, **dict(options))
            graph = time_gpu(image, probs, params, args.repeat, graph="iteration", **dict(options))
            whole = time_gpu(image, probs, params, args.repeat, graph="all", **dict(options))
            lines.append(f"{image.shape[1]}x{image.shape[0]} {name:6s} build {plain['build']:7.2f} "
                         f"(host {plain['host_build']:6.2f}) iters {plain['iters']:7.2f} "
                         f"(host {plain['host_iters']:5.2f}) total {plain['total']:7.2f} "
                         f"| graph of one iteration: iters {graph['iters']:7.2f} (host {graph['host_iters']:5.2f}) "
                         f"total {graph['total']:7.2f} | of all: iters {whole['iters']:7.2f} | peak "
                         f"{plain['peak'] / 2**20:6.0f} MiB | vs {names[0]}: max diff {diff:.1e} argmax "
                         f"{agree:.4f}% | deterministic {np.array_equal(out, again)}")
            print(lines[-1], flush=True)
            if args.breakdown:
                kernel_breakdown(img, prb, params, **dict(options))
    print()
    print("\n".join(lines))


def _fmt(x, spec, missing="-"):
    return missing if x is None else format(x, spec)


def print_row(row, flush=False):
    print(f"  done {row['size']} ({row['photo']})", flush=flush, file=sys.stderr)


def print_table(rows, file=None) -> None:
    cols = ["size", "MP", "GPU build ms", "GPU iters ms", "GPU total ms", "GPU graph ms", "GPU batch ms/img",
            "GPU peak MiB",
            "CPU s", "CPU peak MiB", "pydensecrf s", "pyd peak MiB", "pyd/GPU", "CPU/pyd", "GPU=pyd argmax"]
    lines = []
    for r in rows:
        g, gg, c, p = r.get("gpu"), r.get("gpu_graph"), r.get("cpu"), r.get("pyd")
        agree = None
        if p is not None and r.get("gpu_labels") is not None:
            agree = float((r["gpu_labels"] == p["labels"]).mean()) * 100
        best_gpu = min(g["total"], gg["total"]) if g and gg else None
        lines.append([
            r["size"], f"{r['mp']:.2f}",
            _fmt(g and g["build"], ".2f"), _fmt(g and g["iters"], ".2f"), _fmt(g and g["total"], ".2f"),
            _fmt(gg and gg["total"], ".2f"), _fmt(r.get("gpu_batch"), ".2f"), _fmt(g and g["peak"] / 2**20, ".0f"),
            _fmt(c and c["time"], ".2f"), _fmt(c and c["peak"] / 2**20, ".0f"),
            _fmt(p and p["time"], ".2f"), _fmt(p and p["peak"] / 2**20, ".0f"),
            _fmt(p and best_gpu and p["time"] * 1000 / best_gpu, ".0f"),
            _fmt(c and p and c["time"] / p["time"], ".2f"),
            _fmt(agree, ".3f"),
        ])
    widths = [max(len(col), *(len(line[i]) for line in lines)) for i, col in enumerate(cols)]
    print(" | ".join(col.rjust(wd) for col, wd in zip(cols, widths)), file=file)
    print("-+-".join("-" * wd for wd in widths), file=file)
    for line in lines:
        print(" | ".join(v.rjust(wd) for v, wd in zip(line, widths)), file=file, flush=True)


if __name__ == "__main__":
    main()
