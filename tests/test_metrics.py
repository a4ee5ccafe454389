"""Confusion matrix and scores, checked against matrices counted by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deeplab_cli.errors import DeeplabError
from deeplab_cli.metrics import ConfusionMatrix

# 3 classes; rows = ground truth, columns = prediction.
TRUTH = np.array([[0, 0, 1, 1],
                  [0, 255, 1, 2],
                  [2, 2, 255, 1]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 2, 2],
                 [2, 0, 0, 1]], dtype=np.uint8)
# Counted by hand over the 10 pixels whose truth is not 255:
#   truth 0: (0,0)->0 (0,1)->1 (1,0)->0          -> [2, 1, 0]
#   truth 1: (0,2)->1 (0,3)->1 (1,2)->2 (2,3)->1 -> [0, 3, 1]
#   truth 2: (1,3)->2 (2,0)->2 (2,1)->0          -> [1, 0, 2]
HAND = np.array([[2, 1, 0],
                 [0, 3, 1],
                 [1, 0, 2]])


def test_matrix_by_hand_ignores_255():
    cm = ConfusionMatrix(3).update(TRUTH, PRED)
    np.testing.assert_array_equal(cm.matrix, HAND)
    assert cm.total == 10 and cm.images == 1


def test_scores_by_hand():
    cm = ConfusionMatrix(3).update(TRUTH, PRED)
    assert cm.pixel_accuracy() == pytest.approx(7 / 10)
    np.testing.assert_allclose(cm.class_accuracy(), [2 / 3, 3 / 4, 2 / 3])
    assert cm.mean_accuracy() == pytest.approx((2 / 3 + 3 / 4 + 2 / 3) / 3)
    # IoU = tp / (gt + pred - tp): class 0: 2/(3+3-2), class 1: 3/(4+4-3), class 2: 2/(3+3-2)
    iou = [2 / 4, 3 / 5, 2 / 4]
    np.testing.assert_allclose(cm.class_iou(), iou)
    assert cm.mean_iou() == pytest.approx(sum(iou) / 3)
    assert cm.fw_iou() == pytest.approx(0.3 * iou[0] + 0.4 * iou[1] + 0.3 * iou[2])


def test_absent_classes_are_left_out_of_the_means():
    # 4 classes: class 3 never appears; class 2 is predicted but never in the truth.
    truth = np.array([[0, 0, 1], [1, 1, 0]])
    pred = np.array([[0, 2, 1], [1, 0, 0]])
    cm = ConfusionMatrix(4).update(truth, pred)
    acc, iou = cm.class_accuracy(), cm.class_iou()
    assert math.isnan(acc[2]) and math.isnan(acc[3])  # no truth pixels
    assert iou[2] == 0.0  # predicted only: union 1, counted as a miss
    assert math.isnan(iou[3])  # neither: not a class "present"
    # class 0: tp 2, gt 3, pred 3 -> 2/4; class 1: tp 2, gt 3, pred 2 -> 2/3
    assert cm.mean_accuracy() == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert cm.mean_iou() == pytest.approx((2 / 4 + 2 / 3 + 0) / 3)
    # fwIoU weighs by truth frequency only (class 2 has none)
    assert cm.fw_iou() == pytest.approx(0.5 * 2 / 4 + 0.5 * 2 / 3)


def test_matches_the_port_definition_on_random_labels():
    rng = np.random.default_rng(0)
    n = 5
    truths = [rng.integers(0, n, (7, 9)) for _ in range(3)]
    preds = [rng.integers(0, n, (7, 9)) for _ in range(3)]
    truths[0][0, :4] = 255
    cm = ConfusionMatrix(n)
    for t, p in zip(truths, preds):
        cm.update(t, p)
    # Independent count with explicit loops.
    hist = np.zeros((n, n))
    for t, p in zip(truths, preds):
        for a, b in zip(t.ravel(), p.ravel()):
            if a != 255:
                hist[a, b] += 1
    np.testing.assert_array_equal(cm.matrix, hist)
    iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    assert cm.mean_iou() == pytest.approx(np.nanmean(iu))
    assert cm.pixel_accuracy() == pytest.approx(np.trace(hist) / hist.sum())


def test_merge_equals_one_accumulator():
    a = ConfusionMatrix(3).update(TRUTH, PRED)
    b = ConfusionMatrix(3).update(PRED, TRUTH.clip(0, 2))
    both = ConfusionMatrix(3).update(TRUTH, PRED).update(PRED, TRUTH.clip(0, 2))
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.matrix, both.matrix)
    assert merged.images == 2
    np.testing.assert_array_equal(a.matrix, HAND)  # inputs unchanged
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))


def test_out_of_set_labels_name_the_file():
    truth = np.array([[0, 7], [255, 1]])
    with pytest.raises(DeeplabError, match=r"gt/a\.png: label values 7 are outside the 3 classes"):
        ConfusionMatrix(3).update(truth, np.zeros_like(truth), name="gt/a.png")
    lenient = ConfusionMatrix(3, strict=False).update(truth, np.zeros_like(truth))
    assert lenient.total == 2  # the 7 and the 255 are skipped
    with pytest.raises(DeeplabError, match="predicted values 3"):
        ConfusionMatrix(3).update(np.zeros((2, 2), int), np.full((2, 2), 3), name="p.png")
    with pytest.raises(DeeplabError, match="prediction is 3x2"):
        ConfusionMatrix(3).update(np.zeros((2, 2), int), np.zeros((2, 3), int), name="p.png")


def test_empty_matrix_scores_are_nan():
    cm = ConfusionMatrix(2).update(np.full((2, 2), 255), np.zeros((2, 2), int))
    assert cm.total == 0
    assert all(math.isnan(v) for v in cm.scores().values())


def test_torch_inputs():
    torch = pytest.importorskip("torch")
    cm = ConfusionMatrix(3).update(torch.from_numpy(TRUTH), torch.from_numpy(PRED))
    np.testing.assert_array_equal(cm.matrix, HAND)


def test_to_dict_is_strict_json_with_names():
    cm = ConfusionMatrix(4).update(np.array([[0, 1]]), np.array([[0, 1]]))
    data = cm.to_dict(["bg", "a", "b", "c"])
    text = json.dumps(data, allow_nan=False)  # NaN must have become null
    back = json.loads(text)
    assert back["classes"][3] == {"index": 3, "name": "c", "iou": None, "accuracy": None,
                                  "gt_pixels": 0, "pred_pixels": 0}
    assert back["mean_iou"] == 1.0 and back["confusion"][1][1] == 1


def test_table_lists_present_classes():
    cm = ConfusionMatrix(4).update(TRUTH, PRED)
    table = cm.format_table(["background", "cat", "dog", "never"])
    assert "never" not in table
    assert "cat" in table and "mean IoU" in table
    assert f"{100 * cm.mean_iou():.2f}" in table
    assert "never" in cm.format_table(["background", "cat", "dog", "never"], all_classes=True)
