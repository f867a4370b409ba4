"""V-Net as used by UA-MT, MC-Net, SS-Net, BCP and their successors (3D; 2D through `dims`).

Layout (`yulequan/UA-MT: code/networks/vnet.py`, read, not copied): 16 base filters doubling to
256 at the bottleneck; encoder stages of 1, 2, 3, 3, 3 plain conv-norm-ReLU layers, joined by
stride-2 2x2x2 convolutions; decoder stages of 3, 3, 2, 1 layers after stride-2 transposed
convolutions; skips are *added*, not concatenated; a 1x1x1 classifier. With `has_dropout`,
Dropout3d(0.5) acts on the bottleneck and on the last decoder feature.

Options the methods need:
- `normalization`: 'batchnorm' (anchors), 'instancenorm', 'groupnorm', 'none' (UC-Seg's V-Net).
- `residual_encoder=True`: a ResNet-34-style encoder (BasicBlocks [3, 4, 6, 3], 7^3 stem, no
  max-pool) with the same channel/resolution pyramid, so the V-Net decoder is reused unchanged
  (the dual-network method's network A, `AIPMLab/Semi-supervised-Segmentation:
  networks/ResNet34.py`). Its bottleneck has no dropout, as in that code.
- `aux_heads=True`: three 1x1 heads on the coarse decoder stages for deep supervision (DuCiSC).
- `feature_taps='merged'`: the decoder returns, per stage, the sum of the up-sampled features and
  the skip (MC-Net/DuCiSC `x5_up` ... `x8_up`, taken *before* that stage's convolutions; the aux
  heads then sit on them, as in DuCiSC's `networks/VNet.py`) instead of the stage outputs
  (`'output'`, UA-MT's x6 ... x9).
- `init`: 'default' (PyTorch's own initialisation: UA-MT, MC-Net and DuCiSC leave their Kaiming pass
  commented out) or 'kaiming' (`kaiming_init` below: the dual-network code's `vnet.py` and
  `ResNet34.py` and UC-Seg's 2D V-Net run it in their constructors). None picks 'kaiming' for the
  residual encoder (that code always runs it) and 'default' otherwise.

Interface shared with unet2d.UNet: `net(x)` -> logits; `net.encoder(x)` -> features shallow to
deep; `net.decoder(features)` -> (logits, decoder_features coarse to fine);
`net.aux_logits(decoder_features, upsample=True)` -> coarse-stage logits, upsampled to the input size
or at their own resolution;
`net.config` -> the constructor arguments, stored in checkpoints to rebuild the network.
"""
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("batchnorm", "instancenorm", "groupnorm", "none")


def conv_nd(dims):
    return nn.Conv3d if dims == 3 else nn.Conv2d


def norm_layer(normalization, dims, channels):
    if normalization == "batchnorm":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)
    if normalization == "instancenorm":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels)
    if normalization == "groupnorm":
        return nn.GroupNorm(num_groups=16, num_channels=channels)
    if normalization == "none":
        return nn.Identity()
    raise ValueError(f"normalization must be one of {NORMS}, got {normalization!r}")


def conv_norm_relu(dims, normalization, c_in, c_out, kernel, stride=1, transpose=False):
    if transpose:
        conv = (nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d)(c_in, c_out, kernel, stride)
    else:
        conv = conv_nd(dims)(c_in, c_out, kernel, stride, padding=kernel // 2 if stride == 1 else 0)
    return nn.Sequential(conv, norm_layer(normalization, dims, c_out), nn.ReLU(inplace=True))


def conv_stage(n_layers, dims, normalization, c_in, c_out):
    """n_layers of 3x3(x3) conv-norm-ReLU (V-Net's plain, non-residual ConvBlock)."""
    return nn.Sequential(*[conv_norm_relu(dims, normalization, c_in if i == 0 else c_out, c_out, 3)
                           for i in range(n_layers)])


class VNetEncoder(nn.Module):
    def __init__(self, dims, in_channels, n_filters, normalization, has_dropout):
        super().__init__()
        f = n_filters
        self.stages = nn.ModuleList([
            conv_stage(1, dims, normalization, in_channels, f),
            conv_stage(2, dims, normalization, 2 * f, 2 * f),
            conv_stage(3, dims, normalization, 4 * f, 4 * f),
            conv_stage(3, dims, normalization, 8 * f, 8 * f),
            conv_stage(3, dims, normalization, 16 * f, 16 * f),
        ])
        self.down = nn.ModuleList([conv_norm_relu(dims, normalization, c, 2 * c, 2, stride=2)
                                   for c in (f, 2 * f, 4 * f, 8 * f)])
        self.dropout = (nn.Dropout3d if dims == 3 else nn.Dropout2d)(0.5) if has_dropout else None

    def forward(self, x):
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.down[i - 1](features[-1]))
            features.append(x)
        if self.dropout is not None:
            features[-1] = self.dropout(features[-1])
        return features  # x1 .. x5, shallow to deep


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 conv-BN, identity or 1x1 projection shortcut."""

    def __init__(self, dims, c_in, c_out, stride):
        super().__init__()
        conv, bn = conv_nd(dims), (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)
        self.conv1 = conv(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = conv(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = bn(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet34Encoder(nn.Module):
    """ResNet-34 layout (BasicBlocks 3, 4, 6, 3) at width n_filters, returning the V-Net pyramid:
    [stem f @1, 2f @1/2, 4f @1/4, 8f @1/8, 16f @1/16]. The stem is a 7^3 stride-1 conv and the
    max-pool is not used, as in the dual-network method's `networks/ResNet34.py`."""

    def __init__(self, dims, in_channels, n_filters):
        super().__init__()
        f = n_filters
        bn = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        self.stem = nn.Sequential(conv_nd(dims)(in_channels, f, 7, 1, padding=3, bias=False),
                                  bn(f), nn.ReLU(inplace=True))
        layers, c_in = [], f
        for n_blocks, c_out in zip((3, 4, 6, 3), (2 * f, 4 * f, 8 * f, 16 * f)):
            blocks = [BasicBlock(dims, c_in, c_out, 2)] + [BasicBlock(dims, c_out, c_out, 1)
                                                           for _ in range(n_blocks - 1)]
            layers.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features[-1]))
        return features


