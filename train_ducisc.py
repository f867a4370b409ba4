"""DuCiSC: Dual Cross-image Semantic Consistency with Self-aware Pseudo Labeling (IEEE TMI 2025).

H. Wu, C. Wang, Z. Cui, "Dual Cross-image Semantic Consistency with Self-aware Pseudo Labeling for
Semi-supervised Medical Image Segmentation", IEEE TMI 2025, arXiv 2507.21440. Official code:
ShanghaiTech-IMPACT/DuCiSC (`code/train_DuCiSC.py`, `code/networks/VNet.py`; read, not copied), built
on MC-Net. Specification: docs/methods/ducisc.md (equation labels D1-D12 are this repository's,
not the paper's; the paper body was not available). Tags: (P) paper (abstract, pipeline figure),
(C) official code, (R) reconstruction.

A mean teacher (EMA 0.99) labels the unlabeled crops at each of four deep-supervision scales; a
voxel counts where the teacher's probability beats a per-class, per-scale threshold that follows
the student's own mean confidence ("self-aware"). Two cross-image consistencies: labeled <->
unlabeled class prototypes (masked average pooling over four decoder stages), and labeled <->
fused, where a fused crop is a global mix sigma x_l + (1 - sigma) x_u trained on the equally mixed
soft label, with its own prototypes. Every term is divided by its own detached value (D12).

Symbols -> variables: x_l, y_l, x_u -> x_l, y_l, x_u; O^s -> logits lists (coarse to fine, s = 1..4);
F^k -> feature lists (fine to coarse, k = 1..4); P_T^s, y_hat^s -> P_T, y_hat; M^s -> certain;
tau_c^s -> thresholds[s, c]; mu_c^s -> mu; sigma -> sigma; x_m, y~_m -> x_m, y_m; P_l^k, P_u^k, P_m^k ->
proto_l, proto_u, proto_m; lambda_t, lambda_m, lambda_p, lambda_mp -> args.lamda_teacher, args.lamda_mix,
args.lamda_proto, args.lamda_mix_proto.

Deviations from the official code, and reconstructions:
- No bug in the released code switches a component off, so there is no `--as_released`: the
  defaults are the code's.
- Warm-up (2,000 of 15,000 iterations) scales with a shorter --max_iterations through
  common.scale_iterations; the threshold EMA rate (0.99 per iteration) does not.
- sigma is drawn from torch's generator instead of Python's `random` (resumable; same law).
- A NaN term is skipped as in the code, and logged as 0 (with `active_terms`), because a NaN in
  the log would stop the run at the NaN guard.
- Logging: `objective` is the value backpropagated (D12: 1 + the weights of the active terms, by
  construction); `loss` is L_sup plus the weighted terms that were trained this iteration (the code
  logs the weighted sum of all four terms, also during the warm-up when they are not trained).
- More than two classes (ACDC; the code is binary only, R): thresholds per class and scale, a
  voxel is certain when the teacher's probability of some class beats that class's threshold
  (the code's bg-or-fg rule), same start 1/C and clip [0.5, 0.95] (so a certain voxel always has a
  majority class); Dice is the code's binary Dice averaged over the foreground classes; the fused
  label is sigma onehot(y_l) + (1 - sigma) onehot(y_hat), prototypes are per class (C x C_k).
- ACDC network: the SSL4MIS 2D U-Net with 3x3 deep-supervision heads on the three coarse decoder
  stages and prototypes on the four decoder-stage outputs (R: the released code has no 2D script;
  the reference reads 1x1 heads from stale bytecode). ACDC recipe: MC-Net's 2D one (poly LR,
  SSL4MIS RandomGenerator).
- The teacher starts as a copy of the student; the code builds an independent network. No effect:
  the first EMA update (a_0 = 0) copies the student before any teacher output is used (warm-up).
Recipe as the code (golden tests): the V-Net with PyTorch's default init (its Kaiming pass is
commented out), rot90/flip + crop on LA and crop only on Pancreas with UA-MT's crop padding, a
constant LR, the test without post-processing at stride 18/4 (LA) and 16 (Pancreas).

    python train_ducisc.py --dataset LA --labeled_num 8
    python test_3d.py --ckpt model/LA_run_8_labeled/ducisc/last.pth
"""
import argparse
import copy

