"""Batched sliding window (common.sliding_window) against the anchors' one-window-at-a-time loop,
on one LA-sized volume, in the same process (a ratio, since machines are noisy).

    python benchmarks/sliding_window_speed.py --root_path data/LA [--case ID] [--sw_batch_size 4]

V-Net (untrained: speed and agreement do not depend on the weights), patch 112x112x80, stride
18/18/4 (protocol §1.5). Prints both times, the ratio and the largest difference of the
probability maps; appends a row to benchmarks/results/sliding_window_speed.csv.
"""
import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@torch.no_grad()
def naive_sliding_window(net, image, patch, stride, num_classes):
    """UA-MT `test_single_case` written plainly: pad, one window per forward, NumPy score/count maps."""
    pad = [max(p - s, 0) for s, p in zip(image.shape, patch)]
    padded = np.pad(image, [(p // 2, p - p // 2) for p in pad])
    score = np.zeros((num_classes, *padded.shape), np.float32)
    count = np.zeros(padded.shape, np.float32)
    starts = [common.window_starts(s, p, st) for s, p, st in zip(padded.shape, patch, stride)]
    device = next(net.parameters()).device
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                sl = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                window = torch.from_numpy(np.ascontiguousarray(padded[sl]))[None, None].to(device)
                score[(slice(None), *sl)] += torch.softmax(net(window), 1)[0].cpu().numpy()
                count[sl] += 1
    score /= count
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, image.shape))
    return score[(slice(None), *crop)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root_path", default="data/LA")
    p.add_argument("--case", default=None, help="case id (default: the first of test.list)")
    p.add_argument("--sw_batch_size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    info = common.get_dataset("LA")
    root = common.resolve_root(info, a.root_path)
    name = a.case or common.read_list(info, root, "test")[0]
    image, _ = common.read_case(common.case_path(info, root, name, "test"), 2, 3)
    torch.manual_seed(0)
    net = common.default_network(info).to(a.device).eval()
    predictor = common.Predictor([net], a.device)
    n_windows = np.prod([len(common.window_starts(s, pt, st)) for s, pt, st in zip(image.shape, info.patch_size, info.stride)])
    t0 = time.perf_counter()
    slow = naive_sliding_window(net, image, info.patch_size, info.stride, 2)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = common.sliding_window(predictor, torch.from_numpy(image).to(a.device), info.patch_size, info.stride, 2,
                                 a.sw_batch_size).cpu().numpy()
    t_batched = time.perf_counter() - t0
    diff = float(np.abs(fast - slow).max())
    same_labels = float((fast.argmax(0) == slow.argmax(0)).mean())
    print(f"LA case {name}, shape {image.shape}, {n_windows} windows, device {a.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"naive loop {t_naive:.1f} s; batched (sw_batch_size {a.sw_batch_size}) {t_batched:.1f} s; "
          f"ratio naive/batched {t_naive / t_batched:.2f}; max |prob diff| {diff:.2e}; "
          f"argmax agreement {same_labels:.6f}")
    out = Path(__file__).resolve().parent / "results" / "sliding_window_speed.csv"
    out.parent.mkdir(exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["case", "shape", "windows", "device", "threads", "sw_batch_size", "naive_s", "batched_s",
                        "ratio", "max_prob_diff", "argmax_agreement"])
        w.writerow([name, "x".join(map(str, image.shape)), n_windows, a.device, torch.get_num_threads(),
                    a.sw_batch_size, round(t_naive, 2), round(t_batched, 2), round(t_naive / t_batched, 3),
                    f"{diff:.2e}", same_labels])


if __name__ == "__main__":
    main()
