"""The whole pipeline on a GPU agrees with the CPU pipeline (skipped without CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import DATA, load_photo

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def model_and_meta():
    from deeplab_cli.model import build_model
    from deeplab_cli.weights import default_meta

    torch.manual_seed(0)
    model = build_model(21)
    with torch.no_grad():  # livelier class scores, so the masks hold several classes
        for i in range(4):
            getattr(model.base.aspp, f"c{i}").weight.normal_(0, 0.05)
    return model, default_meta(Path("random21.pth"), 21)


@pytest.fixture(scope="module")
def weights_file(model_and_meta, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "random21.pth"
    torch.save(model_and_meta[0].state_dict(), path)
    return path


def segmenters(model_and_meta, **kw):
    import copy

    from deeplab_cli.pipeline import Segmenter

    model, meta = model_and_meta
    cpu = Segmenter(copy.deepcopy(model), meta, device="cpu", **kw)
    gpu = Segmenter(copy.deepcopy(model).cuda(), meta, device="cuda", **kw)
    return cpu, gpu


def test_gpu_probabilities_match_the_cpu(model_and_meta):
    rgb = load_photo("chelsea.jpg")
    cpu, gpu = segmenters(model_and_meta, crf=None, max_size=161)
    p_cpu = cpu.probs(rgb)
    p_gpu = gpu.probs(rgb)
    assert p_gpu.device.type == "cuda" and p_gpu.shape == p_cpu.shape == (21, 300, 451)
    assert float((p_gpu.cpu() - p_cpu).abs().max()) < 1e-3  # fp32 both sides, TF32 off


def test_gpu_pipeline_with_crf_matches_the_cpu(model_and_meta):
    rgb = load_photo("coffee.jpg")
    cpu, gpu = segmenters(model_and_meta, max_size=161)
    a = cpu.segment(rgb).labels
    b = gpu.segment(rgb).labels
    assert a.shape == b.shape == rgb.shape[:2]
    assert len(np.unique(a)) > 1
    assert (a == b).mean() > 0.999


def test_gpu_bf16_is_close_to_fp32(model_and_meta):
    rgb = load_photo("astronaut.jpg")
    _, fp32 = segmenters(model_and_meta, crf=None, max_size=161)
    _, bf16 = segmenters(model_and_meta, crf=None, max_size=161, precision="bf16")
    assert (fp32.segment(rgb).labels == bf16.segment(rgb).labels).mean() > 0.95


def test_cli_segments_a_folder_on_the_gpu(weights_file, tmp_path):
    from deeplab_cli.cli import cli

    out = tmp_path / "masks"
    result = CliRunner().invoke(cli, [
        "segment", str(DATA), "-o", str(out), "--weights", str(weights_file),
        "--device", "cuda", "--max-size", "161", "--json", "--batch-size", "2",
    ])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {line["status"] for line in lines} == {"ok"}
    assert len(lines) == len(list(DATA.glob("*.jpg")))
    for line in lines:
        assert abs(sum(c["fraction"] for c in line["classes"]) - 1) < 1e-6
        assert line["timings"]["crf"] > 0
