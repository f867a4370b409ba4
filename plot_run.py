"""Plot what training runs wrote: every loss term, the learning rate and the validation Dice per class
against iterations, several runs overlaid (one colour per run).

    python plot_run.py model/ACDC_quick_7_labeled/ducisc
    python plot_run.py model/ACDC_quick_7_labeled/supervised model/ACDC_quick_7_labeled/icl --out icl_vs_sup.png

Reads each run folder's metrics.csv (one row per iteration) and args.json; writes a PNG beside the first
run (curves.png there, or --out). Loss curves are drawn raw (faint) and as a moving average over 1 % of
the run; a term that only some runs log is drawn for those.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path


def read_run(folder):
    """(label, {column: (iterations, values)}) of a run folder; empty cells (not logged) are skipped."""
    folder = Path(folder)
    path = folder / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass a run folder (model/<dataset>_<exp>_<n>_labeled/<method>)")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"error: {path} has no rows yet")
    series = {}
    for key in rows[0]:
        if key == "iteration":
            continue
        points = [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key) not in ("", None)]
        if points:
            series[key] = tuple(zip(*points))
    args = json.loads((folder / "args.json").read_text()) if (folder / "args.json").is_file() else {}
    label = f"{folder.name}, {args.get('labeled_num', '?')} labeled" if args else str(folder)
    return label, series


def panels_of(runs):
    """Panel order: the objective and loss terms (in the order the runs log them), the learning rate,
    mean validation Dice, then validation Dice per class."""
    keys = list(dict.fromkeys(k for _, s in runs for k in s))
    losses = [k for k in keys if k.startswith("loss") or k == "objective"]
    val = [k for k in keys if k.startswith("val_dice")]
    return losses + [k for k in ("lr",) if k in keys] + val


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = panels_of(runs)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        for i, (label, series) in enumerate(runs):
            if name not in series:
                continue
            x, y = series[name]
            c = colours[i % len(colours)]
            if name.startswith("val_"):
                ax.plot(x, y, "o-", color=c, ms=3, label=label)
            elif name == "lr":
                ax.plot(x, y, color=c, label=label)
            else:
                window = max(1, len(y) // 100)
                ax.plot(x, y, color=c, alpha=0.2, lw=0.6)
                ax.plot(x, moving_average(list(y), window), color=c, lw=1.2, label=label)
        ax.set_title(name.replace("val_dice_", "val Dice ").replace("val_dice", "val Dice (mean)"), fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if name.startswith("val_dice"):
            ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each holds metrics.csv)")
    p.add_argument("--out", default=None, help="PNG to write (default: curves.png in the first run folder)")
    a = p.parse_args(argv)
    runs = [read_run(r) for r in a.runs]
    out = Path(a.out) if a.out else Path(a.runs[0]) / "curves.png"
    plot(runs, out)
    print(f"wrote {out} ({len(panels_of(runs))} panels, {len(runs)} run(s))", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
