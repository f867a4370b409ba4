"""Seconds per training iteration of each method as a ratio to the supervised baseline, measured in
one sitting at the ACDC quick-protocol settings (machines here are noisy: only ratios taken side by
side mean anything).

Each method runs --iterations iterations with validation off, --repeats times, interleaved with the
supervised baseline (supervised, method A, method B, ..., supervised, method A, ...), so a slow
drift of the machine's load hits every method alike. The time per iteration is the median of the
per-iteration wall times in metrics.csv, skipping the first --skip iterations (loader start-up).

    python benchmarks/iteration_speed.py --root_path data/ACDC cifp ducisc icl
Writes benchmarks/results/iteration_speed.csv (appends one row per method and repeat).
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "ACDC", "--patch_size", "128", "128", "--batch_size", "8", "--labeled_bs", "4",
         "--base_lr", "0.01", "--lr_schedule", "poly", "--seed", "1337", "--labeled_num", "7", "--val_split", "none"]


def seconds_per_iteration(method, root, iterations, skip, threads, workdir):
    out = Path(workdir) / f"{method}_{time.time_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(REPO / f"train_{method}.py"), *QUICK, "--root_path", root, "--max_iterations",
           str(iterations), "--exp", "speed", "--model_dir", str(out), "--num_workers", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-2000:]}")
    with open(out / "ACDC_speed_7_labeled" / method / "metrics.csv") as f:
        times = [float(r["time"]) for r in csv.DictReader(f)]
    steps = [b - a for a, b in zip(times[skip:], times[skip + 1:])]
    return statistics.median(steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("methods", nargs="+", help="method names (train_<name>.py)")
    p.add_argument("--root_path", required=True)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "iteration_speed.csv"))
    args = p.parse_args()
    results = {m: [] for m in ["supervised"] + args.methods}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for m in results:
                results[m].append(seconds_per_iteration(m, args.root_path, args.iterations, args.skip, args.threads,
                                                        workdir))
                print(f"{m}: {results[m][-1]:.3f} s/it", flush=True)
    sup = statistics.median(results["supervised"])
    new = not Path(args.out).exists()
    with open(args.out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "method", "s_per_it", "supervised_s_per_it", "ratio", "threads", "iterations"])
        for m, values in results.items():
            s = statistics.median(values)
            print(f"{m:12s} {s:.3f} s/it  x{s / sup:.2f} supervised  (repeats: {', '.join(f'{v:.3f}' for v in values)})")
            w.writerow([time.strftime("%Y-%m-%d %H:%M"), m, round(s, 4), round(sup, 4), round(s / sup, 2),
                        args.threads, args.iterations])


if __name__ == "__main__":
    main()
