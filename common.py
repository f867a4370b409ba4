"""Everything the training and test scripts share that is not a network.

Sections, in order: 1 data set registry, 2 reading, 3 transforms, 4 sampling and
5 phantoms live in common_data.py (re-exported here, so scripts import only `common`); this file
holds 6 losses and schedules, 7 metrics, 8 inference and evaluation, 9 run plumbing.
Conventions and their sources: docs/protocol.md (comments cite the protocol specification as
"protocol §n"; docs/protocol.md lists the sections). Nothing here belongs to one method: a method's
own losses live in its script.
"""
import argparse
import csv
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from common_data import *  # noqa: F401,F403  sections 1-5: registry, reading, transforms, sampling, phantoms
from common_data import REPO


# =============================================================================================
# 6. Losses and schedules (generic only)
# =============================================================================================
def one_hot(labels, num_classes, dtype=torch.float32):
    """(B, *S) class indices -> (B, C, *S) one-hot maps (class axis second, as network outputs)."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(dtype)


def dice_loss(probs, target, smooth=1e-5, weight=None):
    """Soft Dice loss averaged over classes, background included (SSL4MIS `DiceLoss`).

    probs: (B, C, *spatial) probabilities; target: (B, *spatial) integer labels or (B, C, *spatial)
    soft/one-hot targets; weight: optional (B, *spatial) per-voxel weights m (UniMatch's Dice with an
    ignore mask is the 0/1 case). Per class c:
    1 - (2 sum m p_c t_c + s) / (sum m p_c^2 + sum m t_c^2 + s), sums over the whole batch.
    """
    if target.dim() == probs.dim() - 1:
        target = one_hot(target, probs.shape[1], probs.dtype)
    m = 1.0 if weight is None else weight.unsqueeze(1)
    dims = [0] + list(range(2, probs.dim()))
    intersect = (m * probs * target).sum(dims)
    denom = (m * probs * probs).sum(dims) + (m * target * target).sum(dims)
    return (1.0 - (2 * intersect + smooth) / (denom + smooth)).mean()


def supervised_loss(logits, label):
    """0.5 x (cross-entropy + soft Dice): the field's supervised loss (protocol, shared conventions)."""
    return 0.5 * (F.cross_entropy(logits, label.long()) + dice_loss(torch.softmax(logits, 1), label))


def sigmoid_rampup(current, rampup_length):
    """exp(-5 (1 - t/T)^2), t clipped to [0, T] (Laine and Aila; UA-MT, SSL4MIS `ramps.py`)."""
    if rampup_length == 0:
        return 1.0
    t = np.clip(current, 0.0, rampup_length) / rampup_length
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


def scale_iterations(n, reference_max, max_iterations):
    """The one rule for iteration-based schedules (warm-up, ramp-up, stage switch, LR steps) of a
    shorter run: keep them at the same fraction of the run. n iterations of a reference_max-long
    schedule become round(n * max_iterations / reference_max), at least 1 when n > 0; runs at the
    default length are unchanged. Example: a 1,000-iteration warm-up of a 30,000-iteration recipe is
    67 iterations of the 2,000-iteration quick protocol."""
    if n <= 0 or max_iterations >= reference_max:
        return n
    return max(1, int(round(n * max_iterations / reference_max)))


def lr_at(schedule, base_lr, iteration, max_iterations):
    """Learning rate that 0-based step `iteration` runs at: poly (SSL4MIS, power 0.9), step (x0.1 every
    2,500 of 6,000 iterations; a shorter run keeps the steps at the same fractions through
    `scale_iterations`), linear (to 0) or constant (MC-Net).

    Timing as the official loops: they set the new rate *after* each optimizer step from that step's
    index, so step k runs at the schedule's value for k - 1 and steps 0 and 1 both run at base_lr
    (SSL4MIS/ICL poly; the dual network's x0.1 drops after the steps with index 2,500 and 5,000, so
    the first step at 0.1 x base_lr has index 2,501). Scripts call this before the step, which keeps
    the logged rate the one the step used and makes a resumed run exact."""
    iteration = max(iteration - 1, 0)
    if schedule == "poly":
        return base_lr * (1.0 - iteration / max_iterations) ** 0.9
    if schedule == "step":
        return base_lr * 0.1 ** (iteration // scale_iterations(2500, 6000, max_iterations))
    if schedule == "linear":
        return base_lr * (1.0 - iteration / max_iterations)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown --lr_schedule {schedule!r}")


def argmax(x, dim=1):
    """x.argmax(dim), the same indices (the first maximum on ties), computed as x.max(dim).indices: on the
    CPU torch's argmax over a non-last axis is about 10x slower (26 ms vs 2 ms for the (8, 4, 128, 128)
    class axis of a quick-protocol batch, torch 2.13, one thread)."""
    return x.max(dim).indices


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---- image-level strong perturbations of a batch (UniMatch style), for weak-to-strong methods ----
def cutmix_box(spatial, p=0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3), generator=None):
    """0/1 mask of one random box (UniMatch `obtain_cutmix_box`, in 2D or 3D): with probability p a box
    of area (volume) fraction U(area) and aspect ratio U(ratio) between its first two sides, fully
    inside; in 3D the box spans the same fraction of the depth as the square root of the area fraction
    (a reconstruction: UniMatch is 2D only). Otherwise all zeros."""
    box = torch.zeros(spatial)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=generator).item()  # noqa: E731
    if torch.rand((), generator=generator).item() > p:
        return box
    for _ in range(100):
        frac, r = u(*area), u(*ratio)
        if len(spatial) == 3:
            depth = max(1, int(round(spatial[2] * math.sqrt(frac))))
            frac = frac * spatial[2] / depth  # the in-plane fraction that gives the volume fraction
        h = int(math.sqrt(frac * spatial[0] * spatial[1] * r))
        w = int(math.sqrt(frac * spatial[0] * spatial[1] / r))
        if 0 < h <= spatial[0] and 0 < w <= spatial[1]:
            break
    y0 = int(torch.randint(0, spatial[0] - h + 1, (), generator=generator))
    x0 = int(torch.randint(0, spatial[1] - w + 1, (), generator=generator))
    if len(spatial) == 3:
        z0 = int(torch.randint(0, spatial[2] - depth + 1, (), generator=generator))
        box[y0:y0 + h, x0:x0 + w, z0:z0 + depth] = 1
    else:
        box[y0:y0 + h, x0:x0 + w] = 1
    return box


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur of one (C, *spatial) image, radius 3 sigma, reflect padding."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    dims = x.dim() - 1
    conv = F.conv2d if dims == 2 else F.conv3d
    out = x[None]
    for axis in range(dims):
        shape = [1, 1] + [k.numel() if a == axis else 1 for a in range(dims)]
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = r
        out = conv(F.pad(out.movedim(1, 0), pad, mode="reflect"), k.view(shape)).movedim(0, 1)
    return out[0]


@torch.no_grad()
def strong_augment(x, generator=None):
    """Intensity perturbations of each image of a (B, 1, *spatial) batch, independently:
    2D (UniMatch ACDC): brightness and contrast jitter by factors U(0.5, 1.5) with p 0.8 (ColorJitter
    on a grey image), Gaussian blur sigma U(0.1, 2) with p 0.5, values clipped to [0, 1];
    3D (a reconstruction for z-scored volumes): gamma-like contrast scaling around the mean by
    U(0.7, 1.5) with p 0.8, Gaussian noise sigma 0.1 clipped to +-0.2 with p 0.5, blur with p 0.5."""
    out = x.clone()
    rand = lambda: torch.rand((), generator=generator).item()  # noqa: E731
    for i in range(len(out)):
        img = out[i]
        if img.dim() == 3:  # (1, H, W)
            if rand() < 0.8:
                img = img * (0.5 + rand())
                mean = img.mean()
                img = (img - mean) * (0.5 + rand()) + mean
            if rand() < 0.5:
                img = _gaussian_blur(img, 0.1 + 1.9 * rand())
            img = img.clamp(0, 1)
        else:
            if rand() < 0.8:
                mean = img.mean()
                img = (img - mean) * (0.7 + 0.8 * rand()) + mean
            if rand() < 0.5:
                img = img + (0.1 * torch.randn(img.shape, generator=generator).to(img)).clamp(-0.2, 0.2)
            if rand() < 0.5:
                img = _gaussian_blur(img, 0.1 + 1.9 * rand())
        out[i] = img
    return out


