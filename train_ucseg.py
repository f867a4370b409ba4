"""UC-Seg: Uncertainty-aware Cross-training for Semi-supervised Medical Image Segmentation (IEEE TIP 2025).

K. Huang, T. Zhou, H. Fu, Y. Zhang, Y. Zhou, X.-J. Wu, IEEE TIP 34:5543-5556 (2025), arXiv 2508.09014.
Official code: taozh2017/UCSeg at commit 7251be6 (`UC-Seg_3D_github/`, `UC-Seg_2D_github/`: the
trainers, `module/UC_Seg*.py`, `module/generate_pseudo_map_attention*.py`, `module/denseCL_SSIM*.py`,
`utils/UMIS.py`, `utils/losses.py`, `utils/mix_up.py`; read, not copied). Specification:
docs/methods/ucseg.md (comments cite the specification's sections as "ref §n", listed there; the
paper body was not available, so the equations are the code's). Tags: (P) paper (abstract), (C) official code, (R) reconstruction.

Two subnets with no shared weights see the same batch: a U-Net and a V-Net without normalisation or
dropout. UPG: each subnet's logits are Dirichlet evidence (softplus), the uncertainty u = C / S of
each is cut into patches, a cross-attention (queries from u^1, keys and values from u^2) makes a
one-channel map A that re-weights both subnets' logits, and a 1x1-conv head fuses them. The head is
trained on labeled data; its output on unlabeled data (largest connected component kept) is the one
hard pseudo-label for both subnets, and its output is the test-time prediction. CCP on the three
deepest encoder features: IFE (class prototypes of each subnet against its own memory queue of
prototypes) and IC (region-level InfoNCE between the subnets). An evidential accuracy-vs-
uncertainty term (AU) joins every supervised loss; after a warm-up a copy-paste mix of a labeled
and an unlabeled image is trained too.

Symbols -> variables: z^1, z^2, z_hat -> z1, z2, z_hat; F^k_s -> feats1, feats2; u^k -> u1, u2; A -> attention
map in UPG; Y_L, Y_hat -> Y_l, Y_hat; w(t) -> w_t; lambda_c, lambda_p -> LAMBDA_C, LAMBDA_P; tau -> TAU;
Q^k_{s,c} -> CCP.queues[k, c]; tau_q(t) -> gate; lambda_t (AU annealing) -> in au_loss.

Deviations from the official code (default; `--as_released` restores the first three):
- The memory queues get one FIFO pointer per class; the released code shares one pointer per subnet
  and scale between all classes, so class c only ever writes slots c, c + C, ... of its queue and
  (C - 1)/C of it keeps its random start (ref §3.5.1).
- The 3D Dice loss sums over the whole volume; the released one sums over the first two spatial
  axes only (a per-slice Dice, ref §3.1).
- Queue start vectors are normalised along the feature axis; the released 2D file normalises along
  the class axis (only matters while slots keep their start, i.e. with the shared pointer).
Recipe as the code (golden tests where docs/methods/ucseg.md names one): unet_3D with its
Kaiming-normal init and the V-Net with PyTorch's (3D), the 2D V-Net with its Kaiming pass; 3D
augmentation rot90/flip + crop on LA and Pancreas alike; ACDC augmentation = the code's
albumentations pipeline (nearest resize, flips, ShiftScaleRotate, grid/elastic distortion,
CoarseDropout), written with scipy (`Transform2D(pipeline="ucseg")`); the linear rate is set after
each step; 3D test as below.
Reconstructions (R) and other choices:
- One input channel (the 2D code repeats the grey image to three channels).
- The prediction-level consistency L_diff is computed and logged but carries no gradient, as released
  (the code returns a Python float); the flag-free behaviour is the released one.
- The UPG patch must divide the training patch (its positional embedding fixes the token grid).
  Default: 16 in 3D (code), and in 2D the patch side / 16, i.e. the code's 16 x 16 token grid
  (256 / 16 for ACDC, 224 / 14 for its 2D binary tasks): 8 for the quick protocol's 128 x 128.
  Other sizes stop with an error naming --upg_patch. Inference uses the training patch (2D slices
  are zoomed to it; 3D sliding windows have its size).
- The largest-connected-component clean-up is applied to every pseudo-label and own-prediction mask
  (code: 3D and ACDC; its 2D binary trainer skips it). Test time as the code: in 3D the largest
  component is kept and the window stride is 18/18/4 on LA and Pancreas (stored in the checkpoint;
  `test_3d.py --lcc off --stride ...` overrides); ACDC predictions are not post-processed.
- Warm-up of the copy-paste stage (12,000 of 50,000 iterations in 2D, 6,000 in 3D) and the
  unsupervised ramp (200 steps of 150 iterations) scale with a shorter --max_iterations through
  common.scale_iterations; AU annealing and the queue gate use t / T and need no scaling.
- LA uses the code's 96^3 patch; labeled_num defaults 8 (LA) and 6 (Pancreas): the code's 10 %.

    python train_ucseg.py --dataset LA --labeled_num 8
    python test_3d.py --ckpt model/LA_run_8_labeled/ucseg/last.pth
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from unet2d import UNet
from vnet import VNet

# Defaults per data set (ref §4): the code's T = 50,000, linear LR decay, weight decay 1e-5.
DEFAULTS = {
    "*": {"dataset": "LA", "base_lr": 0.01, "lr_schedule": "linear"},
    "LA": {"labeled_num": 8, "batch_size": 4, "labeled_bs": 2, "max_iterations": 50000, "patch_size": (96, 96, 96)},
    "Pancreas": {"labeled_num": 6, "batch_size": 4, "labeled_bs": 2, "max_iterations": 50000,
                 "patch_size": (96, 96, 96)},
    "ACDC": {"batch_size": 24, "labeled_bs": 12, "max_iterations": 50000, "patch_size": (256, 256)},
}
T_REF = 50000                          # (C) the code's max_iterations, reference of the scaled schedules
MIX_START = {2: 12000, 3: 6000}        # (C) copy-paste stage from this iteration
RAMP_EVERY, RAMP_STEPS, W_MAX = 150, 200, 0.1 * 150   # (C) w(t) = 0.1 * 150 * sigmoid_rampup(t // 150, 200)
LAMBDA_C, LAMBDA_P = 0.2, 0.1          # (C) embed_c_factor (IFE), embed_p_factor (IC)
TAU = 0.3                              # (C) temperature of IFE and IC
QUEUE_K = {2: 1440, 3: 144}            # (C) queue length
GATE = {2: (0.5, 0.46), 3: (0.2, 0.56)}  # (C) queue gate tau_q(t) = a + b t / T
UPG_DIM = {2: (96, 64), 3: (1024, 128)}  # (C) token dim, head dim; 8 heads, FFN 384, dropout 0.1
REGIONS = 3                            # (C) IC pools to 3 x 3 (x 3) regions


# ---- method: evidential quantities and losses ----
def uncertainty(z):
    """(C) u = C / S with alpha = softplus(z) + 1, S = sum_c alpha_c (Dirichlet / subjective logic)."""
    return z.shape[1] / (F.softplus(z) + 1).sum(1, keepdim=True)


def au_loss(z, y, t, T, eps=1e-10):
    """(C) `u_loss`, ref §3.1: accuracy-versus-uncertainty calibration. alpha = softplus(z) + 1, p = alpha / S,
    p_hat, c_hat = max, argmax p; a = [c_hat = y]; lambda_t = 0.01^(1 - t/T);
    L_AU = mean[lambda_t a (-p_hat log(1 - u + eps)) + (1 - lambda_t)(1 - a)(-(1 - p_hat) log(u + eps))]."""
    alpha = F.softplus(z) + 1
    S = alpha.sum(1)
    p_hat, c_hat = (alpha / S.unsqueeze(1)).max(1)
    u = z.shape[1] / S
    a = (c_hat == y).float()
    lam = 0.01 ** (1 - t / T)                                              # (C) annealing_AU
    return (lam * a * (-p_hat * torch.log(1 - u + eps))
            + (1 - lam) * (1 - a) * (-(1 - p_hat) * torch.log(u + eps))).mean()


def activation(z, binary):
    """sigma: per-channel sigmoid for binary tasks (multi-label, as the code), softmax over classes otherwise."""
    return torch.sigmoid(z) if binary else torch.softmax(z, 1)


def dice_loss(P, Y, per_slice=False, eps=1e-5):
    """(C) 1 - mean_{b,c} (2 sum P Y + eps) / (sum P + sum Y + eps), sums over the spatial axes, background
    included. per_slice (3D, released): sums over the first two spatial axes only."""
    dims = (2, 3) if per_slice or P.dim() == 4 else (2, 3, 4)
    return (1 - (2 * (P * Y).sum(dims) + eps) / (P.sum(dims) + Y.sum(dims) + eps)).mean()


def seg_loss(z, Y, binary, per_slice=False):
    """(C) L_seg = BCE/CE + Dice: sigmoid BCE on both one-hot channels (binary) or CE with the one-hot (or mixed)
    target as probabilities (ACDC), plus the Dice of sigma(z)."""
    bce = F.binary_cross_entropy_with_logits(z, Y) if binary else F.cross_entropy(z, Y)
    return bce + dice_loss(activation(z, binary), Y, per_slice)


def labeled_dice(z, Y, binary):
    """(C) `val_coef(_ACDC)` with its swapped arguments: soft Dice 2 sum p y / (sum p + sum y + 0.001) of sigma(z)
    against the labels, foreground classes averaged; the queue gate compares it with tau_q(t)."""
    P = activation(z, binary)
    dims = [0] + list(range(2, P.dim()))
    inter, den = (P * Y).sum(dims)[1:], (P.sum(dims) + Y.sum(dims))[1:]
    return torch.where(den > 0, 2 * inter / (den + 0.001), torch.zeros_like(den)).mean()


def prediction_consistency(P1, P2):
    """(C) `loss_diff1/2`, ref §3.5.3: BCE(P1, P2) of the last channel only (the loop overwrites), returned as a
    number (no gradient), as released. Logged only."""
    with torch.no_grad():
        return F.binary_cross_entropy(P1[:, -1].clamp(1e-8, 1 - 1e-7), P2[:, -1].float())


@torch.no_grad()
def hard_prediction(z, binary):
    """(C) hard one-hot mask of a prediction with the largest component of each foreground class per sample:
    binary: sigmoid(z)[:, 1] >= 0.5 (`--nms 1`); multi-class: argmax softmax (`get_ACDC_masks`)."""
    C = z.shape[1]
    labels = (torch.sigmoid(z[:, 1]) >= 0.5).long() if binary else common.argmax(z)
    masks = torch.stack([labels == c for c in range(1, C)], 1)            # (B, C - 1, *S), disjoint
    kept = common.largest_components(masks.flatten(0, 1)).view(masks.shape)
    out = sum(c * kept[:, c - 1].long() for c in range(1, C))
    return common.one_hot(out, C)


# ---- method: UPG ----
def to_tokens(x, p):
    """(B, 1, *S) -> (B, N, p^d): non-overlapping p-sided patches in raster order (einops 'b c (h p1) (w p2) ->
    b (h w) (p1 p2 c)')."""
    B, d = x.shape[0], x.dim() - 2
    grid = [s // p for s in x.shape[2:]]
    x = x.reshape(B, *[v for g in grid for v in (g, p)])
    x = x.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2))
    return x.reshape(B, math.prod(grid), p ** d)


