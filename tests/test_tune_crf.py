"""`deeplab tune-crf`: grid parsing, the search itself, the probability cache, the preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from deeplab_cli import tune
from deeplab_cli.cli import cli
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError

from helpers import LABELS, N_CLASSES, assert_one_line_error, write_voc


def test_parse_values():
    assert tune.parse_values("3,4,5") == [3, 4, 5]
    assert tune.parse_values("50:80:10") == [50, 60, 70, 80]  # stop is inclusive
    assert tune.parse_values("3, 50:60:10, 3") == [3, 50, 60]  # duplicates dropped
    assert tune.parse_values("0.1:0.3:0.1") == [0.1, 0.2, 0.3]  # no float drift
    assert tune.parse_values("5:5:1") == [5]
    for bad in ("", "a", "1:2", "5:1:1", "1:5:0", "1:5:-1", "inf"):
        with pytest.raises(DeeplabError, match="--bi-w"):
            tune.parse_values(bad, option="--bi-w")


def test_build_grid_keeps_fixed_parameters():
    base = CRFParams(pos_w=2, pos_xy_std=3, iterations=4, normalization="after")
    grid = tune.build_grid(base, bi_w=[3, 4], bi_xy_std=[50], bi_rgb_std=[3, 5, 7])
    assert len(grid) == 6
    assert {(p.bi_w, p.bi_rgb_std) for p in grid} == {(w, s) for w in (3, 4) for s in (3, 5, 7)}
    assert all((p.pos_w, p.pos_xy_std, p.iterations, p.normalization) == (2, 3, 4, "after")
               for p in grid)
    with pytest.raises(DeeplabError, match="bi_rgb_std"):
        tune.build_grid(base, bi_w=[3], bi_xy_std=[50], bi_rgb_std=[0])
    default = {k: tune.parse_values(v) for k, v in tune.DEFAULT_GRID.items()}
    assert len(tune.build_grid(base, **default)) <= 128  # the paper's grid at most


# A fake CRF makes the search's bookkeeping checkable exactly.


def _items(n=3, size=(5, 7), seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = rng.integers(0, 3, size).astype(np.uint8)
        label[0, 0] = 255
        rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        items.append(tune.TuneItem(f"img{i}", rgb, label, key=f"img{i}"))
    return items


def _noisy_probs(label, seed):
    """Probabilities whose argmax is right on about half the pixels."""
    rng = np.random.default_rng(seed)
    probs = rng.random((3, *label.shape)).astype(np.float32)
    truth = np.where(label == 255, 0, label)
    keep = rng.random(label.shape) < 0.5
    np.put_along_axis(probs, truth[None], np.where(keep, 2.0, 0.0)[None].astype(np.float32), 0)
    return probs / probs.sum(0, keepdims=True)


def test_search_bookkeeping_with_an_injected_crf():
    items = _items()
    truth_by_image = {it.rgb.tobytes(): it.label for it in items}
    target = CRFParams(bi_w=5, bi_xy_std=60, bi_rgb_std=4)
    grid = tune.build_grid(CRFParams(), bi_w=[4, 5], bi_xy_std=[60, 80], bi_rgb_std=[3, 4])
    calls = {"probs": 0, "crf": 0, "params_for": 0}

    def probs_fn(rgb):
        calls["probs"] += 1
        return _noisy_probs(truth_by_image[rgb.tobytes()], seed=int(rgb[0, 0, 0]))

    def crf_fn(image, probs, params):
        calls["crf"] += 1
        if params == target:  # only this setting "recovers" the ground truth
            label = truth_by_image[image.tobytes()]
            return np.eye(3, dtype=np.float32)[np.where(label == 255, 0, label)].transpose(2, 0, 1)
        return probs

    def params_for(rgb, params):
        calls["params_for"] += 1
        return params

    result = tune.tune_crf(items, grid, n_classes=3, probs_fn=probs_fn, crf_fn=crf_fn,
                           params_for=params_for)
    assert calls == {"probs": 3, "crf": 3 * 8, "params_for": 3 * 8}
    assert result.images == 3
    assert result.best == target and result.best_score == 1.0
    baseline = result.baseline.mean_iou()
    assert 0.2 < baseline < 0.9
    for params, score in zip(grid, result.scores()):
        assert score == (1.0 if params == target else pytest.approx(baseline))
    table = result.format_table()
    assert table.splitlines()[1].split()[:3] == ["5", "60", "4"]  # best first
    assert "no CRF" in table


def test_cache_computes_each_image_once_across_runs(tmp_path):
    items = _items(n=2)
    grid = [CRFParams(bi_w=3), CRFParams(bi_w=6)]
    calls = []

    def probs_fn(rgb):
        calls.append(1)
        return _noisy_probs(items[0].label if rgb is items[0].rgb else items[1].label, seed=len(calls))

    identity = lambda image, probs, params: probs  # noqa: E731
    cache = tune.ProbsCache(tmp_path / "cache", tune.fingerprint("w", 1))
    first = tune.tune_crf(items, grid, n_classes=3, probs_fn=probs_fn, crf_fn=identity, cache=cache)
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.npy")) == ["img0.npy", "img1.npy"]
    assert np.load(next((tmp_path / "cache").rglob("img0.npy"))).dtype == np.float16
    second = tune.tune_crf(items, grid, n_classes=3, probs_fn=probs_fn, crf_fn=identity, cache=cache)
    assert len(calls) == 2  # served from the cache
    # The first run scored the float16-rounded probabilities too: identical results.
    np.testing.assert_array_equal(first.baseline.matrix, second.baseline.matrix)
    # Another fingerprint (other weights) does not see these entries.
    other = tune.ProbsCache(tmp_path / "cache", tune.fingerprint("w", 2))
    tune.tune_crf(items, grid, n_classes=3, probs_fn=probs_fn, crf_fn=identity, cache=other)
    assert len(calls) == 4


def test_preset_round_trip(tmp_path):
    items = _items(n=1)
    grid = [CRFParams(bi_w=3, bi_xy_std=50), CRFParams(bi_w=4, bi_xy_std=70)]
    result = tune.tune_crf(items, grid, n_classes=3,
                           probs_fn=lambda rgb: _noisy_probs(items[0].label, 1),
                           crf_fn=lambda image, probs, params: probs)
    path = tmp_path / "preset.json"
    tune.write_preset(path, result, source="unit test")
    data = json.loads(path.read_text())
    assert data["metric"] == "miou" and data["source"] == "unit test"
    assert data["score"] == pytest.approx(result.best_score)
    assert CRFParams.from_json_file(path) == grid[0]  # a tie goes to the first setting
    assert not list(tmp_path.glob(".*.part"))


# The real CRF: a case built so that exactly one setting of the grid recovers the truth.


def _two_colour_case():
    """Left half red (class 0), right half blue (class 1); each half holds a 9x9 patch
    the network got wrong. Only a bilateral kernel that is strong (w1 = 10), wide
    (sigma_alpha = 30, reaching across the patch) and colour-selective (sigma_beta = 3,
    so the other half does not vote) fixes both patches in one iteration."""
    h, w = 26, 30
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 30, 30)
    rgb[:, w // 2:] = (30, 30, 200)
    label = np.zeros((h, w), np.uint8)
    label[:, w // 2:] = 1
    label[0, :3] = 255
    p1 = np.where(label == 1, 0.7, 0.3).astype(np.float32)
    p1[2:11, 2:11] = 0.6
    p1[14:23, 18:27] = 0.4
    return rgb, label, np.stack([1 - p1, p1])  # (2, H, W)


def test_known_best_setting_with_the_real_crf():
    rgb, label, probs = _two_colour_case()
    base = CRFParams(pos_w=0, iterations=1)
    grid = tune.build_grid(base, bi_w=[0, 10], bi_xy_std=[3, 30], bi_rgb_std=[3, 1000])
    result = tune.tune_crf([tune.TuneItem("two", rgb, label)], grid, n_classes=2,
                           probs_fn=lambda image: probs.copy())
    assert (result.best.bi_w, result.best.bi_xy_std, result.best.bi_rgb_std) == (10, 30, 3)
    assert result.best_score == 1.0
    others = [s for p, s in zip(grid, result.scores()) if p != result.best]
    assert max(others) < 0.95
    # w1 = 0 (and w2 = 0) leaves the network's answer as it was.
    for p, s in zip(grid, result.scores()):
        if p.bi_w == 0:
            assert s == pytest.approx(result.baseline.mean_iou())


# Through the CLI, with random weights.


@pytest.mark.slow
def test_tune_crf_cli_writes_a_preset_others_accept(tmp_path, weights_file):  # noqa: F811
    voc = write_voc(tmp_path / "voc", LABELS)
    preset, table = tmp_path / "best.json", tmp_path / "all.json"
    result = CliRunner().invoke(cli, [
        "tune-crf", "--root", str(voc), "--weights", str(weights_file), "--device", "cpu",
        "--no-msc", "--max-size", "32", "--bi-w", "3,5", "--bi-xy-std", "10:20:10",
        "--bi-rgb-std", "3", "--pos-w", "2", "--iters", "2", "--output", str(preset),
        "--json", str(table), "--cache-dir", str(tmp_path / "cache"),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    params = CRFParams.from_json_file(preset)
    assert (params.pos_w, params.iterations, params.bi_rgb_std) == (2, 2, 3)
    assert (params.bi_w, params.bi_xy_std) in {(w, s) for w in (3, 5) for s in (10, 20)}
    data = json.loads(table.read_text())
    assert len(data["settings"]) == 4 and data["images"] == 2
    assert data["best_crf"] == params.to_dict()
    assert "best: --bi-w" in result.stdout
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2

    # `deeplab crf --crf-params` and `deeplab evaluate --crf-params` accept the preset.
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, [
        "evaluate", "--root", str(voc), "--weights", str(weights_file), "--device", "cpu",
        "--no-msc", "--max-size", "32", "--crf-params", str(preset), "--json", str(out),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["settings"]["crf"] == params.to_dict()
    probs = np.full((N_CLASSES, *LABELS["a"].shape), 0.1, np.float32)
    probs[0] = 0.8  # (C, H, W), sums to 1
    np.save(tmp_path / "a.npy", probs)
    refined = tmp_path / "a.png"
    result = CliRunner().invoke(cli, [
        "crf", str(voc / "JPEGImages" / "a.jpg"), str(tmp_path / "a.npy"), "-o", str(refined),
        "--crf-params", str(preset), "--device", "cpu",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert refined.is_file()


def test_tune_crf_bad_grid_is_one_line(tmp_path):
    voc = write_voc(tmp_path / "voc", LABELS)
    result = CliRunner().invoke(cli, ["tune-crf", "--root", str(voc), "--bi-xy-std", "80:50:10"])
    assert_one_line_error(result, "--bi-xy-std 80:50:10", "start <= stop")
    # given but empty (an unset shell variable): refused, not the default grid
    result = CliRunner().invoke(cli, ["tune-crf", "--root", str(voc), "--bi-w", ""])
    assert_one_line_error(result, "--bi-w '': no values")


def test_tune_crf_counts_one_image_and_one_setting_in_the_singular(tmp_path, weights_file):
    voc = write_voc(tmp_path / "voc", {"a": LABELS["a"]})
    preset = tmp_path / "best.json"
    result = CliRunner().invoke(cli, [
        "tune-crf", "--root", str(voc), "--weights", str(weights_file), "--device", "cpu",
        "--no-msc", "--max-size", "32", "--bi-w", "4", "--bi-xy-std", "10", "--bi-rgb-std", "3",
        "--iters", "1", "-o", str(preset),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "deeplab: 1 CRF setting x 1 image\n" in result.stderr
    assert ", 1 image)" in result.stdout  # the "best:" line
    assert ", 1 image, weights " in json.loads(preset.read_text())["source"]
    assert "1 images" not in result.output and "1 CRF settings" not in result.output
