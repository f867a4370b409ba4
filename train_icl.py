"""ICL: Inherent Consistent Learning (MIDL 2023).

Y. Zhu, J. Yang, S.-Q. Liu, R. Zhang, "Inherent Consistent Learning for Accurate Semi-supervised
Medical Image Segmentation", MIDL 2023, arXiv 2303.14175. Official code: zhuye98/ICL
(`code/networks/unet_icl.py`, `unet_3D_icl.py`, `code/train_inherent_consistent_*.py`,
`code/utils/losses.py`; read, not copied). Specification: docs/methods/icl.md (its sections cited as
"ref §n"; E1-E9 are this repository's equation labels, not the paper's; the paper body was not
available, its method figure fixes the notation). Tags: (P) paper (abstract, Fig. 1), (C) official
code, (R) reconstruction.

Two training-only attention modules sit on three decoder scales of an ordinary segmentation
network. SSPA: learnable class proxies Q_0 query the labeled features scale after scale, giving
image-adapted proxies Q_i and class maps M_i^l supervised by the labels (L_spa). USCL: its own
attention, queried by the labeled batch's proxies, reads the unlabeled features and gives maps
G_i^u, trained to agree with the network's detached prediction p^u (L_usc) and with SSPA's detached
maps M_i^u of the same unlabeled image (L_con). No teacher; at test time only the network runs
(the evaluation checkpoint holds only it).

Symbols -> variables: x^l, y, x^u -> x_l, y_l, x_u; p^l, p^u -> p_l, p_u; F_i -> feats; Q_0 -> ICLModule.Q0;
Q_i -> proxies; M_i^l, M_i^u, G_i^u -> M_l, M_u, G_u; T_i -> T; A_logit -> A; lambda_usc, lambda_con ->
args.lambda_usc, args.lambda_con.

Released forms kept (ref §7): the class decoder's residuals add the attention output to itself
(O + DropPath(O)) rather than to the query, and likewise the attention logits (harmless, E2-E3);
the query head split reshapes (B, K, C) straight to (B, h, K, d), so a map channel mixes the
classes' queries across heads (`--head_split standard` gives the usual split, ref §7.2); the
spatial MLP Linear(N, N) over the N positions of each scale (E3) is on by default: at the ACDC
quick protocol (128x128) the two modules hold about 70 M parameters and train on the CPU; at the
paper's 256x256 about 1.15 B (about 14 GB of weights, gradients and momentum: one large GPU).
`--spatial_mlp 0` drops it (then E3 is A + DropPath(A)) for smaller GPUs.
Deviations and reconstructions:
- Real spatial shapes of every feature map (LA's 112x112x80 patch is not cubic; the code takes a
  cube root) and the real patch size as the interpolation target (the code hard-codes 96^3).
- The SSPA query convolution after the last scale is not applied (its output is unused in the code).
- LA and Pancreas (not in the paper): V-Net with the 3D code's scales (bottleneck 1/16, decoder
  stages 1/8 and 1/4) and the BraTS weights lambda_usc 1, lambda_con 10, 30,000 iterations (R).
- ACDC learning rate 0.01 (the script default); the released command (`train.sh`) passes 0.1.
Recipe as the code (golden tests): ACDC network = the SSL4MIS 2D U-Net with 1x1 conv + bilinear
up-sampling (`UNet_icl`'s `UpBlock` default; its params' `'bilinear': False` is never passed on) and
PyTorch's default init; BraTS = `unet_3D` with its Kaiming-normal init; augmentation = ICL's three-way
`RandomGenerator` (rot90+flip with p 1/2, else a rotation with p 1/2, else nothing); the poly rate is
set after each step (step k runs at the value for k - 1); the SSPA/USCL modules keep PyTorch's init.
- Model selection follows this repository's protocol (validation split or final checkpoint),
  not the code's best-on-val+test.

    python train_icl.py --dataset ACDC --labeled_num 7
    python test_2d.py --ckpt model/ACDC_run_7_labeled/icl/last.pth
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Defaults per data set (ref §4): ACDC and BraTS as the code; LA, Pancreas as ref §7.9 (R).
DEFAULTS = {
    "*": {"dataset": "ACDC", "base_lr": 0.01, "lr_schedule": "poly"},
    "ACDC": {"batch_size": 16, "labeled_bs": 8, "max_iterations": 30000, "patch_size": (256, 256)},
    "BraTS2019": {"batch_size": 4, "labeled_bs": 2, "max_iterations": 30000, "patch_size": (96, 96, 96)},
    "LA": {"batch_size": 4, "labeled_bs": 2, "max_iterations": 30000, "patch_size": (112, 112, 80)},
    "Pancreas": {"batch_size": 4, "labeled_bs": 2, "max_iterations": 30000, "patch_size": (96, 96, 96)},
}
LAMBDAS = {2: (1.0, 50.0), 3: (1.0, 10.0)}  # (C) (lambda_usc, lambda_con): ACDC 1, 50; BraTS 1, 10
DROP_PATH = 0.02                            # (C) dpr[1] of linspace(0, 0.1, 6), every block
MLP_RATIO = 4                               # (C) query MLP C -> 4C -> C


# ---- method: SSPA / USCL modules ----
def drop_path(x, p, training):
    """Stochastic depth per sample (timm DropPath): zero a sample's branch with probability p, scale by 1/(1-p)."""
    if p == 0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= p
    return x * keep / (1 - p)