import torch
import torch.nn.functional as F

import common
from unet2d import UNet
from vnet import VNet

# Defaults per data set (reference §4): LA and Pancreas as the code; ACDC as MC-Net's 2D script (R).
DEFAULTS = {
    "*": {"dataset": "LA", "base_lr": 0.01, "lr_schedule": "constant"},
    "LA": {"labeled_num": 8, "batch_size": 4, "labeled_bs": 2, "max_iterations": 15000, "patch_size": (112, 112, 80)},
    "Pancreas": {"labeled_num": 6, "batch_size": 4, "labeled_bs": 2, "max_iterations": 15000, "patch_size": (96, 96, 96)},
    "ACDC": {"batch_size": 24, "labeled_bs": 12, "max_iterations": 30000, "patch_size": (256, 256),
             "lr_schedule": "poly"},
}
WARMUP, WARMUP_OF = 2000, 15000   # (C) supervised-only iterations of the 15k-iteration recipe
EMA_DECAY = 0.99                  # (C) teacher
THRESH_ALPHA = 0.99               # (C) alpha of the threshold EMA (D5)
THRESH_MIN, THRESH_MAX = 0.5, 0.95  # (C) clip of the thresholds (D5)
SIGMA_LOW, SIGMA_HIGH = 0.25, 0.75  # (C) sigma ~ U(0.25, 0.75) (D9)


def build_network(info):
    """(C) V-Net with dropout, three deep-supervision heads on the decoder sums x5_up, x6_up, x7_up, prototype
    features x5_up..x8_up (`networks/VNet.py`, class DuCiSC); (R) the SSL4MIS 2D U-Net with heads for ACDC."""
    if info.dims == 3:
        return VNet(dims=3, num_classes=info.num_classes, has_dropout=True, aux_heads=True, feature_taps="merged")
    return UNet(dims=2, num_classes=info.num_classes, aux_heads=True)


def forward_deepsup(net, x):
    """(C) `forward(x, deepsup=True)`: logits O^1..O^4 (1/8 -> 1, each at its own resolution) and
    features F^1..F^4 (1 -> 1/8), in float32 so that the losses run in full precision under --amp."""
    logits, decoder_features = net.decoder(net.encoder(x))
    outputs = net.aux_logits(decoder_features, upsample=False) + [logits]
    return [o.float() for o in outputs], [f.float() for f in decoder_features[::-1]]


# ---- method: losses ----
def resize(t, size, mode):
    """Resize (B, C, *s) maps: 'nearest' for hard labels (the code's GT), 'linear' for soft labels."""
    if mode == "linear":
        mode = "trilinear" if t.dim() == 5 else "bilinear"
    return F.interpolate(t, size=size, mode=mode)


def binary_dice(p, t, eps=1e-8):
    """(C) `Binary_dice_loss`, D2: 1 - (2 sum p t + eps) / (sum p + sum t + eps)."""
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def fg_dice(P, T, mask=None):
    """(C) binary Dice on the foreground channel; (R) averaged over the foreground classes. P, T: (B, C, *s);
    mask: optional (B, *s) bool, the voxels that count (flattened over the batch, as the code)."""
    terms = []
    for c in range(1, P.shape[1]):
        p, t = P[:, c], T[:, c]
        terms.append(binary_dice(p[mask], t[mask]) if mask is not None else binary_dice(p, t))
    return torch.stack(terms).mean()


