import pytest
import torch

import common
from unet2d import UNet
from vnet import VNet

CASES = [
    (VNet, dict(dims=3), (1, 1, 32, 32, 16)),
    (VNet, dict(dims=2, num_classes=4), (2, 1, 32, 48)),
    (VNet, dict(dims=3, residual_encoder=True, has_dropout=True), (1, 1, 32, 32, 16)),
    (VNet, dict(dims=3, normalization="none"), (1, 1, 16, 16, 16)),
    (UNet, dict(dims=2), (2, 1, 64, 48)),
    (UNet, dict(dims=2, upsample="transpose"), (2, 1, 32, 32)),
    (UNet, dict(dims=3, num_classes=2), (1, 1, 32, 32, 16)),
]


@pytest.mark.parametrize("cls,kwargs,shape", CASES)
def test_interface_shapes(cls, kwargs, shape):
    net = cls(aux_heads=True, **kwargs).eval()
    x = torch.randn(shape)
    feats = net.encoder(x)
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128, 256]
    for k, f in enumerate(feats):  # shallow to deep, stride 2**k
        assert tuple(f.shape[2:]) == tuple(s // 2 ** k for s in shape[2:])
    logits, dec = net.decoder(feats)
    c = net.config["num_classes"]
    assert logits.shape == (shape[0], c, *shape[2:])
    assert [d.shape[1] for d in dec] == [128, 64, 32, 16]  # coarse to fine
    assert tuple(dec[0].shape[2:]) == tuple(s // 8 for s in shape[2:]) and dec[-1].shape[2:] == shape[2:]
    aux = net.aux_logits(dec)
    assert len(aux) == 3 and all(a.shape == logits.shape for a in aux)
    assert torch.equal(net(x), logits)
    native = net.aux_logits(dec, upsample=False)
    assert [tuple(a.shape[2:]) for a in native] == [tuple(s // 2 ** k for s in shape[2:]) for k in (3, 2, 1)]


def test_vnet_merged_feature_taps():
    torch.manual_seed(0)
    net = VNet(dims=2, num_classes=3, aux_heads=True).eval()
    merged = VNet(dims=2, num_classes=3, aux_heads=True, feature_taps="merged").eval()
    merged.load_state_dict(net.state_dict())                   # same parameters, different taps
    x = torch.randn(1, 1, 32, 32)
    feats = net.encoder(x)
    logits, dec = net.decoder(feats)
    logits_m, dec_m = merged.decoder(feats)
    assert torch.equal(logits, logits_m)                        # the output does not change
    d = net.decoder
    x5_up = d.up[0](feats[4]) + feats[3]                        # up-sampled bottleneck + skip, before block six
    torch.testing.assert_close(dec_m[0], x5_up)
    torch.testing.assert_close(dec_m[1], d.up[1](d.stages[0](x5_up)) + feats[2])
    assert [f.shape[1] for f in dec_m] == [128, 64, 32, 16]
    with pytest.raises(ValueError, match="feature_taps"):
        VNet(feature_taps="input")


@pytest.mark.parametrize("cls,kwargs,shape", CASES)
def test_rebuild_from_config(cls, kwargs, shape):
    net = cls(**kwargs).eval()
    spec = {"name": cls.__name__, "kwargs": net.config}
    twin = common.build_network(spec).eval()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(shape)
    assert torch.equal(net(x), twin(x))


def test_anchor_parameter_counts():
    # UA-MT V-Net (n_filters 16, batchnorm) and the SSL4MIS 2D U-Net sizes
    assert sum(p.numel() for p in VNet().parameters()) == 9448866
    assert sum(p.numel() for p in UNet(num_classes=4).parameters()) == 1813764


def test_dropout_flags():
    net = VNet(has_dropout=True).train()
    x = torch.randn(2, 1, 16, 16, 16)
    assert not torch.equal(net(x), net(x))  # dropout live in train mode
    net.eval()
    assert torch.equal(net(x), net(x))
    assert VNet(has_dropout=False).encoder.dropout is None
    assert VNet(residual_encoder=True, has_dropout=True).encoder.__class__.__name__ == "ResNet34Encoder"


def test_aux_heads_missing_is_an_error():
    net = UNet()
    with pytest.raises(RuntimeError, match="aux_heads"):
        net.aux_logits(net.decoder(net.encoder(torch.zeros(1, 1, 32, 32)))[1])


def test_bad_options():
    with pytest.raises(ValueError, match="normalization"):
        VNet(normalization="layernorm")
    with pytest.raises(ValueError, match="init"):
        VNet(init="xavier")
    with pytest.raises(ValueError, match="init"):
        UNet(init="orthogonal")
    with pytest.raises(ValueError, match="dims"):
        UNet(dims=1)
