"""UC-Seg (train_ucseg.py): evidential terms, losses, UPG tokens and shapes, pseudo-label clean-up, the CCP losses
against naive loops, the queue pointer fix vs the released shared pointer, and smoke runs with the fused model
as the checkpoint."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

import train_ucseg as uc
from conftest import COARSE, SMOKE_2D, SMOKE_3D, run


def test_uncertainty_and_au_loss_by_hand():
    z = torch.tensor([[[0.0], [2.0]]])                                    # (B=1, C=2, N=1)
    alpha = F.softplus(z) + 1
    S = alpha.sum()
    assert uc.uncertainty(z).item() == pytest.approx(2 / S.item(), rel=1e-6)
    p_hat, u = (alpha.max() / S).item(), 2 / S.item()
    y_right, y_wrong = torch.tensor([[1]]), torch.tensor([[0]])
    # t = 0: lambda = 0.01; a correct voxel costs 0.01 * (-p log(1 - u)), a wrong one 0.99 * (-(1 - p) log u)
    assert uc.au_loss(z, y_right, 0, 100).item() == pytest.approx(0.01 * -p_hat * math.log(1 - u), rel=1e-5)
    assert uc.au_loss(z, y_wrong, 0, 100).item() == pytest.approx(0.99 * -(1 - p_hat) * math.log(u), rel=1e-5)
    assert uc.au_loss(z, y_wrong, 100, 100).item() == pytest.approx(0.0, abs=1e-7)   # lambda = 1 at the end


def test_dice_and_seg_loss_by_hand():
    P = torch.tensor([[[[0.8, 0.2]], [[0.2, 0.8]]]])                      # (1, 2, 1, 2)
    Y = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    e = 1e-5
    assert uc.dice_loss(P, Y).item() == pytest.approx(1 - (1.6 + e) / (2.0 + e), rel=1e-6)
    z = torch.randn(2, 2, 4, 4)
    Yb = F.one_hot(torch.randint(0, 2, (2, 4, 4)), 2).movedim(-1, 1).float()
    expected = F.binary_cross_entropy(torch.sigmoid(z), Yb) + uc.dice_loss(torch.sigmoid(z), Yb)
    assert uc.seg_loss(z, Yb, binary=True).item() == pytest.approx(expected.item(), rel=1e-5)
    ce = -(Yb * F.log_softmax(z, 1)).sum(1).mean()
    assert uc.seg_loss(z, Yb, binary=False).item() == pytest.approx((ce + uc.dice_loss(torch.softmax(z, 1), Yb)).item(),
                                                                   rel=1e-5)
    # 3D: volumetric by default, per slice along the last axis when released
    P3 = torch.zeros(1, 1, 2, 2, 2)
    Y3 = torch.zeros(1, 1, 2, 2, 2)
    P3[..., 0], Y3[..., 0] = 1.0, 1.0                                     # slice 0 perfect, slice 1 empty
    assert uc.dice_loss(P3, Y3).item() == pytest.approx(0.0, abs=1e-6)
    assert uc.dice_loss(P3, Y3, per_slice=True).item() == pytest.approx(0.0, abs=1e-6)   # empty slice: (0+e)/(0+e)
    P3[..., 1, 1, 1] = 1.0                                                # a false positive in slice 1 only
    vol, sl = uc.dice_loss(P3, Y3).item(), uc.dice_loss(P3, Y3, per_slice=True).item()
    assert vol == pytest.approx(1 - (8 + e) / (9 + e), rel=1e-5) and sl == pytest.approx(0.5 * (1 - e / (1 + e)), rel=1e-4)


def test_labeled_dice_is_the_soft_foreground_dice():
    z = torch.tensor([[[[0.0, 0.0]], [[2.0, -2.0]]]])                     # (1, 2, 1, 2) logits
    Y = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])
    p = torch.sigmoid(torch.tensor([2.0, -2.0]))
    expected = 2 * p[0] / (p.sum() + 1 + 0.001)
    assert uc.labeled_dice(z, Y, binary=True).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("shape,p", [((2, 1, 8, 12), 4), ((1, 1, 4, 8, 4), 2)])
def test_tokens_round_trip_and_raster_order(shape, p):
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    t = uc.to_tokens(x, p)
    assert t.shape == (shape[0], math.prod(s // p for s in shape[2:]), p ** (len(shape) - 2))
    torch.testing.assert_close(uc.from_tokens(t, shape[2:], p), x)
    first = x[0, 0][tuple(slice(0, p) for _ in shape[2:])].reshape(-1)   # the first token is the corner patch
    torch.testing.assert_close(t[0, 0], first)
    if len(shape) == 4:                                                   # the second is its right neighbour
        torch.testing.assert_close(t[0, 1], x[0, 0, :p, p:2 * p].reshape(-1))


def test_upg_shapes_and_gradients():
    torch.manual_seed(0)
    upg = uc.UPG(2, 4, (32, 32), 8)
    z1, z2 = torch.randn(2, 4, 32, 32, requires_grad=True), torch.randn(2, 4, 32, 32, requires_grad=True)
    u1, u2 = uc.uncertainty(z1), uc.uncertainty(z2)
    out, A = upg(z1, z2, u1, u2)
    assert out.shape == (2, 4, 32, 32) and upg.pos.shape == (1, 16, 96) and A.shape == (2, 1, 32, 32)
    assert (out >= -0.2 * out.abs().max() - 1e-6).all()                   # ends in LeakyReLU(0.2)
    out.sum().backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0            # nothing detached (ref §2.3)
    with pytest.raises(RuntimeError):
        upg(*(torch.randn(1, 4, 48, 48),) * 2, *(torch.rand(1, 1, 48, 48),) * 2)   # fixed token grid


def test_binary_inference_logits_give_the_sigmoid():
    torch.manual_seed(0)
    model = uc.UCSegModel(2, 2, (32, 32), 2).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        z_hat = model.outputs(x)[4]
        probs = torch.softmax(model(x), 1)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(z_hat[:, 1]))
    assert model.net2.config["normalization"] == "none" and not model.net2.config["has_dropout"]


def test_hard_prediction_keeps_the_largest_component_per_class():
    z = torch.full((1, 3, 6, 6), -5.0)
    z[0, 0] = 0.0
    z[0, 1, 0:2, 0:2] = 5.0                                               # class 1: 4 pixels
    z[0, 1, 4:6, 4:5] = 5.0                                               # class 1: 2 pixels, separate
    z[0, 2, 0:1, 4:6] = 5.0                                               # class 2: one component
    Y = uc.hard_prediction(z, binary=False)
    labels = Y.argmax(1)[0]
    assert (labels == 1).sum() == 4 and labels[4, 4] == 0 and (labels == 2).sum() == 2
    zb = torch.zeros(1, 2, 5, 5, 5)
    zb[0, 1] = -5.0
    zb[0, 1, :2, :2, :2] = 5.0
    zb[0, 1, 4, 4, 4] = 5.0
    assert uc.hard_prediction(zb, binary=True)[0, 1].sum() == 8


def test_ife_loss_matches_a_naive_infonce():
    torch.manual_seed(0)
    ccp = uc.CCP(num_classes=3, dim=4, K=6)
    feat = torch.randn(2, 4, 2, 2)
    M = F.one_hot(torch.randint(0, 3, (2, 2, 2)), 3).movedim(-1, 1).float()
    loss = ccp.ife_loss(0, feat, M)
    total = 0.0
    for c in range(3):
        for b in range(2):
            q = (feat[b] * M[b, c]).mean((1, 2))
            pos = ccp.queues[0, c].mean(1)
            negs = [ccp.queues[0, j, :, n] for j in range(3) if j != c for n in range(6)]
            logits = torch.stack([q @ pos] + [q @ n for n in negs]) / 0.3
            total += -torch.log_softmax(logits, 0)[0]
    assert loss.item() == pytest.approx(total.item() / 6, rel=1e-5)


def test_ic_loss_matches_a_naive_infonce():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    r1, r2 = F.adaptive_avg_pool2d(f1, 3).flatten(2), F.adaptive_avg_pool2d(f2, 3).flatten(2)
    total = 0.0
    for i in range(9):
        for b in range(2):
            negs = [r2[bb, :, j] for bb in range(2) for j in range(9) if j != i]
            logits = torch.stack([r1[b, :, i] @ r2[b, :, i]] + [r1[b, :, i] @ n for n in negs]) / 0.3
            total += -torch.log_softmax(logits, 0)[0]
    assert uc.CCP.ic_loss(f1, f2).item() == pytest.approx(total.item() / 18, rel=1e-5)


@pytest.mark.parametrize("shared,expected_written", [(True, {0: {0, 1, 4, 5}, 1: {2, 3, 6, 7}}),
                                                     (False, {0: set(range(8)), 1: set(range(8))})])
def test_queue_pointer_released_bug_and_fix(shared, expected_written):
    ccp = uc.CCP(num_classes=2, dim=1, K=8, shared_pointer=shared)
    ccp.queues.fill_(-1.0)                                                # mark every slot as never written
    feat = torch.ones(2, 1, 2, 2)                                         # B = 2: K / B = 4 blocks
    L = torch.ones(2, 2, 2, 2)
    for _ in range(8):
        ccp.enqueue(0, feat, L)
    written = {c: {n for n in range(8) if ccp.queues[0, c, 0, n] != -1.0} for c in range(2)}
    assert written == expected_written                                    # released: half of each queue stays random
    assert (ccp.queues[1] == -1.0).all()                                  # the other subnet's queues untouched


def test_box_mask_is_two_thirds_of_each_side():
    m = uc.box_mask((12, 9), torch.Generator().manual_seed(0))
    assert (m == 0).sum() == 8 * 6 and set(m.unique().tolist()) == {0.0, 1.0}


def test_prediction_consistency_has_no_gradient():
    P1 = torch.rand(2, 2, 3, 3, requires_grad=True)
    d = uc.prediction_consistency(P1, torch.rand(2, 2, 3, 3))
    assert not d.requires_grad


def test_smoke_phantom2d_fused_checkpoint_and_resume(tmp_path):
    args = [*SMOKE_2D, "--model_dir", tmp_path]
    run("train_ucseg.py", *args, "--max_iterations", "2")
    ckpt = tmp_path / "Phantom2D_run_2_labeled" / "ucseg" / "last.pth"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["nets"][0]["name"] == "UCSegModel" and saved["nets"][0]["module"] == "train_ucseg"
    assert saved["nets"][0]["kwargs"]["upg_patch"] == 2 and "ccp" in saved["models"]
    assert any(k.startswith("upg.") for k in saved["state_dicts"][0])    # the fusion head is in the checkpoint
    assert "cases 6" in run("test_2d.py", "--ckpt", ckpt)
    run("train_ucseg.py", *args, "--max_iterations", "4", "--resume", "--extend")
    assert torch.load(ckpt, weights_only=False)["iteration"] == 4


def test_smoke_phantom3d_as_released(tmp_path):
    run("train_ucseg.py", *SMOKE_3D, "--max_iterations", "2", "--as_released",
        "--model_dir", tmp_path)
    ckpt = tmp_path / "Phantom3D_run_2_labeled" / "ucseg" / "last.pth"
    assert torch.load(ckpt, weights_only=False)["test_rules"] == {"lcc": True, "stride": (18, 18, 4)}  # (C) its 3D test
    out = run("test_3d.py", "--ckpt", ckpt, *COARSE)
    assert "cases 4" in out and "largest component per class: on; stride [32, 32, 16]" in out
    with open(ckpt.parent / "last_test_summary.csv") as f:
        summary = {r["key"]: r["value"] for r in csv.DictReader(f)}
    assert summary["lcc"] == "True" and summary["stride"] == "[32, 32, 16]"


def test_upg_patch_must_divide_the_patch(tmp_path):
    with pytest.raises(uc.common.DataError, match="--upg_patch 5 must divide"):
        uc.main(["--dataset", "Phantom2D", "--labeled_num", "2", "--patch_size", "32", "32", "--batch_size",
                          "4", "--labeled_bs", "2", "--upg_patch", "5", "--max_iterations", "1", "--model_dir",
                          str(tmp_path)])
    assert not any(tmp_path.iterdir())