def from_tokens(t, spatial, p):
    """Inverse of to_tokens: (B, N, p^d) -> (B, 1, *spatial)."""
    B, d = t.shape[0], len(spatial)
    grid = [s // p for s in spatial]
    t = t.reshape(B, *grid, *[p] * d)
    order = [0] + [i for k in range(d) for i in (1 + k, 1 + d + k)]
    return t.permute(*order).reshape(B, 1, *spatial)


class UPG(nn.Module):
    """(C) `Generate_pseudo_Transformer`, ref §2.3: cross-attention over the two uncertainty maps (patch embedding
    shared by both, learned positional embedding, 8-head attention q <- u^1, k, v <- u^2, FFN residual, no
    LayerNorm), folded back into a one-channel map A; then the fusion head H on [A z^1, A z^2]."""

    def __init__(self, dims, num_classes, image_size, patch, heads=8, hidden=384, dropout=0.1):
        super().__init__()
        dim, dim_head = UPG_DIM[dims]
        n_tokens, patch_dim = math.prod(s // patch for s in image_size), patch ** dims
        self.patch, self.heads, self.scale = patch, heads, dim_head ** -0.5
        self.embed = nn.Linear(patch_dim, dim)                             # (C) to_patch_embedding
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim))             # (C) pos_embed ~ N(0, 1)
        self.drop = nn.Dropout(dropout)
        self.w_q, self.w_k, self.w_v = (nn.Linear(dim, heads * dim_head) for _ in range(3))
        self.attn_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.unembed = nn.Sequential(nn.Linear(dim, patch_dim), nn.Dropout(dropout))
        conv, bn = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        widths = [2 * num_classes, 16, 32, 64, 32, 16, num_classes]         # (C) six 1x1 convs, BN + LeakyReLU(0.2)
        self.head = nn.Sequential(*[nn.Sequential(conv(a, b, 1, bias=False), bn(b), nn.LeakyReLU(0.2))
                                    for a, b in zip(widths[:-1], widths[1:])])

    def attention_map(self, u1, u2):
        p1 = self.drop(self.embed(to_tokens(u1, self.patch)) + self.pos)   # (C) shared embedding + pos
        p2 = self.drop(self.embed(to_tokens(u2, self.patch)) + self.pos)
        B, N, _ = p1.shape
        split = lambda t: t.reshape(B, N, self.heads, -1).transpose(1, 2)
        q, k, v = split(self.w_q(p1)), split(self.w_k(p2)), split(self.w_v(p2))
        a = torch.softmax(q @ k.transpose(-2, -1) * self.scale, -1) @ v    # (C) queries u^1, keys/values u^2
        a = self.attn_out(a.transpose(1, 2).reshape(B, N, -1))
        a = self.ffn(a) + a                                                # (C) a <- FFN(a) + a
        return from_tokens(self.unembed(a), u1.shape[2:], self.patch)      # (C) A, no activation

    def forward(self, z1, z2, u1, u2):
        """(z_hat, A)."""
        A = self.attention_map(u1, u2)
        return self.head(torch.cat([A * z1, A * z2], 1)), A                # (C) z_hat = H([A z^1, A z^2])


