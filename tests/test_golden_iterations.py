"""Golden parity of one whole training iteration per method against its official code
(tests/golden/README.md): from the same weights (tests/golden_fill.py) and batch, every loss term, the
gradient with respect to the input images and each parameter's SGD update (its sum and norm), with
dropout and stochastic depth switched off on both sides so that nothing random remains."""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import train_ducisc as dc
import train_dualnet_kl as dk
import train_icl
from golden_fill import execution_order, fill, keyed
from unet2d import UNet

GOLDEN = Path(__file__).parent / "golden"


def updates_by_module(order, before):
    """[(gradient sum, gradient norm, update sum, update norm)] of each parameter, sorted by (parameter
    shapes, k, j) as golden_fill seeds them."""
    rows = []
    for signature, k, m in keyed(order):
        for j, p in enumerate(m.parameters(recurse=False)):
            d = (p.detach() - before[id(p)]).double()
            grad = (p.grad if p.grad is not None else torch.zeros_like(p)).double()
            rows.append(((signature, k, j), [float(grad.sum()), float(grad.norm()), float(d.sum()), float(d.norm())]))
    return np.array([r for _, r in sorted(rows)])


def assert_close_updates(ours, official):
    """Parameters that did not move (outside the loss graph: the official ICL modules run query convolutions
    whose output nothing uses; ours does not run them) are left out on both sides."""
    ours, official = ours[ours[:, 3] > 0], official[official[:, 3] > 0]
    assert ours.shape == official.shape
    # gradients: relative 1e-4; absolute 5e-6 for gradients that are zero up to float32 noise (a conv bias
    # before a batch norm reaches a few 1e-6 in a deep 3D network), against gradient norms of 1e-3 to 1
    np.testing.assert_allclose(ours[:, 1], official[:, 1], rtol=1e-4, atol=5e-6)      # gradient norms
    # gradient sums cancel: each within 1e-3 of itself plus 1e-5 of its gradient's norm, where that norm is
    # above the float32 noise floor (1e-5: a conv bias before a batch norm has a zero gradient up to noise)
    s, ref, norm = ours[:, 0], official[:, 0], official[:, 1]
    assert np.all((np.abs(s - ref) <= 1e-3 * np.abs(ref) + 1e-5 * norm + 5e-7) | (norm < 1e-5))
    # parameters after the step: float32 storage rounds (p + step) - p to about 1e-7 of |p| per element,
    # so an update's norm within 1e-3 and its sum within 1e-3 of the update's norm
    np.testing.assert_allclose(ours[:, 3], official[:, 3], rtol=1e-3, atol=2e-7)
    assert np.all(np.abs(ours[:, 2] - official[:, 2]) <= 1e-3 * np.abs(official[:, 2]) + 1e-3 * official[:, 3] + 2e-7)


class ICLModel(nn.Module):
    """The three trained parts of train_icl.py, called in its loop's order."""

    def __init__(self):
        super().__init__()
        channels, shapes = train_icl.icl_geometry(2, (32, 32))
        self.net = UNet(dims=2, num_classes=4)           # what train_icl.py builds for ACDC
        self.sspa = train_icl.ICLModule(2, channels, shapes, 4)
        self.uscl = train_icl.ICLModule(2, channels, shapes, 4)

    def forward(self, x_l, x_u):
        p_l, feats_l = train_icl.icl_features(self.net, x_l)
        p_u, feats_u = train_icl.icl_features(self.net, x_u)
        M_l, proxies = self.sspa(feats_l)
        M_u, _ = self.sspa(feats_u)
        G_u, _ = self.uscl(feats_u, proxies)
        return p_l, p_u, M_l, M_u, G_u