class MLP(nn.Sequential):
    def __init__(self, d_in, d_hidden):
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_in))


class ClassDecoder(nn.Module):
    """(C) `Class_Decoder` + `Query_Attention`, ref §2.5 (E1-E3): K class queries attend over N tokens.
    Returns the updated proxies (B, K, C) and the refined pre-softmax attention maps (B, K, h, N)."""

    def __init__(self, dim, n_tokens, heads, spatial_mlp=True, head_split="code"):
        super().__init__()
        self.heads, self.scale, self.head_split = heads, (dim // heads) ** -0.5, head_split
        self.norm_q, self.norm_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc_q, self.fc_kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, MLP_RATIO * dim)
        self.spatial_mlp = spatial_mlp
        if spatial_mlp:                                               # (C) LN_N and MLP_N over the N positions
            self.norm_n, self.mlp_n = nn.LayerNorm(n_tokens), MLP(n_tokens, n_tokens)

    def forward(self, Q, T):
        B, N, C = T.shape
        K, h, d = Q.shape[1], self.heads, C // self.heads
        q = self.fc_q(self.norm_q(Q))
        # (C) the code's reshape (B, K, C) -> (B, h, K, d); standard: (B, K, h, d) -> (B, h, K, d)
        q = q.reshape(B, h, K, d) if self.head_split == "code" else q.reshape(B, K, h, d).transpose(1, 2)
        k, v = self.fc_kv(self.norm_t(T)).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4)
        A = (q @ k.transpose(-2, -1)) * self.scale                   # (C) E1: A_logit = s Q^ K^T, (B, h, K, N)
        O = A.softmax(-1) @ v                                         # (C) E1: softmax over N, times V^
        O = O.reshape(B, K, C) if self.head_split == "code" else O.transpose(1, 2).reshape(B, K, C)
        O = self.proj(O)                                              # (C) O = W_o (A V^)
        p = DROP_PATH
        Q_new = O + drop_path(O, p, self.training)                    # (C) E2: Q' = O + DropPath(O)
        Q_new = Q_new + drop_path(self.mlp(self.norm2(Q_new)), p, self.training)   # (C) Q_i = Q' + DP(MLP(LN(Q')))
        A = A.permute(0, 2, 1, 3)                                     # (B, K, h, N)
        A = A + drop_path(A, p, self.training)                        # (C) E3: A' = A + DropPath(A)
        if self.spatial_mlp:
            A = A + drop_path(self.mlp_n(self.norm_n(A)), p, self.training)       # (C) A^ = A' + DP(MLP_N(LN_N(A')))
        return Q_new, A


