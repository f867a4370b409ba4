"""Largest connected component per sample: torch (common.largest_components_torch, on any device)
against SciPy (common.largest_component, on the host), on the masks UC-Seg's pseudo-label sees.

    python benchmarks/lcc_speed.py --root_path data/ACDC [--device cuda] [--threads 1]
    python benchmarks/lcc_speed.py --dataset Phantom2D --device cuda       # where ACDC is not at hand

2D: every foreground class of the ACDC (or phantom) validation label slices, resized to 128 x 128 (the quick protocol),
in batches of 4 (one unlabeled half of a quick-protocol batch). 3D: noisy blobs of 112 x 112 x 80
(the LA patch), batches of 2. Prints the median time per batch of each and whether the masks agree;
appends rows to benchmarks/results/lcc_speed.csv.
"""
import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def slice_masks(dataset, root, size=128):
    """Every foreground class of the validation volumes' label slices, resized to size x size."""
    info = common.get_dataset(dataset, root)
    root = common.resolve_root(info, root)
    masks = []
    for name in common.read_list(info, root, info.val_split):
        _, label = common.read_case(common.case_path(info, root, name, info.val_split), info.num_classes, 3)
        lab = F.interpolate(torch.from_numpy(label.astype(np.float32))[:, None], size=(size, size), mode="nearest")[:, 0]
        masks += [lab == c for c in range(1, info.num_classes)]
    masks = torch.cat(masks)
    return masks[masks.flatten(1).any(1)]


def blobs(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, *shape), generator=g)
    smooth = F.avg_pool3d(x, 9, stride=1, padding=4)
    return (smooth > smooth.flatten(1).quantile(0.7, dim=1).view(-1, 1, 1, 1, 1))[:, 0]


def timed(f, batches, device):
    times, outs = [], []
    for b in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = f(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        outs.append(out.cpu())
    return statistics.median(times), torch.cat(outs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="ACDC", choices=["ACDC", "Phantom2D"])
    p.add_argument("--root_path", default=None, help="default: data/<dataset>")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    sets = {f"{a.dataset} class masks 128x128, batch 4": (slice_masks(a.dataset, a.root_path), 4),
            "blobs 112x112x80, batch 2": (blobs(4, (112, 112, 80)), 2)}
    out = Path(__file__).resolve().parent / "results" / "lcc_speed.csv"
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "masks", "batches", "device", "threads", "scipy_s_per_batch", "torch_s_per_batch",
                        "torch_over_scipy", "equal"])
        for name, (masks, bs) in sets.items():
            batches = [masks[i:i + bs] for i in range(0, len(masks) - bs + 1, bs)]
            common.largest_components_torch(batches[0].to(device))  # warm-up (CUDA context, kernels)
            t_scipy, ref = timed(lambda b: torch.from_numpy(np.stack([common.largest_component(m.numpy()) for m in b])),
                                 batches, torch.device("cpu"))
            t_torch, got = timed(lambda b: common.largest_components_torch(b.to(device)), batches, device)
            equal = bool(torch.equal(ref, got))
            print(f"{name}: {len(batches)} batches; scipy {t_scipy * 1e3:.2f} ms, torch on {device} "
                  f"{t_torch * 1e3:.2f} ms per batch (torch/scipy {t_torch / t_scipy:.1f}); equal {equal}")
            w.writerow([time.strftime("%Y-%m-%d %H:%M"), name, len(batches), device, a.threads, round(t_scipy, 5),
                        round(t_torch, 5), round(t_torch / t_scipy, 2), equal])


if __name__ == "__main__":
    main()
