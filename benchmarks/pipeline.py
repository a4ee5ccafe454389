"""`deeplab segment` throughput: images/s and seconds per stage, without and with the CRF,
on the CPU and (when there is one) on the GPU.

Inputs are the real photos shipped in tests/data (from disk, so decoding is measured);
outputs are encoded as palette PNGs in memory (encoding measured, no disk noise). Each
setting runs twice: a baseline measured in the same run, one image after another on one
thread (decode -> segment -> encode), and the streamed pipeline (`Segmenter.segment_many`:
reader threads decode ahead, a writer thread encodes), so the table shows what the
overlap buys. Weights are random unless --weights is given (speed does not depend on them).

    python benchmarks/pipeline.py [--weights FILE] [--devices cpu,cuda] [--repeat 1]
                                  [--max-size 513] [--no-msc] [--batch-size 1] [--iters 10]
                                  [--precisions fp32,bf16] [--memory-formats contiguous,channels_last]
                                  [--images a.jpg b.jpg ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("decode", "network", "crf", "labels", "encode")


def load(weights: str | None, device):
    """(model, meta) from a weights file, or a randomly initialised 21-class model."""
    from deeplab_cli.model import build_model
    from deeplab_cli.weights import default_meta, load_model

    if weights:
        return load_model(weights, device=device)
    model = build_model(21).to(device)
    return model, default_meta(Path("random-weights"), 21)


def run_sequential(seg, paths: list[Path]) -> tuple[float, list[dict]]:
    """The baseline: decode, segment and encode each image in turn on this thread."""
    from deeplab_cli.image_io import encode_output, read_image

    timings = []
    t0 = time.perf_counter()
    for path in paths:
        t = time.perf_counter()
        image = read_image(path)
        decode = time.perf_counter() - t
        result = seg.segment(image)
        t = time.perf_counter()
        encode_output("palette", labels=result.labels, palette=seg.meta.palette)
        result.timings.update(decode=decode, encode=time.perf_counter() - t)
        timings.append(result.timings)
    return time.perf_counter() - t0, timings


def run_streamed(seg, paths: list[Path], batch_size: int) -> tuple[float, list[dict]]:
    """The pipeline as `deeplab segment` runs it (reader pool, writer thread)."""
    from deeplab_cli.image_io import encode_output

    def encode(item):
        t = time.perf_counter()
        encode_output("palette", labels=item.result.labels, palette=seg.meta.palette)
        item.result.timings["encode"] = time.perf_counter() - t

    timings = []
    t0 = time.perf_counter()
    for item in seg.segment_many(paths, batch_size=batch_size, on_result=encode):
        if item.error is not None:
            raise item.error
        timings.append(item.result.timings)
    return time.perf_counter() - t0, timings


def main() -> None:
    import torch

    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.device import resolve_device
    from deeplab_cli.image_io import read_image
    from deeplab_cli.pipeline import Segmenter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="weights file or registry name (default: random weights)")
    parser.add_argument("--devices", default=None, help="comma list (default: cpu, plus cuda if present)")
    parser.add_argument("--images", nargs="*", type=Path, help="images (default: tests/data/*.jpg)")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the images")
    parser.add_argument("--max-size", type=int, default=513)
    parser.add_argument("--no-msc", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="CRF iterations")
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--memory-formats", default="contiguous", help="comma list of contiguous, channels_last")
    args = parser.parse_args()

    devices = args.devices.split(",") if args.devices else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    paths = args.images or sorted((ROOT / "tests" / "data").glob("*.jpg"))
    paths = [p for _ in range(args.repeat) for p in paths]
    print(f"{len(paths)} images, max-size {args.max_size}, msc {not args.no_msc}, "
          f"batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if "cuda" in devices and torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}")

    header = f"{'device':6} {'prec':5} {'layout':6} {'crf':4} {'mode':10} {'img/s':>7} " + \
        " ".join(f"{s + ' ms':>10}" for s in STAGES) + f" {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for device_name in devices:
        device = resolve_device(device_name)
        model, meta = load(args.weights, device)
        settings = [(precision, layout, crf) for precision in args.precisions.split(",")
                    for layout in args.memory_formats.split(",")
                    for crf in (None, CRFParams(iterations=args.iters))]
        for precision, layout, crf in settings:
            seg = Segmenter(model, meta, device=device, crf=crf, msc=not args.no_msc,
                            max_size=args.max_size, precision=precision, memory_format=layout)
            seg.segment(read_image(paths[0]))  # kernels compiled, cuDNN algorithms chosen
            baseline = None
            for mode, runner in (("sequential", lambda: run_sequential(seg, paths)),
                                 ("streamed", lambda: run_streamed(seg, paths, args.batch_size))):
                wall, timings = runner()
                rate = len(paths) / wall
                stages = " ".join(
                    f"{1000 * statistics.mean(t.get(s, 0.0) for t in timings):10.1f}" for s in STAGES)
                speedup = "" if baseline is None else f"{rate / baseline:7.2f}x"
                baseline = baseline or rate
                print(f"{device_name:6} {precision:5} {layout[:6]:6} {'yes' if crf else 'no':4} {mode:10} {rate:7.2f} "
                      f"{stages} {speedup:>8}")


if __name__ == "__main__":
    main()