class MapHead(nn.Module):
    """(C) E4: per class, the h attention maps -> depthwise 3x3 (no bias), BN, ReLU, 1x1 h -> h (no bias), BN, ReLU,
    1x1 h -> 1: the class's logit map ("Conv2d" after each "Cross Att" in Fig. 1)."""

    def __init__(self, dims, heads):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        bn = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        self.block = nn.Sequential(conv(heads, heads, 3, padding=1, groups=heads, bias=False), bn(heads),
                                   nn.ReLU(inplace=True), conv(heads, heads, 1, bias=False), bn(heads),
                                   nn.ReLU(inplace=True), conv(heads, 1, 1))

    def forward(self, A, spatial):
        B, K, h, _ = A.shape
        return self.block(A.reshape(B * K, h, *spatial)).reshape(B, K, *spatial)


class ICLModule(nn.Module):
    """(C) `InherentConsistent`: one SSPA or USCL. Per scale i: tokenizer (1x1 conv, flatten, LN: T_i), class
    decoder, map head, and the Conv1d C_i -> C_i/2 that hands the proxies to the next scale; Q_0 (zeros).

    forward(feats) (SSPA): Q_0 -> scale 1 -> Conv1d -> scale 2 -> ... ; returns (maps M_i, batch-mean proxies Q_i).
    forward(feats, proxies) (USCL): scale i is queried by proxies[i], expanded to the batch (no chain)."""

    def __init__(self, dims, channels, spatial_shapes, num_classes, spatial_mlp=True, head_split="code"):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        heads = [c // 16 for c in channels]                           # (C) head dimension 16
        self.tokenizers = nn.ModuleList([conv(c, c, 1) for c in channels])
        self.token_norms = nn.ModuleList([nn.LayerNorm(c) for c in channels])
        self.decoders = nn.ModuleList([ClassDecoder(c, math.prod(s), h, spatial_mlp, head_split)
                                       for c, s, h in zip(channels, spatial_shapes, heads)])
        self.map_heads = nn.ModuleList([MapHead(dims, h) for h in heads])
        self.query_convs = nn.ModuleList([nn.Conv1d(c, c // 2, 1) for c in channels[:-1]])
        self.Q0 = nn.Parameter(torch.zeros(1, num_classes, channels[0]))   # (C) Q_0 initialised to zeros

    def forward(self, feats, proxies=None):
        maps, means = [], []
        q = self.Q0.expand(feats[0].shape[0], -1, -1)                  # (P) "Init proxy" Q_0
        for i, Fi in enumerate(feats):
            T = self.token_norms[i](self.tokenizers[i](Fi).flatten(2).transpose(1, 2))  # (C) T_i = LN(flatten(conv(F_i)))
            query = q if proxies is None else proxies[i].expand(Fi.shape[0], -1, -1)    # (C) USCL: Q_bar_i
            Q_i, A = self.decoders[i](query, T)
            maps.append(self.map_heads[i](A, Fi.shape[2:]))            # (C) M_i or G_i, K-class logits
            means.append(Q_i.mean(0, keepdim=True))                     # (C) Q_bar_i = batch mean, not detached
            if proxies is None and i < len(feats) - 1:
                q = self.query_convs[i](Q_i.transpose(1, 2)).transpose(1, 2)            # (C) Conv1d_i: C_i -> C_i/2
        return maps, means


def icl_features(net, x):
    """Logits and the three ICL feature maps (ref §2.3, §7.5): 2D U-Net up1..up3 (1/8, 1/4, 1/2) (C);
    3D bottleneck (after its dropout) and the first two decoder stages (1/16, 1/8, 1/4) (C for unet_3D, R for V-Net)."""
    enc = net.encoder(x)
    logits, dec = net.decoder(enc)
    return logits, (dec[:3] if x.dim() == 4 else [enc[-1], dec[0], dec[1]])


def icl_geometry(dims, patch):
    """Channels and real spatial shapes of the three ICL feature maps for a patch."""
    if dims == 2:
        return (128, 64, 32), [tuple(p // f for p in patch) for f in (8, 4, 2)]
    return (256, 128, 64), [tuple(p // f for p in patch) for f in (16, 8, 4)]


# ---- method: losses ----
def upsample(z, size):
    """U(.): bilinear / trilinear to the patch size, align_corners off (C)."""
    return F.interpolate(z, size=size, mode="trilinear" if z.dim() == 5 else "bilinear", align_corners=False)


def soft_dice(P, R, smooth=1e-5):
    """(C) D_soft (`softmax_dice_loss` after the softmax): 1/K sum_k [1 - (2 sum P_k R_k + s) / (sum P_k + sum R_k + s)]."""
    dims = [0] + list(range(2, P.dim()))
    return (1 - (2 * (P * R).sum(dims) + smooth) / (P.sum(dims) + R.sum(dims) + smooth)).mean()


def seg_loss(logits, y):
    """(C) E5: CE + D_sq (SSL4MIS DiceLoss, background included), no 1/2."""
    return F.cross_entropy(logits, y.long()) + common.dice_loss(torch.softmax(logits, 1), y)


def spa_loss(M_l, y):
    """(P) L_spa, (C) E6: 1/S sum_i [CE(U(M_i^l), y) + D_sq(softmax U(M_i^l), y)]."""
    return sum(seg_loss(upsample(M, y.shape[1:]), y) for M in M_l) / len(M_l)


def usc_loss(G_u, p_u):
    """(P) L_usc against the detached prediction, (C) E7: 1/S sum_i D_soft(softmax U(G_i^u), softmax sg(p^u))."""
    target = torch.softmax(p_u.detach(), 1)
    return sum(soft_dice(torch.softmax(upsample(G, p_u.shape[2:]), 1), target) for G in G_u) / len(G_u)


def con_loss(G_u, M_u):
    """(P) L_con against SSPA's detached maps, (C) E8: 1/S sum_i mean (softmax G_i^u - softmax sg(M_i^u))^2,
    at each scale's own resolution."""
    return sum(((torch.softmax(G, 1) - torch.softmax(M.detach(), 1)) ** 2).mean() for G, M in zip(G_u, M_u)) / len(G_u)


def main(argv=None):
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--lambda_usc", type=float, default=None, help="weight of L_usc (C: 1; AMOS 0.1)")
    parser.add_argument("--lambda_con", type=float, default=None, help="weight of L_con (C: ACDC 50, BraTS 10)")
    parser.add_argument("--spatial_mlp", type=int, default=1,
                        help="1: the released spatial MLP over the N positions of each scale (E3); 0: without it")
    parser.add_argument("--head_split", default="code", choices=["code", "standard"],
                        help="query head split: the released reshape, or the standard one (ref §7.2)")
    args = common.parse_args(parser, argv, DEFAULTS)
    common.seed_everything(args.seed, args.deterministic)
    info = common.get_dataset(args.dataset, args.root_path)
    root = common.resolve_root(info, args.root_path)
    default_usc, default_con = LAMBDAS[info.dims]
    args.lambda_usc = default_usc if args.lambda_usc is None else args.lambda_usc
    args.lambda_con = default_con if args.lambda_con is None else args.lambda_con

    channels, shapes = icl_geometry(info.dims, args.patch_size)
    common.check_memory(lambda: [ICLModule(info.dims, channels, shapes, info.num_classes, bool(args.spatial_mlp),
                                           args.head_split) for _ in range(2)], args.device,
                        "the spatial MLP has N x N weights per scale (N positions); --spatial_mlp 0 removes it, a "
                        "smaller --patch_size shrinks it (128 128: 72 M)")
    loader, n_labeled, n_unlabeled = common.train_loader(args, info, root, pipeline="three_way")  # (C) its RandomGenerator
    # (C) ACDC: the SSL4MIS U-Net (1x1 conv + bilinear up-sampling, default init); BraTS: unet_3D (Kaiming);
    # LA/Pancreas: V-Net (R)
    net = common.default_network(info).to(args.device)
    sspa = ICLModule(info.dims, channels, shapes, info.num_classes, bool(args.spatial_mlp), args.head_split).to(args.device)
    uscl = ICLModule(info.dims, channels, shapes, info.num_classes, bool(args.spatial_mlp), args.head_split).to(args.device)
    params = list(net.parameters()) + list(sspa.parameters()) + list(uscl.parameters())
    optimizer = torch.optim.SGD(params, lr=args.base_lr, momentum=0.9, weight_decay=1e-4)  # (C) one SGD for all
    scaler = common.grad_scaler(args)
    run = common.Run(args, "icl", models={"net": net, "sspa": sspa, "uscl": uscl},
                     optimizers={"optimizer": optimizer, "scaler": scaler},     # evaluation: the network only
                     progress_terms=["loss", "loss_seg", "loss_spa", "loss_usc", "loss_con"])
    n_icl = sum(p.numel() for p in sspa.parameters()) + sum(p.numel() for p in uscl.parameters())
    run.log(f"{n_labeled} labeled and {n_unlabeled} unlabeled training samples; batches of {args.labeled_bs} + "
            f"{args.batch_size - args.labeled_bs}; SSPA + USCL {n_icl / 1e6:.1f} M parameters (spatial MLP "
            f"{'on' if args.spatial_mlp else 'off'}), lambda_usc {args.lambda_usc}, lambda_con {args.lambda_con}")
    lbs = args.labeled_bs

    for m in (net, sspa, uscl):
        m.train()
    with run:
        for iteration, batch in run.batches(loader):
            common.set_lr(optimizer, common.lr_at(args.lr_schedule, args.base_lr, iteration, args.max_iterations))
            image, label = batch["image"].to(args.device), batch["label"].to(args.device)
            x_l, y_l, x_u = image[:lbs], label[:lbs], image[lbs:]

            # ---- method: ICL ----
            with common.autocast(args):
                p_l, feats_l = icl_features(net, x_l)                 # (C) two separate forward calls
                p_u, feats_u = icl_features(net, x_u)
                M_l, proxies = sspa(feats_l)                          # (P) SSPA on labeled: M_i^l and Q_i
                M_u, _ = sspa(feats_u)                                # (P) SSPA on unlabeled: targets M_i^u only
                G_u, _ = uscl(feats_u, proxies)                       # (P) USCL queried by the labeled proxies
            p_l, p_u = p_l.float(), p_u.float()
            M_l, M_u, G_u = [[m.float() for m in maps] for maps in (M_l, M_u, G_u)]

            loss_seg = seg_loss(p_l, y_l)                             # (P) L_seg, (C) E5
            loss_spa = spa_loss(M_l, y_l)                             # (P) L_spa, (C) E6
            loss_usc = usc_loss(G_u, p_u)                             # (P) L_usc, (C) E7
            loss_con = con_loss(G_u, M_u)                             # (P) L_con, (C) E8
            loss = loss_seg + loss_spa + args.lambda_usc * loss_usc + args.lambda_con * loss_con   # (C) E9, no ramp

            run.viz(iteration, x_u[0], {"prediction": p_u[0], **{f"SSPA M_{i + 1}": M[0] for i, M in enumerate(M_u)},
                                        **{f"USCL G_{i + 1}": G[0] for i, G in enumerate(G_u)}})

            # ---- standard loop ----
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.step(iteration, {"loss": loss, "loss_seg": loss_seg, "loss_spa": loss_spa, "loss_usc": loss_usc,
                                 "loss_con": loss_con})
        run.finish()


if __name__ == "__main__":
    common.cli(main)