def deepsup_loss(logits, targets, masks=None, soft=False):
    """L = 1/2 (1/4 sum_s CE^s + 1/4 sum_s Dice^s) over the four scales (D1, D2, D6, D10).

    targets: per scale (B, C, *s) one-hot (hard) or soft maps; masks: per scale (B, *s) certain voxels or None.
    Hard: CE(O^s, argmax target) averaged over the (certain) voxels. Soft (D10): F.kl_div(log softmax O^s,
    target) averaged over the certain (voxel, class) entries, i.e. 1/C of the per-voxel KL, as the code.
    An empty mask gives NaN (the caller skips the term, as the code)."""
    ce, dice = 0, 0
    for s, (O, T) in enumerate(zip(logits, targets)):
        m = None if masks is None else masks[s]
        if soft:
            kl = F.kl_div(F.log_softmax(O, 1), T, reduction="none")                  # (C) custom_cross_entropy
            ce = ce + (kl.mean() if m is None else kl.movedim(1, -1)[m].mean())
        else:
            per_voxel = F.cross_entropy(O, common.argmax(T), reduction="none")
            ce = ce + (per_voxel.mean() if m is None else per_voxel[m].mean())
        dice = dice + fg_dice(torch.softmax(O, 1), T, m)
    n = len(logits)
    return (ce / n + dice / n) / 2, ce / n, dice / n


@torch.no_grad()
def certain_masks(P_T, thresholds):
    """(C) D3: M^s(v) = OR_c [P_T^s(c|v) > tau_c^s] (binary: bg > tau_bg or fg > tau_fg)."""
    return [(P > thresholds[s].view(1, -1, *[1] * (P.dim() - 2))).any(1) for s, P in enumerate(P_T)]


@torch.no_grad()
def update_thresholds(thresholds, P_S, y_hat, alpha=THRESH_ALPHA):
    """(C) D4-D5: mu_c^s = mean of the student's P_S^s(c) over {y_hat^s = c} (teacher argmax);
    tau_c^s <- clip(alpha tau + (1 - alpha) mu, 0.5, 0.95), skipped where no voxel carries c."""
    new = thresholds.clone()
    for s, (P, y) in enumerate(zip(P_S, y_hat)):
        oh = common.one_hot(y, P.shape[1])
        dims = [0] + list(range(2, P.dim()))
        count = oh.sum(dims)
        mu = (P * oh).sum(dims) / count.clamp_min(1)                                   # (C) mu_c^s
        updated = (alpha * thresholds[s] + (1 - alpha) * mu).clamp(THRESH_MIN, THRESH_MAX)  # (C) D5
        new[s] = torch.where(count > 0, updated, thresholds[s])
    return new


def prototypes(features, masks):
    """(C) D7, masked average pooling: p_c^k(b) = sum_v F^k_b(v) m_c(b, v) / sum_v m_c(b, v), then the mean over
    the batch. features: per level (B, C_k, *s); masks: per level (B, C, *s) weights. Returns per level (C, C_k);
    a class absent from an image gives NaN (0/0), as the code."""
    out = []
    for Fk, m in zip(features, masks):
        num = torch.einsum("bc...,bk...->bkc", Fk, m)                                   # (B, C, C_k)
        den = m.flatten(2).sum(-1).unsqueeze(-1)                                         # (B, C, 1)
        out.append((num / den).mean(0))                                                  # (C) mean of per-image prototypes
    return out


def prototype_loss(proto_a, proto_b, num_proto=4):
    """(C) D8/D11: mean over the valid (non-NaN) levels of MSE(P_a^k, P_b^k), the num_proto coarsest levels;
    both sides keep their gradient. Returns (loss or None when no level is valid, number of valid levels)."""
    terms = [F.mse_loss(a, b) for a, b in list(zip(proto_a, proto_b))[::-1][:num_proto]]
    valid = [t for t in terms if not torch.isnan(t)]                                    # (C) NaN levels skipped (sync)
    return (sum(valid) / len(valid) if valid else None), len(valid)


def self_normalized(term):
    """(C) D12: L / sg(L). Its value is 1 and its gradient grad(L) / L: a term's scale does not matter, and its
    step grows as it shrinks."""
    return term / term.detach()


