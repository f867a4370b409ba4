"""U-Net of SSL4MIS (2D; 3D through `dims`), with the interface of vnet.VNet.

2D defaults = `HiLab-git/SSL4MIS: code/networks/unet.py`, class `UNet` (read, not copied): channels
16, 32, 64, 128, 256; each block conv3x3-BN-LeakyReLU-Dropout-conv3x3-BN-LeakyReLU with encoder
dropout 0.05, 0.1, 0.2, 0.3, 0.5 and none in the decoder; max-pool down; up-sampling by a 1x1 conv
and bilinear interpolation; concatenated skips; 3x3 output conv. About the up-sampling: `UNet`'s
params say `'bilinear': False`, but its `Decoder` never passes that to `UpBlock`, whose default
`bilinear=True` is what runs (checked at SSL4MIS commit 06df604). `upsample='transpose'` gives the
transposed-conv form (CIFP's reconstruction; ICL's official U-Net runs the bilinear form, as SSL4MIS).

3D defaults = SSL4MIS `unet_3D` as UC-Seg and ICL use it (`feature_scale=4`): the same channels,
InstanceNorm + ReLU, trilinear up-sampling of the full channel count then concatenation
(`upsample='interp'`), Dropout(0.3) on the bottleneck and on the last decoder feature, a 1x1x1
classifier, Kaiming-normal (fan_in) weights of every conv (`init='kaiming'`, the `unet_3D`
constructor's pass; the 2D `UNet` keeps PyTorch's default, `init='default'`). (The 3D blocks
here are the same conv-norm-act pairs as the 2D ones: a
reconstruction of `unet_3D`'s `UnetConv3`, which has the same two-conv shape.)

`aux_heads=True` adds 3x3 heads on the three coarse decoder stages (SSL4MIS `UNet_DS`), whose
logits `aux_logits` upsamples (nearest, as `UNet_DS`) to the input size (or returns at their own
resolution with `upsample=False`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from vnet import INITS, conv_nd, kaiming_init, norm_layer

UPSAMPLE = ("bilinear", "transpose", "interp")


class ConvBlock(nn.Module):
    """conv3-norm-act, dropout, conv3-norm-act."""

    def __init__(self, dims, c_in, c_out, dropout, normalization, act):
        super().__init__()
        conv = conv_nd(dims)
        act_layer = (lambda: nn.LeakyReLU()) if act == "leakyrelu" else (lambda: nn.ReLU(inplace=True))
        self.block = nn.Sequential(
            conv(c_in, c_out, 3, padding=1), norm_layer(normalization, dims, c_out), act_layer(),
            nn.Dropout(dropout),
            conv(c_out, c_out, 3, padding=1), norm_layer(normalization, dims, c_out), act_layer())

    def forward(self, x):
        return self.block(x)


class UNetEncoder(nn.Module):
    def __init__(self, dims, in_channels, channels, dropout, normalization, act, bottleneck_dropout):
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock(dims, in_channels if i == 0 else channels[i - 1], c,
                                               dropout[i], normalization, act)
                                     for i, c in enumerate(channels)])
        self.pool = (nn.MaxPool3d if dims == 3 else nn.MaxPool2d)(2)
        self.bottleneck_dropout = nn.Dropout(bottleneck_dropout) if bottleneck_dropout else None

    def forward(self, x):
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            features.append(x)
        if self.bottleneck_dropout is not None:
            features[-1] = self.bottleneck_dropout(features[-1])
        return features  # shallow to deep; features[-1] is the bottleneck


class UpBlock(nn.Module):
    def __init__(self, dims, c_deep, c_skip, c_out, normalization, act, upsample):
        super().__init__()
        self.upsample, self.dims = upsample, dims
        if upsample == "bilinear":
            self.reduce = conv_nd(dims)(c_deep, c_skip, 1)
            c_up = c_skip
        elif upsample == "transpose":
            self.up = (nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d)(c_deep, c_skip, 2, stride=2)
            c_up = c_skip
        elif upsample == "interp":
            c_up = c_deep
        else:
            raise ValueError(f"upsample must be one of {UPSAMPLE}, got {upsample!r}")
        self.conv = ConvBlock(dims, c_skip + c_up, c_out, 0.0, normalization, act)

    def forward(self, deep, skip):
        if self.upsample == "transpose":
            x = self.up(deep)
        else:
            if self.upsample == "bilinear":
                deep = self.reduce(deep)
            mode = "trilinear" if self.dims == 3 else "bilinear"
            x = F.interpolate(deep, size=skip.shape[2:], mode=mode, align_corners=self.upsample == "bilinear")
        return self.conv(torch.cat([skip, x], dim=1))


class UNetDecoder(nn.Module):
    def __init__(self, dims, num_classes, channels, normalization, act, upsample, final_dropout, out_kernel):
        super().__init__()
        c = list(channels)
        self.ups = nn.ModuleList([UpBlock(dims, c[i + 1], c[i], c[i], normalization, act, upsample)
                                  for i in (3, 2, 1, 0)])
        self.final_dropout = nn.Dropout(final_dropout) if final_dropout else None
        self.out_conv = conv_nd(dims)(c[0], num_classes, out_kernel, padding=out_kernel // 2)

    def forward(self, features):
        x = features[-1]
        decoder_features = []
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
            decoder_features.append(x)
        if self.final_dropout is not None:
            x = self.final_dropout(x)
            decoder_features[-1] = x
        return self.out_conv(x), decoder_features  # coarse (1/8) to fine (1/1)


class UNet(nn.Module):
    def __init__(self, dims=2, in_channels=1, num_classes=4, channels=(16, 32, 64, 128, 256),
                 encoder_dropout=None, bottleneck_dropout=None, final_dropout=None,
                 normalization=None, upsample=None, aux_heads=False, init=None):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        two_d = dims == 2
        # Defaults per dims (module docstring): SSL4MIS `UNet` in 2D, SSL4MIS `unet_3D` in 3D.
        if encoder_dropout is None:
            encoder_dropout = (0.05, 0.1, 0.2, 0.3, 0.5) if two_d else (0.0,) * 5
        if bottleneck_dropout is None:
            bottleneck_dropout = 0.0 if two_d else 0.3
        if final_dropout is None:
            final_dropout = 0.0 if two_d else 0.3
        if normalization is None:
            normalization = "batchnorm" if two_d else "instancenorm"
        if upsample is None:
            upsample = "bilinear" if two_d else "interp"
        if init is None:
            init = "default" if two_d else "kaiming"
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if len(channels) != 5 or len(encoder_dropout) != 5:
            raise ValueError("channels and encoder_dropout need 5 entries (one per encoder stage)")
        act, out_kernel = ("leakyrelu", 3) if two_d else ("relu", 1)
        self.config = dict(dims=dims, in_channels=in_channels, num_classes=num_classes,
                           channels=list(channels), encoder_dropout=list(encoder_dropout),
                           bottleneck_dropout=bottleneck_dropout, final_dropout=final_dropout,
                           normalization=normalization, upsample=upsample, aux_heads=aux_heads, init=init)
        self.encoder = UNetEncoder(dims, in_channels, channels, encoder_dropout, normalization, act,
                                   bottleneck_dropout)
        self.decoder = UNetDecoder(dims, num_classes, channels, normalization, act, upsample,
                                   final_dropout, out_kernel)
        self.aux = None
        if aux_heads:
            self.aux = nn.ModuleList([conv_nd(dims)(c, num_classes, 3, padding=1)
                                      for c in (channels[3], channels[2], channels[1])])
        if init == "kaiming":
            kaiming_init(self)

    def aux_logits(self, decoder_features, upsample=True):
        """Logits of the three coarse decoder stages (1/8, 1/4, 1/2), upsampled (nearest) to full size,
        or at their own resolution with upsample=False."""
        if self.aux is None:
            raise RuntimeError("this network was built without aux_heads=True")
        logits = [head(feat) for head, feat in zip(self.aux, decoder_features[:-1])]
        if not upsample:
            return logits
        size = decoder_features[-1].shape[2:]
        return [F.interpolate(z, size=size) for z in logits]

    def forward(self, x):
        logits, _ = self.decoder(self.encoder(x))
        return logits
