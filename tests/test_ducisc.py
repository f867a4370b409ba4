"""DuCiSC (train_ducisc.py): each loss, mask, threshold update and prototype on tiny tensors against hand
computation, the self-normalisation's gradient, network shapes, and smoke runs with test script and resume."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import train_ducisc as dc
from conftest import COARSE, SMOKE_2D, SMOKE_3D, run


def test_binary_and_foreground_dice_by_hand():
    p = torch.tensor([0.8, 0.4, 0.1])
    t = torch.tensor([1.0, 0.5, 0.0])
    assert dc.binary_dice(p, t).item() == pytest.approx(1 - 2 * (0.8 + 0.2) / (1.3 + 1.5), rel=1e-6)
    P = torch.tensor([[[0.2, 0.9], [0.8, 0.1]]])          # (B=1, C=2, N=2)
    T = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    assert dc.fg_dice(P, T, mask).item() == pytest.approx(1 - 2 * 0.8 / (0.8 + 1.0), rel=1e-6)  # voxel 0 only
    P3 = torch.tensor([[[0.5, 0.1], [0.3, 0.1], [0.2, 0.8]]])  # 3 classes: mean of classes 1 and 2
    T3 = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    d1, d2 = 1 - 2 * 0.3 / (0.4 + 1), 1 - 2 * 0.8 / (1.0 + 1)
    assert dc.fg_dice(P3, T3).item() == pytest.approx((d1 + d2) / 2, rel=1e-6)


def test_deepsup_loss_hard_and_soft_by_hand():
    O = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])   # (1, 2, 3) logits, one scale
    T = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])   # labels 0, 1, 1
    logp = F.log_softmax(O, 1)
    p = logp.exp()
    ce = -(logp[0, 0, 0] + logp[0, 1, 1] + logp[0, 1, 2]) / 3
    dice = dc.binary_dice(p[0, 1], T[0, 1])
    total, ce_out, dice_out = dc.deepsup_loss([O], [T])
    assert ce_out.item() == pytest.approx(ce.item(), rel=1e-6) and total.item() == pytest.approx((ce + dice).item() / 2)
    # two scales: the mean over scales
    total2, _, _ = dc.deepsup_loss([O, O], [T, T])
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)
    # masked, hard: only the certain voxels
    m = torch.tensor([[True, False, True]])
    _, ce_m, _ = dc.deepsup_loss([O], [T], [m])
    assert ce_m.item() == pytest.approx(-(logp[0, 0, 0] + logp[0, 1, 2]).item() / 2, rel=1e-6)
    # soft (D10): kl_div averaged over the certain (voxel, class) entries
    S = torch.tensor([[[0.3, 0.5, 1.0], [0.7, 0.5, 0.0]]])
    _, ce_s, _ = dc.deepsup_loss([O], [S], [m], soft=True)
    kl = lambda v: sum(S[0, c, v] * (math.log(S[0, c, v]) - logp[0, c, v]) if S[0, c, v] > 0 else 0 for c in range(2))
    assert ce_s.item() == pytest.approx(float(kl(0) + kl(2)) / 4, rel=1e-5)   # 2 voxels x 2 classes
    # an empty mask gives NaN: the caller skips the term, as the code
    _, ce_e, _ = dc.deepsup_loss([O], [T], [torch.zeros_like(m)])
    assert torch.isnan(ce_e)


def test_certain_masks_by_hand():
    P = torch.tensor([[[0.9, 0.6, 0.3, 0.45], [0.1, 0.4, 0.7, 0.55]]])  # (1, 2, 4)
    tau = torch.tensor([[0.8, 0.6]])                                     # bg 0.8, fg 0.6 at this scale
    # voxel 0: bg 0.9 > 0.8; voxel 1: bg 0.6 < 0.8, fg 0.4 < 0.6; voxel 2: fg 0.7 > 0.6; voxel 3: neither
    assert dc.certain_masks([P], tau)[0].tolist() == [[True, False, True, False]]


def test_update_thresholds_by_hand():
    P_S = [torch.tensor([[[0.9, 0.7, 0.2], [0.1, 0.3, 0.8]]])]          # student probabilities, one scale
    y_hat = [torch.tensor([[0, 0, 1]])]                                  # teacher argmax
    tau = torch.tensor([[0.5, 0.94]])
    new = dc.update_thresholds(tau, P_S, y_hat)
    assert new[0, 0].item() == pytest.approx(0.99 * 0.5 + 0.01 * 0.8)            # mu_bg = (0.9 + 0.7) / 2
    assert new[0, 1].item() == pytest.approx(min(0.95, 0.99 * 0.94 + 0.01 * 0.8))
    # no voxel of a class: unchanged; the clip keeps [0.5, 0.95]
    new2 = dc.update_thresholds(torch.tensor([[0.5, 0.7]]), [P_S[0]], [torch.tensor([[0, 0, 0]])])
    assert new2[0, 1].item() == pytest.approx(0.7)                                 # no voxel labelled fg
    assert new2[0, 0].item() == pytest.approx(0.99 * 0.5 + 0.01 * (0.9 + 0.7 + 0.2) / 3)
    low = dc.update_thresholds(torch.tensor([[0.25, 0.25]]), P_S, y_hat)          # 4-class start 1/C -> floor 0.5
    assert low.tolist() == [[0.5, 0.5]]
    high = dc.update_thresholds(torch.tensor([[0.99, 0.99]]), P_S, y_hat)
    torch.testing.assert_close(high, torch.tensor([[0.95, 0.95]]))


def test_prototypes_by_hand_and_nan_for_an_absent_class():
    Fk = torch.tensor([[[1.0, 3.0, 5.0]], [[2.0, 4.0, 6.0]]])            # (B=2, C_k=1, N=3)
    m = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],                 # image 0: bg voxel 0, fg voxels 1, 2
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])                # image 1: bg 0, 1; fg 2
    proto = dc.prototypes([Fk], [m])[0]                                   # (C=2, C_k=1)
    assert proto[0, 0].item() == pytest.approx((1.0 + 3.0) / 2)           # mean of per-image means 1 and 3
    assert proto[1, 0].item() == pytest.approx((4.0 + 6.0) / 2)           # 4 and 6
    soft = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 1.0]]])             # soft weights (fused)
    assert dc.prototypes([Fk[:1]], [soft])[0][1, 0].item() == pytest.approx((0.5 + 1.5 + 5.0) / 2.0)
    absent = m.clone()
    absent[1, 1] = 0                                                      # image 1 has no fg
    assert torch.isnan(dc.prototypes([Fk], [absent])[0][1]).all()


def test_prototype_loss_takes_the_coarsest_levels_and_skips_nan():
    a = [torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 2)]          # fine -> coarse
    b = [torch.full((2, 4), 1.0), torch.full((2, 3), 2.0), torch.full((2, 2), float("nan"))]
    loss, n = dc.prototype_loss(a, b, num_proto=4)
    assert n == 2 and loss.item() == pytest.approx((1.0 + 4.0) / 2)       # the NaN coarsest level skipped
    loss1, n1 = dc.prototype_loss(a, b, num_proto=2)                      # the two coarsest: NaN and 4
    assert n1 == 1 and loss1.item() == pytest.approx(4.0)
    assert dc.prototype_loss(a[2:], b[2:])[0] is None


def test_self_normalisation_gradient_is_grad_over_value():
    w = torch.tensor([2.0], requires_grad=True)
    L = (3 * w) ** 2                                   # 36, dL/dw = 36
    out = dc.self_normalized(L)
    assert out.item() == pytest.approx(1.0)
    out.backward()
    assert w.grad.item() == pytest.approx(36 / 36)     # grad(L) / L, not grad(L)
    w2 = torch.tensor([2.0], requires_grad=True)
    dc.self_normalized(10 * (3 * w2) ** 2).backward()
    assert w2.grad.item() == pytest.approx(1.0)        # the scale of a term does not matter


@pytest.mark.parametrize("name,shape", [("Phantom3D", (2, 1, 32, 32, 16)), ("Phantom2D", (2, 1, 32, 32))])
def test_forward_deepsup_shapes(name, shape):
    info = common.get_dataset(name)
    net = dc.build_network(info)
    logits, feats = dc.forward_deepsup(net, torch.randn(shape))
    spatial = shape[2:]
    assert [tuple(o.shape[2:]) for o in logits] == [tuple(s // 2 ** k for s in spatial) for k in (3, 2, 1, 0)]
    assert [tuple(f.shape[2:]) for f in feats] == [tuple(s // 2 ** k for s in spatial) for k in (0, 1, 2, 3)]
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
    if info.dims == 3:  # the V-Net's features are the decoder sums before the stage convolutions
        enc = net.encoder(torch.randn(shape))
        torch.testing.assert_close(net.decoder(enc)[1][0], net.decoder.up[0](enc[4]) + enc[3])


def test_forward_deepsup_returns_float32_under_autocast():
    """--amp on CUDA: the prototype pooling mixes features with float32 masks, so the forward must hand back
    float32 (this failed on a GPU before the fix; bfloat16 CPU autocast reproduces it here)."""
    info = common.get_dataset("Phantom2D")
    net = dc.build_network(info)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, feats = dc.forward_deepsup(net, torch.randn(2, 1, 32, 32))
    assert {t.dtype for t in logits + feats} == {torch.float32}
    masks = [common.one_hot(torch.randint(0, 4, (2, *f.shape[2:])), 4) for f in feats]
    assert len(dc.prototypes(feats, masks)) == 4


def test_smoke_phantom2d_test_and_resume(tmp_path):
    args = [*SMOKE_2D, "--model_dir", tmp_path]
    run("train_ducisc.py", *args, "--max_iterations", "3")
    ckpt = tmp_path / "Phantom2D_run_2_labeled" / "ducisc" / "last.pth"
    saved = torch.load(ckpt, weights_only=False)
    assert len(saved["nets"]) == 1 and "teacher" in saved["models"]            # evaluation: the student only
    assert saved["method_state"]["thresholds"].shape == (4, 4)
    assert "cases 6" in run("test_2d.py", "--ckpt", ckpt)
    header = (ckpt.parent / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_cs_ulb", "loss_cs_mix", "loss_proto_ulb", "loss_proto_mix", "tau_s4_c3", "active_terms"} <= set(header)
    run("train_ducisc.py", *args, "--max_iterations", "5", "--resume", "--extend")
    assert torch.load(ckpt, weights_only=False)["iteration"] == 5


def test_smoke_phantom3d(tmp_path):
    run("train_ducisc.py", *SMOKE_3D, "--max_iterations", "3",
        "--model_dir", tmp_path)
    folder = tmp_path / "Phantom3D_run_2_labeled" / "ducisc"
    assert "cases 4" in run("test_3d.py", "--ckpt", folder / "last.pth", *COARSE)
    thresholds = torch.load(folder / "last.pth", weights_only=False)["method_state"]["thresholds"]
    assert thresholds.shape == (4, 2) and (thresholds >= 0.5).all()        # updated after the 1-iteration warm-up


def test_batch_must_pair_labeled_with_unlabeled(tmp_path):
    with pytest.raises(common.DataError, match="at least twice --labeled_bs 2"):
        dc.main(["--dataset", "Phantom2D", "--labeled_num", "2", "--batch_size", "3", "--labeled_bs", "2",
                           "--max_iterations", "1", "--model_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
