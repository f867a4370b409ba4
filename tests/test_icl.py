"""ICL (train_icl.py): the class decoder against a naive re-implementation (both head splits), the head-split
quirk, the proxy chain and its gradient paths, each loss by hand, real non-cubic shapes, and smoke runs."""

import pytest
import torch
import torch.nn.functional as F

import common
import train_icl as icl
from conftest import COARSE, SMOKE_2D, SMOKE_3D, run


def naive_class_decoder(dec, Q, T, split):
    """E1-E3 written per head and per class with explicit loops (eval mode: DropPath off)."""
    B, N, C = T.shape
    K, h = Q.shape[1], dec.heads
    d = C // h
    q = dec.fc_q(dec.norm_q(Q))                                        # (B, K, C)
    kv = dec.fc_kv(dec.norm_t(T))
    k, v = kv[..., :C], kv[..., C:]
    if split == "code":  # chunk (j*K + r) of the class-major flat query array
        q_rows = lambda b, j, r: q[b].reshape(-1)[(j * K + r) * d:(j * K + r + 1) * d]
    else:
        q_rows = lambda b, j, r: q[b, r, j * d:(j + 1) * d]
    A = torch.zeros(B, h, K, N)
    O = torch.zeros(B, h, K, d)
    for b in range(B):
        for j in range(h):
            kj, vj = k[b, :, j * d:(j + 1) * d], v[b, :, j * d:(j + 1) * d]
            for r in range(K):
                logits = torch.stack([torch.dot(q_rows(b, j, r), kj[n]) for n in range(N)]) / d ** 0.5
                A[b, j, r] = logits
                O[b, j, r] = torch.softmax(logits, 0) @ vj
    O = O.reshape(B, K, C) if split == "code" else O.transpose(1, 2).reshape(B, K, C)
    O = dec.proj(O)
    Qn = 2 * O                                                          # O + DropPath(O), DropPath off
    Qn = Qn + dec.mlp(dec.norm2(Qn))
    A = 2 * A.permute(0, 2, 1, 3)
    A = A + dec.mlp_n(dec.norm_n(A))
    return Qn, A


@pytest.mark.parametrize("split", ["code", "standard"])
def test_class_decoder_matches_a_naive_loop(split):
    torch.manual_seed(0)
    dec = icl.ClassDecoder(dim=8, n_tokens=6, heads=2, spatial_mlp=True, head_split=split).eval()
    Q, T = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    Qn, A = dec(Q, T)
    Qn_ref, A_ref = naive_class_decoder(dec, Q, T, split)
    torch.testing.assert_close(Qn, Qn_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A, A_ref, atol=1e-5, rtol=1e-5)
    assert A.shape == (2, 3, 2, 6)


def test_code_head_split_mixes_classes_in_the_maps_but_not_in_the_proxies():
    torch.manual_seed(0)
    K, h = 4, 8
    for split, rows_touched in [("standard", {0}), ("code", {0, 1, 2, 3})]:
        dec = icl.ClassDecoder(dim=16 * h, n_tokens=5, heads=h, spatial_mlp=False, head_split=split).eval()
        Q, T = torch.randn(1, K, 16 * h), torch.randn(1, 5, 16 * h)
        Q2 = Q.clone()
        Q2[0, 0] += torch.randn(16 * h)                                 # change class 0's query only
        (Qa, Aa), (Qb, Ab) = dec(Q, T), dec(Q2, T)
        proxy_rows = {r for r in range(K) if not torch.allclose(Qa[0, r], Qb[0, r])}
        map_rows = {r for r in range(K) if not torch.allclose(Aa[0, r], Ab[0, r])}
        assert proxy_rows == {0}                                        # proxies stay class-consistent
        assert map_rows == rows_touched, split                          # code: class 0 reaches every map channel


def test_spatial_mlp_off_has_no_n_by_n_layer():
    on = icl.ClassDecoder(dim=16, n_tokens=100, heads=1, spatial_mlp=True)
    off = icl.ClassDecoder(dim=16, n_tokens=100, heads=1, spatial_mlp=False)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(on) - count(off) == 2 * 100 * 100 + 2 * 100 + 2 * 100   # two Linear(N, N) and LN_N


def test_geometry_keeps_real_non_cubic_shapes_and_the_module_runs_on_them():
    channels, shapes = icl.icl_geometry(3, (112, 112, 80))
    assert channels == (256, 128, 64) and shapes == [(7, 7, 5), (14, 14, 10), (28, 28, 20)]
    channels2, shapes2 = icl.icl_geometry(3, (32, 32, 16))
    feats = [torch.randn(1, c, *s) for c, s in zip(channels2, shapes2)]
    module = icl.ICLModule(3, channels2, shapes2, num_classes=2)
    maps, means = module(feats)
    assert [tuple(m.shape) for m in maps] == [(1, 2, *s) for s in shapes2]
    assert [tuple(q.shape) for q in means] == [(1, 2, c) for c in channels2]


