"""`deeplab tune-crf` wall time for the paper's protocol size: 100 settings x 100 images.

Builds a synthetic PASCAL-VOC layout of 100 images of 500x375 cut from the real photos in
tests/data (labels are coarse colour classes: the timing does not depend on them), saves
randomly initialised 21-class weights, and times the real CLI end to end. The baseline
measured in the same run is one setting (the weights' defaults) over the same images, so
the table shows what each extra setting costs.

With --each it times the CRF part alone on one photo instead: every setting of the grid
run one at a time through `dense_crf` (the baseline, measured in the same run) against one
`dense_crf_each` call, which builds each lattice once for the settings that share it, and
checks that both give the same results bit for bit.

    python benchmarks/tune_crf.py [--device cuda] [--images 100] [--grid 1|16|100]
    python benchmarks/tune_crf.py --each [--device cuda] [--grid 100] [--size 500x375] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Inclusive ranges giving 4 x 5 x 5 = 100 settings, and a 1-setting baseline.
GRIDS = {
    100: ("3:6:1", "30:70:10", "3:7:1"),
    16: ("3:6:1", "40,80", "3,5"),
    1: ("4", "67", "3"),
}


def make_voc(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    from deeplab_cli.labels import palette_for

    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(p).convert("RGB").resize((640, 480)))
              for p in sorted((ROOT / "tests" / "data").glob("*.jpg"))]
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = [c for rgb in palette_for(256) for c in rgb]
    names = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, 480 - 375), rng.integers(0, 640 - 500)
        crop = np.ascontiguousarray(photo[top:top + 375, left:left + 500])
        if i % 2:
            crop = np.ascontiguousarray(crop[:, ::-1])
        name = f"img{i:04d}"
        Image.fromarray(crop).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        label = (crop.mean(axis=2) // 13).astype(np.uint8).clip(0, 20)
        label[:3] = 255  # a strip of "ignore", as VOC borders
        im = Image.fromarray(label, mode="P")
        im.putpalette(palette)
        im.save(root / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")


def compare_each(device: str, n_settings: int, size: tuple[int, int], repeat: int) -> None:
    import statistics

    import torch

    from deeplab_cli.crf import CRFParams, dense_crf, dense_crf_each
    from deeplab_cli.image_io import read_image
    from deeplab_cli.tune import build_grid, parse_values

    width, height = size
    rgb = read_image(ROOT / "tests" / "data" / "coffee.jpg")
    rgb = torch.nn.functional.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), size=(height, width),
                                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    image = rgb.round().clamp(0, 255).to(torch.uint8).contiguous()
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn((1, 21, height // 8 + 1, width // 8 + 1), generator=gen)
    probs = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                            align_corners=False).softmax(1)[0]
    image, probs = image.to(device), probs.to(device)
    bi_w, bi_xy, bi_rgb = (parse_values(v) for v in GRIDS[n_settings])
    grid = build_grid(CRFParams(), bi_w=bi_w, bi_xy_std=bi_xy, bi_rgb_std=bi_rgb)

    def sync():
        if probs.is_cuda:
            torch.cuda.synchronize(probs.device)

    def one_at_a_time():
        return [dense_crf(image, probs, p).argmax(0) for p in grid]

    def each():
        labels = [None] * len(grid)
        for i, out in dense_crf_each(image, probs, grid):
            labels[i] = out.argmax(0)
        return labels

    times = {"one at a time": [], "dense_crf_each": []}
    results = {}
    for _ in range(repeat):
        for name, run in (("one at a time", one_at_a_time), ("dense_crf_each", each)):
            sync()
            t = time.perf_counter()
            results[name] = run()
            sync()
            times[name].append(time.perf_counter() - t)
    same = all(torch.equal(a, b) for a, b in zip(results["one at a time"], results["dense_crf_each"]))
    lattices = len({(p.bi_xy_std, p.bi_rgb_std) for p in grid})
    print(f"{width}x{height}, 21 labels, {len(grid)} settings ({lattices} bilateral lattices), device {device}, "
          f"torch {torch.__version__}, median of {repeat}")
    print(f"{'mode':16} {'s':>8} {'ms / setting':>13} {'speedup':>8} {'same labels':>12}")
    base = statistics.median(times["one at a time"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:16} {med:8.2f} {1000 * med / len(grid):13.1f} {base / med:7.2f}x {str(same):>12}")


def main() -> None:
    import torch
    from click.testing import CliRunner

    from deeplab_cli.cli import cli
    from deeplab_cli.model import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--grid", type=int, choices=sorted(GRIDS), default=100,
                        help="settings in the timed grid")
    parser.add_argument("--no-msc", action="store_true")
    parser.add_argument("--each", action="store_true", help="time dense_crf_each against one setting at a time")
    parser.add_argument("--size", default="500x375", help="with --each: WIDTHxHEIGHT of the photo")
    parser.add_argument("--repeat", type=int, default=3, help="with --each: rounds (the median is shown)")
    args = parser.parse_args()
    if args.each:
        width, height = (int(v) for v in args.size.lower().split("x"))
        compare_each(args.device, args.grid, (width, height), args.repeat)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_voc(tmp / "VOC", args.images)
        torch.manual_seed(0)
        weights = tmp / "random21.pth"
        torch.save(build_model(21).state_dict(), weights)

        print(f"{args.images} images of 500x375, device {args.device}, torch {torch.__version__}")
        print(f"{'settings':>8} {'wall s':>8} {'s / setting':>12}")
        for n_settings in sorted({1, args.grid}):
            bi_w, bi_xy, bi_rgb = GRIDS[n_settings]
            argv = ["tune-crf", "--root", str(tmp / "VOC"), "--split", "val",
                    "--limit", str(args.images), "--weights", str(weights),
                    "--device", args.device, "--bi-w", bi_w, "--bi-xy-std", bi_xy,
                    "--bi-rgb-std", bi_rgb, "-o", str(tmp / f"preset{n_settings}.json")]
            if args.no_msc:
                argv.append("--no-msc")
            t0 = time.perf_counter()
            result = CliRunner().invoke(cli, argv)
            wall = time.perf_counter() - t0
            if result.exit_code != 0:
                raise SystemExit(f"tune-crf failed: {result.output}")
            print(f"{n_settings:8d} {wall:8.1f} {wall / n_settings:12.3f}")


if __name__ == "__main__":
    main()
