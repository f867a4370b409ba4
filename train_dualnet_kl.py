"""Dual-network semi-supervised segmentation with KL-uncertainty-weighted pseudo-labels (KBS 2025).

Y. Lu, Y. Wu, A. Chaddad, T. Daqqaq, R. Kateb, "Enhancing Dual Network Based Semi-Supervised Medical
Image Segmentation with Uncertainty-Guided Pseudo-Labeling", Knowledge-Based Systems 2025,
arXiv 2509.13084. Official code: AIPMLab/Semi-supervised-Segmentation (`train_LA.py`, read, not
copied), built on xmindflow/SSL-contrastive and WYC-321/MCF. Specification:
docs/methods/dualnet_kl.md (comments cite the specification's sections as "ref §n", listed there).
Tags: (P) paper (abstract), (C) official code, (R) reconstruction. Only the abstract of the paper was available.

Two different networks see the same crop (C): A = V-Net decoder on a ResNet-34 encoder, B = V-Net
with dropout. Each is supervised on the labeled half (CE + Dice + a mutual-correction term); the
unlabeled half gets an entropy-filtered fused pseudo-label for both, the KL-uncertainty-weighted
cross pseudo supervision B -> A, a cosine consistency, and a prototype loss that pulls the
uncertain voxel features of the network that lost this iteration's Dice comparison toward the
class prototypes of its reliable voxels. Inference: the mean of both networks' softmax (C).

Symbols -> variables: z_A, z_B -> z_A, z_B; p_A, p_B -> p_A, p_B; y_hat_A, y_hat_B -> yhat_A, yhat_B;
m_A, m_B -> m_A, m_B; f_l (loser's last decoder features) -> f_loser; M -> M; H_k -> H_A, H_B;
tau_k -> tau_A, tau_B; K / U (kept / unreliable) -> kept / unreliable; y_hat_u -> yhat_u; D -> D;
w = exp(-D) -> w; lambda_c -> lambda_c.

Deviations from the official code (default; `--as_released` restores the released behaviour):
- The released code computes L_u (CE on *detached softmax probabilities* used as logits) and L_c
  (inside torch.no_grad()) without gradient, and its entropy is taken of raw logits, which gives
  NaN, so the percentile filter keeps every voxel (ref §3.3, §3.6, §3.8). By default: CE on the
  live logits, entropy from probabilities, prototypes detached and candidate features with
  gradient, empty sets skipped. `--as_released` computes both terms as released (no gradient;
  entropy of logits) and only logs them; as the term carries no gradient this gives the released
  updates exactly. Where the released L_c is NaN (no uncertain voxel) we log 0, since a NaN would
  stop the run at the NaN guard.
- L_u^A and L_u^B keep the code's constant weight 1; `--u_rampup 1` weights them by the sigmoid
  ramp of lambda_c instead (R, the remedy ref §3.7 names if gradients on L_u make the start
  unstable). On the ACDC quick protocol neither helped network A early: see docs/results.md.
- One summed loss and one backward pass instead of two losses and two backward passes: each term
  is counted once either way, so the gradients are the same (ref §3.7).
- The third, prototype-distance term of L_c is a constant once the prototypes are detached; it
  is logged (`proto_gap`), not added.
Recipe as the code (golden tests): both networks run the code's Kaiming-normal init pass over every
conv (`vnet.py`, `ResNet34.py`); random crop only, with UA-MT's crop padding; the x0.1 LR drops
apply after the steps of index 2,500 and 5,000 (step k runs at the schedule's value for k - 1).
On ACDC (R: no 2D code) the 2D forms get the same init and SSL4MIS's 2D RandomGenerator.
Reconstructions (R) for more than two classes (ACDC; the code is binary only): "foreground" is any
class > 0; the Dice is the code's squared-denominator foreground Dice averaged over the foreground
classes; L_cr uses 1/2 sum_c (p_c - onehot_c)^2 (equal to the code's (p_fg - y)^2 for two
classes); the fused label is the union of foregrounds with the more confident network deciding
between two different foreground classes (equal to the code's OR for two classes); prototypes
and candidates per class, N = floor(|uncertain voxels the loser calls foreground| / 100) per class.
The 2D networks for ACDC are the same two V-Nets through `dims=2` (R), ACDC's recipe is the
field's (SSL4MIS) one, BraTS 2019 has no script and uses the LA recipe (R).
On ACDC both networks are built without their Dropout(0.5) layers (R; `--dropout off` is the ACDC
default, LA, Pancreas, BraTS and your own data keep the code's dropout). In the 2D forms the code's
channel dropout on the 16-channel last decoder feature (and B's bottleneck) slows learning so much
that the coupling terms, which act from the first iteration, teach a class neither network predicts
yet (the right ventricle) as background: on the ACDC quick protocol the method with dropout ends
below the supervised U-Net (34.8 / 36.3 % Dice at 3 / 7 patients), without it 63.4 / 68.6 %. ACDC is
not one of the paper's data sets; `--dropout on` gives the code's networks. Measurements and
ablations (`--labeled_terms_only`) are in docs/results.md.

    python train_dualnet_kl.py --dataset LA --labeled_num 8
    python test_3d.py --ckpt model/LA_run_8_labeled/dualnet_kl/last.pth
"""
import argparse

