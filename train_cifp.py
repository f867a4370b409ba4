"""CIFP: Cross Image Feature Perturbation with Pseudo Label Fusion (WACV 2025).

M. Xu, H. Yang, B. Song, W. Hu, J. Miao, E. Cheng, "Cross Image Feature Perturbation with Pseudo
Label Fusion for Semi-Supervised Medical Image Segmentation", WACV 2025, pp. 7337-7347.

**A documented reconstruction.** Only the abstract was available and no official code exists;
the specification is docs/methods/cifp.md (comments cite its sections as "reference n").
Tags: (P) stated in the abstract, (R) our reconstruction (almost everything), after UniMatch (`LiheYoung/UniMatch: more-scenarios/medical`).

The idea (P): image-level perturbations of unlabeled images (colour changes, noise) ignore the
reliable information in the labeled images. CIFP perturbs the *features* of an unlabeled image
with features of the labeled images, refining its ambiguous regions; and instead of filtering
pseudo-labels with a confidence threshold, several predictions are fused with uncertainty weights.

How it is built here (R): a UniMatch-style single network (no teacher). For the weak unlabeled
view x_w the network predicts three ways: clean (P_w), with channel dropout on every encoder
feature (P_fp, UniMatch's feature perturbation) and with CIFP at the bottleneck (P_cifp). The
three are fused per pixel with certainty weights (1 - normalised entropy); the argmax is the
pseudo-label y_hat for P_fp, P_cifp and two strong views (intensity perturbations + CutMix), and the
fused certainty r weights each pixel's loss.

Symbols -> variables: x_l, y_l -> x_l, y_l; x_w -> x_w; x_s1, x_s2 -> x_s1, x_s2; B1, B2 -> box1,
box2; U (unlabeled bottleneck) -> U; L (labeled bottleneck, detached) -> L; a (ambiguity gate) -> a;
A (affinity) -> A; R (borrowed features) -> R; P_w, P_fp, P_cifp -> P_w, P_fp, P_cifp; omega_k -> omega;
P_bar -> P_bar; y_hat -> y_hat; r -> r; tau -> args.tau.

Reconstruction choices beyond the reference, and why:
- The CutMix source is the unlabeled half of the batch rolled by one position (an option the
  reference names, since it fits the two-stream sampler); its targets are therefore the rolled
  fused targets of the main pass, not a separate eval-mode pass (UniMatch computes one for a
  second unlabeled batch). This saves a forward pass per iteration.
- Implemented switches: --cifp_mode attn|proto, --use_dropout_fp, --pl_weight. Not implemented:
  the reference's other alternatives (KL uncertainty, softmax fusion, leave-one-out, CE on
  unlabeled data, a ramp-up, a learned-attention or AdaIN or memory-bank CIFP).
- The 3D strong perturbations (contrast, noise, blur, 3D CutMix) are common.strong_augment /
  common.cutmix_box, a reconstruction for z-scored volumes.
- Recipe around the losses (R, after UniMatch): U-Net with transposed-conv up-sampling and PyTorch's
  default init; weak 2D augmentation = UniMatch's three-way generator (rot90+flip with p 1/2, else a
  rotation with p 1/2, else nothing; `Transform2D(pipeline="three_way")`); the poly rate is set after
  each step (step k runs at the value for k - 1), as UniMatch; no test-time post-processing.

    python train_cifp.py --dataset ACDC --labeled_num 7
    python train_cifp.py --dataset LA --labeled_num 8
"""
import argparse
import math

import torch
import torch.nn.functional as F

import common

# Defaults per data set (reference section 4, all R): UniMatch's ACDC recipe; LA as CrossMatch/UA-MT.
DEFAULTS = {
    "*": {"dataset": "ACDC", "base_lr": 0.01, "lr_schedule": "poly"},
    "ACDC": {"batch_size": 24, "labeled_bs": 12, "max_iterations": 30000, "patch_size": (256, 256)},
    "LA": {"batch_size": 4, "labeled_bs": 2, "max_iterations": 15000, "patch_size": (112, 112, 80)},
}


# ---- method: CIFP ----
def normalized_entropy(P):
    """H(P) / log C per pixel, in [0, 1] (reference 3.2). P: (B, C, *spatial) probabilities."""
    return -(P * torch.log(P.clamp_min(1e-8))).sum(1) / math.log(P.shape[1])


def cifp_attn(U, L, a, tau):
    """Cross-image feature perturbation, parameter-free attention (reference 2.4, R).

    U: (B_u, C, *s) unlabeled bottleneck; L: (B_l, C, *s) labeled bottleneck (detached here: no
    gradient reaches the labeled features); a: (B_u, *s) ambiguity gate in [0, 1]."""
    C = U.shape[1]
    U_rows = U.flatten(2).transpose(1, 2)                              # (B_u, N_u, C)
    L_rows = L.detach().flatten(2).transpose(1, 2).reshape(-1, C)       # (B_l * N, C), sg(L): all labeled positions (R)
    # (R) A = softmax over labeled positions of (U^ L^T / tau), U^ and L^ row-normalised
    A = torch.softmax(F.normalize(U_rows, dim=-1) @ F.normalize(L_rows, dim=-1).T / tau, dim=-1)
    R = (A @ L_rows).transpose(1, 2).reshape(U.shape)                   # (R) R = A L
    a = a.unsqueeze(1)
    return (1 - a) * U + a * R                                          # (R) U~ = (1 - a) U + a R


