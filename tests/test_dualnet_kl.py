"""Dual-network KL method (train_dualnet_kl.py): each loss on tiny tensors against hand computation or
the official code's formula written out naively, the gradient paths (default vs --as_released), and
smoke runs on both phantoms with the test script and resume."""

import argparse
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import train_dualnet_kl as dk
from conftest import COARSE, SMOKE_2D, SMOKE_3D, run


def first_metrics_row(folder):
    """The first logged iteration of a run folder's metrics.csv, column name -> float."""
    with open(folder / "metrics.csv") as f:
        return {k: float(v) for k, v in next(csv.DictReader(f)).items() if v != ""}


def probs(*rows):
    """(B=1, C, N) probabilities from per-voxel rows."""
    return torch.tensor(rows, dtype=torch.float32).T.unsqueeze(0)


def test_foreground_dice_binary_is_the_mcf_dice():
    p = probs([0.2, 0.8], [0.6, 0.4], [0.1, 0.9])
    y = torch.tensor([[1, 0, 1]])
    s = 1e-5
    expected = 1 - (2 * (0.8 + 0.9) + s) / ((0.64 + 0.16 + 0.81) + 2 + s)
    assert dk.foreground_dice(p, y).item() == pytest.approx(expected, rel=1e-6)
    # three classes: the mean of the two foreground Dice terms
    p3 = probs([0.2, 0.5, 0.3], [0.1, 0.1, 0.8])
    y3 = torch.tensor([[1, 2]])
    d1 = 1 - (2 * 0.5 + s) / (0.25 + 0.01 + 1 + s)
    d2 = 1 - (2 * 0.8 + s) / (0.09 + 0.64 + 1 + s)
    assert dk.foreground_dice(p3, y3).item() == pytest.approx((d1 + d2) / 2, rel=1e-6)


def test_disagreement_mask_and_mutual_correction_by_hand():
    p_A = probs([0.3, 0.7], [0.45, 0.55], [0.2, 0.8], [0.9, 0.1])
    p_B = probs([0.35, 0.65], [0.3, 0.7], [0.5, 0.5], [0.3, 0.7])
    # voxel 0: both confident fg -> 0; voxel 1: A fg at 0.55 < 0.6, B confident fg -> 1;
    # voxel 2: A confident fg, B bg (argmax takes the first of a tie) -> 1; voxel 3: A bg, B confident fg -> 1
    M = dk.disagreement_mask(p_A, p_B)
    assert M.tolist() == [[0.0, 1.0, 1.0, 1.0]]
    y = torch.tensor([[1, 1, 0, 0]])
    expected = ((0.55 - 1) ** 2 + (0.8 - 0) ** 2 + (0.1 - 0) ** 2) / (3 + 1e-16)   # (p_fg - y)^2 as the code
    assert dk.mutual_correction_loss(p_A, y, M).item() == pytest.approx(expected, rel=1e-6)
    assert dk.mutual_correction_loss(p_A, y, torch.zeros_like(M)).item() == 0.0


def test_fused_label_is_the_union_and_the_more_confident_net_breaks_ties():
    p_A = probs([0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7], [0.8, 0.1, 0.1])
    p_B = probs([0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1])
    # bg/fg2 -> 2; fg1/bg -> 1; fg1 (0.6) vs fg2 (0.8) -> 2; fg2 (0.7) vs fg1 (0.6) -> 2; bg/bg -> 0
    assert dk.fused_label(p_A, p_B).tolist() == [[2, 1, 2, 2, 0]]
    a, b = torch.randint(0, 2, (50,)), torch.randint(0, 2, (50,))
    pa, pb = F.one_hot(a, 2).T[None].float(), F.one_hot(b, 2).T[None].float()
    assert torch.equal(dk.fused_label(pa, pb)[0], a | b)          # two classes: the code's OR


def test_unreliable_mask_uses_the_numpy_percentile_and_nan_disables_it():
    torch.manual_seed(0)
    H_A, H_B = torch.rand(2, 7, 5), torch.rand(2, 7, 5)
    tA, tB = np.percentile(H_A.numpy().ravel(), 20), np.percentile(H_B.numpy().ravel(), 20)
    expected = (H_A.numpy() >= tA) & (H_B.numpy() >= tB)
    got = dk.unreliable_mask(H_A, H_B, 20)
    assert np.array_equal(got.numpy(), expected)
    kept = (~got).float().mean().item()
    assert 0.2 <= kept <= 0.4  # among the lowest 20 % of at least one network
    # the released entropy of raw logits: -z log z is NaN for a negative logit -> nothing is filtered
    z = torch.tensor([[[1.5, -0.3], [0.2, 2.0]]])                 # (B=1, C=2, N=2)
    assert torch.isnan(dk.entropy(z)).any()
    assert not dk.unreliable_mask(dk.entropy(z), dk.entropy(z)).any()