import torch
import torch.nn.functional as F

import common
from vnet import VNet

# Defaults per data set (ref §4): LA and Pancreas as the code; BraTS 2019 (R); ACDC the SSL4MIS recipe (R).
DEFAULTS = {
    "*": {"dataset": "LA", "base_lr": 0.01, "lr_schedule": "step", "dropout": "on"},
    "LA": {"labeled_num": 8, "batch_size": 4, "labeled_bs": 2, "max_iterations": 6000, "patch_size": (112, 112, 80)},
    "Pancreas": {"labeled_num": 6, "batch_size": 4, "labeled_bs": 2, "max_iterations": 6000, "patch_size": (96, 96, 96)},
    "BraTS2019": {"batch_size": 4, "labeled_bs": 2, "max_iterations": 6000, "patch_size": (96, 96, 96)},
    "ACDC": {"batch_size": 24, "labeled_bs": 12, "max_iterations": 30000, "patch_size": (256, 256),
             "lr_schedule": "poly", "dropout": "off"},   # (R) no dropout in the 2D forms, see the docstring
}
CONF_THRESH = 0.6        # (C) `Thresh` of the mutual-correction mask
ALPHA = 0.5              # (C) weight of L_cr in L_s
LAMBDA_C, RAMP_STEPS, RAMP_EVERY = 0.1, 40, 150   # (C) lambda_c = 0.1 sigmoid_rampup(t // 150, 40)
KL_T = 0.5               # (C) temperature of the pseudo-label softmax (no effect on an argmax)


# ---- method: the dual-network losses ----
def foreground_dice(p, y, smooth=1e-5):
    """(C) MCF `losses.dice_loss` on the foreground: 1 - (2 sum p y + s) / (sum p^2 + sum y^2 + s), batch-pooled;
    (R) averaged over the foreground classes when there are more than two."""
    onehot = common.one_hot(y, p.shape[1], p.dtype)
    dims = [0] + list(range(2, p.dim()))
    inter = (p * onehot).sum(dims)[1:]
    denom = (p * p).sum(dims)[1:] + (onehot * onehot).sum(dims)[1:]
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def mutual_correction_loss(p_k, y, M):
    """(C) L_cr^k = sum_v M (p_k,fg - y)^2 / (sum_v M + 1e-16), ref §3.1; (R) 1/2 sum_c (p_c - onehot_c)^2 per voxel."""
    onehot = common.one_hot(y, p_k.shape[1], p_k.dtype)
    sq = 0.5 * ((p_k - onehot) ** 2).sum(1)
    return (M * sq).sum() / (M.sum() + 1e-16)


@torch.no_grad()
def disagreement_mask(p_A, p_B, thresh=CONF_THRESH):
    """(C) M = [y_hat_A = fg and m_A >= 0.6] XOR [y_hat_B = fg and m_B >= 0.6]; (R) fg = any class > 0."""
    m_A, yhat_A = p_A.max(1)
    m_B, yhat_B = p_B.max(1)
    return (((yhat_A > 0) & (m_A >= thresh)) ^ ((yhat_B > 0) & (m_B >= thresh))).float()


@torch.no_grad()
def fused_label(p_A, p_B):
    """(C) y_hat_u = y_hat_A OR y_hat_B (union of the foregrounds); (R) for two different foreground classes
    the more confident network decides."""
    m_A, yhat_A = p_A.max(1)
    m_B, yhat_B = p_B.max(1)
    both_fg_differ = (yhat_A > 0) & (yhat_B > 0) & (yhat_A != yhat_B)
    union = torch.where(yhat_A > 0, yhat_A, yhat_B)
    return torch.where(both_fg_differ & (m_B > m_A), yhat_B, union)


