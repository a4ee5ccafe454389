"""The network's forward pass in each inference form, against the checkpoint's own form.

Forms: `checkpoint` (the model as loaded: NCHW, batch norms as layers; the baseline),
`folded` (batch norms folded into the convolutions, NCHW) and `folded+nhwc` (folded, weights
and activations channels-last), each with fp32 and, when asked, bf16 autocast (on the CPU
as well: CPUs with AVX512-BF16 or AMX run it natively). All of them run in turn, round after
round, on the same input (a shipped photo at --max-size with MSC), so load on the machine
hits them alike; the table gives the median time, the speedup
over the baseline measured in the same run (the checkpoint form in the first precision
given), and how far each form's logits are from the baseline's: the largest difference
relative to the largest logit, and the share of the coarse logit map whose argmax agrees
(with random weights, whose margins are smaller than a trained network's).

    python benchmarks/network.py [--devices cpu,cuda] [--rounds 3] [--max-size 513]
                                 [--no-msc] [--precisions fp32,bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMS = ("checkpoint", "folded", "folded+nhwc")


def make_forms(model):
    import torch

    from deeplab_cli.model import inference_copy

    return {
        "checkpoint": (model, torch.contiguous_format),
        "folded": (inference_copy(model), torch.contiguous_format),
        "folded+nhwc": (inference_copy(model, channels_last=True), torch.channels_last),
    }


def main() -> None:
    import torch
    import torch.nn.functional as F

    from deeplab_cli.image_io import read_image
    from deeplab_cli.model import build_model, preprocess
    from deeplab_cli.pipeline import network_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default=None, help="comma list (default: cpu, plus cuda if present)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=513)
    parser.add_argument("--no-msc", action="store_true")
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"fp32", "bf16"}:
        parser.error(f"--precisions {args.precisions}: expected a comma list of fp32, bf16")
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rgb = read_image(ROOT / "tests" / "data" / "rocket.jpg")
    h, w = network_size(*rgb.shape[:2], args.max_size)
    print(f"input {w}x{h} (rocket.jpg), msc {not args.no_msc}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {args.rounds} rounds")

    torch.manual_seed(0)
    base = build_model(21)
    gen = torch.Generator().manual_seed(0)
    for name, value in base.state_dict().items():  # statistics a trained network could have
        if name.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=gen))
        elif name.endswith("running_mean") or name.endswith("bn.bias"):
            value.copy_(0.1 * torch.randn(value.shape, generator=gen))

    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        x = preprocess(rgb).to(device)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        forms = make_forms(base.to(device))
        variants = [(precision, name) for precision in precisions for name in FORMS]

        def forward(precision, name):
            model, layout = forms[name]
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.no_grad(), autocast:
                out = model(x.contiguous(memory_format=layout), msc=not args.no_msc)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out.float()

        outs = {v: forward(*v) for v in variants}  # also the warm-up
        times = {v: [] for v in variants}
        for _ in range(args.rounds):  # every variant once a round, so load on the machine hits them alike
            for v in variants:
                t = time.perf_counter()
                forward(*v)
                times[v].append(time.perf_counter() - t)
        base = variants[0]  # the checkpoint form in the first precision (fp32 by default)
        ref, baseline = outs[base], statistics.median(times[base])
        for v in variants:
            med = statistics.median(times[v])
            diff = float((outs[v] - ref).abs().max() / ref.abs().max())
            agree = float((outs[v].argmax(1) == ref.argmax(1)).float().mean())
            rows.append((device_name, *v, 1000 * med, 1000 * min(times[v]), baseline / med, diff, agree))
            print(f"  {device_name} {v[0]} {v[1]}: {1000 * med:.1f} ms", file=sys.stderr, flush=True)

    header = (f"{'device':6} {'prec':5} {'form':12} {'median ms':>10} {'min ms':>10} {'speedup':>8} "
              f"{'max rel diff':>13} {'same argmax':>12}")
    print(header)
    print("-" * len(header))
    for device_name, precision, name, med, low, speedup, diff, agree in rows:
        print(f"{device_name:6} {precision:5} {name:12} {med:10.1f} {low:10.1f} {speedup:7.2f}x {diff:13.1e} "
              f"{100 * agree:11.2f}%")

if __name__ == "__main__":
    main()