@torch.no_grad()
def update_ema(ema_model, model, alpha, global_step):
    """Mean-teacher EMA of the parameters with alpha = min(1 - 1/(step + 1), alpha) (SSL4MIS)."""
    alpha = min(1.0 - 1.0 / (global_step + 1), alpha)
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.mul_(alpha).add_(p, alpha=1.0 - alpha)


# =============================================================================================
# 7. Metrics
# =============================================================================================
def binary_metrics(pred, gt, distances=True):
    """Dice, Jaccard, 95HD and ASD of one binary mask pair, in voxel units (medpy, no spacing).

    Empty-mask rule (protocol §5.4), written once here:
    - prediction empty, label not: Dice 0, Jaccard 0, 95HD 0, ASD 0 as UA-MT/MC-Net/BCP do, so
      numbers compare with the field; hd95_strict/asd_strict are NaN (a failed case is not perfect);
    - both empty: Dice 1, Jaccard 1, distances NaN (never happens on whole ACDC/LA volumes);
    - label empty, prediction not: Dice 0, Jaccard 0, distances NaN.
    ASD is medpy's `asd(pred, gt)` (prediction surface to label surface), as every anchor calls it.
    """
    from medpy.metric import binary as mb
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    empty_pred, empty_gt = not pred.any(), not gt.any()
    m = {"empty_pred": empty_pred, "empty_label": empty_gt}
    if empty_pred or empty_gt:
        both = empty_pred and empty_gt
        m.update(dice=float(both), jaccard=float(both), hd95=0.0 if (empty_pred and not empty_gt) else math.nan,
                 asd=0.0 if (empty_pred and not empty_gt) else math.nan, hd95_strict=math.nan, asd_strict=math.nan)
        return m
    inter = np.logical_and(pred, gt).sum()
    m["dice"] = 2.0 * inter / (pred.sum() + gt.sum())
    m["jaccard"] = inter / np.logical_or(pred, gt).sum()
    if distances:
        m["hd95"] = m["hd95_strict"] = float(mb.hd95(pred, gt))
        m["asd"] = m["asd_strict"] = float(mb.asd(pred, gt))
    else:
        m.update(hd95=math.nan, asd=math.nan, hd95_strict=math.nan, asd_strict=math.nan)
    return m


def case_metrics(pred, label, num_classes, distances=True):
    """{class index: binary_metrics} for the foreground classes 1..num_classes-1."""
    return {c: binary_metrics(pred == c, label == c, distances) for c in range(1, num_classes)}


METRICS = ("dice", "jaccard", "hd95", "asd", "hd95_strict", "asd_strict")


def summarize(rows, class_names):
    """Mean and sd over cases, per class and of the per-case class mean; NaNs (undefined distances)
    are left out of the means and counted. rows: [{"case": name, "metrics": case_metrics(...)}]."""
    out = {}
    for c, cname in enumerate(class_names, start=1):
        for k in METRICS:
            v = np.array([r["metrics"][c][k] for r in rows], float)
            out[f"{cname}_{k}_mean"], out[f"{cname}_{k}_sd"] = _nanmean_sd(v)
        out[f"{cname}_empty_pred"] = sum(r["metrics"][c]["empty_pred"] for r in rows)
    for k in METRICS:
        v = np.array([class_mean(r["metrics"], k) for r in rows], float)
        out[f"{k}_mean"], out[f"{k}_sd"] = _nanmean_sd(v)
    out["cases"] = len(rows)
    out["empty_pred"] = sum(any(r["metrics"][c]["empty_pred"] for c in r["metrics"]) for r in rows)
    return out


def class_mean(metrics, key):
    """Mean of one metric over the classes of a case, NaNs left out (NaN if all are NaN)."""
    v = np.array([metrics[c][key] for c in metrics], float)
    return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else math.nan


def _nanmean_sd(v):
    v = v[~np.isnan(v)]
    return (float(v.mean()), float(v.std())) if len(v) else (math.nan, math.nan)