@torch.no_grad()
def unreliable_mask(H_A, H_B, percent=20):
    """(C) tau_k = the percent-th percentile of H_k over the unlabeled batch; unreliable iff H_A >= tau_A and
    H_B >= tau_B (a voxel is kept when it is among the lowest-entropy `percent` % of either network).
    A NaN entropy gives a NaN percentile and no unreliable voxel, as np.percentile does in the code."""
    tau_A = torch.quantile(H_A.flatten().float(), percent / 100)
    tau_B = torch.quantile(H_B.flatten().float(), percent / 100)
    return (H_A >= tau_A) & (H_B >= tau_B)


def entropy(p):
    """H = -sum_c p_c log p_c (natural log), with the code's + 1e-10 inside the log."""
    return -(p * torch.log(p + 1e-10)).sum(1)


def pseudo_label_loss(z_k, target, unreliable):
    """(C) L_u^k = (|Omega_U| / |K|) mean_{v in K} CE(z_k(v), y_hat_u(v)), unreliable voxels ignored (U2PL weight)."""
    target = target.masked_fill(unreliable, -100)
    n_kept = (~unreliable).sum()
    return unreliable.numel() / n_kept.clamp_min(1) * F.cross_entropy(z_k, target, ignore_index=-100)


def kl_weighted_loss(z_student, z_teacher, T=KL_T):
    """(C) `uncertainty_rectified_loss`, ref §3.4: y_hat = argmax softmax(z_teacher / T) (detached);
    D = KL(p_teacher || p_student) per voxel with p_teacher detached; w = exp(-D), not detached;
    L_kl = mean[w CE(z_student, y_hat)] + mean[D]. Gradient only into the student. Returns (L_kl, w)."""
    y_hat = common.argmax(torch.softmax(z_teacher.detach() / T, 1))
    p_t = torch.softmax(z_teacher.detach(), 1)
    D = (torch.xlogy(p_t, p_t) - p_t * F.log_softmax(z_student, 1)).sum(1)     # (C) D = sum_c p_t (log p_t - log p_s)
    w = torch.exp(-D)                                                           # (C) w = exp(-D)
    return (w * F.cross_entropy(z_student, y_hat, reduction="none")).mean() + D.mean(), w


def cosine_loss(p_A, p_B):
    """(C) `consist_loss`: L_cos = mean_v [1 - cos(p_A(v), p_B(v))], both sides with gradient."""
    return (1 - F.cosine_similarity(p_A, p_B, dim=1)).mean()


def prototype_loss(f, yhat_u, unreliable, yhat_loser, num_classes, generator=None):
    """(C, with the R gradient form of ref §3.6) on the loser's unlabeled features f (B_u, C_f, *s):
    P_c = mean of f over the reliable voxels with y_hat_u = c (detached, R), candidates = unreliable voxels
    the loser predicts as c, N = floor(#candidates predicted foreground / 100) sampled per class;
    L_c = sum_c mean_{v in S_c} || f(v)/|f(v)| - P_c/|P_c| ||_2. Empty sets are skipped (R).
    Returns (L_c, number of sampled voxels, mean distance between the normalised prototypes)."""
    feats = f.movedim(1, -1).reshape(-1, f.shape[1])                 # (N_vox, C_f)
    yhat_u, unreliable, yhat_loser = yhat_u.reshape(-1), unreliable.reshape(-1), yhat_loser.reshape(-1)
    kept = ~unreliable
    n_samples = int((unreliable & (yhat_loser > 0)).sum()) // 100    # (C) N = |U_fg| // 100 (one sync)
    loss, sampled, protos = f.new_zeros(()), 0, []
    for c in range(num_classes):
        reliable_c = kept & (yhat_u == c)
        if not reliable_c.any():
            continue
        P_c = F.normalize(feats[reliable_c].mean(0).detach(), dim=0)  # (R) detached prototype P_c
        protos.append(P_c)
        candidates = feats[unreliable & (yhat_loser == c)]
        pick = torch.randperm(len(candidates), generator=generator, device="cpu")[:n_samples].to(f.device)
        if len(pick) == 0:
            continue                                                  # (R) empty set: term skipped
        loss = loss + (F.normalize(candidates[pick], dim=1) - P_c).norm(dim=1).mean()
        sampled += len(pick)
    gap = torch.stack([(a - b).norm() for i, a in enumerate(protos) for b in protos[i + 1:]]).mean() \
        if len(protos) > 1 else f.new_zeros(())
    return loss, sampled, gap


