"""The ACDC quick-protocol figure: validation Dice against iterations per method at 3 and 7 labeled
patients, and the final checkpoint's Dice on the 20 validation volumes with its per-case spread.

    python benchmarks/quick_figure.py model --out docs/figures/acdc_quick.png
    python benchmarks/quick_figure.py runA/model runB/model       # runs spread over several model folders

Reads <model_dir>/ACDC_quick_<n>_labeled/<method>/metrics.csv (the val_dice column, every 200
iterations) and last_val_cases.csv (written by `test_2d.py --ckpt .../last.pth --split val`). A method
or label count without a run is left out of the figure and listed on the console.
"""
import argparse
import csv
from collections import defaultdict
from pathlib import Path

METHODS = ["supervised", "cifp", "ducisc", "dualnet_kl", "icl", "ucseg"]
LABELS = {"supervised": "supervised", "cifp": "CIFP (R)", "ducisc": "DuCiSC", "dualnet_kl": "dual network + KL",
          "icl": "ICL", "ucseg": "UC-Seg"}


def find_runs(model_dirs, counts):
    runs = {}
    for n in counts:
        for method in METHODS:
            for d in model_dirs:
                folder = Path(d) / f"ACDC_quick_{n}_labeled" / method
                if (folder / "metrics.csv").is_file():
                    runs[n, method] = folder
    return runs


def validation_curve(folder):
    with open(folder / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_dice")]
    return [int(r["iteration"]) for r in rows], [100 * float(r["val_dice"]) for r in rows]


def case_dice(folder):
    """Mean Dice over the classes of each validation case of the final checkpoint (%), or None."""
    path = folder / "last_val_cases.csv"
    if not path.is_file():
        return None
    per_case = defaultdict(list)
    with open(path) as f:
        for r in csv.DictReader(f):
            per_case[r["case"]].append(float(r["dice"]))
    return [100 * sum(v) / len(v) for v in per_case.values()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dirs", nargs="+", help="folders holding ACDC_quick_<n>_labeled/<method>/")
    p.add_argument("--counts", nargs="+", default=["3", "7"])
    p.add_argument("--out", default="docs/figures/acdc_quick.png")
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = find_runs(a.model_dirs, a.counts)
    missing = [f"{m} {n}" for n in a.counts for m in METHODS if (n, m) not in runs]
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, len(a.counts) + 1, figsize=(5 * (len(a.counts) + 1), 4))
    for ax, n in zip(axes, a.counts):
        for method in METHODS:
            if (n, method) in runs:
                x, y = validation_curve(runs[n, method])
                ax.plot(x, y, "o-", ms=3, color=colours[method], label=LABELS[method])
        ax.set_title(f"validation Dice, {n} labeled patients", fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean Dice (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[-1]
    ticks = []
    for i, (n, method) in enumerate(sorted(runs, key=lambda k: (k[0], METHODS.index(k[1])))):
        dice = case_dice(runs[n, method])
        if dice is None:
            continue
        mean = sum(dice) / len(dice)
        ax.scatter([len(ticks)] * len(dice), dice, s=8, alpha=0.4, color=colours[method])
        ax.errorbar(len(ticks), mean, fmt="D", color=colours[method], ms=6)
        ticks.append(f"{LABELS[method]}\n{n}")
    ax.set_xticks(range(len(ticks)), ticks, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("Dice per validation case (%)")
    ax.set_ylim(0, 100)
    ax.set_title("final checkpoint: mean (diamond) and each case", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out} from {len(runs)} runs" + (f"; no run for: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
