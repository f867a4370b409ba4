"""CIFP (train_cifp.py): each module on tiny tensors against hand computation or a naive loop,
gradient flow, and a smoke run on both phantoms with test script and resume."""
import math

import pytest
import torch

import common
import train_cifp as cifp
from conftest import COARSE, SMOKE_2D, SMOKE_3D, run


def test_normalized_entropy():
    P = torch.tensor([[[0.25], [0.25], [0.25], [0.25]], [[1.0], [0.0], [0.0], [0.0]]])  # (B=2, C=4, 1)
    assert cifp.normalized_entropy(P).flatten().tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def naive_cifp_attn(U, L, a, tau):
    out = torch.empty_like(U)
    keys = [L[b, :, i, j] for b in range(L.shape[0]) for i in range(L.shape[2]) for j in range(L.shape[3])]
    for b in range(U.shape[0]):
        for i in range(U.shape[2]):
            for j in range(U.shape[3]):
                q = U[b, :, i, j]
                sims = torch.stack([torch.dot(q / q.norm(), k / k.norm()) / tau for k in keys])
                w = torch.exp(sims - sims.max())
                w = w / w.sum()
                R = sum(wk * k for wk, k in zip(w, keys))
                out[b, :, i, j] = (1 - a[b, i, j]) * q + a[b, i, j] * R
    return out


def test_cifp_attn_matches_a_naive_loop_and_detaches_the_labeled_side():
    torch.manual_seed(0)
    U = torch.randn(2, 5, 3, 2, requires_grad=True)
    L = torch.randn(3, 5, 3, 2, requires_grad=True)
    a = torch.rand(2, 3, 2)
    out = cifp.cifp_attn(U, L, a, 0.1)
    torch.testing.assert_close(out, naive_cifp_attn(U.detach(), L.detach(), a, 0.1))
    out.sum().backward()
    assert U.grad is not None and L.grad is None  # gradient into the unlabeled path only
    torch.testing.assert_close(cifp.cifp_attn(U, L, torch.zeros(2, 3, 2), 0.1), U)  # a = 0: unchanged


def test_cifp_attn_3d_shapes():
    U, L = torch.randn(2, 4, 2, 2, 3), torch.randn(2, 4, 2, 2, 3)
    assert cifp.cifp_attn(U, L, torch.rand(2, 2, 2, 3), 0.1).shape == U.shape


def test_cifp_proto_by_hand():
    L = torch.zeros(1, 2, 2, 2)
    L[0, :, 0, :] = torch.tensor([1.0, 0.0])[:, None]    # top row: class 0 features (1, 0)
    L[0, :, 1, 0] = torch.tensor([0.0, 2.0])             # bottom row: class 1 features (0, 2) and (0, 4)
    L[0, :, 1, 1] = torch.tensor([0.0, 4.0])
    y = torch.tensor([[[0, 0], [1, 1]]])                 # labels at the bottleneck resolution
    U = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # positions aligned with mu_0, mu_1
    out = cifp.cifp_proto(U, L, y, torch.ones(1, 1, 2), tau=0.01, num_classes=3)  # class 2 absent: ignored
    # mu_0 = (1, 0), mu_1 = (0, 3); tau 0.01 makes the softmax a hard choice
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([0.0, 3.0]), atol=1e-4, rtol=0)


def test_fusion_by_hand():
    P1 = torch.tensor([0.9, 0.1]).view(1, 2, 1)
    P2 = torch.tensor([0.5, 0.5]).view(1, 2, 1)
    y_hat, r, omega = cifp.fuse([P1, P2])
    H1 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    w1 = (1 - H1 + 1e-6) / ((1 - H1 + 1e-6) + (0 + 1e-6))
    assert omega[0].item() == pytest.approx(w1, rel=1e-5) and omega[1].item() == pytest.approx(1 - w1, abs=1e-5)
    p0 = w1 * 0.9 + (1 - w1) * 0.5
    H_bar = -(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)) / math.log(2)
    assert y_hat.item() == 0 and r.item() == pytest.approx(1 - H_bar, rel=1e-5)


def test_weighted_dice_by_hand():
    probs = torch.tensor([[[0.8, 0.4], [0.2, 0.6]]])
    label = torch.tensor([[0, 1]])
    w = torch.tensor([[1.0, 0.0]])  # only the first pixel counts
    s = 1e-5
    expected = ((1 - (2 * 0.8 + s) / (0.64 + 1 + s)) + (1 - (0 + s) / (0.04 + 0 + s))) / 2
    assert common.dice_loss(probs, label, weight=w).item() == pytest.approx(expected, abs=1e-6)
    assert common.dice_loss(probs, label, weight=torch.ones(1, 2)).item() == pytest.approx(
        common.dice_loss(probs, label).item())


def test_channel_dropout_drops_whole_channels():
    torch.manual_seed(0)
    f = torch.ones(2, 64, 4, 4)
    out = cifp.channel_dropout([f])[0]
    per_channel = out.flatten(2)
    assert ((per_channel == 0).all(-1) | (per_channel == 2).all(-1)).all()
    assert 0.3 < (per_channel == 0).all(-1).float().mean() < 0.7


def test_cutmix_box_and_strong_augment():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        box = common.cutmix_box((64, 64), p=1.0, generator=g)
        assert 0.01 <= box.mean() <= 0.41 and set(box.unique().tolist()) == {0.0, 1.0}
        box3 = common.cutmix_box((32, 32, 16), p=1.0, generator=g)
        assert 0.005 <= box3.mean() <= 0.45
    assert common.cutmix_box((64, 64), p=0.0).sum() == 0
    x = torch.rand(4, 1, 32, 32)
    y = common.strong_augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
    delta = torch.zeros(1, 9, 9)
    delta[0, 4, 4] = 1
    blurred = common._gaussian_blur(delta, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(blurred, blurred.flip(1).flip(2))  # symmetric
    assert common.strong_augment(torch.randn(2, 1, 8, 8, 4)).shape == (2, 1, 8, 8, 4)


def test_smoke_phantom2d_test_and_resume(tmp_path):
    args = [*SMOKE_2D, "--model_dir", tmp_path]
    run("train_cifp.py", *args, "--max_iterations", "2")
    ckpt = tmp_path / "Phantom2D_run_2_labeled" / "cifp" / "last.pth"
    assert "cases 6" in run("test_2d.py", "--ckpt", ckpt)  # 3 test patients x 2 frames
    header = (ckpt.parent / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_sup", "loss_s1", "loss_s2", "loss_fp", "loss_cifp", "mean_r", "omega_cifp"} <= set(header)
    run("train_cifp.py", *args, "--max_iterations", "4", "--resume", "--extend")
    assert torch.load(ckpt, weights_only=False)["iteration"] == 4


def test_smoke_phantom3d_proto(tmp_path):
    run("train_cifp.py", *SMOKE_3D, "--max_iterations", "2", "--cifp_mode",
        "proto", "--use_dropout_fp", "0", "--model_dir", tmp_path)
    assert "cases 4" in run("test_3d.py", "--ckpt", tmp_path / "Phantom3D_run_2_labeled" / "cifp" / "last.pth", *COARSE)