def build_networks(info, dropout=True):
    """(C) A: ResNet-34-encoder V-Net (dropout on the last decoder feature only); B: V-Net with dropout
    (bottleneck and last decoder feature); both run the code's Kaiming-normal init pass over every conv;
    (R) their 2D forms for ACDC. dropout=False: neither has any."""
    net_a = VNet(dims=info.dims, num_classes=info.num_classes, has_dropout=dropout, residual_encoder=True, init="kaiming")
    net_b = VNet(dims=info.dims, num_classes=info.num_classes, has_dropout=dropout, init="kaiming")
    return net_a, net_b


def main(argv=None):
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--as_released", action="store_true",
                        help="L_u and L_c without gradient and entropy of logits, as the released code (see docstring)")
    parser.add_argument("--entropy_percentile", type=float, default=20,
                        help="keep a voxel if its entropy is below this percentile for either network (C: 20)")
    parser.add_argument("--u_rampup", type=int, default=0,
                        help="0: L_u^A, L_u^B with weight 1 from the start, as the code; 1: weighted by the sigmoid "
                             "ramp of lambda_c (R, ref §3.7)")
    parser.add_argument("--kl_both_directions", action="store_true",
                        help="KL-weighted supervision A -> B as well as the code's B -> A (ref §3.4, R)")
    parser.add_argument("--kl_unlabeled_only", action="store_true",
                        help="KL-weighted term on the unlabeled half only (the code uses the whole batch)")
    parser.add_argument("--dropout", choices=("on", "off"), default=None,
                        help="the code's Dropout(0.5) layers in both networks (default: on; off on ACDC, where they "
                             "slow the 2D networks down so much that the method falls behind, see the docstring)")
    parser.add_argument("--labeled_terms_only", action="store_true",
                        help="ablation: train on L_s^A + L_s^B only (mutual correction included; the unlabeled "
                             "terms are computed and logged, not added): what the two networks reach without them")
    args = common.parse_args(parser, argv, DEFAULTS)
    common.seed_everything(args.seed, args.deterministic)
    info = common.get_dataset(args.dataset, args.root_path)
    root = common.resolve_root(info, args.root_path)

    loader, n_labeled, n_unlabeled = common.train_loader(args, info, root, rot_flip=False)  # (C) random crop only
    net_a, net_b = (n.to(args.device) for n in build_networks(info, dropout=args.dropout == "on"))
    opt_a = torch.optim.SGD(net_a.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=1e-4)  # (C) one SGD
    opt_b = torch.optim.SGD(net_b.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=1e-4)  #     per network
    scaler = common.grad_scaler(args)
    run = common.Run(args, "dualnet_kl", models={"net_a": net_a, "net_b": net_b},
                     optimizers={"opt_a": opt_a, "opt_b": opt_b, "scaler": scaler},
                     eval_models=("net_a", "net_b"),                 # (C) inference: mean of both softmax maps
                     progress_terms=["loss", "loss_s_A", "loss_u_A", "loss_kl", "loss_c"])
    run.log(f"{n_labeled} labeled and {n_unlabeled} unlabeled training samples; batches of "
            f"{args.labeled_bs} + {args.batch_size - args.labeled_bs}; "
            f"{'as released' if args.as_released else 'gradients on L_u and L_c (paper intent)'}; dropout {args.dropout}")
    lbs, C = args.labeled_bs, info.num_classes
    ramp_every = common.scale_iterations(RAMP_EVERY, 6000, args.max_iterations)  # the ramp spans the whole run

    net_a.train()
    net_b.train()
    with run:
        for iteration, batch in run.batches(loader):
            lr = common.lr_at(args.lr_schedule, args.base_lr, iteration, args.max_iterations)
            common.set_lr(opt_a, lr)
            common.set_lr(opt_b, lr)
            x, label = batch["image"].to(args.device), batch["label"].to(args.device)
            y_l = label[:lbs]

            # ---- method: dual network ----
            with common.autocast(args):
                z_A, dec_A = net_a.decoder(net_a.encoder(x))          # (C) the same crop for both networks
                z_B, dec_B = net_b.decoder(net_b.encoder(x))
            z_A, z_B = z_A.float(), z_B.float()
            p_A, p_B = torch.softmax(z_A, 1), torch.softmax(z_B, 1)

            # L_s^k = CE + Dice + alpha L_cr^k on the labeled half (ref §3.1)
            dice_A, dice_B = foreground_dice(p_A[:lbs], y_l), foreground_dice(p_B[:lbs], y_l)
            M = disagreement_mask(p_A[:lbs], p_B[:lbs])                                     # (C) M
            loss_s_A = F.cross_entropy(z_A[:lbs], y_l) + dice_A + ALPHA * mutual_correction_loss(p_A[:lbs], y_l, M)
            loss_s_B = F.cross_entropy(z_B[:lbs], y_l) + dice_B + ALPHA * mutual_correction_loss(p_B[:lbs], y_l, M)
            b_wins = bool(dice_B < dice_A)                            # (C) winner by the Dice terms (one sync)
            f_loser = (dec_A if b_wins else dec_B)[-1][lbs:].float()  # (C) x9 of the loser, unlabeled half
            p_loser = (p_A if b_wins else p_B)[lbs:]

            # Entropy-filtered fused pseudo-label (ref §3.3)
            pu_A, pu_B = p_A[lbs:].detach(), p_B[lbs:].detach()
            yhat_u = fused_label(pu_A, pu_B)                          # (C) union of the two foregrounds
            if args.as_released:                                      # (C) entropy of raw logits: NaN -> no filter
                H_A, H_B = entropy(z_A[lbs:].detach()), entropy(z_B[lbs:].detach())
            else:                                                     # (R) entropy of the probabilities
                H_A, H_B = entropy(pu_A), entropy(pu_B)
            unreliable = unreliable_mask(H_A, H_B, args.entropy_percentile)
            if args.as_released:                                      # (C) CE on detached probabilities: no gradient
                loss_u_A = pseudo_label_loss(pu_A, yhat_u, unreliable)
                loss_u_B = pseudo_label_loss(pu_B, yhat_u, unreliable)
            else:
                loss_u_A = pseudo_label_loss(z_A[lbs:], yhat_u, unreliable)   # (R) L_u^A on live logits
                loss_u_B = pseudo_label_loss(z_B[lbs:], yhat_u, unreliable)   # (R) L_u^B

            # KL-uncertainty-weighted cross pseudo supervision B -> A (ref §3.4)
            scope = slice(lbs, None) if args.kl_unlabeled_only else slice(None)
            loss_kl, w = kl_weighted_loss(z_A[scope], z_B[scope])                         # (C) L_kl, w = exp(-D)
            if args.kl_both_directions:
                loss_kl_ba, _ = kl_weighted_loss(z_B[scope], z_A[scope])                   # (R) A -> B as well
                loss_kl = loss_kl + loss_kl_ba
            loss_cos = cosine_loss(p_A, p_B)                                               # (C) L_cos, whole batch

            # Prototype loss on the loser's uncertain features (ref §3.6)
            with torch.set_grad_enabled(not args.as_released):        # (C) released: under no_grad
                loss_c, n_sampled, proto_gap = prototype_loss(f_loser, yhat_u, unreliable, common.argmax(p_loser), C)
            if args.as_released and n_sampled > 0:
                loss_c = loss_c + proto_gap                           # (C) the released value adds the gap
            # (no voxel sampled: the released value is NaN (an empty mean); logged as 0, see the docstring)
            ramp = common.sigmoid_rampup(iteration // ramp_every, RAMP_STEPS)
            lambda_c = LAMBDA_C * ramp                                # (C) lambda_c(t) = 0.1 sigmoid_rampup(t // 150, 40)
            w_u = ramp if args.u_rampup and not args.as_released else 1.0  # (R) w_u(t), ref §3.7

            # (C) total: sum_k (L_s^k + w_u L_u^k) + L_kl + L_cos + lambda_c L_c (ref §3.7)
            loss = loss_s_A + loss_s_B + w_u * (loss_u_A + loss_u_B) + loss_kl + loss_cos + lambda_c * loss_c
            if args.labeled_terms_only:                               # ablation (not the method)
                loss = loss_s_A + loss_s_B

            run.viz(iteration, x[lbs], {"prediction A": p_A[lbs], "prediction B": p_B[lbs], "fused pseudo-label": yhat_u[0],
                                        "unreliable (entropy filter)": unreliable[0], "KL weight w": w[lbs - (scope.start or 0)]})

            # ---- standard loop ----
            opt_a.zero_grad()
            opt_b.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
            run.step(iteration, {
                "loss": loss, "loss_s_A": loss_s_A, "loss_s_B": loss_s_B, "dice_A": dice_A, "dice_B": dice_B,
                "loss_u_A": loss_u_A, "loss_u_B": loss_u_B, "loss_kl": loss_kl, "mean_w": w.mean(),
                "loss_cos": loss_cos, "loss_c": loss_c, "lambda_c": lambda_c, "w_u": w_u, "b_wins": float(b_wins),
                "kept_fraction": 1 - unreliable.float().mean(), "mask_M": M.mean(), "proto_samples": n_sampled,
                "proto_gap": proto_gap})
        run.finish()


if __name__ == "__main__":
    common.cli(main)