def test_proxy_chain_and_gradient_paths():
    torch.manual_seed(0)
    channels, shapes = icl.icl_geometry(2, (32, 32))
    sspa, uscl = icl.ICLModule(2, channels, shapes, 3), icl.ICLModule(2, channels, shapes, 3)
    f_l = [torch.randn(2, c, *s, requires_grad=True) for c, s in zip(channels, shapes)]
    f_u = [torch.randn(2, c, *s, requires_grad=True) for c, s in zip(channels, shapes)]
    M_l, proxies = sspa(f_l)
    G_u, _ = uscl(f_u, proxies)
    G_u[0].sum().backward()
    assert sspa.Q0.grad is not None and sspa.Q0.grad.abs().sum() > 0   # USCL's loss reaches Q_0 through Q_bar_1
    assert f_l[0].grad is not None and f_u[0].grad is not None         # and the labeled and unlabeled features
    assert uscl.Q0.grad is None                                         # USCL's own Q_0 is never used
    assert all(p.grad is None for p in uscl.query_convs.parameters())  # nor its Conv1d layers
    assert sspa.query_convs[0].weight.grad is None                     # scale 1 of USCL does not use the chain


def test_soft_dice_and_losses_by_hand():
    P = torch.tensor([[[0.8, 0.2], [0.2, 0.8]]])                        # (1, K=2, N=2)
    R = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    s = 1e-5
    expected = 1 - (2 * 0.8 + s) / (1.0 + 1.0 + s)                      # the same for both classes
    assert icl.soft_dice(P, R).item() == pytest.approx(expected, rel=1e-6)
    # L_con: mean of squared softmax differences, target detached
    G = [torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]]).reshape(1, 2, 1, 2).requires_grad_()]
    M = [torch.zeros(1, 2, 1, 2, requires_grad=True)]
    pg = torch.softmax(G[0].detach(), 1)
    assert icl.con_loss(G, M).item() == pytest.approx(((pg - 0.5) ** 2).mean().item(), rel=1e-6)
    icl.con_loss(G, M).backward()
    assert G[0].grad is not None and M[0].grad is None
    # L_usc: prediction detached
    p_u = torch.randn(1, 2, 4, 4, requires_grad=True)
    Gs = [torch.randn(1, 2, 2, 2, requires_grad=True)]
    loss = icl.usc_loss(Gs, p_u)
    expected = icl.soft_dice(torch.softmax(F.interpolate(Gs[0].detach(), size=(4, 4), mode="bilinear"), 1),
                             torch.softmax(p_u.detach(), 1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert p_u.grad is None and Gs[0].grad is not None
    # L_spa = mean over scales of L_seg on the up-sampled maps; L_seg = CE + Dice without 1/2
    y = torch.randint(0, 2, (1, 4, 4))
    maps = [torch.randn(1, 2, 1, 1), torch.randn(1, 2, 2, 2)]
    logits = torch.randn(1, 2, 4, 4)
    assert icl.seg_loss(logits, y).item() == pytest.approx(2 * common.supervised_loss(logits, y).item(), rel=1e-6)
    manual = sum(icl.seg_loss(F.interpolate(m, size=(4, 4), mode="bilinear"), y) for m in maps) / 2
    assert icl.spa_loss(maps, y).item() == pytest.approx(manual.item(), rel=1e-6)


def test_drop_path_drops_whole_samples():
    torch.manual_seed(0)
    x = torch.ones(1000, 3, 2)
    out = icl.drop_path(x, 0.5, training=True)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0.4 < (per_sample == 0).all(1).float().mean() < 0.6
    assert torch.equal(icl.drop_path(x, 0.5, training=False), x)


def test_smoke_phantom2d_test_and_resume(tmp_path):
    args = [*SMOKE_2D, "--model_dir", tmp_path]
    run("train_icl.py", *args, "--max_iterations", "2")
    ckpt = tmp_path / "Phantom2D_run_2_labeled" / "icl" / "last.pth"
    saved = torch.load(ckpt, weights_only=False)
    assert [n["name"] for n in saved["nets"]] == ["UNet"] and saved["nets"][0]["kwargs"]["upsample"] == "bilinear"  # the official ICL U-Net
    assert not any(k.startswith(("sspa", "uscl")) for k in saved["state_dicts"][0])   # modules dropped at test time
    assert {"sspa", "uscl"} <= set(saved["models"])                                  # but kept for --resume
    assert "cases 6" in run("test_2d.py", "--ckpt", ckpt)
    run("train_icl.py", *args, "--max_iterations", "4", "--resume", "--extend")
    assert torch.load(ckpt, weights_only=False)["iteration"] == 4


def test_smoke_phantom3d_standard_split_without_spatial_mlp(tmp_path):
    run("train_icl.py", *SMOKE_3D, "--max_iterations", "2",
        "--spatial_mlp", "0", "--head_split", "standard", "--model_dir", tmp_path)
    assert "cases 4" in run("test_3d.py", "--ckpt", tmp_path / "Phantom3D_run_2_labeled" / "icl" / "last.pth", *COARSE)