class UCSegModel(nn.Module):
    """Subnet 1 (U-Net), subnet 2 (V-Net, no normalisation, no dropout) and UPG. forward(x) gives the test-time
    prediction as logits for a softmax (binary: (0, z_hat_1), whose softmax is (1 - sigmoid, sigmoid));
    outputs(x) gives everything training needs: z1, the three deepest features of subnet 1, z2, subnet 2's,
    z_hat, and what UPG saw and made: the uncertainty maps u1, u2 and the attention map A."""

    def __init__(self, dims, num_classes, patch_size, upg_patch):
        super().__init__()
        self.config = dict(dims=dims, num_classes=num_classes, patch_size=list(patch_size), upg_patch=upg_patch)
        self.binary = num_classes == 2
        self.net1 = UNet(dims=dims, num_classes=num_classes)               # (C) unet_2D (default init) / unet_3D (Kaiming)
        self.net2 = VNet(dims=dims, num_classes=num_classes, normalization="none", has_dropout=False,
                         init="kaiming" if dims == 2 else "default")      # (C) only the 2D V-Net runs its Kaiming pass
        self.upg = UPG(dims, num_classes, patch_size, upg_patch)

    def outputs(self, x):
        feats1, feats2 = self.net1.encoder(x), self.net2.encoder(x)
        z1, z2 = self.net1.decoder(feats1)[0], self.net2.decoder(feats2)[0]
        u1, u2 = uncertainty(z1), uncertainty(z2)                          # (C) u^k = C / S
        z_hat, A = self.upg(z1, z2, u1, u2)
        return z1, feats1[-3:], z2, feats2[-3:], z_hat, (u1, u2, A)        # (C) CCP: three deepest encoder stages

    def forward(self, x):
        z_hat = self.outputs(x)[4]
        return torch.cat([torch.zeros_like(z_hat[:, :1]), z_hat[:, 1:2]], 1) if self.binary else z_hat