def cifp_proto(U, L, y_l, a, tau, num_classes):
    """CIFP variant `proto` (reference 2.4, R): borrow from labeled class prototypes mu_c (masked
    average of L over the positions labelled c, labels downsampled to the bottleneck by nearest)."""
    y = F.interpolate(y_l[:, None].float(), size=L.shape[2:], mode="nearest")[:, 0].long()  # (R) labels to the grid
    onehot = common.one_hot(y, num_classes)                          # (B_l, K, *s)
    L = L.detach()                                                       # (R) sg(L)
    counts = onehot.flatten(2).sum((0, 2))                               # positions per class
    mu = torch.einsum("bk...,bc...->kc", onehot, L) / counts.clamp_min(1)[:, None]   # (R) mu_c = mean of L over class c
    mu = mu[counts > 0]                                                  # classes present only
    U_rows = U.flatten(2).transpose(1, 2)
    # (R) A = softmax over classes of (U^ mu^T / tau)
    A = torch.softmax(F.normalize(U_rows, dim=-1) @ F.normalize(mu, dim=-1).T / tau, dim=-1)
    R = (A @ mu).transpose(1, 2).reshape(U.shape)                        # (R) R = A mu
    a = a.unsqueeze(1)
    return (1 - a) * U + a * R


@torch.no_grad()
def fuse(P_list, delta=1e-6):
    """Uncertainty-weighted pseudo-label fusion, no threshold (reference 3.3; P for the idea).

    omega_k = (1 - U_k + delta) / sum_j (1 - U_j + delta); P_bar = sum_k omega_k P_k;
    y_hat = argmax P_bar; r = 1 - H(P_bar) / log C. Returns (y_hat, r, omega)."""
    certainty = torch.stack([1 - normalized_entropy(P) + delta for P in P_list])   # (R) 1 - U_k + delta, (K, B, *s)
    omega = certainty / certainty.sum(0, keepdim=True)                             # (R) omega_k
    P_bar = sum(w.unsqueeze(1) * P for w, P in zip(omega, P_list))                 # (P) fusion, (R) its form
    return common.argmax(P_bar), 1 - normalized_entropy(P_bar), omega                   # (P) no threshold; (R) y_hat, r


def channel_dropout(features, p=0.5):
    """UniMatch feature perturbation (R, reference 2.5): channel dropout p 0.5 on every encoder feature,
    active whatever the module mode."""
    drop = F.dropout2d if features[0].dim() == 4 else F.dropout3d
    return [drop(f, p, training=True) for f in features]