# =============================================================================================
# 8. Inference and evaluation
# =============================================================================================
def window_starts(size, patch, stride):
    """ceil((size - patch) / stride) + 1 windows; the last one flush with the end (protocol §1.5)."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(i * stride, size - patch) for i in range(n)]


def _gaussian_weight(patch, device, sigma_scale=0.125):
    w = torch.ones(patch, device=device)
    for axis, p in enumerate(patch):
        x = torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2
        g = torch.exp(-0.5 * (x / (sigma_scale * p)) ** 2)
        w = w * g.view([-1 if a == axis else 1 for a in range(len(patch))])
    return w / w.max()


@torch.no_grad()
def sliding_window(predict, image, patch, stride, num_classes, sw_batch_size=4, gaussian=False):
    """Probability map (C, *image.shape) of a 3D volume by the anchors' sliding window, batched.

    predict: (B, 1, *patch) tensor -> (B, C, *patch) probabilities. Axes smaller than the patch are
    zero-padded to it (floor(pad/2) before); window probabilities are summed and divided by the
    coverage count (plain averaging, as UA-MT/SSL4MIS; `gaussian=True` weights the window centre).
    `sw_batch_size` windows go through the network per call; the result does not depend on it.
    """
    device = image.device if torch.is_tensor(image) else torch.device("cpu")
    image = torch.as_tensor(image, dtype=torch.float32, device=device)
    shape = image.shape
    pad = [max(p - s, 0) for s, p in zip(shape, patch)]
    if any(pad):
        image = F.pad(image, [x for p in reversed(pad) for x in (p // 2, p - p // 2)])
    size = image.shape
    starts = [(a, b, c) for a in window_starts(size[0], patch[0], stride[0])
              for b in window_starts(size[1], patch[1], stride[1]) for c in window_starts(size[2], patch[2], stride[2])]
    score = torch.zeros((num_classes, *size), device=device)
    count = torch.zeros(size, device=device)
    weight = _gaussian_weight(patch, device) if gaussian else torch.ones(patch, device=device)
    for i in range(0, len(starts), sw_batch_size):
        group = starts[i:i + sw_batch_size]
        slices = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in group]
        batch = torch.stack([image[sl] for sl in slices])[:, None]
        probs = predict(batch).float()
        for sl, pr in zip(slices, probs):
            score[(slice(None), *sl)] += pr * weight
            count[sl] += weight
    score = score / count
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, shape))
    return score[(slice(None), *crop)]


@torch.no_grad()
def predict_slices(predict, volume, patch, batch_size=16):
    """Label map (S, H, W) of a 2D-trained network on a (S, H, W) volume, slice by slice: zoom each
    slice to the patch (order 0), argmax, zoom back (order 0), as SSL4MIS `val_2D.py` (protocol §4.4)."""
    zoomed = np.stack([zoom_to(s, patch) for s in volume])
    labels = []
    for i in range(0, len(zoomed), batch_size):  # the predictor moves the batch to its device
        x = torch.from_numpy(zoomed[i:i + batch_size])[:, None]
        labels.append(argmax(predict(x)).cpu().numpy().astype(np.uint8))
    labels = np.concatenate(labels)
    return np.stack([zoom_to(lab, volume.shape[1:]) for lab in labels])


class Predictor:
    """Callable (B, 1, *patch) -> (B, C, *patch) float32 softmax probabilities of one network or the
    mean of several (an ensemble checkpoint), in eval mode; amp_dtype: the networks autocast to this
    dtype ("bfloat16", "float16"; see amp_dtype), None for float32.

    channels_last: 3D networks and their windows in the channels-last-3D memory layout, which oneDNN
    convolves about 1.4x faster on the CPU (benchmarks/sliding_window_speed.py: the same label maps as
    UA-MT's loop, probabilities equal to float rounding). The networks are converted in place, so only
    for networks that are used for evaluation alone (the test scripts'); training keeps its layout."""

    def __init__(self, nets, device, amp_dtype=None, channels_last=False):
        self.nets, self.device, self.amp_dtype = list(nets), torch.device(device), amp_dtype
        self.channels_last = channels_last and any(p.dim() == 5 for net in self.nets for p in net.parameters())
        if self.channels_last:
            for net in self.nets:
                net.to(memory_format=torch.channels_last_3d)

    def __call__(self, x):
        x = x.to(self.device)
        if self.channels_last and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with _autocast(self.device, self.amp_dtype):
            logits = [net(x) for net in self.nets]
        probs = [torch.softmax(z.float(), 1) for z in logits]
        return sum(probs) / len(probs)


def largest_component(mask):
    """Keep the largest connected component (full connectivity, as skimage.measure.label) of a bool array."""
    from scipy import ndimage
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if n <= 1:
        return mask
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


@torch.no_grad()
def largest_components_torch(mask, check_every=8):
    """(B, *spatial) bool tensor -> the same with only the largest connected component of each sample kept
    (full connectivity, as `largest_component`), computed on the mask's device: no host round trip but one
    convergence check every `check_every` steps. Every voxel starts with its own id, n - (raster index),
    and takes the largest id in its 3x3(x3) neighbourhood within the mask until nothing changes: a
    component ends labelled by its first voxel in raster order, so a tie in size goes to the component
    scipy labels first, as `largest_component` does."""
    spatial = mask.shape[1:]
    n = math.prod(spatial)
    dtype = torch.float32 if n < 2 ** 24 else torch.float64  # ids exact in the float type max-pooling needs
    pool = F.max_pool3d if len(spatial) == 3 else F.max_pool2d
    ids = (n - torch.arange(n, device=mask.device, dtype=dtype)).view(1, 1, *spatial)
    inside = mask.unsqueeze(1).to(dtype)
    lab = ids * inside
    while True:
        new = lab
        for _ in range(check_every):  # each step only raises ids, so no change over the block = converged
            new = pool(new, 3, stride=1, padding=1) * inside
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab[:, 0].reshape(len(mask), n).long()
    counts = torch.zeros(len(mask), n + 1, dtype=torch.long, device=mask.device)
    counts.scatter_add_(1, lab, torch.ones_like(lab))
    counts[:, 0] = 0                                                         # background
    keep = n - argmax(counts.flip(1))                                        # largest count, largest id on ties
    return (lab == keep[:, None]).view(mask.shape) & mask


def largest_components(mask):
    """(B, *spatial) bool tensor -> only the largest connected component of each sample kept, on the mask's
    device: in torch on CUDA (no host round trip), with scipy on the CPU, where it measured about 180x
    faster than the torch propagation (72 ACDC masks of 128 x 128: 0.005 s vs 0.93 s, one thread)."""
    if mask.is_cuda:
        return largest_components_torch(mask)
    kept = [largest_component(m) for m in mask.numpy()]
    return torch.from_numpy(np.stack(kept)) if kept else mask.clone()


def keep_largest_components(label_map, num_classes):
    """Post-processing `--lcc on` (the LA test scripts' `--nms 1`, `getLargestCC`): each foreground class of
    a whole-case label map keeps only its largest connected component; the rest becomes background."""
    out = np.zeros_like(label_map)
    for c in range(1, num_classes):
        out[largest_component(label_map == c)] = c
    return out


def predict_case(predict, info, image, patch, stride=None, sw_batch_size=4, gaussian=False, lcc=False):
    """Label map of one case: slice-wise for 2D data sets, sliding window for 3D; lcc: then
    keep_largest_components."""
    if info.dims == 2:
        pred = predict_slices(predict, image, patch)
    else:
        image = torch.from_numpy(image).to(predict.device)
        probs = sliding_window(predict, image, patch, stride or info.stride, info.num_classes, sw_batch_size, gaussian)
        pred = argmax(probs, 0).cpu().numpy().astype(np.uint8)
    return keep_largest_components(pred, info.num_classes) if lcc else pred


@torch.no_grad()
def evaluate(predict, info, cases, patch, stride=None, sw_batch_size=4, distances=True, progress=False,
             on_case=None, lcc=False):
    """The one evaluation path (training-time validation and the test scripts): predict every case,
    metrics per class per case on the full volume. Returns (rows, summary); on_case(name, image,
    label, pred) is called for each case (for saving predictions); lcc: largest component per class."""
    for net in predict.nets:
        net.eval()
    rows = []
    with tqdm(cases, desc="evaluating", leave=False, disable=not progress) as it:  # closed on an error too
        for name, image, label in it:
            pred = predict_case(predict, info, image, patch, stride, sw_batch_size, lcc=lcc)
            rows.append({"case": name, "metrics": case_metrics(pred, label, info.num_classes, distances)})
            if on_case is not None:
                on_case(name, image, label, pred)
    return rows, summarize(rows, info.class_names)


# ---- what the method sees: --viz_interval panels ----
def _display(t, depth):
    """A map as a 2D numpy array for imshow, and whether it is a label map. (C, *spatial) class scores
    are shown as their argmax; 3D maps at slice `depth` of the last axis."""
    a = torch.as_tensor(t).detach().float().cpu()
    labels = not torch.is_floating_point(torch.as_tensor(t))
    if a.dim() == (3 if depth is None else 4):  # class scores or probabilities
        a, labels = argmax(a, 0).float(), True
    if depth is not None and a.dim() == 3:
        a = a[..., depth]
    return a.numpy(), labels


def save_panel(path, image, maps, title, num_classes, class_names=None):
    """One PNG: the image and each named map of `maps` side by side. Spatial maps are (H, W) or (H, W, D)
    (shown at the middle depth); (C, *spatial) class scores as their argmax; small arrays (a table of
    thresholds) as annotated heat maps; a scalar as a number. The panel names are stored in the
    PNG's metadata (key "Panels", a JSON list)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    maps = {k: v for k, v in maps.items() if v is not None}  # a switched-off source has no map
    image = torch.as_tensor(image).detach().float().cpu()[0].numpy()
    depth = image.shape[-1] // 2 if image.ndim == 3 else None
    names = ["image", *maps]
    classes = matplotlib.colors.ListedColormap(["black", "tab:red", "tab:green", "tab:blue", "tab:orange",
                                                "tab:purple", "tab:cyan", "tab:olive"][:max(num_classes, 2)])
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.9), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.set_xticks([]), ax.set_yticks([])
        if name == "image":
            ax.imshow(image[..., depth] if depth is not None else image, cmap="gray")
            ax.set_title("image" + (f" (slice {depth})" if depth is not None else ""), fontsize=8)
            continue
        value = maps[name]
        if torch.is_tensor(value) and value.dim() == 0 or np.ndim(value) == 0:
            ax.axis("off")
            ax.text(0.5, 0.5, f"{name}\n{float(value):.4g}", ha="center", va="center", fontsize=9)
            continue
        arr, labels = _display(value, depth)
        arr = np.atleast_2d(arr)
        if min(arr.shape) <= 8:  # a small table, e.g. thresholds per scale and class
            ax.imshow(arr, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(arr):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w")
        elif torch.is_tensor(value) and value.dtype == torch.bool:  # a mask: white where true
            ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        elif labels:  # a label map: background black, one colour per class
            ax.imshow(arr, cmap=classes, vmin=0, vmax=num_classes - 1, interpolation="nearest")
        else:
            im = ax.imshow(arr, cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        ax.set_title(name, fontsize=8)
    if class_names:  # the colour of each foreground class in the label maps
        from matplotlib.patches import Patch
        fig.legend(handles=[Patch(color=classes(c), label=name) for c, name in enumerate(class_names, start=1)],
                   loc="upper right", ncol=len(class_names), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Title": title, "Panels": json.dumps(names)})
    plt.close(fig)


# =============================================================================================
# 9. Run plumbing: arguments, seeding, loaders, snapshot folder, logging, checkpoints, resume
# =============================================================================================
SW_BATCH_HELP = ("sliding-window patches per forward pass (3D); default 4 on CUDA, 1 on the CPU, where "
                 "batching measured slower (benchmarks/sliding_window_speed.py)")


def default_sw_batch_size(device):
    return 4 if str(device).startswith("cuda") else 1


def add_common_args(parser):
    """The SSL4MIS argument names. Defaults of None are filled by parse_args from the method's
    defaults for the data set, then from the data set registry (--help lists them per data set)."""
    parser.formatter_class = _DefaultsHelpFormatter
    a = parser.add_argument
    a("--dataset", default=None, help=f"one of {', '.join(DATASETS)}, Custom (any case)")
    a("--root_path", default=None, help="data root (default: data/<dataset>)")
    a("--exp", default="run", help="experiment name, part of the snapshot folder")
    a("--labeled_num", default=None, help="labeled cases (3D) or patients (ACDC), or 'all'")
    a("--max_iterations", type=int, default=None, help="training iterations")
    a("--batch_size", type=int, default=None, help="samples per batch, labeled + unlabeled")
    a("--labeled_bs", type=int, default=None, help="labeled samples per batch (they come first)")
    a("--base_lr", type=float, default=None, help="initial learning rate")
    a("--lr_schedule", default=None, choices=["poly", "step", "linear", "constant"], help="learning-rate schedule")
    a("--patch_size", type=int, nargs="+", default=None, help=f"training patch; every side a multiple of {PATCH_MULTIPLE}")
    a("--seed", type=int, default=1337, help="random seed")
    a("--deterministic", type=int, default=1, help="deterministic cuDNN (1) or benchmark mode (0)")
    a("--val_interval", type=int, default=200, help="validate every N iterations (needs a val split)")
    a("--val_split", default=None, help="split for model selection; 'none' disables; LA/Pancreas have "
                                        "none (the anchors select on 'test': comparable, but optimistic)")
    a("--save_interval", type=int, default=1000, help="write last.pth every N iterations")
    a("--save_minutes", type=float, default=10.0,
      help="also write last.pth when this many minutes of wall time have passed since the last write (0: never)")
    a("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    a("--threads", type=int, default=None,
      help="torch CPU threads; default: OMP_NUM_THREADS when set, else the cores this process may use that "
           "other work does not keep busy when the run starts")
    a("--num_workers", type=int, default=None,
      help="data loader worker processes; default: 0 on the CPU (measured fastest: benchmarks/cpu_defaults.py), "
           "min(4, cores) with CUDA")
    a("--amp", action="store_true", help="mixed precision: float16 autocast on CUDA, bfloat16 on a CPU "
      "with bfloat16 instructions (float32 on other CPUs); losses stay float32")
    a("--resume", action="store_true",
      help="continue from last.pth in the snapshot folder; every flag that changes training must be as before")
    a("--extend", action="store_true",
      help="with --resume: allow a larger --max_iterations (the LR schedule is recomputed for the new length)")
    a("--model_dir", default="model", help="parent of the snapshot folders")
    a("--sw_batch_size", type=int, default=None, help=SW_BATCH_HELP)
    a("--viz_interval", type=int, default=0,
      help="every N iterations, write a PNG of what the method sees (image, prediction, pseudo-labels, masks, "
           "weights) for the first unlabeled sample into <run folder>/viz/; 0: off")
    return parser


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each default: fixed ones as '(default: X)'; data-set dependent ones (None here) are
    written into the help text by parse_args."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


PATCH_MULTIPLE = 16  # every network here halves the patch four times (V-Net, U-Net, their 3D forms)

# flags that may differ when a run is resumed: where and how it runs, not what it trains
RESUME_FREE = {"resume", "extend", "device", "threads", "num_workers", "sw_batch_size", "save_interval",
               "save_minutes", "val_interval", "root_path", "model_dir", "viz_interval", "cpu", "precision",
               "amp_dtype"}


def _registry_defaults(info):
    return dict(labeled_num=info.labeled_num, max_iterations=info.max_iterations, batch_size=info.batch_size,
                labeled_bs=info.labeled_bs, base_lr=0.01, lr_schedule="poly", patch_size=info.patch_size,
                val_split=info.val_split or "none")


def _merged_defaults(info, defaults):
    """A data set's defaults: the method's for that data set, then the method's for all, then the registry."""
    return {**_registry_defaults(info), **defaults.get("*", {}), **defaults.get(info.name, {})}


def _describe_defaults(parser, defaults):
    """Append each data-set dependent default to its --help line: the default data set's value, and
    the others' where they differ."""
    first = defaults.get("*", {}).get("dataset", "ACDC")
    per = {name: _merged_defaults(info, defaults) for name, info in DATASETS.items()}
    fmt = lambda v: "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)  # noqa: E731
    for action in parser._actions:
        if action.default is not None or not action.option_strings or "default" in (action.help or ""):
            continue
        if action.dest == "dataset":
            action.help = (action.help or "") + f" (default: {first})"
        elif action.dest in per[first]:
            others = [f"{n} {fmt(per[n][action.dest])}" for n in DATASETS
                      if n != first and fmt(per[n][action.dest]) != fmt(per[first][action.dest])]
            action.help = (action.help or "") + f" (default: {fmt(per[first][action.dest])} for {first}" + \
                (f"; {', '.join(others)}" if others else "; the same for every data set") + ")"


def parse_args(parser, argv=None, defaults=None):
    """Parse; fill every None from defaults[dataset], then defaults['*'], then the registry; check every
    flag that can be checked before anything is built or written (each error names its flag)."""
    defaults = defaults or {}
    _describe_defaults(parser, defaults)
    args = parser.parse_args(argv)

    def fail(message):  # one line through cli(), not argparse's usage block
        raise DataError(message)

    if args.dataset is None:
        args.dataset = defaults.get("*", {}).get("dataset", "ACDC")
    info = get_dataset(args.dataset, args.root_path)
    args.dataset = info.name  # the registry's spelling (--dataset acdc -> ACDC)
    for key, value in _merged_defaults(info, defaults).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.patch_size = [int(p) for p in args.patch_size]
    if len(args.patch_size) != info.dims:
        fail(f"--patch_size needs {info.dims} numbers for {info.name}, got {args.patch_size}")
    if any(p < PATCH_MULTIPLE or p % PATCH_MULTIPLE for p in args.patch_size):
        fixed = [max(PATCH_MULTIPLE, round(p / PATCH_MULTIPLE) * PATCH_MULTIPLE) for p in args.patch_size]
        fail(f"--patch_size {' '.join(map(str, args.patch_size))}: every side must be a multiple of {PATCH_MULTIPLE} "
             f"(the networks halve it four times); e.g. --patch_size {' '.join(map(str, fixed))}")
    if str(args.labeled_num) != "all":
        try:
            args.labeled_num = int(args.labeled_num)
        except ValueError:
            fail(f"--labeled_num must be a number or 'all', got {args.labeled_num!r}")
        if args.labeled_num < 1:
            fail(f"--labeled_num must be at least 1 (or 'all'), got {args.labeled_num}")
    for flag in ("batch_size", "labeled_bs", "val_interval", "save_interval"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.labeled_bs > args.batch_size:
        fail(f"--labeled_bs {args.labeled_bs} is larger than --batch_size {args.batch_size}")
    if args.max_iterations < 0:
        fail("--max_iterations must be >= 0")
    if args.base_lr <= 0:
        fail(f"--base_lr must be positive, got {args.base_lr}")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be at least 1, got {args.threads}")
    if args.num_workers is not None and args.num_workers < 0:
        fail(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.save_minutes < 0:
        fail(f"--save_minutes must be >= 0, got {args.save_minutes}")
    if args.viz_interval < 0:
        fail(f"--viz_interval must be >= 0, got {args.viz_interval}")
    if args.extend and not args.resume:
        fail("--extend only goes with --resume")
    args.val_split = None if args.val_split in (None, "none") else args.val_split
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    args.amp_dtype, args.precision = amp_dtype(args.device, args.amp)
    if args.sw_batch_size is None:
        args.sw_batch_size = default_sw_batch_size(args.device)
    configure_cpu(args)
    return args


def usable_cores():
    """Cores this process may run on (its CPU affinity, e.g. a cluster job's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_jiffies(cpus):
    """(busy, total) clock ticks since boot summed over the given CPU numbers (Linux /proc/stat)."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(interval=0.25):
    """How many of this process's cores other work keeps busy now: their busy fraction over `interval`
    seconds (this process sleeps meanwhile) times their number. None where /proc/stat is unreadable."""
    try:
        cpus = os.sched_getaffinity(0)
        b0, t0 = _cpu_jiffies(cpus)
        time.sleep(interval)
        b1, t1 = _cpu_jiffies(cpus)
    except (OSError, AttributeError, ValueError):
        return None
    return len(cpus) * (b1 - b0) / max(t1 - t0, 1)


def configure_cpu(args):
    """Torch threads and loader workers, chosen from the cores present unless given.

    Threads: --threads, else OMP_NUM_THREADS when set, else the usable cores that other work does not
    keep busy when the run starts (sampled for 0.25 s; at least 1). Compute threads that share a core
    with another job wait for each other at every operation: on 2 cores beside one busy process, the
    quick start ran 5x slower with 2 threads than with 1 (benchmarks/cpu_defaults.py).
    Workers: --num_workers, else 0 on the CPU (a worker process competes with the compute threads; the
    augmentation is cheap beside the network: benchmarks/cpu_defaults.py) and min(4, cores) with CUDA.
    The choice is stored in args.cpu and logged by Run."""
    cores = usable_cores()
    env = os.environ.get("OMP_NUM_THREADS", "")
    if args.threads is not None:
        source = "--threads"
    elif env.isdigit() and int(env) > 0:
        args.threads, source = int(env), "OMP_NUM_THREADS"
    else:
        busy = busy_cores()
        taken = 0 if busy is None else min(cores - 1, int(busy + 0.5))
        args.threads = cores - taken
        source = "usable cores" + (f", {busy:.1f} busy with other work at the start" if taken else "")
    torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    if args.num_workers is None:
        args.num_workers = min(4, cores) if on_cuda else 0
        worker_source = "default for CUDA" if on_cuda else "default on the CPU"
    else:
        worker_source = "--num_workers"
    args.cpu = (f"{cores} usable cores; torch threads {args.threads} ({source}); loader workers "
                f"{args.num_workers} ({worker_source})")


def cpu_has_bf16():
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it,
    which is slower than float32."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def amp_dtype(device, amp):
    """The dtype --amp autocasts the network passes to: "float16" on CUDA (with a GradScaler), "bfloat16"
    on a CPU that has bfloat16 instructions, None (float32) otherwise. Returns (dtype name, what to log)."""
    if not amp:
        return None, "float32"
    if str(device).startswith("cuda"):
        return "float16", "--amp: float16 autocast of the network passes (CUDA), losses in float32"
    if cpu_has_bf16():
        return "bfloat16", "--amp: bfloat16 autocast of the network passes (CPU with bfloat16 instructions), losses in float32"
    return None, "--amp ignored: this CPU has no bfloat16 instructions (AVX512-BF16/AMX), so float32"


def autocast(args):
    """Context for the network passes of a training step: autocast to args.amp_dtype, a no-op without --amp.
    Outputs come out in the low dtype: the scripts cast them with .float() before the losses, so that
    every loss, metric and method state is float32 as without --amp."""
    return _autocast(args.device, args.amp_dtype)


def _autocast(device, dtype_name):
    dtype = getattr(torch, dtype_name) if dtype_name else None
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(args):
    """Loss scaling for float16 (CUDA --amp); bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler("cuda", enabled=args.amp_dtype == "float16")


def seed_everything(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def available_memory(device):
    """Bytes free for a new allocation: MemAvailable on a Linux CPU, free memory on a CUDA device; None
    where it cannot be read."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(build, device, hint):
    """Stop before building modules that cannot fit. build() is run on the meta device (no memory) to
    count parameters; training needs about 16 bytes per parameter (weights, gradients, momentum and the
    backward's temporaries: measured 14-16 B on ICL's spatial MLP), which must stay under 3/4 of the
    memory available (the activations need the rest). hint: the flags that make it smaller."""
    with torch.device("meta"):
        modules = build()
    n = sum(p.numel() for m in modules for p in m.parameters())
    need, free = 16 * n, available_memory(device)
    if free is not None and need > 0.75 * free:
        raise DataError(f"{n / 1e6:,.0f} M parameters need about {need / 2 ** 30:.1f} GiB to train, more than 3/4 of "
                        f"the {free / 2 ** 30:.1f} GiB available on {device}: {hint}")
    return n


def default_network(info, **kwargs):
    """The field's network for a data set: V-Net with dropout (UA-MT) for LA/Pancreas/Phantom3D,
    SSL4MIS 2D U-Net for ACDC/Phantom2D, SSL4MIS 3D U-Net for BraTS."""
    from unet2d import UNet
    from vnet import VNet
    if info.network == "VNet":
        return VNet(**{"dims": info.dims, "num_classes": info.num_classes, "has_dropout": True, **kwargs})
    return UNet(**{"dims": info.dims, "num_classes": info.num_classes, **kwargs})


def build_network(spec):
    """Rebuild a network from {"name": ..., "kwargs": ...} as stored in checkpoints. A method's own
    model class (UC-Seg: two subnets and their fusion head, whose fused output is the prediction) is
    stored with "module", the training script it lives in, and imported from there."""
    if "module" in spec:
        import importlib
        try:
            cls = getattr(importlib.import_module(spec["module"]), spec["name"])
        except (ImportError, AttributeError) as e:
            raise ValueError(f"checkpoint names {spec['module']}.{spec['name']}, which cannot be imported: {e}")
        return cls(**spec["kwargs"])
    from unet2d import UNet
    from vnet import VNet
    classes = {"VNet": VNet, "UNet": UNet}
    if spec["name"] not in classes:
        raise ValueError(f"checkpoint names an unknown network {spec['name']!r}")
    return classes[spec["name"]](**spec["kwargs"])


def network_spec(net):
    """{"name", "kwargs"[, "module"]} that build_network rebuilds `net` from (net.config holds the kwargs)."""
    spec = {"name": type(net).__name__, "kwargs": net.config}
    module = type(net).__module__
    if module not in ("vnet", "unet2d"):  # a class defined in a training script (also when run as __main__)
        spec["module"] = Path(sys.modules[module].__file__).stem
    return spec


def train_loader(args, info, root, labeled_only=False, rot_flip=None, pipeline="ssl4mis"):
    """DataLoader over the training list with the two-stream sampler; returns (loader, n_labeled,
    n_unlabeled). labeled_only: batches of --labeled_bs labeled samples (supervised baseline).
    rot_flip (3D) and pipeline (2D): the method's official augmentation, see train_transform."""
    dataset = SegDataset(info, root, "train", train_transform(info, args.patch_size, rot_flip, pipeline))
    labeled = labeled_indices(info, dataset.names, args.labeled_num, dataset.has_label)
    unlabeled = [] if labeled_only else sorted(set(range(len(dataset))) - set(labeled))
    batch_size = args.labeled_bs if labeled_only else args.batch_size
    if not labeled_only and not unlabeled:
        raise DataError(f"--labeled_num {args.labeled_num} leaves no unlabeled samples in {info.name}")
    sampler = TwoStreamBatchSampler(labeled, unlabeled, batch_size, args.labeled_bs, seed=args.seed)
    # The loader gets its own generator: creating an iterator (each epoch, and on resume) would
    # otherwise draw from the global torch RNG and shift dropout masks after a resume.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, worker_init_fn=_worker_init,
                        pin_memory=args.device.startswith("cuda"), generator=torch.Generator().manual_seed(args.seed))
    return loader, len(labeled), len(unlabeled)


def _worker_init(worker_id):
    """Loader workers ignore Ctrl-C and SIGTERM: the main process decides (Run) and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def cli(main):
    """Run a script's main() so that it ends with one line, never a traceback, for what a user can fix:
    a DataError (data or flags; exit status 2), running out of memory (the flags that need less; 3),
    Ctrl-C outside the training loop (130). Messages start on their own line (tqdm.write)."""
    try:
        main()
    except DataError as e:
        tqdm.write(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        tqdm.write("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in text:
            raise
        tqdm.write(f"error: out of memory ({text.splitlines()[0][:200]}). Reduce --batch_size/--labeled_bs or "
                   f"--patch_size, or use a device with more memory (--device)", file=sys.stderr)
        sys.exit(3)


def atomic_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Run:
    """One training run's folder and bookkeeping: model/<dataset>_<exp>_<labeled_num>_labeled/<method>/
    with args.json, log.txt, metrics.csv, best.pth (best validation Dice) and last.pth (everything
    resume needs). Nothing is written before every check has passed (resume flags, validation data).

    Use as a context manager. Ctrl-C (SIGINT) or SIGTERM (what `timeout` and cluster schedulers send):
    the current iteration finishes, last.pth is written and the script exits with 130 (SIGINT) or 143
    (SIGTERM); a second signal aborts at once (exit status likewise) and leaves the last good last.pth as
    it was. last.pth is also written every --save_interval iterations and after --save_minutes of wall
    time, so even `kill -9` loses at most that much."""

    def __init__(self, args, method, models, optimizers, eval_models=("net",), state=None, test_rules=None,
                 progress_terms=None):
        """test_rules: the official test's rules, stored in every checkpoint for the test scripts:
        {"lcc": keep the largest component per class, "stride": 3D sliding-window stride or None for
        the data set's}. Training-time validation does not apply them (a cheaper, shared rule).
        progress_terms: the logged names the progress bar shows (default: the first four)."""
        self.args, self.method, self.info = args, method, get_dataset(args.dataset, args.root_path)
        self.test_rules = {"lcc": False, "stride": None, **(test_rules or {})}
        self.models, self.optimizers, self.state = models, optimizers, state if state is not None else {}
        self.eval_models, self.progress_terms = list(eval_models), progress_terms
        self.dir = Path(args.model_dir) / f"{args.dataset}_{args.exp}_{args.labeled_num}_labeled" / method
        self.iteration, self.best, self.best_iteration, self._stop = 0, -1.0, None, 0
        self._elapsed0, self._last_saved, self._validated_at = 0.0, "never", None
        ckpt = None
        if args.resume:
            ckpt = self._read_last()
            self._check_resume_args(ckpt)
        elif (self.dir / "last.pth").exists():
            raise DataError(f"{self.dir / 'last.pth'} exists: pass --resume to continue that run, or choose "
                            f"another --exp to start a new one")
        self.val_cases = []
        if args.val_split:
            self.val_cases = load_cases(self.info, resolve_root(self.info, args.root_path), args.val_split)
        # every check passed: from here on the run folder is written
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.pth.tmp"):  # a save cut short by an abort or kill -9
            stale.unlink()
        if ckpt is not None:
            self._load_last(ckpt)
        self._log_file = open(self.dir / "log.txt", "a")
        (self.dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        self.log(f"{'resuming' if args.resume else 'starting'} {method} on {args.dataset} at iteration "
                 f"{self.iteration}; git {_git_commit()}; python {platform.python_version()}, torch "
                 f"{torch.__version__}, numpy {np.__version__}; device {args.device}; CPU: {args.cpu}; "
                 f"precision: {args.precision}\n"
                 f"args: {json.dumps(vars(args))}")
        if args.val_split == "test":
            self.log("model selection on the TEST list (--val_split test): as the LA/Pancreas anchors do; "
                     "comparable with them but optimistic")
        self.predictor = Predictor([models[k] for k in self.eval_models], args.device, args.amp_dtype)
        self._csv_keys, self._csv, self._t0 = None, None, time.time()
        self._saved_at = time.monotonic()

    def log(self, message, console=True):
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        self._log_file.write(line + "\n")
        self._log_file.flush()
        if console:
            tqdm.write(line, file=sys.stderr)

    def viz(self, iteration, image, maps):
        """--viz_interval N: after every N-th iteration, one PNG (viz/iteration_<k>.png in the run folder)
        of what the method sees for the first unlabeled sample of the batch: `image` (1, *spatial) and
        the named maps its losses use, handed over as they are (common.save_panel draws them)."""
        every = getattr(self.args, "viz_interval", 0)
        if not every or (iteration + 1) % every:
            return
        save_panel(self.dir / "viz" / f"iteration_{iteration + 1:06d}.png", image, maps,
                   f"{self.method}, {self.args.dataset}, iteration {iteration + 1}", self.info.num_classes,
                   self.info.class_names)

    # ---- the loop ----
    def batches(self, loader):
        """Yield (iteration, batch) for iteration = self.iteration .. max_iterations - 1 (0-based: the
        number of steps already done), epoch after epoch; a resumed run continues mid-epoch."""
        sampler = loader.batch_sampler
        epoch, skip = divmod(self.iteration, len(sampler))
        self.bar = tqdm(total=self.args.max_iterations, initial=self.iteration, desc=self.method,
                        dynamic_ncols=True, mininterval=1.0)
        iteration = self.iteration
        while iteration < self.args.max_iterations:
            sampler.set_epoch(epoch, skip)
            for batch in loader:
                yield iteration, batch
                iteration += 1
                if iteration >= self.args.max_iterations:
                    break
            epoch, skip = epoch + 1, 0

    def step(self, iteration, logs):
        """After the optimizer step of 0-based `iteration`: NaN guard, metrics.csv, progress bar,
        validation and best.pth every --val_interval, last.pth every --save_interval.
        logs: {name: scalar tensor or number}; one device sync per call for all of them."""
        names = list(logs)
        device = next((v.device for v in logs.values() if torch.is_tensor(v)), torch.device("cpu"))
        values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(())
                              for v in logs.values()]).tolist()
        for name, value in zip(names, values):
            if not math.isfinite(value):
                raise SystemExit(f"{name} is {value} at iteration {iteration + 1}: stopping. Nothing was saved "
                                 f"over {self.dir / 'last.pth'} (last written at iteration "
                                 f"{self._last_saved}).")
        self.iteration = iteration + 1
        row = {"iteration": self.iteration, "lr": self._lr(), **dict(zip(names, values))}
        if self.val_cases and self.iteration % self.args.val_interval == 0:
            row.update(self.validate())
        self._write_csv(row)
        shown = self.progress_terms or names[:4]
        self.bar.set_postfix({k: f"{row[k]:.4f}" for k in shown}, refresh=False)
        self.bar.update(1)
        minutes = self.args.save_minutes
        if (self.iteration % self.args.save_interval == 0 or self._stop
                or (minutes > 0 and time.monotonic() - self._saved_at >= 60 * minutes)):
            self.save_last()
        if self._stop:
            name = signal.Signals(self._stop).name
            self.log(f"{name}: stopped after iteration {self.iteration}, last.pth written; continue with --resume")
            raise SystemExit(128 + self._stop)

    def _lr(self):
        opt = next((o for o in self.optimizers.values() if isinstance(o, torch.optim.Optimizer)), None)
        return opt.param_groups[0]["lr"] if opt is not None else math.nan

    def validate(self):
        self._validated_at = self.iteration
        was_training = {k: m.training for k, m in self.models.items()}
        rows, summary = evaluate(self.predictor, self.info, self.val_cases, self.args.patch_size,
                                 sw_batch_size=self.args.sw_batch_size, distances=False)
        for k, m in self.models.items():
            m.train(was_training[k])
        out = {"val_dice": summary["dice_mean"], "val_jaccard": summary["jaccard_mean"]}
        out.update({f"val_dice_{c}": summary[f"{c}_dice_mean"] for c in self.info.class_names})
        msg = f"iteration {self.iteration}: val mean Dice {out['val_dice']:.4f} (" + ", ".join(
            f"{c} {out[f'val_dice_{c}']:.4f}" for c in self.info.class_names) + f"); empty predictions {summary['empty_pred']}"
        if out["val_dice"] > self.best:
            self.best, self.best_iteration = out["val_dice"], self.iteration
            atomic_save(self._eval_payload(), self.dir / "best.pth")
            msg += " -> best.pth"
        self.log(msg)
        return out

    def _write_csv(self, row):
        if self._csv is None:
            val_keys = ["val_dice", "val_jaccard"] + [f"val_dice_{c}" for c in self.info.class_names]
            self._csv_keys = list(row) + ["time"] + ([k for k in val_keys if k not in row] if self.val_cases else [])
            path = self.dir / "metrics.csv"
            kept = []
            if self.args.resume and path.exists():  # drop rows after the checkpoint we resumed from
                with open(path) as f:
                    kept = [r for r in csv.DictReader(f) if int(r["iteration"]) < self.iteration]
            self._csv_file = open(path, "w", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=self._csv_keys, extrasaction="raise")
            self._csv.writeheader()
            self._csv.writerows({k: r.get(k, "") for k in self._csv_keys} for r in kept)
        row["time"] = round(self._elapsed0 + time.time() - self._t0, 3)
        self._csv.writerow({k: row.get(k, "") for k in self._csv_keys})
        if self.iteration % 20 == 0 or self.iteration == self.args.max_iterations:
            self._csv_file.flush()
            self.log(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                     console=False)

    # ---- checkpoints ----
    def _eval_payload(self):
        nets = [self.models[k] for k in self.eval_models]
        return {"method": self.method, "dataset": self.args.dataset, "iteration": self.iteration,
                "args": vars(self.args), "inference": "softmax_mean", "test_rules": self.test_rules,
                "nets": [network_spec(n) for n in nets],
                "state_dicts": [n.state_dict() for n in nets]}

    def save_last(self):
        payload = self._eval_payload()
        payload.update(
            models={k: m.state_dict() for k, m in self.models.items()},
            optimizers={k: o.state_dict() for k, o in self.optimizers.items()},
            method_state=self.state, best={"val_dice": self.best, "iteration": self.best_iteration},
            elapsed=self._elapsed0 + time.time() - self._t0,
            rng={"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
        atomic_save(payload, self.dir / "last.pth")
        self._last_saved, self._saved_at = self.iteration, time.monotonic()

    def _read_last(self):
        path = self.dir / "last.pth"
        if not path.is_file():
            raise DataError(f"--resume: {path} does not exist (same --dataset, --exp, --labeled_num and "
                            f"--model_dir as the run to continue?)")
        return read_checkpoint_file(path, self.args.device, "--resume", "; start a new run with another --exp")

    def _check_resume_args(self, ckpt):
        """Refuse a resume whose flags would train something else than the run being continued."""
        old, new = ckpt["args"], vars(self.args)
        norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  tuples vs lists, paths
        changed = [k for k in new if k in old and k not in RESUME_FREE and norm(old[k]) != norm(new[k])]
        if self.args.extend and "max_iterations" in changed:
            if new["max_iterations"] < ckpt["iteration"]:
                raise DataError(f"--extend --max_iterations {new['max_iterations']}: the run is already at "
                                f"iteration {ckpt['iteration']}")
            changed.remove("max_iterations")
        if changed:
            show = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
            listed = "; ".join(f"--{k} {show(new[k])} (the run has {show(old[k])})" for k in changed)
            hint = (" To train a run longer: --resume --extend --max_iterations N." if "max_iterations" in changed
                    else "")
            raise DataError(f"--resume: flags differ from the run in {self.dir}: {listed}. Resume with the run's "
                            f"flags (its args.json), or start a new run with another --exp.{hint}")

    def _load_last(self, ckpt):
        for k, m in self.models.items():
            m.load_state_dict(ckpt["models"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
        self.state.update(ckpt["method_state"])
        self.iteration, self._last_saved = ckpt["iteration"], ckpt["iteration"]
        self.best, self.best_iteration = ckpt["best"]["val_dice"], ckpt["best"]["iteration"]
        self._elapsed0 = ckpt.get("elapsed", 0.0)
        rng = ckpt["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        if self.args.extend and ckpt["args"]["max_iterations"] != self.args.max_iterations:
            self._extended_from = ckpt["args"]["max_iterations"]

    def finish(self):
        """Write last.pth, validate the final weights if not just done, and log the summary."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        self.save_last()
        msg = f"finished at iteration {self.iteration}; final checkpoint {self.dir / 'last.pth'}"
        if str(self.args.device).startswith("cuda"):
            msg += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB (allocated by torch)"
        if self.val_cases:
            if self._validated_at != self.iteration:
                self.validate()
            msg += f"; best val Dice {self.best:.4f} at iteration {self.best_iteration} ({self.dir / 'best.pth'})"
        self.log(msg)

    def __enter__(self):
        self._pid = os.getpid()
        self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        if getattr(self, "_extended_from", None) is not None:
            self.log(f"--extend: max_iterations {self._extended_from} -> {self.args.max_iterations}; the LR schedule "
                     f"now runs to the new length")
        return self

    def _on_signal(self, signum, frame):
        """First SIGINT/SIGTERM: stop after this iteration (step() saves and exits). Second: abort now.
        Messages go straight to the file descriptor: the main thread may be inside a print."""
        if os.getpid() != self._pid:  # a forked child: only the main process reacts
            return
        name = signal.Signals(signum).name
        if self._stop:
            os.write(2, f"\n{name} again: aborting at once; last.pth (iteration {self._last_saved}) is as it "
                        f"was\n".encode())
            os._exit(128 + signum)
        self._stop = signum
        os.write(2, f"\n{name}: finishing iteration {self.iteration + 1}, then writing last.pth and stopping "
                    f"(Ctrl-C again aborts at once)\n".encode())

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if getattr(self, "bar", None) is not None:
            self.bar.close()  # an error message then starts on its own line
        if getattr(self, "_csv_file", None) is not None:
            self._csv_file.close()
        self._log_file.close()
        return False


# ---- checkpoints for evaluation, and the test scripts' command line ----
def read_checkpoint_file(path, device, flag, hint=""):
    """torch.load of a checkpoint file; a truncated or foreign file ends in one line naming `flag`, the
    file and `hint` (torch raises several kinds of error for them)."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise DataError(f"{flag} {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}){hint}") from None


def load_checkpoint(path, device="cpu", member=None, channels_last=True):
    """(Predictor, checkpoint dict) from any checkpoint a training script wrote; member=k keeps only the
    k-th network of an ensemble checkpoint (0-based, in the order the checkpoint lists them);
    channels_last: 3D networks in that layout on the CPU (see Predictor)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--ckpt {path}: file not found")
    ckpt = read_checkpoint_file(path, device, "--ckpt")
    if not isinstance(ckpt, dict):
        raise DataError(f"--ckpt {path}: not a checkpoint of this repository (a {type(ckpt).__name__})")
    for key in ("dataset", "nets", "state_dicts", "args"):
        if key not in ckpt:
            raise DataError(f"--ckpt {path}: not a checkpoint of this repository (no {key!r})")
    members = list(zip(ckpt["nets"], ckpt["state_dicts"]))
    if member is not None:
        if not 0 <= member < len(members):
            raise DataError(f"--member {member}: {path} holds {len(members)} network(s), numbered from 0")
        members = [members[member]]
    nets = []
    for spec, sd in members:
        net = build_network(spec).to(device)
        net.load_state_dict(sd)
        nets.append(net.eval())
    return Predictor(nets, device, channels_last=channels_last and torch.device(device).type == "cpu"), ckpt


def test_main(dims, argv=None):
    """Command line of test_2d.py / test_3d.py: evaluate --ckpt on a split, print a per-case table and
    mean +- sd, write CSVs next to the checkpoint, optionally NIfTI predictions."""
    p = argparse.ArgumentParser(description=f"Evaluate a {dims}D checkpoint (the checkpoint knows its data set).",
                                formatter_class=_DefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--split", default=None, help="test (default), val, or any split of the data set")
    p.add_argument("--root_path", default=None, help="data root (default: the one the run trained on)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sw_batch_size", type=int, default=None, help=SW_BATCH_HELP)
    p.add_argument("--stride", type=int, nargs="+", default=None,
                   help="sliding-window stride (3D); default: the method's official test stride stored in the "
                        "checkpoint, else the data set's")
    p.add_argument("--lcc", choices=["auto", "on", "off"], default="auto",
                   help="keep the largest connected component of each class (the LA tests' --nms 1); auto: as the "
                        "method's official test, stored in the checkpoint (UC-Seg 3D: on; others: off)")
    p.add_argument("--save_nii", action="store_true", help="write prediction, image and label as .nii.gz")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 autocast on CUDA, bfloat16 on a "
                   "CPU with bfloat16 instructions (float32 on other CPUs)")
    p.add_argument("--channels_last", choices=["on", "off"], default="on",
                   help="3D on the CPU: networks and windows in the channels-last layout (about 1.5x faster; "
                        "probabilities equal to float rounding); off: the layout the networks trained in")
    p.add_argument("--member", type=int, default=None,
                   help="evaluate only network k (0-based) of an ensemble checkpoint, a diagnostic; CSVs get _member<k>")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    a.sw_batch_size = a.sw_batch_size or default_sw_batch_size(device)
    predictor, ckpt = load_checkpoint(a.ckpt, device, a.member, channels_last=a.channels_last == "on")
    predictor.amp_dtype, precision = amp_dtype(device, a.amp)
    if a.amp:
        print(precision)
    root_path = a.root_path or ckpt["args"].get("root_path")
    info = get_dataset(ckpt["dataset"], root_path)
    if info.dims != dims:
        raise DataError(f"--ckpt {a.ckpt} is a {info.dims}D {info.name} checkpoint: use test_{info.dims}d.py")
    split = a.split or ("test" if "test" in info.lists else info.val_split)
    root = resolve_root(info, root_path)
    cases = load_cases(info, root, split, progress=True)
    ckpt_path = Path(a.ckpt)
    stem = f"{ckpt_path.stem}_{split}" + ("" if a.member is None else f"_member{a.member}")
    save = None
    if a.save_nii:
        import nibabel as nib
        nii_dir = ckpt_path.parent / f"{stem}_nii"
        nii_dir.mkdir(exist_ok=True)

        def save(name, image, label, pred):  # identity affine: the h5 files store no spacing
            for kind, arr in (("img", image.astype(np.float32)), ("gt", label), ("pred", pred)):
                nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), nii_dir / f"{name}_{kind}.nii.gz")
    rules = ckpt.get("test_rules", {})
    lcc = rules.get("lcc", False) if a.lcc == "auto" else a.lcc == "on"
    stride = a.stride or rules.get("stride")
    if info.dims == 3 and stride is not None and len(stride) != 3:
        raise DataError(f"--stride needs 3 numbers (x y z), got {stride}")
    t0 = time.time()
    rows, summary = evaluate(predictor, info, cases, ckpt["args"]["patch_size"], stride, a.sw_batch_size,
                             progress=True, on_case=save, lcc=lcc)
    seconds = time.time() - t0
    summary = {"checkpoint": str(ckpt_path), "iteration": ckpt["iteration"], "split": split, "lcc": lcc,
               "stride": list(stride or info.stride or []), "eval_seconds": round(seconds, 1), **summary}
    member = "" if a.member is None else f" (network {a.member} of {len(ckpt['nets'])} only)"
    print_results(rows, summary, info, f"{ckpt['method']}{member} on {info.name} {split}, {ckpt_path} "
                  f"(iteration {ckpt['iteration']}), {seconds:.1f} s; largest component per class: "
                  f"{'on' if lcc else 'off'}" + (f"; stride {list(stride or info.stride)}" if info.dims == 3 else ""))
    write_results(rows, summary, info, ckpt_path.parent / f"{stem}_cases.csv", ckpt_path.parent / f"{stem}_summary.csv")
    print(f"wrote {ckpt_path.parent / (stem + '_cases.csv')} and {stem}_summary.csv"
          + (f"; NIfTI in {nii_dir}" if a.save_nii else ""))
    return rows, summary


def print_results(rows, summary, info, title):
    names = info.class_names
    per_class = len(names) > 1
    print(title)
    head = f"{'case':<28}" + "".join(f"{c + ' Dice':>10}" for c in names) * per_class + \
        f"{'Dice':>8}{'Jaccard':>9}{'95HD':>8}{'ASD':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r["metrics"]
        mean = {k: class_mean(m, k) for k in ("dice", "jaccard", "hd95", "asd")}
        print(f"{r['case']:<28}" + "".join(f"{m[c]['dice']:>10.4f}" for c in m) * per_class +
              f"{mean['dice']:>8.4f}{mean['jaccard']:>9.4f}{mean['hd95']:>8.2f}{mean['asd']:>7.2f}")
    print("-" * len(head))
    for c in (names if per_class else []):
        print(f"{c:<6} " + "  ".join(f"{k} {summary[f'{c}_{k}_mean']:.4f} +- {summary[f'{c}_{k}_sd']:.4f}"
                                     for k in ("dice", "jaccard", "hd95", "asd")))
    print("mean   " + "  ".join(f"{k} {summary[f'{k}_mean']:.4f} +- {summary[f'{k}_sd']:.4f}"
                                for k in ("dice", "jaccard", "hd95", "asd")))
    print(f"cases {summary['cases']}; cases with an empty predicted class {summary['empty_pred']} "
          f"(scored Dice 0, 95HD 0, ASD 0 as the anchors; 95HD/ASD without them: hd95_strict "
          f"{summary['hd95_strict_mean']:.4f}, asd_strict {summary['asd_strict_mean']:.4f}); distances in voxels")


def write_results(rows, summary, info, cases_csv, summary_csv):
    with open(cases_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "class"] + list(METRICS) + ["empty_pred", "empty_label"])
        for r in rows:
            for c, m in r["metrics"].items():
                w.writerow([r["case"], info.class_names[c - 1]] + [m[k] for k in METRICS] +
                           [int(m["empty_pred"]), int(m["empty_label"])])
    with open(summary_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "value"])
        w.writerows(summary.items())
