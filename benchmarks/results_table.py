"""Print results rows (markdown, as in docs/results.md) from run folders, so no number is typed by hand.

    python benchmarks/results_table.py model/ACDC_quick_3_labeled/supervised model/ACDC_quick_7_labeled/supervised

For each run folder: the evaluated checkpoint's summary (<ckpt>_<split>_summary.csv, written by
test_2d.py / test_3d.py), the training wall time (last `time` of metrics.csv) and the arguments
(args.json). Columns: method, data set, labeled_num, seed, mean Dice / Jaccard / 95HD / ASD
(mean +- sd over cases), per-class Dice, checkpoint, wall time, seconds per iteration, and what the
method keeps of its own ACDC recipe (network, initialisation, augmentation; docs/recipes.md): the
quick protocol's flags override its optimizer, schedule, batch, patch and run length.
"""
import argparse
import csv
import json
from pathlib import Path


# What each method keeps of its own recipe on ACDC under the quick protocol (docs/recipes.md).
OWN_RECIPE = {
    "supervised": "SSL4MIS U-Net (bilinear), default init; SSL4MIS generator",
    "cifp": "U-Net (transposed conv), default init; three-way generator (R)",
    "ducisc": "U-Net + 3 heads (R), default init; SSL4MIS generator (R)",
    "icl": "SSL4MIS U-Net (bilinear), default init; ICL three-way generator",
    "ucseg": "U-Net + V-Net (no norm, Kaiming); UC-Seg albumentations pipeline",
    "dualnet_kl": "ResNet-34 V-Net + V-Net (2D, Kaiming, no dropout) (R); SSL4MIS generator (R)",
}


def row(folder, ckpt, split):
    folder = Path(folder)
    args = json.loads((folder / "args.json").read_text())
    summary_file = folder / f"{ckpt}_{split}_summary.csv"
    if not summary_file.is_file():
        raise SystemExit(f"{summary_file} not found: run test_{len(args['patch_size'])}d.py --ckpt "
                         f"{folder / (ckpt + '.pth')} --split {split} first")
    with open(summary_file) as f:
        s = {r["key"]: r["value"] for r in csv.DictReader(f)}
    with open(folder / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    fmt = lambda k, scale: f"{float(s[k + '_mean']) * scale:.2f} ± {float(s[k + '_sd']) * scale:.2f}"  # noqa: E731
    classes = [k[:-len("_dice_mean")] for k in s if k.endswith("_dice_mean") and k != "dice_mean"]
    per_class = " / ".join(f"{float(s[c + '_dice_mean']) * 100:.2f}" for c in classes) if len(classes) > 1 else "-"
    seconds = float(last["time"])
    return (f"| {folder.name} | {args['dataset']} {split} | {args['labeled_num']} | {args['seed']} | "
            f"{fmt('dice', 100)} | {fmt('jaccard', 100)} | {fmt('hd95', 1)} | {fmt('asd', 1)} | {per_class} | "
            f"{ckpt}.pth (iteration {s['iteration']}) | {seconds / 60:.1f} min | "
            f"{seconds / int(last['iteration']):.3f} | {s['empty_pred']} | "
            f"{OWN_RECIPE.get(folder.name, 'see docs/recipes.md')} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--ckpt", default="last", help="last (final) or best")
    p.add_argument("--split", default="val")
    a = p.parse_args()
    print("| method | data | labeled | seed | Dice % | Jaccard % | 95HD (vox) | ASD (vox) | Dice per class % | "
          "checkpoint | train wall time | s/it | cases with an empty class | own recipe kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in a.folders:
        print(row(folder, a.ckpt, a.split))


if __name__ == "__main__":
    main()