def main(argv=None):
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--cifp_mode", default="attn", choices=["attn", "proto"],
                        help="attn: attention over labeled features; proto: labeled class prototypes (reference 2.4)")
    parser.add_argument("--tau", type=float, default=0.1, help="CIFP temperature (reference 4, R)")
    parser.add_argument("--use_dropout_fp", type=int, default=1,
                        help="keep UniMatch's channel-dropout stream beside CIFP (reference 2.5, R)")
    parser.add_argument("--pl_weight", default="reliability", choices=["reliability", "none"],
                        help="per-pixel weight r = 1 - H(P_bar)/log C of the unlabeled losses, or 1 (reference 3.3)")
    args = common.parse_args(parser, argv, DEFAULTS)
    common.seed_everything(args.seed, args.deterministic)
    info = common.get_dataset(args.dataset, args.root_path)
    root = common.resolve_root(info, args.root_path)

    loader, n_labeled, n_unlabeled = common.train_loader(args, info, root, pipeline="three_way")  # (R) UniMatch's weak aug.
    # UniMatch's U-Net up-samples with transposed convolutions (reference 2.1).
    net = common.default_network(info, **({"upsample": "transpose"} if info.dims == 2 else {})).to(args.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=1e-4)
    scaler = common.grad_scaler(args)
    run = common.Run(args, "cifp", models={"net": net}, optimizers={"optimizer": optimizer, "scaler": scaler},
                     progress_terms=["loss", "loss_sup", "loss_s1", "loss_fp", "loss_cifp"])
    run.log(f"{n_labeled} labeled and {n_unlabeled} unlabeled training samples; batches of "
            f"{args.labeled_bs} + {args.batch_size - args.labeled_bs}")
    lbs = args.labeled_bs
    sources = 3 if args.use_dropout_fp else 2

    net.train()
    with run:
        for iteration, batch in run.batches(loader):
            common.set_lr(optimizer, common.lr_at(args.lr_schedule, args.base_lr, iteration, args.max_iterations))
            image, label = batch["image"].to(args.device), batch["label"].to(args.device)
            x_l, y_l, x_w = image[:lbs], label[:lbs], image[lbs:]

            # ---- method: CIFP ----
            # (P) image perturbations; (R) their form: intensity perturbations, then CutMix with the
            # unlabeled batch rolled by one position as the partner (reference 2.5, 4)
            x_s1, x_s2 = common.strong_augment(x_w), common.strong_augment(x_w)
            box1 = torch.stack([common.cutmix_box(x_w.shape[2:]) for _ in x_w]).to(image)
            box2 = torch.stack([common.cutmix_box(x_w.shape[2:]) for _ in x_w]).to(image)
            x_s1 = torch.where(box1[:, None] > 0, x_s1.roll(1, 0), x_s1)
            x_s2 = torch.where(box2[:, None] > 0, x_s2.roll(1, 0), x_s2)

            with common.autocast(args):
                feats = net.encoder(torch.cat([x_l, x_w]))               # (R) one encoder pass for x_l and x_w
                logits, _ = net.decoder(feats)
                logits_l, logits_w = logits[:lbs], logits[lbs:]
                feats_u = [f[lbs:] for f in feats]
                P_w = torch.softmax(logits_w.float(), 1).detach()        # (R) clean weak prediction, sg(P_w)
                U, L = feats_u[-1], feats[-1][:lbs]
                a = F.adaptive_avg_pool2d(normalized_entropy(P_w), U.shape[2:]) if info.dims == 2 else \
                    F.adaptive_avg_pool3d(normalized_entropy(P_w), U.shape[2:])          # (P) "ambiguous"; (R) gate a
                U_tilde = cifp_attn(U, L, a, args.tau) if args.cifp_mode == "attn" else \
                    cifp_proto(U, L, y_l, a, args.tau, info.num_classes)                 # (P) CIFP, (R) form 2.4
                logits_cifp, _ = net.decoder(feats_u[:-1] + [U_tilde])   # (R) P_cifp: skips e0..e3 unchanged
                logits_fp = net.decoder(channel_dropout(feats_u))[0] if args.use_dropout_fp else None  # (R) P_fp
                logits_s1, logits_s2 = net(torch.cat([x_s1, x_s2])).chunk(2)  # (R) P_s1, P_s2
            P_cifp = torch.softmax(logits_cifp.float(), 1)
            P_fp = torch.softmax(logits_fp.float(), 1) if args.use_dropout_fp else None

            # (P) uncertainty-based pseudo-label fusion, no threshold; (R) sources {w, cifp, fp}, 3.3
            y_hat, r, omega = fuse([P_w, P_cifp.detach()] + ([P_fp.detach()] if args.use_dropout_fp else []))
            if args.pl_weight == "none":
                r = torch.ones_like(r)
            y_s1 = torch.where(box1 > 0, y_hat.roll(1, 0), y_hat)         # (R) CutMix-composited targets (3.4)
            r_s1 = torch.where(box1 > 0, r.roll(1, 0), r)
            y_s2 = torch.where(box2 > 0, y_hat.roll(1, 0), y_hat)
            r_s2 = torch.where(box2 > 0, r.roll(1, 0), r)

            loss_sup = common.supervised_loss(logits_l.float(), y_l)                            # (R) L_sup (3.1)
            loss_s1 = common.dice_loss(torch.softmax(logits_s1.float(), 1), y_s1, weight=r_s1)  # (R) L_s1 (3.4)
            loss_s2 = common.dice_loss(torch.softmax(logits_s2.float(), 1), y_s2, weight=r_s2)  # (R) L_s2
            loss_cifp = common.dice_loss(P_cifp, y_hat, weight=r)                               # (R) L_cifp
            if args.use_dropout_fp:
                loss_fp = common.dice_loss(P_fp, y_hat, weight=r)                               # (R) L_fp
                # (R) L = 1/2 [L_sup + 0.25 L_s1 + 0.25 L_s2 + 0.25 L_fp + 0.25 L_cifp] (3.5)
                loss = (loss_sup + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.25 * loss_fp + 0.25 * loss_cifp) / 2
            else:
                loss_fp = torch.zeros((), device=image.device)
                loss = (loss_sup + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_cifp) / 2  # (R) L_cifp takes the 0.5

            run.viz(iteration, x_w[0], {"P_w": P_w[0], "P_fp": P_fp[0] if P_fp is not None else None, "P_cifp": P_cifp[0],
                                        **{f"weight {k}": w[0] for k, w in zip(["w", "cifp", "fp"], omega)},
                                        "fused pseudo-label": y_hat[0], "reliability r": r[0]})

            # ---- standard loop ----
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.step(iteration, {
                "loss": loss, "loss_sup": loss_sup, "loss_s1": loss_s1, "loss_s2": loss_s2, "loss_fp": loss_fp,
                "loss_cifp": loss_cifp, "mean_r": r.mean(), "mean_gate_a": a.mean(),
                **{f"omega_{k}": w.mean() for k, w in zip(["w", "cifp", "fp"][:sources], omega)},
                "fusion_changed": (y_hat != common.argmax(P_w)).float().mean()})
        run.finish()


if __name__ == "__main__":
    common.cli(main)