FEATURE_TAPS = ("output", "merged")


class VNetDecoder(nn.Module):
    def __init__(self, dims, num_classes, n_filters, normalization, has_dropout, feature_taps="output"):
        super().__init__()
        if feature_taps not in FEATURE_TAPS:
            raise ValueError(f"feature_taps must be one of {FEATURE_TAPS}, got {feature_taps!r}")
        self.merged = feature_taps == "merged"
        f = n_filters
        self.up = nn.ModuleList([conv_norm_relu(dims, normalization, c, c // 2, 2, stride=2, transpose=True)
                                 for c in (16 * f, 8 * f, 4 * f, 2 * f)])
        self.stages = nn.ModuleList([
            conv_stage(3, dims, normalization, 8 * f, 8 * f),
            conv_stage(3, dims, normalization, 4 * f, 4 * f),
            conv_stage(2, dims, normalization, 2 * f, 2 * f),
            conv_stage(1, dims, normalization, f, f),
        ])
        self.dropout = (nn.Dropout3d if dims == 3 else nn.Dropout2d)(0.5) if has_dropout else None
        self.out_conv = conv_nd(dims)(f, num_classes, 1)

    def forward(self, features):
        x = features[-1]
        decoder_features = []
        for up, stage, skip in zip(self.up, self.stages, reversed(features[:-1])):
            merged = up(x) + skip  # additive skip (V-Net)
            x = stage(merged)
            decoder_features.append(merged if self.merged else x)
        if self.dropout is not None:
            x = self.dropout(x)
            if not self.merged:
                decoder_features[-1] = x  # UA-MT returns x9 after dropout
        return self.out_conv(x), decoder_features  # x6..x9 (or x5_up..x8_up): 1/8 -> full resolution


class VNet(nn.Module):
    def __init__(self, dims=3, in_channels=1, num_classes=2, n_filters=16, normalization="batchnorm",
                 has_dropout=False, residual_encoder=False, aux_heads=False, feature_taps="output", init=None):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if init is None:
            init = "kaiming" if residual_encoder else "default"
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.config = dict(dims=dims, in_channels=in_channels, num_classes=num_classes, n_filters=n_filters,
                           normalization=normalization, has_dropout=has_dropout,
                           residual_encoder=residual_encoder, aux_heads=aux_heads, feature_taps=feature_taps,
                           init=init)
        if residual_encoder:
            self.encoder = ResNet34Encoder(dims, in_channels, n_filters)
        else:
            self.encoder = VNetEncoder(dims, in_channels, n_filters, normalization, has_dropout)
        self.decoder = VNetDecoder(dims, num_classes, n_filters, normalization, has_dropout, feature_taps)
        self.aux = None
        if aux_heads:
            self.aux = nn.ModuleList([conv_nd(dims)(c, num_classes, 1)
                                      for c in (8 * n_filters, 4 * n_filters, 2 * n_filters)])
        if init == "kaiming":
            kaiming_init(self)

    def aux_logits(self, decoder_features, upsample=True):
        """Logits of the three coarse decoder stages (1/8, 1/4, 1/2), upsampled (linear) to full size,
        or at their own resolution with upsample=False."""
        if self.aux is None:
            raise RuntimeError("this network was built without aux_heads=True")
        logits = [head(feat) for head, feat in zip(self.aux, decoder_features[:-1])]
        if not upsample:
            return logits
        size = decoder_features[-1].shape[2:]
        mode = "trilinear" if self.config["dims"] == 3 else "bilinear"
        return [F.interpolate(z, size=size, mode=mode, align_corners=False) for z in logits]

    def forward(self, x):
        logits, _ = self.decoder(self.encoder(x))
        return logits


INITS = ("default", "kaiming")


def kaiming_init(module):
    """Kaiming-normal (fan_in, gain sqrt 2) weights of every conv and transposed conv, biases left at
    PyTorch's default; BN weight 1, bias 0. The init pass of the dual-network code (`vnet.py`,
    `ResNet34.py`), UC-Seg's 2D V-Net and, for its convs, SSL4MIS `unet_3D` (no BN there: InstanceNorm)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Conv2d, nn.ConvTranspose3d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm3d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