def test_icl_iteration_matches_the_official_one(monkeypatch):
    g = np.load(GOLDEN / "icl_iteration.npz")
    monkeypatch.setattr(train_icl, "DROP_PATH", 0.0)
    model = ICLModel()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x_l, x_u, y_l = (torch.from_numpy(g[k]) for k in ("x_l", "x_u", "y_l"))
    forward = lambda n, v: n(*v)  # noqa: E731
    fill(model, (x_l, x_u), forward).train()
    order = execution_order(model, (x_l, x_u), forward)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    xl, xu = x_l.clone().requires_grad_(True), x_u.clone().requires_grad_(True)
    # the loop body of train_icl.py
    p_l, p_u, M_l, M_u, G_u = model(xl, xu)
    loss_seg = train_icl.seg_loss(p_l, y_l)
    loss_spa = train_icl.spa_loss(M_l, y_l)
    loss_usc = train_icl.usc_loss(G_u, p_u)
    loss_con = train_icl.con_loss(G_u, M_u)
    loss = loss_seg + loss_spa + 1.0 * loss_usc + 50.0 * loss_con
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    np.testing.assert_allclose(p_l.detach().numpy(), g["logits_l"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p_u.detach().numpy(), g["logits_u"], rtol=1e-4, atol=1e-5)
    terms = [t.item() for t in (loss_seg, loss_spa, loss_usc, loss_con, loss)]
    np.testing.assert_allclose(terms, g["terms"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xl.grad.numpy(), g["grad_x_l"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(xu.grad.numpy(), g["grad_x_u"], rtol=1e-4, atol=1e-6)
    assert_close_updates(updates_by_module(order, before), g["updates"])


def test_ducisc_iteration_matches_the_official_one():
    """3D binary, the first iteration after the warm-up (every term active, thresholds updated), from a
    mid-run threshold state; the teacher is a second network with its own weights, as in the code."""
    g = np.load(GOLDEN / "ducisc_iteration.npz")
    info = common.get_dataset("LA")
    net, teacher = dc.build_network(info), dc.build_network(info)
    for m in list(net.modules()) + list(teacher.modules()):
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    image, y = torch.from_numpy(g["volume"]), torch.from_numpy(g["label"])
    forward = dc.forward_deepsup
    fill(net, image[:2], forward).train()
    fill(teacher, image[:2], forward, salt=1).train()
    orders = execution_order(net, image[:2], forward), execution_order(teacher, image[:2], forward)
    before = {id(p): p.detach().clone() for p in list(net.parameters()) + list(teacher.parameters())}
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    thresholds = torch.tensor(g["thresholds_before"], dtype=torch.float32)
    image = image.clone().requires_grad_(True)
    lbs, C = 2, 2
    # the loop body of train_ducisc.py after the warm-up, with the code's sigma draws
    x_l, y_l, x_u = image[:lbs], y[:lbs], image[lbs:]
    O_l, F_l = forward(net, x_l)
    O_u, F_u = forward(net, x_u)
    with torch.no_grad():
        O_T, _ = forward(teacher, x_u)
    P_T = [torch.softmax(o, 1) for o in O_T]
    y_hat = [P.argmax(1) for P in P_T]
    Y_l = common.one_hot(y_l, C)
    loss_sup, _, _ = dc.deepsup_loss(O_l, [dc.resize(Y_l, o.shape[2:], "nearest") for o in O_l])
    certain = dc.certain_masks(P_T, thresholds)
    loss_ulb, _, _ = dc.deepsup_loss(O_u, [common.one_hot(v, C) for v in y_hat], certain)
    proto_l = dc.prototypes(F_l, [dc.resize(Y_l, f.shape[2:], "nearest") for f in F_l])
    proto_u = dc.prototypes(F_u, [common.one_hot(v, C) for v in y_hat[::-1]])
    loss_proto_ulb, _ = dc.prototype_loss(proto_l, proto_u)
    sigma = torch.tensor(g["sigma"], dtype=torch.float32).view(lbs, 1, 1, 1, 1)
    x_m = sigma * x_l + (1 - sigma) * x_u[:lbs]
    y_m = sigma * Y_l + (1 - sigma) * common.one_hot(y_hat[-1][:lbs], C)
    O_m, F_m = forward(net, x_m)
    loss_mix, _, _ = dc.deepsup_loss(O_m, [dc.resize(y_m, o.shape[2:], "linear") for o in O_m],
                                     [m[:lbs] for m in certain], soft=True)
    proto_m = dc.prototypes(F_m, [dc.resize(y_m, f.shape[2:], "linear") for f in F_m])
    loss_proto_mix, _ = dc.prototype_loss(proto_l, proto_m)
    loss = dc.self_normalized(loss_sup)
    for term, w in ((loss_ulb, 0.3), (loss_mix, 0.1), (loss_proto_ulb, 0.1), (loss_proto_mix, 0.1)):
        loss = loss + w * dc.self_normalized(term)
    new_thresholds = dc.update_thresholds(thresholds, [torch.softmax(o.detach(), 1) for o in O_u], y_hat)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    common.update_ema(teacher, net, dc.EMA_DECAY, 2000)

    terms = [t.item() for t in (loss_sup, loss_ulb, loss_mix, loss_proto_ulb, loss_proto_mix, loss)]
    np.testing.assert_allclose(terms, g["terms"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_thresholds.numpy(), g["thresholds_after"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(image.grad.numpy(), g["grad_volume"], rtol=1e-4, atol=1e-6)
    assert_close_updates(updates_by_module(orders[0], before), g["student"])
    assert_close_updates(updates_by_module(orders[1], before), g["teacher"])


def test_dualnet_as_released_iteration_matches_the_official_one():
    """LA (3D binary), `--as_released` (the code's L_u and L_c: values without gradient), iteration 300
    (lambda_c on its ramp). The code's L_c is NaN here (its entropy of logits is NaN, nothing is sampled):
    this repository logs 0 for it, so it is not compared."""
    g = np.load(GOLDEN / "dualnet_iteration.npz")
    net_a, net_b = dk.build_networks(common.get_dataset("LA"))
    for m in list(net_a.modules()) + list(net_b.modules()):
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    x, label = torch.from_numpy(g["x"]), torch.from_numpy(g["label"])
    forward = lambda n, v: n(v)  # noqa: E731
    fill(net_a, x, forward).train()
    fill(net_b, x, forward).train()
    orders = execution_order(net_a, x, forward), execution_order(net_b, x, forward)
    before = {id(p): p.detach().clone() for p in list(net_a.parameters()) + list(net_b.parameters())}
    opt_a = torch.optim.SGD(net_a.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = x.clone().requires_grad_(True)
    lbs, y_l, iteration = 2, label[:2], int(g["iteration"])
    # the loop body of train_dualnet_kl.py with --as_released
    z_A, dec_A = net_a.decoder(net_a.encoder(x))
    z_B, dec_B = net_b.decoder(net_b.encoder(x))
    p_A, p_B = torch.softmax(z_A, 1), torch.softmax(z_B, 1)
    dice_A, dice_B = dk.foreground_dice(p_A[:lbs], y_l), dk.foreground_dice(p_B[:lbs], y_l)
    M = dk.disagreement_mask(p_A[:lbs], p_B[:lbs])
    cr_A, cr_B = dk.mutual_correction_loss(p_A[:lbs], y_l, M), dk.mutual_correction_loss(p_B[:lbs], y_l, M)
    ce_A, ce_B = F.cross_entropy(z_A[:lbs], y_l), F.cross_entropy(z_B[:lbs], y_l)
    loss_s_A, loss_s_B = ce_A + dice_A + dk.ALPHA * cr_A, ce_B + dice_B + dk.ALPHA * cr_B
    b_wins = bool(dice_B < dice_A)
    pu_A, pu_B = p_A[lbs:].detach(), p_B[lbs:].detach()
    yhat_u = dk.fused_label(pu_A, pu_B)
    unreliable = dk.unreliable_mask(dk.entropy(z_A[lbs:].detach()), dk.entropy(z_B[lbs:].detach()), 20)
    loss_u_A, loss_u_B = dk.pseudo_label_loss(pu_A, yhat_u, unreliable), dk.pseudo_label_loss(pu_B, yhat_u, unreliable)
    loss_kl, _ = dk.kl_weighted_loss(z_A, z_B)
    loss_cos = dk.cosine_loss(p_A, p_B)
    lambda_c = dk.LAMBDA_C * common.sigmoid_rampup(iteration // dk.RAMP_EVERY, dk.RAMP_STEPS)
    loss = loss_s_A + loss_s_B + loss_u_A + loss_u_B + loss_kl + loss_cos   # + lambda_c L_c: no gradient as released
    opt_a.zero_grad()
    opt_b.zero_grad()
    loss.backward()
    opt_a.step()
    opt_b.step()

    terms = [t.item() for t in (ce_A, dice_A, cr_A, ce_B, dice_B, cr_B, loss_u_A, loss_u_B, loss_kl, loss_cos)]
    np.testing.assert_allclose(terms + [lambda_c], g["terms"], rtol=1e-5, atol=1e-6)
    assert b_wins == bool(g["b_wins"])
    assert not unreliable.any()                             # the code's NaN percentile keeps every voxel
    np.testing.assert_allclose(x.grad.numpy(), g["grad_x"], rtol=1e-4, atol=1e-6)
    assert_close_updates(updates_by_module(orders[0], before), g["net_a"])
    assert_close_updates(updates_by_module(orders[1], before), g["net_b"])
