import sys

import numpy as np
import pytest
import torch

import common
from conftest import REPO
from unet2d import UNet
from vnet import VNet

sys.path.insert(0, str(REPO / "benchmarks"))
from sliding_window_speed import naive_sliding_window  # noqa: E402  (the anchors' loop, written plainly)


def tiny_net():
    torch.manual_seed(0)
    return VNet(dims=3, num_classes=3, n_filters=4).eval()


def test_window_starts_cover_and_end_flush():
    assert common.window_starts(175, 112, 18) == [0, 18, 36, 54, 63]
    assert common.window_starts(88, 80, 4) == [0, 4, 8]
    assert common.window_starts(112, 112, 18) == [0]


@pytest.mark.parametrize("sw_batch_size", [1, 3, 7, 64])
def test_batched_sliding_window_equals_the_naive_loop(sw_batch_size):
    net = tiny_net()
    image = np.random.default_rng(0).standard_normal((37, 30, 13)).astype(np.float32)
    patch, stride = (16, 16, 16), (7, 9, 4)  # z smaller than the patch: padded
    predict = common.Predictor([net], "cpu")
    fast = common.sliding_window(predict, torch.from_numpy(image), patch, stride, 3, sw_batch_size)
    slow = naive_sliding_window(net, image, patch, stride, 3)
    assert fast.shape == (3, 37, 30, 13)
    np.testing.assert_allclose(fast.numpy(), slow, atol=1e-5)


def test_sliding_window_equals_whole_volume_when_the_patch_covers_it():
    net = tiny_net()
    image = torch.randn(16, 32, 16)
    predict = common.Predictor([net], "cpu")
    whole = torch.softmax(net(image[None, None]), 1)[0]
    window = common.sliding_window(predict, image, (16, 32, 16), (4, 4, 4), 3, sw_batch_size=2)
    torch.testing.assert_close(window, whole)


def test_gaussian_weighting_changes_only_overlaps():
    net = tiny_net()
    image = torch.randn(16, 16, 16)
    predict = common.Predictor([net], "cpu")
    plain = common.sliding_window(predict, image, (16, 16, 16), (8, 8, 8), 3)
    gauss = common.sliding_window(predict, image, (16, 16, 16), (8, 8, 8), 3, gaussian=True)
    torch.testing.assert_close(plain, gauss)  # one window: the weight cancels


def test_ensemble_predictor_averages_softmax():
    a, b = tiny_net(), VNet(dims=3, num_classes=3, n_filters=4).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    torch.testing.assert_close(common.Predictor([a, b], "cpu")(x), expected)


def test_load_checkpoint_member_keeps_one_network_of_an_ensemble(tmp_path):
    a, b = tiny_net(), VNet(dims=3, num_classes=3, n_filters=4).eval()
    torch.save({"dataset": "LA", "args": {}, "nets": [common.network_spec(a), common.network_spec(b)],
                "state_dicts": [a.state_dict(), b.state_dict()]}, tmp_path / "ens.pth")
    x = torch.randn(1, 1, 16, 16, 16)
    both, _ = common.load_checkpoint(tmp_path / "ens.pth")
    second, _ = common.load_checkpoint(tmp_path / "ens.pth", member=1)
    assert len(both.nets) == 2 and len(second.nets) == 1
    torch.testing.assert_close(second(x), torch.softmax(b(x), 1))
    with pytest.raises(common.DataError, match="holds 2 network"):
        common.load_checkpoint(tmp_path / "ens.pth", member=2)


def test_predict_slices_zooms_to_the_patch_and_back():
    torch.manual_seed(0)
    net = UNet(num_classes=4).eval()
    volume = np.random.default_rng(1).random((3, 70, 50)).astype(np.float32)
    predict = common.Predictor([net], "cpu")
    labels = common.predict_slices(predict, volume, (32, 32), batch_size=2)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    k = 1  # the same slice by hand
    x = torch.from_numpy(common.zoom_to(volume[k], (32, 32)))[None, None]
    expected = common.zoom_to(net(x).argmax(1)[0].numpy().astype(np.uint8), (70, 50))
    assert np.array_equal(labels[k], expected)


def test_evaluate_on_a_perfect_predictor():
    info = common.get_dataset("Phantom3D")

    class Oracle:  # predicts the label of the only case by looking it up: Dice must be 1
        device, nets = torch.device("cpu"), []

        def __call__(self, x):
            return torch.nn.functional.one_hot((x[:, 0] > 0).long(), 2).movedim(-1, 1).float()
    label = np.zeros((20, 20, 12), np.uint8)
    label[5:15, 5:15, 3:9] = 1
    image = label.astype(np.float32)
    rows, summary = common.evaluate(Oracle(), info, [("c", image, label)], (16, 16, 8), (4, 4, 4))
    assert summary["dice_mean"] == 1.0 and summary["hd95_mean"] == 0.0 and summary["empty_pred"] == 0


def test_keep_largest_components_per_class_with_full_connectivity():
    pred = np.zeros((6, 6, 3), np.uint8)
    pred[0:2, 0:2, 0] = 1            # class 1: a 4-voxel blob ...
    pred[2, 2, 1] = 1                # ... touching this voxel only at a corner: one 26-connected component (5)
    pred[4:6, 4:6, :] = 1            # class 1: the largest component (12 voxels)
    pred[0, 5, 2] = 2                # class 2: a single component, kept
    out = common.keep_largest_components(pred, 3)
    assert (out == 1).sum() == 12 and out[4:6, 4:6, :].min() == 1 and out[0, 0, 0] == 0
    assert out[0, 5, 2] == 2 and (out == 2).sum() == 1
    pred[4:6, 4:6, :] = 0            # now the corner-connected pair is the largest: kept whole
    out = common.keep_largest_components(pred, 3)
    assert (out == 1).sum() == 5


@pytest.mark.parametrize("shape", [(5, 32, 32), (3, 20, 24, 16)])
def test_torch_largest_component_equals_scipy_on_random_masks(shape):
    rng = np.random.default_rng(0)
    for density in (0.2, 0.3, 0.5, 0.6):  # around the percolation threshold: many components, ties
        mask = torch.from_numpy(rng.random(shape) < density)
        expected = np.stack([common.largest_component(m) for m in mask.numpy()])
        assert np.array_equal(common.largest_components_torch(mask).numpy(), expected), density
    assert not common.largest_components_torch(torch.zeros(2, 8, 8, dtype=torch.bool)).any()


def test_torch_largest_component_equals_scipy_on_real_masks():
    info = common.get_dataset("Phantom2D")
    cases = common.load_cases(info, common.resolve_root(info), "val")
    slices = [common.zoom_to(s, (96, 96)) for _, _, label in cases for s in label]   # every val slice's label
    masks = torch.from_numpy(np.stack([s == c for s in slices for c in (1, 2, 3)]))
    expected = np.stack([common.largest_component(m) for m in masks.numpy()])
    assert np.array_equal(common.largest_components_torch(masks).numpy(), expected)
    assert np.array_equal(common.largest_components(masks).numpy(), expected)   # the CPU path (scipy)


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_argmax_equals_torch_argmax_with_ties(dim):
    """common.argmax (max(dim).indices, faster on the CPU) gives torch's argmax, the first maximum on ties."""
    g = torch.Generator().manual_seed(dim)
    x = torch.randint(0, 3, (3, 4, 5, 6), generator=g).float()  # three values: ties everywhere
    assert torch.equal(common.argmax(x, dim), x.argmax(dim))
    y = torch.randn(2, 4, 7, 5, 3, generator=g)
    assert torch.equal(common.argmax(y), y.argmax(1))