# ---- method: CCP ----
class CCP(nn.Module):
    """(C) `Contrast_global_consistency` at one encoder scale: IFE (per subnet) and IC, and the memory queues
    Q^k_{s,c} (2 subnets x C classes x D x K, buffers) with their pointers."""

    def __init__(self, num_classes, dim, K, shared_pointer=False, init_class_axis=False):
        super().__init__()
        self.C, self.K, self.shared_pointer = num_classes, K, shared_pointer
        queues = torch.randn(2, num_classes, dim, K)
        self.register_buffer("queues", F.normalize(queues, dim=1 if init_class_axis else 2))
        self.register_buffer("ptr", torch.zeros(2, num_classes, dtype=torch.long))

    @staticmethod
    def _resize_mask(M, size):
        """(C) masks to the feature size: bilinear / trilinear, then > 0.5."""
        mode = "trilinear" if M.dim() == 5 else "bilinear"
        return (F.interpolate(M, size=size, mode=mode, align_corners=False) > 0.5).float()

    def ife_loss(self, k, feat, M):
        """(C) L_IFE^k: q_b = GAP(F * M_c) (mean over all positions, not the mask), positive = mean of the own
        class queue, negatives = every entry of the other classes' queues; InfoNCE at tau; mean over b and c."""
        M = self._resize_mask(M, feat.shape[2:])
        losses = []
        for c in range(self.C):
            q = (feat * M[:, c:c + 1]).flatten(2).mean(-1)                  # (C) GAP(F (.) M_c), (B, D)
            pos = self.queues[k, c].mean(1)                                 # (C) k+ = queue mean
            neg = torch.cat([self.queues[k, j] for j in range(self.C) if j != c], 1)   # (D, (C - 1) K)
            logits = torch.cat([(q @ pos)[:, None], q @ neg], 1) / TAU
            losses.append(F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)))
        return torch.stack(losses).mean()

    @staticmethod
    def ic_loss(f1, f2):
        """(C) `patch_loss`: regions r^k = adaptive average pool to 3 per side; for region i the anchor r^1_{b,i},
        positive r^2_{b,i}, negatives r^2_{b',j} for all b' and j != i; raw dot products / tau; mean over i."""
        pool = F.adaptive_avg_pool3d if f1.dim() == 5 else F.adaptive_avg_pool2d
        r1, r2 = pool(f1, REGIONS).flatten(2), pool(f2, REGIONS).flatten(2)   # (B, D, R)
        B, D, R = r1.shape
        losses = []
        for i in range(R):
            pos = (r1[:, :, i] * r2[:, :, i]).sum(1, keepdim=True)
            negatives = torch.cat([r2[:, :, :i], r2[:, :, i + 1:]], 2).permute(1, 0, 2).reshape(D, -1)
            logits = torch.cat([pos, r1[:, :, i] @ negatives], 1) / TAU
            losses.append(F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=r1.device)))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def enqueue(self, k, feat, L):
        """(C) `interpolation_save`: for each class, GAP(F * L_c) of every sample is written into subnet k's queue
        at the pointer, which then advances by B. Default: one pointer per class. shared_pointer (released):
        one pointer per subnet, advanced after every class's write."""
        L = self._resize_mask(L, feat.shape[2:])
        B = feat.shape[0]
        if self.K % B:
            raise ValueError(f"queue length {self.K} is not a multiple of the batch size {B}")
        for c in range(self.C):
            entry = (feat * L[:, c:c + 1]).flatten(2).mean(-1)              # (B, D)
            slot = 0 if self.shared_pointer else c
            p = int(self.ptr[k, slot])
            self.queues[k, c, :, p:p + B] = entry.T
            self.ptr[k, slot] = (p + B) % self.K


