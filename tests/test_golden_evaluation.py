"""Golden parity of the two evaluation paths (tests/golden/README.md): the 3D sliding window and metrics
against UA-MT's `test_single_case` + `calculate_metric_percase`, the 2D slice-wise path against SSL4MIS's
`test_single_volume`, with the same network weights (tests/golden_fill.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from golden_fill import fill
from unet2d import UNet
from vnet import VNet

G = np.load(Path(__file__).parent / "golden" / "evaluation.npz")


@pytest.mark.parametrize("channels_last", [False, True])  # True: the test scripts' layout on the CPU
def test_3d_sliding_window_and_metrics_match_uamt(channels_last):
    net = VNet(dims=3, num_classes=2, has_dropout=False)
    fill(net, torch.zeros(1, 1, 32, 32, 16)).eval()
    with torch.no_grad():
        net.decoder.out_conv.bias.copy_(torch.from_numpy(G["bias3"]))
    # a 44 x 38 x 12 volume: z is below the 16-deep patch, so the padding path runs too
    predictor = common.Predictor([net], "cpu", channels_last=channels_last)
    assert predictor.channels_last == channels_last
    probs = common.sliding_window(predictor, G["vol3"], (32, 32, 16), (8, 8, 4), 2)
    np.testing.assert_allclose(probs.numpy(), G["score_map3"], rtol=1e-5, atol=1e-6)
    label_map = probs.argmax(0).numpy()
    assert np.array_equal(label_map, G["label_map3"])                      # 0 differing voxels
    m = common.binary_metrics(label_map == 1, G["lab3"] == 1)
    np.testing.assert_allclose([m["dice"], m["jaccard"], m["hd95"], m["asd"]], G["metrics3"], rtol=1e-6)


def test_2d_slicewise_prediction_and_metrics_match_ssl4mis():
    net = UNet(dims=2, num_classes=4)
    fill(net, torch.zeros(1, 1, 32, 32)).eval()
    with torch.no_grad():
        net.decoder.out_conv.bias.copy_(torch.from_numpy(G["bias2"]))
    pred = common.predict_slices(common.Predictor([net], "cpu"), G["vol2"], (32, 32))
    ours = [[m["dice"], m["hd95"]] for m in common.case_metrics(pred, G["lab2"], 4).values()]
    np.testing.assert_allclose(ours, G["metrics2"], rtol=1e-6)
