"""Are the CPU defaults (torch threads, loader workers) right? Seconds per iteration of each script with
its defaults beside every (threads, workers) setting, in one sitting, on the ACDC quick protocol.

For each script the settings run interleaved (default, 1x0, 1x1, ..., then again for --repeats), so a
drift of the machine's load hits them alike. "default" passes neither --threads nor --num_workers and
removes OMP_NUM_THREADS from the environment: what a user gets from the README's commands. The time
per iteration is the median of the per-iteration wall times in metrics.csv after the first --skip
iterations (loader start-up); validation is off. Run it on an otherwise idle machine.

    python benchmarks/cpu_defaults.py --root_path data/ACDC supervised ducisc icl
    python benchmarks/cpu_defaults.py --quick_start      # the README quick start (Phantom2D), whole runs

Writes benchmarks/results/cpu_defaults.csv (one row per script, setting and repeat) and prints, per
script, the default's s/it as a ratio to the best setting's.
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
QUICK_START = ["--dataset", "Phantom2D", "--labeled_num", "2"]  # the README's first command


def timed_run(script, flags, setting, workdir):
    """(median s/it after --skip, wall seconds of the whole command, the run's metrics.csv path)."""
    out = Path(workdir) / f"{script}_{time.time_ns()}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    extra = [] if setting == "default" else ["--threads", str(setting[0]), "--num_workers", str(setting[1])]
    cmd = [sys.executable, str(REPO / f"train_{script}.py"), *flags, "--exp", "cpu", "--model_dir", str(out), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    metrics = next(out.glob("*/*/metrics.csv"))
    with open(metrics) as f:
        times = [float(r["time"]) for r in csv.DictReader(f)]
    return times, wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scripts", nargs="*", default=["supervised"], help="method names (train_<name>.py)")
    p.add_argument("--root_path", default="data/ACDC")
    p.add_argument("--quick_start", action="store_true",
                   help="time the README quick start instead (Phantom2D, 300 iterations, whole command)")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=None,
                   help="THREADSxWORKERS settings to compare with the default, e.g. 1x0 2x1; default: every "
                        "combination of --threads and --workers")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_defaults.csv"))
    a = p.parse_args()
    if a.settings:
        settings = ["default"] + [tuple(int(x) for x in s.split("x")) for s in a.settings]
    else:
        settings = ["default"] + [(t, w) for t in dict.fromkeys(a.threads) for w in a.workers]
    scripts = ["supervised"] if a.quick_start else a.scripts
    out = Path(a.out)
    new = not out.exists()
    with tempfile.TemporaryDirectory() as tmp, open(out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "protocol", "script", "setting", "threads", "workers", "s_per_it", "wall_s",
                        "iterations", "cores"])
        for script in scripts:
            results = {s: [] for s in settings}
            for _ in range(a.repeats):
                for s in settings:
                    if a.quick_start:
                        times, wall = timed_run(script, QUICK_START, s, tmp)
                    else:
                        times, wall = timed_run(script, [*QUICK, "--root_path", a.root_path,
                                                         "--max_iterations", str(a.iterations)], s, tmp)
                    steps = [y - x for x, y in zip(times[a.skip:], times[a.skip + 1:])]
                    s_per_it = statistics.median(steps)
                    results[s].append(s_per_it)
                    name = s if s == "default" else f"{s[0]}x{s[1]}"
                    threads, workers = ("", "") if s == "default" else s
                    w.writerow([time.strftime("%Y-%m-%d %H:%M"), "quick_start" if a.quick_start else "acdc_quick",
                                script, name, threads, workers, f"{s_per_it:.4f}", f"{wall:.1f}", len(times),
                                os.cpu_count()])
                    f.flush()
                    print(f"{script:<12} {name:<8} {s_per_it:.3f} s/it  (whole command {wall:.1f} s)", flush=True)
            med = {s: statistics.median(v) for s, v in results.items()}
            best = min((s for s in settings if s != "default"), key=med.get)
            print(f"{script}: default {med['default']:.3f} s/it, best {best[0]} threads x {best[1]} workers "
                  f"{med[best]:.3f} s/it, ratio {med['default'] / med[best]:.3f}", flush=True)


if __name__ == "__main__":
    main()