def test_pseudo_label_loss_by_hand():
    z = torch.tensor([[[2.0, 0.0, 1.0, -1.0], [0.0, 1.0, 1.0, 1.0]]])  # (1, 2, 4)
    target = torch.tensor([[0, 1, 1, 0]])
    unreliable = torch.tensor([[False, False, True, True]])
    ce = [-F.log_softmax(z[0, :, i], 0)[target[0, i]].item() for i in range(2)]
    assert dk.pseudo_label_loss(z, target, unreliable).item() == pytest.approx(4 / 2 * (ce[0] + ce[1]) / 2, rel=1e-6)


def naive_uncertainty_rectified_loss(inputs, targets, T):
    """The official `uncertainty_rectified_loss`, written out voxel by voxel."""
    B, C, N = inputs.shape
    total_w, total_kl = 0.0, 0.0
    for b in range(B):
        for v in range(N):
            pt = torch.softmax(targets[b, :, v], 0)
            label = torch.softmax(targets[b, :, v] / T, 0).argmax()
            log_ps = torch.log_softmax(inputs[b, :, v], 0)
            kl = sum(pt[c] * (torch.log(pt[c]) - log_ps[c]) for c in range(C))
            total_w += torch.exp(-kl) * (-log_ps[label])
            total_kl += kl
    return total_w / (B * N) + total_kl / (B * N)


def test_kl_weighted_loss_matches_the_code_formula_and_trains_only_the_student():
    torch.manual_seed(0)
    zs = torch.randn(2, 3, 5, requires_grad=True)
    zt = torch.randn(2, 3, 5, requires_grad=True)
    loss, w = dk.kl_weighted_loss(zs, zt, T=0.5)
    assert loss.item() == pytest.approx(naive_uncertainty_rectified_loss(zs.detach(), zt.detach(), 0.5).item(), rel=1e-5)
    assert w.shape == (2, 5) and 0 < w.min() and w.max() <= 1
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None
    same, _ = dk.kl_weighted_loss(zt.detach(), zt.detach())
    ce = F.cross_entropy(zt.detach(), zt.detach().argmax(1))
    assert same.item() == pytest.approx(ce.item(), rel=1e-5)       # D = 0, w = 1: plain CE to its own argmax


def test_cosine_loss_by_hand():
    p_A, p_B = probs([1.0, 0.0], [0.5, 0.5]), probs([0.0, 1.0], [0.5, 0.5])
    assert dk.cosine_loss(p_A, p_B).item() == pytest.approx((1 + 0) / 2, abs=1e-6)


def test_prototype_loss_by_hand_and_its_gradient_path():
    # 6 voxels, 2-d features; reliable bg voxels 0, 1 and fg voxel 2; unreliable voxels 3, 4, 5
    f = torch.tensor([[[1.0, 3.0, 0.0, 0.0, 1.0, 2.0],
                       [0.0, 0.0, 2.0, 1.0, 1.0, 0.0]]], requires_grad=True)   # (1, 2, 6)
    yhat_u = torch.tensor([[0, 0, 1, 0, 0, 0]])
    unreliable = torch.tensor([[False, False, False, True, True, True]])
    yhat_loser = torch.tensor([[0, 0, 0, 1, 1, 0]])
    # |U_fg| = 2 -> N = 2 // 100 = 0: nothing is sampled, the loss is 0 (the code's NaN, skipped)
    loss, n, gap = dk.prototype_loss(f, yhat_u, unreliable, yhat_loser, 2)
    assert loss.item() == 0 and n == 0
    assert gap.item() == pytest.approx(2 ** 0.5, rel=1e-6)          # |(1,0) - (0,1)|
    # 200 unreliable fg voxels -> N = 2 per class
    f2 = torch.zeros(1, 2, 403)
    f2[0, 0, :3] = torch.tensor([2.0, 1.0, 0.0]); f2[0, 1, :3] = torch.tensor([0.0, 0.0, 5.0])   # reliable: bg, bg, fg
    f2[0, :, 3:203] = torch.tensor([[1.0], [1.0]])                 # unreliable, loser says fg: direction (1,1)
    f2[0, :, 203:] = torch.tensor([[0.0], [3.0]])                  # unreliable, loser says bg: direction (0,1)
    f2.requires_grad_(True)
    yhat_u2 = torch.tensor([[0, 0, 1] + [0] * 400])
    unrel2 = torch.tensor([[False] * 3 + [True] * 400])
    loser2 = torch.tensor([[0, 0, 0] + [1] * 200 + [0] * 200])
    loss2, n2, _ = dk.prototype_loss(f2, yhat_u2, unrel2, loser2, 2)
    d_fg = ((2 ** -0.5) ** 2 + (2 ** -0.5 - 1) ** 2) ** 0.5        # |(1,1)/sqrt2 - (0,1)|
    d_bg = 2 ** 0.5                                                # |(0,1) - (1,0)|
    assert n2 == 4 and loss2.item() == pytest.approx(d_fg + d_bg, rel=1e-5)
    loss2.backward()
    assert f2.grad[0, :, :3].abs().sum() == 0                      # prototypes detached: no gradient
    assert (f2.grad[0].abs().sum(0) > 0).sum() > 0                 # the sampled candidates get it


