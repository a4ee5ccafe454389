"""`deeplab evaluate` / `deeplab tune-crf` against the inputs a demanding user gives: odd split
files, outputs that would overwrite inputs or cannot be written (refused before any slow
work), huge or invalid grids, a probability cache holding damaged or foreign files, labels
saved as colours or against an EXIF-turned image, and labels that are all 'ignore'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deeplab_cli import datasets, tune
from deeplab_cli.cli import cli
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError
from deeplab_cli.labels import palette_for
from deeplab_cli.metrics import ConfusionMatrix
from helpers import LABELS, assert_one_line_error, write_palette_png


@pytest.fixture
def preds(tmp_path) -> Path:
    for name, lab in LABELS.items():
        write_palette_png(tmp_path / "pred" / f"{name}.png", np.where(lab == 255, 0, lab))
    return tmp_path / "pred"


@pytest.fixture
def no_network(monkeypatch):
    """Make loading the network fail loudly: what a test checks must happen before it."""
    import deeplab_cli.cli.evaluate as evaluate_cli

    def refuse(*args, **kwargs):
        raise AssertionError("the network was loaded before the mistake was reported")

    monkeypatch.setattr(evaluate_cli, "load_segmenter", refuse)


@pytest.fixture
def fake_weights(tmp_path) -> Path:
    path = tmp_path / "w.pth"
    path.write_bytes(b"not loaded: every error here comes first")
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def split(voc: Path, name: str, data: bytes) -> str:
    (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_bytes(data)
    return name


# Split files


def test_split_file_with_bom_crlf_and_blank_lines(voc):
    # Windows editors write a byte-order mark and CRLF line ends.
    name = split(voc, "win", b"\xef\xbb\xbfa\r\n\r\n  b \r\n\r\n")
    assert [s.name for s in datasets.voc_samples(voc, name)] == ["a", "b"]


def test_binary_split_file_is_one_line(voc, preds):
    name = split(voc, "bin", b"a\n\xff\xfe\x00b\n")
    result = run("evaluate", "--pred", preds, "--root", voc, "--split", name, "--n-classes", 3)
    assert_one_line_error(result, "bin.txt", "not a UTF-8 text file")


def test_duplicate_ids_are_refused_not_counted_twice(voc, preds):
    name = split(voc, "dup", b"a\nb\na\n")
    result = run("evaluate", "--pred", preds, "--root", voc, "--split", name, "--n-classes", 3)
    assert_one_line_error(result, "dup.txt:3", "a is listed twice (also on line 1)")
    # Two-column lines naming the same stem would share one --save-pred file.
    name = split(voc, "dup2", b"JPEGImages/a.jpg SegmentationClass/a.png\na\n")
    with pytest.raises(DeeplabError, match="dup2.txt:2: a is listed twice"):
        datasets.voc_samples(voc, name)


def test_jpeg_prediction_and_weights_name_hints(voc, preds):
    (preds / "b.png").unlink()
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(preds / "b.jpg")
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3)
    assert_one_line_error(result, "no prediction b.png", "b.jpg is not a PNG")
    result = run("evaluate", "--pred", preds, "--root", voc, "--weights", "voc12")
    assert_one_line_error(result, "--weights voc12: no such file", "--model voc12")


# Outputs: refused before any work when they would overwrite an input or cannot be written


def test_json_onto_a_label_or_the_split_file_is_refused(voc, preds):
    label = voc / "SegmentationClass" / "a.png"
    before = label.read_bytes()
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3, "--json", label)
    assert_one_line_error(result, "--json", "is the label", "refusing to overwrite it")
    assert label.read_bytes() == before
    split_file = voc / "ImageSets" / "Segmentation" / "val.txt"
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3, "--json", split_file)
    assert_one_line_error(result, "--json", "val.txt", "refusing to overwrite it")
    assert split_file.read_text() == "a\nb\n"
    assert "mean IoU" not in result.stdout  # nothing was scored


def test_save_pred_into_the_label_or_pred_folder_is_refused(voc, preds):
    label = voc / "SegmentationClass" / "a.png"
    before = label.read_bytes()
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3,
                 "--save-pred", voc / "SegmentationClass")
    assert_one_line_error(result, "--save-pred", "a.png would overwrite the label")
    assert label.read_bytes() == before  # ground truth (255 = ignore) kept
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3, "--save-pred", preds)
    assert_one_line_error(result, "--save-pred", "would overwrite the pred")


def test_unwritable_outputs_fail_before_scoring(voc, preds, tmp_path):
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3,
                 "--json", a_file / "scores.json")
    assert_one_line_error(result, "--json", "plain.txt is a file, not a folder")
    assert "mean IoU" not in result.stdout
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3,
                 "--save-pred", a_file / "saved")
    assert_one_line_error(result, "--save-pred", "plain.txt is a file, not a folder")
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 3,
                 "--json", f"{tmp_path}/newdir/")
    assert_one_line_error(result, "names a folder")
    assert not (tmp_path / "newdir").exists()


def test_evaluate_checks_outputs_and_crf_flags_before_the_network(voc, fake_weights, no_network):
    result = run("evaluate", "--root", voc, "--weights", fake_weights, "--json", fake_weights)
    assert_one_line_error(result, "--json", "is the input", "refusing to overwrite it")
    result = run("evaluate", "--root", voc, "--weights", fake_weights, "--bi-rgb-std", 0)
    assert_one_line_error(result, "--bi-rgb-std must be a positive number")


@pytest.mark.parametrize("mode", ["--no-crf", "--pred"])
def test_bad_crf_flags_are_refused_where_no_crf_runs(voc, preds, fake_weights, no_network, mode):
    # A CRF flag that is not used is still checked, with the very message of a run that uses
    # it: a typo shows now, not on the next run without --no-crf.
    base = ["evaluate", "--root", voc, "--weights", fake_weights]
    unused = [*base, *(["--no-crf"] if mode == "--no-crf" else ["--pred", preds])]
    result = run(*unused, "--bi-rgb-std", -1)
    assert result.exit_code == 1 and result.stdout == ""  # nothing scored
    assert_one_line_error(result, "--bi-rgb-std must be a positive number")
    with_crf = run(*base, "--bi-rgb-std", -1)
    assert result.stderr.splitlines()[-1] == with_crf.stderr.splitlines()[-1]
    result = run(*unused, "--iters", 5, "--crf-params", voc / "missing.json")
    assert result.exit_code == 1
    assert_one_line_error(result, "missing.json")


def test_tune_crf_checks_outputs_and_grid_before_the_network(voc, tmp_path, fake_weights, no_network):
    base = ["tune-crf", "--root", voc, "--weights", fake_weights]
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    assert_one_line_error(run(*base, "-o", a_file / "best.json"), "-o", "is a file, not a folder")
    assert_one_line_error(run(*base, "-o", fake_weights), "-o", "is the input")
    label = voc / "SegmentationClass" / "b.png"
    assert_one_line_error(run(*base, "-o", label), "-o", "is the label")
    same = tmp_path / "same.json"
    assert_one_line_error(run(*base, "-o", same, "--json", same), "--json", "is the -o output")
    # Values the user typed are called by their flags.
    assert_one_line_error(run(*base, "--bi-rgb-std", "0,3"), "--bi-rgb-std must be a positive number")
    assert_one_line_error(run(*base, "--pos-xy-std", -1), "--pos-xy-std must be a positive number")
    assert_one_line_error(run(*base, "--bi-w", "0:10:0.1", "--bi-xy-std", "10:100:10"),
                          "the grid has 4040 settings (101 x 10 x 4 values)")
    assert_one_line_error(run(*base, "--cache-dir", a_file / "cache"), "--cache-dir", "is a file")
    assert not same.exists()


def test_tune_crf_may_refine_its_preset_in_place(voc, tmp_path, fake_weights, no_network):
    # -o naming the --crf-params preset is allowed (it is read before the run); the run
    # then gets as far as the network.
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"crf": CRFParams(pos_w=2).to_dict()}))
    with pytest.raises(AssertionError, match="network was loaded"):
        run("tune-crf", "--root", voc, "--weights", fake_weights, "--crf-params", preset, "-o", preset)


# Grids


def test_huge_ranges_and_grids_are_refused_at_once():
    # 10^12 values: listing them would never end.
    with pytest.raises(DeeplabError, match=r"--bi-w 0:1e12:1: range 0:1e12:1 has \d+ values"):
        tune.parse_values("0:1e12:1", option="--bi-w")
    with pytest.raises(DeeplabError, match="finite"):
        tune.parse_values("0:inf:1", option="--bi-w")
    values = tune.parse_values("1:10:1")
    with pytest.raises(DeeplabError, match=r"the grid has 1000 settings|more than"):
        tune.build_grid(CRFParams(), bi_w=values, bi_xy_std=values, bi_rgb_std=values + [11])
    assert len(tune.build_grid(CRFParams(), bi_w=values, bi_xy_std=values, bi_rgb_std=values)) == 1000


# The probability cache never trusts a file it did not write for this image


def _item(shape=(4, 6), seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, shape).astype(np.uint8)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    probs = rng.random((3, *shape)).astype(np.float32)
    return tune.TuneItem("img", rgb, label, key="img"), probs / probs.sum(0, keepdims=True)


@pytest.mark.parametrize("bad", [
    b"",  # an empty file (np.load raises EOFError, which click reads as Ctrl-D: "Aborted!")
    b"\x93NUMPY truncated",
    np.ones((5, 4, 6), np.float16),  # another class count
    np.full((3, 6, 4), 1 / 3, np.float16),  # another image size
    np.ones((3, 4, 6), np.int64),  # not probabilities
    np.full((3, 4, 6), np.nan, np.float16),
    np.full((3, 4, 6), 0.9, np.float16),  # do not sum to 1
])
def test_damaged_or_foreign_cache_entries_are_recomputed(tmp_path, bad):
    item, probs = _item()
    cache = tune.ProbsCache(tmp_path, "fp")
    entry = tmp_path / "fp" / "img.npy"
    if isinstance(bad, bytes):
        entry.write_bytes(bad)
    else:
        np.save(entry, bad)
    calls = []

    def probs_fn(rgb):
        calls.append(1)
        return probs

    identity = lambda image, p, params: p  # noqa: E731
    result = tune.tune_crf([item], [CRFParams()], n_classes=3, probs_fn=probs_fn, crf_fn=identity,
                           cache=cache)
    assert calls == [1]
    expected = ConfusionMatrix(3).update(item.label, probs.astype(np.float16).argmax(0))
    np.testing.assert_array_equal(result.baseline.matrix, expected.matrix)
    # The entry was overwritten with the right one, which the next run uses.
    np.testing.assert_array_equal(np.load(entry), probs.astype(np.float16))
    tune.tune_crf([item], [CRFParams()], n_classes=3, probs_fn=probs_fn, crf_fn=identity, cache=cache)
    assert calls == [1]


def test_all_ignore_labels_give_no_best_setting():
    item, probs = _item()
    item.label[:] = 255
    grid = [CRFParams(bi_w=3), CRFParams(bi_w=4)]
    with pytest.raises(DeeplabError, match="every label pixel of the 1 image is 255"):
        tune.tune_crf([item], grid, n_classes=3, probs_fn=lambda rgb: probs,
                      crf_fn=lambda image, p, params: p)


# Label files


def test_colour_labels_get_a_hint(tmp_path):
    voc_colours = np.array(palette_for(21), np.uint8)[np.array([[0, 1, 15], [15, 20, 0]])]
    path = tmp_path / "colours.png"
    Image.fromarray(voc_colours).save(path)  # the VOC colours as RGB, the usual mistake
    with pytest.raises(DeeplabError, match="colours.png: label PNG has mode RGB.*VOC palette"):
        datasets.read_label(path)
    gray = np.repeat(np.array([[0, 1, 2], [2, 1, 7]], np.uint8)[..., None], 3, axis=2)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    with pytest.raises(DeeplabError, match=r"gray.png: label PNG has mode RGB.*gray \(R = G = B\)"):
        datasets.read_label(path)


def test_16_bit_labels_read_as_indices(tmp_path):
    labels = np.array([[0, 1, 2], [255, 1, 0]], np.uint16)
    Image.fromarray(labels).save(tmp_path / "l16.png")
    np.testing.assert_array_equal(datasets.read_label(tmp_path / "l16.png", n_classes=3), labels)


def test_label_of_an_exif_turned_image_gets_a_hint(tmp_path):
    im = Image.fromarray(np.zeros((3, 5, 3), np.uint8))  # stored 5x3, shown 3x5
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: turn 90 degrees to show
    im.save(tmp_path / "turned.jpg", exif=exif.tobytes())
    write_palette_png(tmp_path / "turned.png", np.zeros((3, 5), np.uint8))  # fits the stored image
    sample = datasets.Sample("turned", tmp_path / "turned.png", tmp_path / "turned.jpg")
    with pytest.raises(DeeplabError, match=r"label is 5x3 but image turned.jpg is 3x5; .*EXIF orientation"):
        datasets.load_sample(sample, n_classes=3)


# Metrics edge cases counted by hand


def test_all_ignore_image_counts_no_pixels():
    cm = ConfusionMatrix(3)
    cm.update(np.full((2, 2), 255, np.uint8), np.array([[0, 1], [2, 0]], np.uint8))
    assert cm.images == 1 and cm.total == 0
    assert all(np.isnan(v) for v in cm.scores().values())
    # Then one real image: class 2 absent from both truth and prediction -> not in the mean.
    cm.update(np.array([[0, 1]], np.uint8), np.array([[0, 0]], np.uint8))
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    # IoU: class 0 = 1 / (1 + 2 - 1) = 1/2, class 1 = 0 / 1 = 0, class 2 = NaN (left out)
    assert cm.mean_iou() == pytest.approx((1 / 2 + 0) / 2)
    assert cm.mean_accuracy() == pytest.approx((1 + 0) / 2)
    assert cm.to_dict()["classes"][2]["iou"] is None
