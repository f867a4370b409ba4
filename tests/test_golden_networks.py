"""Golden parity of every network a script builds against its official constructor (tests/golden/README.md):
parameter count, the output after the same deterministic weights (tests/golden_fill.py) and the
initialisation's fingerprint (per-conv weight standard deviations of a freshly built network)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import train_ducisc
import train_dualnet_kl
import train_ucseg
from golden_fill import conv_weight_stds, fill
from unet2d import UNet

GOLDEN = np.load(Path(__file__).parent / "golden" / "networks.npz")


def ducisc_outputs(net, x):
    logits, dec = net.decoder(net.encoder(x))
    return torch.cat([z.flatten() for z in net.aux_logits(dec, upsample=False) + [logits]])


def dualnet(k):
    return lambda: train_dualnet_kl.build_networks(common.get_dataset("LA"))[k]


# key: (how the repository builds it, input, forward)
CASES = {
    "ssl4mis_unet2d": (lambda: UNet(dims=2, num_classes=4), "x2", None),                  # supervised, DuCiSC/UC-Seg 2D
    "icl_unet2d": (lambda: common.default_network(common.get_dataset("ACDC")), "x2", None),  # train_icl.py on ACDC
    "ssl4mis_unet3d": (lambda: UNet(dims=3, num_classes=2), "x3c", None),                # UC-Seg / ICL 3D, BraTS
    "uamt_vnet": (lambda: common.default_network(common.get_dataset("LA")), "x3", None),  # LA/Pancreas default
    "ucseg_vnet3d": (lambda: train_ucseg.UCSegModel(3, 2, (32, 32, 16), 16).net2, "x3", None),
    "dualnet_vnet": (dualnet(1), "x3", None),
    "dualnet_resnet34_vnet": (dualnet(0), "x3", None),
    "ducisc_vnet": (lambda: train_ducisc.build_network(common.get_dataset("LA")), "x3", ducisc_outputs),
}


@pytest.mark.parametrize("key", list(CASES))
def test_network_matches_the_official_constructor(key):
    build, x, forward = CASES[key]
    forward = forward or (lambda n, v: n(v))
    x = torch.from_numpy(GOLDEN[x])
    torch.manual_seed(0)
    net = build()
    assert sum(p.numel() for p in net.parameters()) == GOLDEN[f"{key}__params"]
    # the initialisation pass: each conv's weight std within sampling noise of the official one's
    # (Kaiming vs PyTorch's default differ by a factor of about 2.4)
    ours, official = np.array(conv_weight_stds(net, x, forward)), GOLDEN[f"{key}__stds"]
    assert ours.shape == official.shape
    np.testing.assert_allclose(ours, official, rtol=0.2)
    fill(net, x, forward).eval()
    with torch.no_grad():
        out = forward(net, x)
    np.testing.assert_allclose(out.numpy().reshape(GOLDEN[f"{key}__out"].shape), GOLDEN[f"{key}__out"],
                               rtol=1e-4, atol=1e-5)
