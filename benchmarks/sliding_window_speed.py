"""The 3D sliding window (common.sliding_window) in several forms against the anchors' one-window-at-a-
time loop, on one LA-sized volume, in the same process and interleaved (ratios, since machines are noisy).

    python benchmarks/sliding_window_speed.py --root_path data/LA [--case ID] [--sw_batch_size 4] [--threads T]

V-Net (untrained: speed does not depend on the weights, and its flat outputs make the label-map check
strict), patch 112x112x80, stride 18/18/4 (protocol §1.5). Forms: batched windows under no_grad or
inference_mode, with the network and windows in NCDHW or channels-last-3D memory layout. For each: the
median time, UA-MT loop / form, the largest difference of the probability maps and the number of
voxels whose label differs from the loop's. Appends rows to benchmarks/results/sliding_window_speed.csv.
"""
import argparse
import copy
import csv
import inspect
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


def variants(net, device, sw_batch_size, info):
    """name -> function(image) -> (C, *shape) probabilities. The anchors' loop first (the reference)."""
    raw = inspect.unwrap(common.sliding_window)  # without its own grad-mode decorator
    patch, stride = info.patch_size, info.stride
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)

    def batched(grad_mode, model, memory_format=torch.contiguous_format):
        predictor = common.Predictor([model], device)

        def predict(x):
            return predictor(x.contiguous(memory_format=memory_format))

        def f(image):
            with grad_mode():
                return raw(predict, torch.from_numpy(image).to(device), patch, stride, 2, sw_batch_size).cpu().numpy()
        return f
    return {
        "UA-MT loop": lambda image: naive_sliding_window(net, image, patch, stride, 2),
        "batched, no_grad": batched(torch.no_grad, net),
        "batched, inference_mode": batched(torch.inference_mode, net),
        "batched, no_grad, channels_last_3d": batched(torch.no_grad, net_cl, torch.channels_last_3d),
        "batched, inference_mode, channels_last_3d": batched(torch.inference_mode, net_cl, torch.channels_last_3d),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root_path", default="data/LA")
    p.add_argument("--case", default=None, help="case id (default: the first of test.list)")
    p.add_argument("--sw_batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all variants (interleaved)")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (the UA-MT loop always runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    info = common.get_dataset("LA")
    root = common.resolve_root(info, a.root_path)
    name = a.case or common.read_list(info, root, "test")[0]
    image, _ = common.read_case(common.case_path(info, root, name, "test"), 2, 3)
    torch.manual_seed(0)
    net = common.default_network(info).to(a.device).eval()
    runs = variants(net, a.device, a.sw_batch_size, info)
    if a.only:
        runs = {k: v for k, v in runs.items() if k == "UA-MT loop" or k in a.only}
    n_windows = np.prod([len(common.window_starts(s, pt, st)) for s, pt, st in zip(image.shape, info.patch_size, info.stride)])
    print(f"LA case {name}, shape {image.shape}, {n_windows} windows, device {a.device}, "
          f"torch threads {torch.get_num_threads()}, sw_batch_size {a.sw_batch_size}", flush=True)
    times, outputs = {k: [] for k in runs}, {}
    for r in range(a.repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            outputs[k] = f(image)
            times[k].append(time.perf_counter() - t0)
            print(f"  round {r + 1} {k}: {times[k][-1]:.1f} s", flush=True)
    ref = outputs["UA-MT loop"]
    t_ref = float(np.median(times["UA-MT loop"]))
    out = Path(__file__).resolve().parent / "results" / "sliding_window_speed.csv"
    new = not out.exists() or "variant" not in out.read_text().splitlines()[0]
    if new and out.exists():
        out.rename(out.with_name("sliding_window_speed_v1.csv"))  # the earlier two-way comparison
    with open(out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "case", "shape", "windows", "device", "threads", "sw_batch_size", "variant",
                        "median_s", "times_s", "ua_mt_over_variant", "max_prob_diff", "label_voxels_differing"])
        for k, ts in times.items():
            t = float(np.median(ts))
            diff = float(np.abs(outputs[k] - ref).max())
            differing = int((outputs[k].argmax(0) != ref.argmax(0)).sum())
            print(f"{k:45s} {t:7.1f} s  UA-MT/this {t_ref / t:.2f}  max |prob diff| {diff:.1e}  "
                  f"label voxels differing {differing}")
            w.writerow([time.strftime("%Y-%m-%d %H:%M"), name, "x".join(map(str, image.shape)), n_windows, a.device,
                        torch.get_num_threads(), a.sw_batch_size, k, round(t, 2), " ".join(f"{x:.2f}" for x in ts),
                        round(t_ref / t, 3), f"{diff:.2e}", differing])


if __name__ == "__main__":
    main()