def box_mask(spatial, generator=None):
    """(C) `generate_mask`: ones, with zeros in a box of int(2/3) of every side at a random position."""
    mask = torch.ones(spatial)
    corner = [int(torch.randint(0, s - int(s * 2 / 3), (1,), generator=generator)) for s in spatial]
    mask[tuple(slice(c, c + int(s * 2 / 3)) for c, s in zip(corner, spatial))] = 0
    return mask


def main(argv=None):
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--as_released", action="store_true",
                        help="shared queue pointer, per-slice 3D Dice, class-axis queue init (see docstring)")
    parser.add_argument("--upg_patch", type=int, default=None,
                        help="UPG patch side; default 16 (3D) or the patch side / 16 (2D); must divide the patch")
    parser.add_argument("--no_mix", action="store_true", help="leave out the copy-paste stage (ref §7.4)")
    args = common.parse_args(parser, argv, DEFAULTS)
    common.seed_everything(args.seed, args.deterministic)
    info = common.get_dataset(args.dataset, args.root_path)
    root = common.resolve_root(info, args.root_path)
    dims, C, lbs = info.dims, info.num_classes, args.labeled_bs
    binary = C == 2
    if args.upg_patch is None:
        args.upg_patch = 16 if dims == 3 else args.patch_size[0] // 16
    if args.upg_patch < 1 or any(p % args.upg_patch for p in args.patch_size):
        raise common.DataError(f"--upg_patch {args.upg_patch} must divide every side of --patch_size {args.patch_size}")
    if args.batch_size != 2 * lbs:
        raise common.DataError(f"UC-Seg pairs labeled and unlabeled samples: --batch_size {args.batch_size} must "
                               f"be twice --labeled_bs {lbs}")

    # (C) 3D: rot90/flip + crop (Pancreas too); 2D: the code's albumentations pipeline, written with scipy
    loader, n_labeled, n_unlabeled = common.train_loader(args, info, root, rot_flip=True, pipeline="ucseg")
    model = UCSegModel(dims, C, args.patch_size, args.upg_patch).to(args.device)
    feat_dims = (64, 128, 256)                                             # (C) features[-3], [-2], [-1]
    ccp = nn.ModuleList([CCP(C, d, QUEUE_K[dims], shared_pointer=args.as_released,
                             init_class_axis=args.as_released and dims == 2) for d in feat_dims]).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=1e-5)  # (C)
    scaler = common.grad_scaler(args)
    # (C) the 3D test keeps the largest component and slides with stride 18/18/4 on LA and Pancreas alike
    test_rules = {"lcc": True, "stride": (18, 18, 4)} if dims == 3 else {}
    run = common.Run(args, "ucseg", models={"model": model, "ccp": ccp}, test_rules=test_rules,
                     optimizers={"optimizer": optimizer, "scaler": scaler}, eval_models=("model",),
                     progress_terms=["loss", "loss_sup1", "loss_upg", "loss_u1", "loss_mix1"])
    mix_start = common.scale_iterations(MIX_START[dims], T_REF, args.max_iterations)
    ramp_every = common.scale_iterations(RAMP_EVERY, T_REF, args.max_iterations)
    gate_a, gate_b = GATE[dims]
    run.log(f"{n_labeled} labeled and {n_unlabeled} unlabeled training samples; batches of {lbs} + {lbs}; UPG "
            f"patch {args.upg_patch}; copy-paste from iteration {mix_start}; "
            f"{'as released' if args.as_released else 'per-class queue pointers'}")
    per_slice = args.as_released and dims == 3

    model.train()
    with run:
        for iteration, batch in run.batches(loader):
            common.set_lr(optimizer, common.lr_at(args.lr_schedule, args.base_lr, iteration, args.max_iterations))
            image, label = batch["image"].to(args.device), batch["label"].to(args.device)
            x_l, x_u, y_l = image[:lbs], image[lbs:], label[:lbs]
            Y_l = common.one_hot(y_l, C)
            t, T = iteration, args.max_iterations

            # ---- method: UC-Seg ----
            with common.autocast(args):
                z1, feats1, z2, feats2, z_hat, (u1, u2, A) = model.outputs(image)  # (C) both subnets + UPG, whole batch
            z1, z2, z_hat = z1.float(), z2.float(), z_hat.float()
            feats1, feats2 = [f.float() for f in feats1], [f.float() for f in feats2]

            # Supervised (ref §3.2) and UPG (§3.3) losses on the labeled half, each with the AU term
            loss_sup1 = seg_loss(z1[:lbs], Y_l, binary, per_slice) + au_loss(z1[:lbs], y_l, t, T)   # (C) L_sup^1
            loss_sup2 = seg_loss(z2[:lbs], Y_l, binary, per_slice) + au_loss(z2[:lbs], y_l, t, T)   # (C) L_sup^2
            loss_upg = seg_loss(z_hat[:lbs], Y_l, binary, per_slice) + au_loss(z_hat[:lbs], y_l, t, T)  # (C) L_upg

            # Pseudo-label from UPG (no gradient, largest component) and the unsupervised loss (§3.4)
            Y_hat = hard_prediction(z_hat[lbs:].detach(), binary)          # (C) Y_hat
            loss_u1 = seg_loss(z1[lbs:], Y_hat, binary, per_slice)         # (C) L_u^1
            loss_u2 = seg_loss(z2[lbs:], Y_hat, binary, per_slice)         # (C) L_u^2
            P1, P2 = activation(z1, binary), activation(z2, binary)
            diff1, diff2 = prediction_consistency(P1, P2), prediction_consistency(P2, P1)  # (C) logged only

            # CCP (§3.5): IFE with each subnet's own hard masks, IC between the subnets, three scales
            M1, M2 = hard_prediction(z1.detach(), binary), hard_prediction(z2.detach(), binary)
            ife1 = sum(m.ife_loss(0, f, M1) for m, f in zip(ccp, feats1)) / 3            # (C) L_IFE^1
            ife2 = sum(m.ife_loss(1, f, M2) for m, f in zip(ccp, feats2)) / 3            # (C) L_IFE^2
            ic = sum(m.ic_loss(f1, f2) for m, f1, f2 in zip(ccp, feats1, feats2)) / 3     # (C) L_IC

            # Queue update (§3.5.1), gated by each subnet's soft Dice on the labeled half
            gate = gate_a + gate_b * t / T                                 # (C) tau_q(t)
            dice1, dice2 = labeled_dice(z1[:lbs].detach(), Y_l, binary), labeled_dice(z2[:lbs].detach(), Y_l, binary)
            L = torch.cat([Y_l, Y_hat])                                    # (C) labels of the full batch
            for k, (d, feats) in enumerate([(dice1, feats1), (dice2, feats2)]):
                if bool(d > gate):                                         # one sync per subnet
                    for m, f in zip(ccp, feats):
                        m.enqueue(k, f.detach(), L)

            w_t = W_MAX * common.sigmoid_rampup(iteration // ramp_every, RAMP_STEPS)   # (C) w(t)
            mixing = iteration >= mix_start and not args.no_mix
            if not mixing:
                # (C) stage 1: L^k = L_sup^k + w L_u^k + lambda_c L_IFE^k; L = (L^1 + L^2) / 2 + L_upg + lambda_p L_IC
                loss1 = loss_sup1 + w_t * loss_u1 + LAMBDA_C * ife1
                loss2 = loss_sup2 + w_t * loss_u2 + LAMBDA_C * ife2
                loss = (loss1 + loss2) / 2 + loss_upg + LAMBDA_P * ic
                loss_mix1 = loss_mix2 = torch.zeros((), device=image.device)
            else:
                # (C) stage 2 (§3.6): copy-paste of labeled i and unlabeled i, a box of 2/3 of each side
                box = box_mask(x_l.shape[2:]).to(image.device)
                if torch.rand(()) > 0.5:
                    inside, outside = x_u, x_l                             # (C) labeled outside the box
                    Y_in, Y_out = Y_hat, Y_l
                else:
                    inside, outside = x_l, x_u
                    Y_in, Y_out = Y_l, Y_hat
                x_mix = outside * box + inside * (1 - box)
                Y_mix = Y_out * box + Y_in * (1 - box)
                with common.autocast(args):
                    z1m, f1m, z2m, f2m, _, _ = model.outputs(x_mix)        # (C) UPG output on the mix unused
                z1m, z2m = z1m.float(), z2m.float()
                f1m, f2m = [f.float() for f in f1m], [f.float() for f in f2m]
                loss_mix1 = seg_loss(z1m, Y_mix, binary, per_slice)        # (C) L_mix^1
                loss_mix2 = seg_loss(z2m, Y_mix, binary, per_slice)        # (C) L_mix^2
                M1m, M2m = hard_prediction(z1m.detach(), binary), hard_prediction(z2m.detach(), binary)
                ife1m = sum(m.ife_loss(0, f, M1m) for m, f in zip(ccp, f1m)) / 3
                ife2m = sum(m.ife_loss(1, f, M2m) for m, f in zip(ccp, f2m)) / 3
                icm = sum(m.ic_loss(a, b) for m, a, b in zip(ccp, f1m, f2m)) / 3
                # (C) L^k = L_sup^k + w/2 (L_u^k + L_mix^k) + lambda_c/2 (L_IFE^k + L_IFE,mix^k)
                loss1 = loss_sup1 + 0.5 * w_t * (loss_u1 + loss_mix1) + 0.5 * LAMBDA_C * (ife1 + ife1m)
                loss2 = loss_sup2 + 0.5 * w_t * (loss_u2 + loss_mix2) + 0.5 * LAMBDA_C * (ife2 + ife2m)
                loss = (loss1 + loss2) / 2 + loss_upg + 0.5 * LAMBDA_P * (ic + icm)

            run.viz(iteration, x_u[0], {"fused prediction": z_hat[lbs], "uncertainty u1 (U-Net)": u1[lbs, 0],
                                        "uncertainty u2 (V-Net)": u2[lbs, 0], "UPG attention A": A[lbs, 0],
                                        "UPG pseudo-label": Y_hat[0]})

            # ---- standard loop ----
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.step(iteration, {
                "loss": loss, "loss_sup1": loss_sup1, "loss_sup2": loss_sup2, "loss_upg": loss_upg,
                "loss_u1": loss_u1, "loss_u2": loss_u2, "loss_mix1": loss_mix1, "loss_mix2": loss_mix2,
                "ife1": ife1, "ife2": ife2, "ic": ic, "w_t": w_t, "diff1": diff1, "diff2": diff2,
                "dice1": dice1, "dice2": dice2, "gate": gate, "mixing": float(mixing),
                "pseudo_fg": Y_hat[:, 1:].sum(1).mean()})
        run.finish()


if __name__ == "__main__":
    common.cli(main)