def main(argv=None):
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--lamda_teacher", type=float, default=0.3, help="lambda_t of L_cs^ulb (C)")
    parser.add_argument("--lamda_mix", type=float, default=0.1, help="lambda_m of L_cs^mix (C)")
    parser.add_argument("--lamda_proto", type=float, default=0.1, help="lambda_p of L_proto^ulb (C)")
    parser.add_argument("--lamda_mix_proto", type=float, default=0.1, help="lambda_mp of L_proto^mix (C)")
    parser.add_argument("--num_proto", type=int, default=4, choices=[1, 2, 3, 4],
                        help="prototype levels, counted from the coarsest (C)")
    args = common.parse_args(parser, argv, DEFAULTS)
    common.seed_everything(args.seed, args.deterministic)
    info = common.get_dataset(args.dataset, args.root_path)
    root = common.resolve_root(info, args.root_path)
    lbs, C = args.labeled_bs, info.num_classes
    if args.batch_size - lbs < lbs:
        raise common.DataError(f"DuCiSC pairs each labeled sample with an unlabeled one: --batch_size "
                               f"{args.batch_size} must be at least twice --labeled_bs {lbs}")

    loader, n_labeled, n_unlabeled = common.train_loader(args, info, root)
    net = build_network(info).to(args.device)
    teacher = copy.deepcopy(net)  # (R) EMA teacher; the code builds an independent network (no effect: a_0 = 0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=1e-4)
    scaler = common.grad_scaler(args)
    state = {"thresholds": torch.full((4, C), 1.0 / C, device=args.device)}  # (C) tau_c^s = 1/num_classes
    run = common.Run(args, "ducisc", models={"net": net, "teacher": teacher},
                     optimizers={"optimizer": optimizer, "scaler": scaler}, state=state,
                     progress_terms=["loss_sup", "loss_cs_ulb", "loss_cs_mix", "loss_proto_ulb", "loss_proto_mix"])
    warmup = common.scale_iterations(WARMUP, WARMUP_OF, args.max_iterations)
    run.log(f"{n_labeled} labeled and {n_unlabeled} unlabeled training samples; batches of {lbs} + "
            f"{args.batch_size - lbs} (+ {lbs} fused); supervised-only warm-up {warmup} iterations")

    net.train()
    teacher.train()                                                           # (C) teacher never in eval mode
    with run:
        for iteration, batch in run.batches(loader):
            common.set_lr(optimizer, common.lr_at(args.lr_schedule, args.base_lr, iteration, args.max_iterations))
            image, label = batch["image"].to(args.device), batch["label"].to(args.device)
            x_l, y_l, x_u = image[:lbs], label[:lbs], image[lbs:]
            thresholds = run.state["thresholds"]

            # ---- method: DuCiSC ----
            with common.autocast(args):
                O_l, F_l = forward_deepsup(net, x_l)                          # (C) three separate student passes
                O_u, F_u = forward_deepsup(net, x_u)
                with torch.no_grad():
                    O_T, _ = forward_deepsup(teacher, x_u)
            P_T = [torch.softmax(o, 1) for o in O_T]
            y_hat = [common.argmax(P) for P in P_T]                          # (C) y_hat^s from each scale's own head

            # L_sup (D1, D2): GT resized by nearest to every head
            Y_l = common.one_hot(y_l, C)
            loss_sup, sup_ce, sup_dice = deepsup_loss(O_l, [resize(Y_l, o.shape[2:], "nearest") for o in O_l])

            # Self-aware certain masks (D3) and L_cs^ulb (D6)
            certain = certain_masks(P_T, thresholds)
            loss_ulb, _, _ = deepsup_loss(O_u, [common.one_hot(y, C) for y in y_hat], certain)

            # L_proto^ulb (D7, D8): GT masks for labeled, teacher argmax of the matching scale for unlabeled
            proto_l = prototypes(F_l, [resize(Y_l, f.shape[2:], "nearest") for f in F_l])
            proto_u = prototypes(F_u, [common.one_hot(y, C) for y in y_hat[::-1]])  # (C) level k <-> scale 5 - k
            loss_proto_ulb, levels_ulb = prototype_loss(proto_l, proto_u, args.num_proto)

            # Fused images (D9) and L_cs^mix (D10): sigma x_l + (1 - sigma) x_u, soft label likewise
            shape = (lbs,) + (1,) * (x_l.dim() - 1)
            sigma = SIGMA_LOW + (SIGMA_HIGH - SIGMA_LOW) * torch.rand(shape, device=image.device)  # (C) sigma_i
            x_m = sigma * x_l + (1 - sigma) * x_u[:lbs]                       # (C) global mixup of the pair i
            y_m = sigma * Y_l + (1 - sigma) * common.one_hot(y_hat[-1][:lbs], C)      # (C) y~_m with the full-res y_hat^4
            with common.autocast(args):
                O_m, F_m = forward_deepsup(net, x_m)
            loss_mix, _, _ = deepsup_loss(O_m, [resize(y_m, o.shape[2:], "linear") for o in O_m],
                                          [m[:lbs] for m in certain], soft=True)  # (C) the unlabeled partner's M^s

            # L_proto^mix (D11): soft fused masks
            proto_m = prototypes(F_m, [resize(y_m, f.shape[2:], "linear") for f in F_m])
            loss_proto_mix, levels_mix = prototype_loss(proto_l, proto_m, args.num_proto)

            # (C) D12: every term divided by its own detached value; unsupervised terms after the warm-up
            loss = self_normalized(loss_sup)
            raw = {"loss_cs_ulb": loss_ulb, "loss_cs_mix": loss_mix, "loss_proto_ulb": loss_proto_ulb,
                   "loss_proto_mix": loss_proto_mix}
            weights = {"loss_cs_ulb": args.lamda_teacher, "loss_cs_mix": args.lamda_mix,
                       "loss_proto_ulb": args.lamda_proto, "loss_proto_mix": args.lamda_mix_proto}
            active, loss_weighted = 0, loss_sup.detach()
            for name, term in raw.items():
                usable = term is not None and bool(torch.isfinite(term)) and bool(term != 0)  # (C) skip NaN / 0
                raw[name] = term.detach() if usable else torch.zeros((), device=image.device)
                if iteration >= warmup and usable and weights[name] != 0:
                    loss = loss + weights[name] * self_normalized(term)
                    loss_weighted = loss_weighted + weights[name] * raw[name]
                    active += 1
            if iteration >= warmup:                                           # (C) thresholds after the warm-up
                P_S = [torch.softmax(o.detach(), 1) for o in O_u]             # (C) the student's own probabilities
                run.state["thresholds"] = update_thresholds(thresholds, P_S, y_hat)

            run.viz(iteration, x_u[0], {"prediction": O_u[-1][0], "teacher pseudo-label": y_hat[-1][0],
                                        "certain mask": certain[-1][0], "thresholds (scale x class)": thresholds})

            # ---- standard loop ----
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            common.update_ema(teacher, net, EMA_DECAY, iteration)            # (C) a_t = min(1 - 1/(t + 1), 0.99)
            run.step(iteration, {                                            # objective: what backward() got
                "objective": loss, "loss": loss_weighted, "loss_sup": loss_sup, "sup_ce": sup_ce, "sup_dice": sup_dice, **raw,
                "active_terms": active, "proto_levels_ulb": levels_ulb, "proto_levels_mix": levels_mix,
                "certain_fraction": torch.stack([m.float().mean() for m in certain]).mean(),
                **{f"tau_s{s + 1}_c{c}": run.state["thresholds"][s, c] for s in range(4) for c in range(C)}})
        run.finish()


if __name__ == "__main__":
    common.cli(main)
