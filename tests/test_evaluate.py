"""`deeplab evaluate` and the dataset readers, on a tiny VOC-layout set written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deeplab_cli import datasets
from deeplab_cli.cli import cli
from deeplab_cli.errors import DeeplabError
from helpers import LABELS, N_CLASSES, assert_one_line_error, write_palette_png

PREDS = {
    "a": np.array([[0, 0, 1, 1, 1],
                   [0, 0, 1, 1, 2],
                   [0, 0, 2, 2, 2]], dtype=np.uint8),
    "b": np.array([[2, 0, 0],
                   [2, 1, 0]], dtype=np.uint8),
}
# Counted by hand (rows: truth, columns: prediction):
#   a: truth 0 -> [4, 1, 0], truth 1 -> [0, 4, 1], truth 2 -> [0, 0, 3]
#   b: truth 0 -> [2, 0, 0], truth 2 -> [1, 0, 2]
HAND = np.array([[6, 1, 0],
                 [0, 4, 1],
                 [1, 0, 5]])
HAND_IOU = [6 / (7 + 7 - 6), 4 / (5 + 5 - 4), 5 / (6 + 6 - 5)]


@pytest.fixture
def preds(tmp_path) -> Path:
    for name, p in PREDS.items():
        write_palette_png(tmp_path / "pred" / f"{name}.png", p)
    return tmp_path / "pred"


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# Dataset reading


def test_palette_labels_read_as_indices_not_colours(voc):
    labels = datasets.read_label(voc / "SegmentationClass" / "a.png", n_classes=N_CLASSES)
    np.testing.assert_array_equal(labels, LABELS["a"])


def test_voc_listing_and_loading(voc):
    samples = datasets.voc_samples(voc, "val")
    assert [s.name for s in samples] == ["a", "b"]
    item = datasets.load_sample(samples[0], n_classes=N_CLASSES)
    assert item.rgb.shape == (3, 5, 3) and item.rgb.dtype == np.uint8
    np.testing.assert_array_equal(item.label, LABELS["a"])


def test_voc_two_column_split_lines(voc):
    (voc / "ImageSets" / "Segmentation" / "aug.txt").write_text(
        "/JPEGImages/b.jpg /SegmentationClass/b.png\n")
    samples = datasets.voc_samples(voc, "aug")
    assert [(s.name, s.image.name, s.label.name) for s in samples] == [("b", "b.jpg", "b.png")]


def test_voc_names_carry_no_folders(voc):
    # The name becomes an output file name (--save-pred, the cache): '../a' must not
    # lead outside the output folder, though the files are still looked up as written.
    (voc / "ImageSets" / "Segmentation" / "up.txt").write_text("../JPEGImages/a\n")
    (voc / "JPEGImages" / "a.png").write_bytes((voc / "SegmentationClass" / "a.png").read_bytes())
    samples = datasets.voc_samples(voc, "up")
    assert [s.name for s in samples] == ["a"]
    assert samples[0].image.resolve() == (voc / "JPEGImages" / "a.jpg").resolve()
    assert samples[0].label.resolve() == (voc / "JPEGImages" / "a.png").resolve()


def test_label_pixel_cap_is_checked_before_decoding(voc):
    path = voc / "SegmentationClass" / "a.png"
    assert datasets.read_label(path, max_pixels=15).shape == (3, 5)
    with pytest.raises(DeeplabError, match=r"a.png: label is 5x3, .*--max-pixels"):
        datasets.read_label(path, max_pixels=14)


def test_paired_folders_by_stem(voc, tmp_path):
    samples = datasets.paired_samples(voc / "JPEGImages", voc / "SegmentationClass")
    assert [(s.name, s.image.suffix) for s in samples] == [("a", ".jpg"), ("b", ".jpg")]
    (voc / "JPEGImages" / "c.jpg").write_bytes((voc / "JPEGImages" / "a.jpg").read_bytes())
    with pytest.raises(DeeplabError, match="no label PNG for c.jpg$"):
        datasets.paired_samples(voc / "JPEGImages", voc / "SegmentationClass")
    for extra in ("d", "e"):
        (voc / "JPEGImages" / f"{extra}.jpg").write_bytes((voc / "JPEGImages" / "a.jpg").read_bytes())
        with pytest.raises(DeeplabError, match="no label PNG for c.jpg and ") as caught:
            datasets.paired_samples(voc / "JPEGImages", voc / "SegmentationClass")
        assert str(caught.value).endswith({"d": " and 1 more image", "e": " and 2 more images"}[extra])


def test_rgb_label_png_is_refused(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(DeeplabError, match="rgb.png: label PNG has mode RGB"):
        datasets.read_label(path)


def test_prefetch_keeps_order_and_raises_in_place():
    import time

    def slow(i):
        time.sleep(0.01 * (5 - i))
        if i == 3:
            raise DeeplabError("bad 3")
        return i * i

    it = datasets.prefetch(slow, range(5), workers=3, depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(DeeplabError, match="bad 3"):
        next(it)
    assert list(datasets.prefetch(slow, range(3), workers=0)) == [0, 1, 4]


# Scoring saved predictions


def test_pred_scores_match_hand_counts(voc, preds, tmp_path):
    out = tmp_path / "scores.json"
    result = run("evaluate", "--pred", preds, "--root", voc, "--split", "val",
                 "--n-classes", N_CLASSES, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    np.testing.assert_array_equal(data["confusion"], HAND)
    assert data["images"] == 2 and data["pixels"] == 18
    assert data["pixel_accuracy"] == pytest.approx(15 / 18)
    assert data["mean_accuracy"] == pytest.approx((6 / 7 + 4 / 5 + 5 / 6) / 3)
    assert data["mean_iou"] == pytest.approx(sum(HAND_IOU) / 3)
    assert data["fw_iou"] == pytest.approx((7 * HAND_IOU[0] + 5 * HAND_IOU[1] + 6 * HAND_IOU[2]) / 18)
    assert [c["iou"] for c in data["classes"]] == pytest.approx(HAND_IOU)
    # The table on stdout: VOC names (3 classes -> generic), then the summary.
    assert f"{100 * sum(HAND_IOU) / 3:.2f}" in result.stdout
    assert "mean IoU" in result.stdout


def test_pred_with_label_folder_and_voc_names(voc, preds):
    result = run("evaluate", "--pred", preds, "--labels", voc / "SegmentationClass")
    assert result.exit_code == 0, result.output
    # Without --n-classes the VOC classes are assumed: names in the table.
    assert "background" in result.stdout and "aeroplane" in result.stdout
    # Classes 0..2 present; VOC's other 18 never occur and stay out of the mean.
    assert f"{100 * sum(HAND_IOU) / 3:.2f}" in result.stdout


def test_pred_limit(voc, preds, tmp_path):
    out = tmp_path / "s.json"
    assert run("evaluate", "--pred", preds, "--root", voc, "--limit", 1, "--n-classes", 3,
               "--json", out).exit_code == 0
    assert json.loads(out.read_text())["images"] == 1
    assert json.loads(out.read_text())["pixels"] == 13


# Bad layouts: one-line errors


def test_missing_split_file(voc, preds):
    result = run("evaluate", "--pred", preds, "--root", voc, "--split", "test")
    assert_one_line_error(result, "test.txt", "split file not found")


def test_missing_prediction(voc, preds):
    (preds / "b.png").unlink()
    result = run("evaluate", "--pred", preds, "--root", voc)
    assert_one_line_error(result, "no prediction b.png")


def test_missing_label(voc, preds):
    (voc / "SegmentationClass" / "b.png").unlink()
    result = run("evaluate", "--pred", preds, "--root", voc)
    assert_one_line_error(result, "b.png", "label not found")


def test_label_values_outside_class_set(voc, preds):
    bad = LABELS["b"].copy()
    bad[0, 0] = 7
    write_palette_png(voc / "SegmentationClass" / "b.png", bad)
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", N_CLASSES)
    assert_one_line_error(result, "b.png", "label values 7 are outside the 3 classes")


def test_prediction_size_mismatch(voc, preds):
    write_palette_png(preds / "a.png", np.zeros((4, 5), np.uint8))
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", N_CLASSES)
    assert_one_line_error(result, "a.png", "prediction is 5x4", "label a.png is 5x3")


def test_label_image_size_mismatch(voc):
    write_palette_png(voc / "SegmentationClass" / "b.png", np.zeros((3, 3), np.uint8))
    sample = datasets.voc_samples(voc, "val")[1]
    with pytest.raises(DeeplabError, match=r"b\.png: label is 3x3 but image b\.jpg is 3x2"):
        datasets.load_sample(sample)


def test_no_dataset_given():
    assert_one_line_error(run("evaluate", "--no-crf"), "no dataset")


# End to end through the network (random weights)


@pytest.mark.slow
def test_evaluate_end_to_end_random_weights(voc, weights_file, tmp_path):
    out, saved = tmp_path / "run.json", tmp_path / "saved"
    result = run("evaluate", "--root", voc, "--split", "val", "--weights", weights_file,
                 "--device", "cpu", "--no-crf", "--no-msc", "--max-size", 64,
                 "--save-pred", saved, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["images"] == 2
    assert data["pixels"] == sum(int((lab != 255).sum()) for lab in LABELS.values())
    assert data["settings"]["crf"] is None and data["settings"]["msc"] is False
    assert "mean IoU" in result.stdout
    # Saved predictions are palette PNGs of the images' sizes; scoring them again
    # with --pred gives the very same confusion matrix.
    for name, lab in LABELS.items():
        with Image.open(saved / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (lab.shape[1], lab.shape[0])
    again = tmp_path / "again.json"
    result = run("evaluate", "--pred", saved, "--root", voc, "--n-classes", N_CLASSES,
                 "--json", again)
    assert result.exit_code == 0, result.output
    assert json.loads(again.read_text())["confusion"] == data["confusion"]


@pytest.mark.slow
def test_evaluate_with_crf_and_images_labels_folders(voc, weights_file, tmp_path):
    out = tmp_path / "crf.json"
    result = run("evaluate", "--images", voc / "JPEGImages", "--labels", voc / "SegmentationClass",
                 "--weights", weights_file, "--device", "cpu", "--max-size", 64,
                 "--bi-w", 5, "--iters", 3, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["images"] == 2
    assert data["settings"]["crf"]["bi_w"] == 5.0 and data["settings"]["crf"]["iterations"] == 3


def test_evaluate_bad_label_values_with_model(voc, weights_file):
    bad = LABELS["a"].copy()
    bad[1, 1] = 9
    write_palette_png(voc / "SegmentationClass" / "a.png", bad)
    result = run("evaluate", "--root", voc, "--weights", weights_file, "--device", "cpu",
                 "--no-crf", "--no-msc", "--max-size", 32)
    assert_one_line_error(result, "a.png", "label values 9")


def test_model_and_weights_are_exclusive(voc, weights_file):
    result = run("evaluate", "--root", voc, "--model", "voc12", "--weights", weights_file)
    assert_one_line_error(result, "either --model NAME or --weights FILE")


# Counts in messages: one image is "1 image"


def one_image_split(voc: Path) -> str:
    (voc / "ImageSets" / "Segmentation" / "one.txt").write_text("a\n")
    return "one"


def test_one_scored_prediction_is_singular(voc, preds):
    result = run("evaluate", "--pred", preds, "--root", voc, "--split", one_image_split(voc),
                 "--n-classes", N_CLASSES)
    assert result.exit_code == 0, result.output
    assert "deeplab: scored 1 image in " in result.stderr
    assert "images in" not in result.stderr


def test_one_image_through_the_network_is_singular(voc, weights_file):
    result = run("evaluate", "--root", voc, "--split", one_image_split(voc), "--weights", weights_file,
                 "--device", "cpu", "--no-crf", "--no-msc", "--max-size", 32)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("deeplab: 1 image, weights ")
    assert "deeplab: scored 1 image in " in result.stderr
    assert "1 images" not in result.stderr


def test_one_class_is_refused(voc, preds):
    # One class scores nothing (every pixel is class 0); weights have at least two.
    result = run("evaluate", "--pred", preds, "--root", voc, "--n-classes", 1)
    assert result.exit_code == 1
    assert_one_line_error(result, "--n-classes", "1 is not in the range x>=2")