def test_default_trains_through_l_u_and_l_c_while_as_released_does_not():
    torch.manual_seed(0)
    net = dk.build_networks(common.get_dataset("Phantom2D"))[0]
    x = torch.randn(2, 1, 32, 32)
    z, dec = net.decoder(net.encoder(x))
    p = torch.softmax(z, 1)
    yhat = dk.fused_label(p.detach(), p.detach())
    unreliable = dk.unreliable_mask(dk.entropy(p.detach()), dk.entropy(p.detach()) + 1)
    f = torch.cat([dec[-1]] * 30, 0)  # enough voxels for N > 0
    yh, un, lo = (t.repeat(30, 1, 1) for t in (yhat, unreliable, (p.argmax(1) * 0 + 1)))
    # default: the losses have a graph to the parameters
    loss_u = dk.pseudo_label_loss(z, yhat, unreliable)
    loss_c, n, _ = dk.prototype_loss(f, yh, un, lo, 4)
    assert n > 0
    (loss_u + loss_c).backward()
    assert all(q.grad is not None for q in net.decoder.out_conv.parameters())
    # as released: CE on detached probabilities and the prototype loss under no_grad
    released_u = dk.pseudo_label_loss(p.detach(), yhat, unreliable)
    with torch.no_grad():
        released_c, _, _ = dk.prototype_loss(f, yh, un, lo, 4)
    assert not released_u.requires_grad and not released_c.requires_grad
    assert released_u.item() != pytest.approx(loss_u.item())     # softmax applied twice in the released value


def test_smoke_phantom2d_test_and_resume(tmp_path):
    args = [*SMOKE_2D, "--model_dir", tmp_path]
    run("train_dualnet_kl.py", *args, "--max_iterations", "2")
    ckpt = tmp_path / "Phantom2D_run_2_labeled" / "dualnet_kl" / "last.pth"
    saved = torch.load(ckpt, weights_only=False)
    assert [n["kwargs"]["residual_encoder"] for n in saved["nets"]] == [True, False]  # the ensemble is the checkpoint
    assert saved["inference"] == "softmax_mean" and len(saved["state_dicts"]) == 2
    assert "cases 6" in run("test_2d.py", "--ckpt", ckpt)
    assert "network 0 of 2 only" in run("test_2d.py", "--ckpt", ckpt, "--member", "0")  # subnet A alone
    assert (ckpt.parent / "last_test_member0_summary.csv").exists()
    header = (ckpt.parent / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_u_A", "loss_kl", "loss_cos", "loss_c", "kept_fraction", "mean_w"} <= set(header)
    run("train_dualnet_kl.py", *args, "--max_iterations", "4", "--resume", "--extend")
    assert torch.load(ckpt, weights_only=False)["iteration"] == 4


def test_smoke_phantom3d_as_released(tmp_path):
    run("train_dualnet_kl.py", *SMOKE_3D, "--max_iterations", "2", "--as_released",
        "--model_dir", tmp_path)
    folder = tmp_path / "Phantom3D_run_2_labeled" / "dualnet_kl"
    assert "cases 4" in run("test_3d.py", "--ckpt", folder / "last.pth", *COARSE)
    row = first_metrics_row(folder)
    assert row["kept_fraction"] == 1.0  # released: some logit is negative -> NaN entropy -> the filter keeps every voxel
    assert row["proto_samples"] == 0 and row["loss_c"] == 0.0   # the released L_c is NaN then: logged as 0


def test_labeled_terms_only_ablation_trains_on_l_s_alone(tmp_path):
    run("train_dualnet_kl.py", *SMOKE_2D, "--max_iterations", "1", "--labeled_terms_only", "--val_split", "none",
        "--model_dir", tmp_path)
    r = first_metrics_row(tmp_path / "Phantom2D_run_2_labeled" / "dualnet_kl")
    assert r["loss"] == pytest.approx(r["loss_s_A"] + r["loss_s_B"], rel=1e-4)
    assert r["loss_kl"] > 0 and r["loss_cos"] > 0    # the unlabeled terms are still computed and logged


def test_dropout_is_the_codes_except_on_acdc_and_the_flag_reaches_the_checkpoint(tmp_path):
    info = common.get_dataset("Phantom2D")
    count = lambda net: sum(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in net.modules())
    assert [count(n) for n in dk.build_networks(info)] == [1, 2]       # (C) A: last feature; B: bottleneck + last
    assert [count(n) for n in dk.build_networks(info, dropout=False)] == [0, 0]
    parser = common.add_common_args(argparse.ArgumentParser())
    parser.add_argument("--dropout", default=None)
    assert common.parse_args(parser, ["--dataset", "ACDC"], dk.DEFAULTS).dropout == "off"       # (R) ACDC
    for dataset in ("LA", "Pancreas", "Phantom2D"):
        assert common.parse_args(parser, ["--dataset", dataset], dk.DEFAULTS).dropout == "on"   # (C)
    run("train_dualnet_kl.py", *SMOKE_2D, "--max_iterations", "1", "--dropout", "off", "--val_split", "none",
        "--model_dir", tmp_path)
    ckpt = torch.load(tmp_path / "Phantom2D_run_2_labeled" / "dualnet_kl" / "last.pth", weights_only=False)
    assert [spec["kwargs"]["has_dropout"] for spec in ckpt["nets"]] == [False, False]
