import math

import numpy as np
import pytest
import torch

import common


def test_dice_loss_by_hand():
    # two pixels, two classes: p(class 0) = [0.8, 0.4], p(class 1) = [0.2, 0.6]; labels [0, 1]
    probs = torch.tensor([[[0.8, 0.4], [0.2, 0.6]]])
    label = torch.tensor([[0, 1]])
    s = 1e-5
    class0 = 1 - (2 * 0.8 + s) / (0.8 ** 2 + 0.4 ** 2 + 1 + s)   # 1 - 1.6 / 1.8
    class1 = 1 - (2 * 0.6 + s) / (0.2 ** 2 + 0.6 ** 2 + 1 + s)   # 1 - 1.2 / 1.4
    expected = (class0 + class1) / 2
    assert expected == pytest.approx(0.126984, abs=1e-6)
    assert common.dice_loss(probs, label).item() == pytest.approx(expected, abs=1e-6)
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # soft/one-hot targets give the same value
    assert common.dice_loss(probs, onehot).item() == pytest.approx(expected, abs=1e-6)
    assert common.dice_loss(onehot, label).item() == pytest.approx(0.0, abs=1e-6)


def test_supervised_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # (B=1, C=2, N=2)
    label = torch.tensor([[0, 1]])
    p = torch.softmax(logits, 1)
    ce = -(math.log(p[0, 0, 0]) + math.log(p[0, 1, 1])) / 2
    expected = 0.5 * (ce + common.dice_loss(p, label).item())
    assert common.supervised_loss(logits, label).item() == pytest.approx(expected, rel=1e-6)


def test_schedules():
    assert common.sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert common.sigmoid_rampup(20, 40) == pytest.approx(math.exp(-5 * 0.25))
    assert common.sigmoid_rampup(100, 40) == 1.0
    # step k runs at the schedule's value for k - 1 (the official loops set the rate after the step)
    assert common.lr_at("poly", 0.01, 0, 100) == 0.01
    assert common.lr_at("poly", 0.01, 1, 100) == 0.01
    assert common.lr_at("poly", 0.01, 51, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert common.lr_at("step", 0.01, 2500, 6000) == 0.01
    assert common.lr_at("step", 0.01, 2501, 6000) == pytest.approx(0.001)
    assert common.lr_at("step", 0.01, 5001, 6000) == pytest.approx(0.0001)
    assert common.lr_at("step", 0.01, 833, 2000) == 0.01   # a 2,000-iteration run drops after steps 833 and 1,666
    assert common.lr_at("step", 0.01, 834, 2000) == pytest.approx(0.001)
    assert common.lr_at("step", 0.01, 1667, 2000) == pytest.approx(0.0001)
    assert common.lr_at("linear", 0.01, 76, 100) == pytest.approx(0.0025)
    assert common.lr_at("constant", 0.01, 99, 100) == 0.01


def test_scale_iterations():
    assert common.scale_iterations(1000, 30000, 2000) == 67
    assert common.scale_iterations(2500, 15000, 15000) == 2500   # default length: unchanged
    assert common.scale_iterations(2500, 15000, 30000) == 2500   # longer runs keep the paper's numbers
    assert common.scale_iterations(10, 30000, 2) == 1            # never rounds a schedule away
    assert common.scale_iterations(0, 30000, 2000) == 0


def test_ema_update():
    student, teacher = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    student.weight.data.fill_(1.0)
    teacher.weight.data.fill_(0.0)
    common.update_ema(teacher, student, 0.99, global_step=0)  # alpha = min(1 - 1/1, 0.99) = 0: copy
    assert teacher.weight.item() == 1.0
    student.weight.data.fill_(3.0)
    common.update_ema(teacher, student, 0.99, global_step=1000)  # alpha 0.99
    assert teacher.weight.item() == pytest.approx(0.99 * 1.0 + 0.01 * 3.0)


# ---- metrics ----
def square(size, y0, x0, side):
    m = np.zeros(size, bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_dice_and_jaccard_of_known_masks():
    pred, gt = square((10, 10), 2, 2, 4), square((10, 10), 3, 3, 4)  # overlap 3x3 = 9
    m = common.binary_metrics(pred, gt)
    assert m["dice"] == pytest.approx(2 * 9 / 32)
    assert m["jaccard"] == pytest.approx(9 / 23)
    assert not m["empty_pred"] and not m["empty_label"]


def test_distances_of_known_masks():
    pred, gt = np.zeros((1, 9), bool), np.zeros((1, 9), bool)
    pred[0, 1], gt[0, 4] = True, True  # single voxels 3 apart: every surface distance is 3
    m = common.binary_metrics(pred, gt)
    assert m["hd95"] == pytest.approx(3.0) and m["asd"] == pytest.approx(3.0)
    a = square((20, 20), 2, 2, 3)
    b = a | square((20, 20), 14, 14, 3)  # b = a plus a distant blob
    assert common.binary_metrics(a, b)["asd"] == 0.0          # asd(pred, gt): pred surface to gt only
    assert common.binary_metrics(b, a)["asd"] > 2.0
    same = common.binary_metrics(a, a)
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and same["asd"] == 0.0


def test_empty_mask_rule():
    gt = square((8, 8), 1, 1, 3)
    empty = np.zeros((8, 8), bool)
    m = common.binary_metrics(empty, gt)  # missed structure: the anchors' (0, 0, 0, 0) ...
    assert (m["dice"], m["jaccard"], m["hd95"], m["asd"]) == (0, 0, 0, 0) and m["empty_pred"]
    assert math.isnan(m["hd95_strict"]) and math.isnan(m["asd_strict"])  # ... and the honest NaN
    m = common.binary_metrics(empty, empty)
    assert m["dice"] == 1.0 and m["jaccard"] == 1.0 and math.isnan(m["hd95"])
    m = common.binary_metrics(gt, empty)
    assert m["dice"] == 0.0 and math.isnan(m["hd95"]) and m["empty_label"]


def test_case_metrics_and_summary_count_empty_cases():
    label = np.zeros((2, 10, 10), np.uint8)
    label[:, 1:4, 1:4], label[:, 5:9, 5:9] = 1, 2
    perfect = label.copy()
    missed = label.copy()
    missed[missed == 2] = 0  # class 2 absent from this prediction
    rows = [{"case": "a", "metrics": common.case_metrics(perfect, label, 3)},
            {"case": "b", "metrics": common.case_metrics(missed, label, 3)}]
    s = common.summarize(rows, ("one", "two"))
    assert s["one_dice_mean"] == 1.0 and s["two_dice_mean"] == 0.5 and s["two_dice_sd"] == 0.5
    assert s["dice_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["empty_pred"] == 1 and s["two_empty_pred"] == 1 and s["one_empty_pred"] == 0
    assert s["two_hd95_mean"] == 0.0 and s["two_hd95_strict_mean"] == 0.0  # NaN left out of the strict mean
    assert s["cases"] == 2
