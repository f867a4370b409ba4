"""Deterministic weights for the golden network tests: the same values whatever the module names.

`execution_order(net, x, forward)` lists the modules that own parameters in the order a forward pass
first calls them (the data flow, which an official network and ours share even where their module
trees are laid out differently). `fill(...)` gives the k-th module of each parameter-shape signature in
that order values drawn from a generator seeded by (signature, k): weights N(0, 1/fan_in), norm
weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1); BN running statistics stay at 0 / 1. So two networks
that compute the same thing get the same weights, and their outputs can be compared one to one.
`conv_weight_stds(...)` lists the standard deviation of every conv / transposed-conv weight: the
fingerprint of an initialisation pass."""
import zlib

import torch

CONVS = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def execution_order(net, x, forward=None):
    seen, hooks = [], []
    for m in net.modules():
        if any(True for _ in m.parameters(recurse=False)):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp: seen.append(mod) if mod not in seen else None))
    was_training = net.training
    net.eval()
    with torch.no_grad():
        (forward or (lambda n, v: n(v)))(net, x)
    net.train(was_training)
    for h in hooks:
        h.remove()
    return seen


def keyed(order):
    """(signature, k, module) for modules in execution order: k counts the earlier modules whose
    parameters have the same shapes (the key that seeds `fill` and sorts the compared rows)."""
    counts = {}
    for m in order:
        signature = tuple(tuple(p.shape) for p in m.parameters(recurse=False))
        counts[signature] = counts.get(signature, -1) + 1
        yield signature, counts[signature], m


def fill(net, x, forward=None, salt=0):
    """salt != 0 gives other values (a second network of the same layout, e.g. a teacher)."""
    with torch.no_grad():
        for signature, k, m in keyed(execution_order(net, x, forward)):
            params = list(m.named_parameters(recurse=False))
            key = (signature, k) if salt == 0 else (salt, signature, k)
            g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
            for name, p in params:
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                elif name == "weight":
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def conv_weight_stds(net, x, forward=None):
    """Per conv weight std, sorted by (parameter shapes, k) like the seeds of `fill`: independent of
    where in the data flow a layer of a given shape runs (deep-supervision heads)."""
    stds = [((signature, k), float(m.weight.detach().std()))
            for signature, k, m in keyed(execution_order(net, x, forward)) if isinstance(m, CONVS)]
    return [std for _, std in sorted(stds)]
