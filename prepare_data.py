"""Convert a folder of NIfTI volumes (nnU-Net naming) into this repository's h5 layout.

    python prepare_data.py --input MY_NIFTI --output data/MyOrgan --dims 3 [--modality CT --ct_window -125 275]
    python train_supervised.py --dataset Custom --root_path data/MyOrgan --labeled_num 4

Input (nnU-Net v1/v2 naming): imagesTr/<case>.nii.gz or imagesTr/<case>_0000.nii.gz (one file per
modality: `--channel K` picks _000K), optional labelsTr/<case>.nii.gz, optional imagesTs/ + labelsTs/.
A training image without a label is an *unlabeled* case: its h5 file holds only `image`, and it
only ever enters the unlabeled stream.

Output (`--dims 3`): <root>/<case>.h5 (image float32, label uint8, axes as nibabel reads them,
x y z); `--dims 2`: the ACDC layout, training slices <root>/data/slices/<case>_slice_<k>.h5
(k from 1, slices along the last axis) and validation/test volumes <root>/data/<case>.h5 as
(slices, H, W). Lists: labeled.list, unlabeled.list, train.list (labeled cases first, in the
seeded order, then unlabeled; for 2D train_slices.list holds their slices), val.list, test.list.
`dataset.json` records what was done: classes and the label mapping, normalisation, spacing,
patch and stride, the split and every case's shape; `--dataset Custom` reads it.

Intensities, as the field does it: MRI z-score per volume (UA-MT LA); CT clipped to
--ct_window then z-scored (MC-Net Pancreas); 2D min-max to [0, 1] per volume (SSL4MIS ACDC).
Labels must be integers; their distinct values are mapped in sorted order to 0..C-1 (printed and
stored). Optional resampling to --spacing with SciPy (cubic image, nearest label).

Nothing is written until every input has been read and validated, and the data set is written
into a temporary folder renamed into place at the end, so an interrupted run leaves nothing that
looks complete. An existing, non-empty --output is refused unless --overwrite.
"""
import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

import common

class PrepError(common.DataError):
    """Bad input to prepare_data.py; the message names the file or flag."""


NII = re.compile(r"^(?P<stem>.+)\.nii(?:\.gz)?$")
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def nifti_stems(folder):
    return {m["stem"]: path for path in sorted(Path(folder).iterdir()) if (m := NII.match(path.name))}


def find_images(folder, channel):
    """{case: path} of an images folder. nnU-Net splits modalities into <case>_0000, <case>_0001, ...:
    when every file has such a suffix, `channel` picks one; otherwise the file name is the case name."""
    stems = nifti_stems(folder)
    split = [CHANNEL.match(s) for s in stems]
    if stems and all(split) and any(m["channel"] == "0000" for m in split):
        out = {m["case"]: stems[m.string] for m in split if int(m["channel"]) == channel}
        missing = sorted({m["case"] for m in split} - set(out))
        if missing:
            raise PrepError(f"{folder}/{missing[0]}_*: no file for --channel {channel}")
        return out
    return stems


def load_nifti(path, channel=None):
    """(array, affine, spacing) of one NIfTI file; a 4D image needs --channel."""
    import nibabel as nib
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4:
        if channel is None:
            raise PrepError(f"{path}: 4D image of shape {data.shape}: pick a modality with --channel K "
                            f"(0..{data.shape[3] - 1})")
        if channel >= data.shape[3]:
            raise PrepError(f"{path}: --channel {channel} but the image has {data.shape[3]} channels")
        data = data[..., channel]
    if data.ndim != 3:
        raise PrepError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def read_pairs(images, labels, channel):
    """Load and check every (image, label) pair before anything is written."""
    cases = {}
    for case, ipath in tqdm(sorted(images.items()), desc="reading", leave=False):
        image, affine, spacing = load_nifti(ipath, channel)
        label = None
        if case in labels:
            label, laffine, _ = load_nifti(labels[case])
            if label.shape != image.shape:
                raise PrepError(f"{labels[case]}: label shape {label.shape} differs from image {ipath} {image.shape}")
            if not np.allclose(affine, laffine, atol=1e-3):
                raise PrepError(f"{labels[case]}: affine differs from image {ipath}:\n{laffine}\nvs\n{affine}")
            if not np.array_equal(label, np.round(label)):
                raise PrepError(f"{labels[case]}: label values must be integers")
            label = np.round(label).astype(np.int64)
        cases[case] = {"image": image.astype(np.float32), "label": label, "spacing": spacing, "source": str(ipath)}
    return cases


def normalise(image, modality, ct_window, dims):
    if dims == 2:  # SSL4MIS ACDC: min-max per volume
        lo, hi = float(image.min()), float(image.max())
        return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    if modality == "CT":
        image = np.clip(image, *ct_window)
    std = float(image.std())
    return (image - image.mean()) / std if std > 0 else image - image.mean()


def resample(image, label, spacing, target):
    factors = [s / t for s, t in zip(spacing, target)]
    image = ndimage.zoom(image, factors, order=3)
    label = None if label is None else ndimage.zoom(label, factors, order=0)
    return image, label


def default_patch(shapes, dims):
    """Median shape, capped (3D 96, 2D 256) and rounded down to a multiple of 16 (four poolings)."""
    median = np.median(np.array(shapes), axis=0)
    cap = 96 if dims == 3 else 256
    return [int(max(16, min(cap, m) // 16 * 16)) for m in median]


def split_cases(labeled, seed, val_fraction, test_fraction):
    """Seeded shuffle of the labeled cases into train / val / test."""
    order = list(np.random.default_rng(seed).permutation(sorted(labeled)))
    n_val = int(round(val_fraction * len(order)))
    n_test = int(round(test_fraction * len(order)))
    if len(order) - n_val - n_test < 1:
        raise PrepError(f"only {len(order)} labeled cases: not enough for --val_fraction {val_fraction} and "
                        f"--test_fraction {test_fraction} with at least one labeled training case")
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def write_example(folder, dims, seed=0):
    """A synthetic nnU-Net folder for the README's worked example and the tests, made from the
    phantoms: 3D: 10 labeled + 4 unlabeled training cases, labels stored as 0/255 (like the raw LA
    masks); 2D: 8 labeled + 2 unlabeled stacks, labels stored as 0/10/20/30 (to show the remapping)."""
    import nibabel as nib
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    n_labeled, n_unlabeled = (10, 4) if dims == 3 else (8, 2)
    for i in range(n_labeled + n_unlabeled):
        if dims == 3:
            image, label = common.phantom3d_case(rng)
            image, label, spacing = image * 100 + 300, label * 255, (0.625, 0.625, 0.625)
        else:
            image, label = common.phantom2d_volume(rng, int(rng.integers(6, 10)))
            image, label, spacing = np.moveaxis(image, 0, 2) * 800, np.moveaxis(label, 0, 2) * 10, (1.5, 1.5, 8.0)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / f"case{i:03d}_0000.nii.gz")
        if i < n_labeled:
            nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "labelsTr" / f"case{i:03d}.nii.gz")
    print(f"wrote a synthetic {dims}D nnU-Net folder to {folder}: {n_labeled} labeled, {n_unlabeled} unlabeled cases")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", help="folder with imagesTr/ [labelsTr/ imagesTs/ labelsTs/]")
    p.add_argument("--output", help="data root to create (then --dataset Custom --root_path it)")
    p.add_argument("--write_example", metavar="DIR", help="only write a synthetic NIfTI folder (with --dims) to DIR")
    p.add_argument("--dims", type=int, choices=[2, 3], default=3, help="3: volumes; 2: ACDC-style slices")
    p.add_argument("--modality", choices=["MRI", "CT"], default="MRI")
    p.add_argument("--ct_window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    p.add_argument("--channel", type=int, default=None, help="modality index for 4D or _000K-split images")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="resample to this spacing (mm)")
    p.add_argument("--classes", nargs="+", default=None, help="foreground class names (default class1..)")
    p.add_argument("--patch_size", type=int, nargs="+", default=None, help="default: from the median shape")
    p.add_argument("--val_fraction", type=float, default=0.2, help="labeled cases kept for validation")
    p.add_argument("--test_fraction", type=float, default=None,
                   help="labeled cases kept for test (default 0.2, or 0 when imagesTs/ is given)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.write_example:
        return write_example(a.write_example, a.dims)
    if not (a.input and a.output):
        p.error("--input and --output are required")
    t0 = time.time()
    src, out = Path(a.input), Path(a.output)
    if a.modality == "CT" and a.ct_window is None:
        p.error("--modality CT needs --ct_window LOW HIGH (for example -125 275, as MC-Net's Pancreas)")
    if not (src / "imagesTr").is_dir():
        raise PrepError(f"{src / 'imagesTr'}: folder not found (expected nnU-Net layout: imagesTr/, labelsTr/)")
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise PrepError(f"{out} already holds data: pass --overwrite to replace it, or choose another --output")

    images = find_images(src / "imagesTr", a.channel or 0)
    if not images:
        raise PrepError(f"{src / 'imagesTr'}: no .nii or .nii.gz files")
    labels = nifti_stems(src / "labelsTr") if (src / "labelsTr").is_dir() else {}
    for case, path in labels.items():
        if case not in images:
            raise PrepError(f"{path}: label without an image in {src / 'imagesTr'}")
    cases = read_pairs(images, labels, a.channel)
    test_cases = {}
    if (src / "imagesTs").is_dir():
        ts_labels = nifti_stems(src / "labelsTs") if (src / "labelsTs").is_dir() else {}
        ts_images = find_images(src / "imagesTs", a.channel or 0)
        missing = sorted(set(ts_images) - set(ts_labels))
        if missing:
            raise PrepError(f"{src / 'labelsTs'}: no label for test case(s) {missing[:5]}: test cases need labels")
        test_cases = read_pairs(ts_images, ts_labels, a.channel)
    labeled = [c for c, v in cases.items() if v["label"] is not None]
    if not labeled:
        raise PrepError(f"{src}: no training case has a label (labelsTr/<case>.nii.gz)")

    # label mapping: sorted distinct values -> 0..C-1
    values = sorted(set().union(*[np.unique(v["label"]).tolist() for v in {**cases, **test_cases}.values()
                                  if v["label"] is not None]))
    n_classes = len(a.classes) + 1 if a.classes else len(values)
    if len(values) > n_classes:
        raise PrepError(f"labels hold {len(values)} distinct values {values}, more than the {n_classes} classes "
                        f"of --classes {a.classes}")
    if n_classes < 2:
        raise PrepError(f"labels hold only the value {values}: nothing to segment")
    mapping = {int(v): i for i, v in enumerate(values)}
    class_names = a.classes or [f"class{i}" for i in range(1, n_classes)]
    lut_lo = min(values)
    lut = np.zeros(max(values) - lut_lo + 1, np.uint8)
    for v, i in mapping.items():
        lut[v - lut_lo] = i

    test_fraction = a.test_fraction if a.test_fraction is not None else (0.0 if test_cases else 0.2)
    train_l, val, test = split_cases(labeled, a.seed, a.val_fraction, test_fraction)
    unlabeled = sorted(c for c in cases if cases[c]["label"] is None)
    all_cases = {**cases, **test_cases}
    test = test + sorted(test_cases)

    # convert in memory first, then write into a temporary folder renamed into place
    converted = {}
    for case, v in tqdm(sorted(all_cases.items()), desc="converting"):
        image, label = v["image"], v["label"]
        if a.spacing:
            image, label = resample(image, label, v["spacing"], a.spacing)
        image = normalise(image, a.modality, a.ct_window, a.dims).astype(np.float32)
        label = None if label is None else lut[label - lut_lo]
        converted[case] = (image, label)
    shapes = [im.shape for im, _ in converted.values()]
    patch = a.patch_size or default_patch([s[:2] for s in shapes] if a.dims == 2 else shapes, a.dims)
    if len(patch) != a.dims:
        p.error(f"--patch_size needs {a.dims} numbers")

    split = {"train": train_l, "unlabeled": unlabeled, "val": val, "test": test}
    record = {
        "name": out.name, "created_by": "prepare_data.py", "dims": a.dims, "num_classes": n_classes,
        "class_names": class_names, "label_mapping": {str(k): v for k, v in mapping.items()},
        "modality": a.modality, "ct_window": a.ct_window,
        "normalisation": "min-max to [0, 1] per volume" if a.dims == 2 else
        ("clip to ct_window, then z-score per volume" if a.modality == "CT" else "z-score per volume"),
        "spacing": a.spacing or "unchanged", "patch_size": patch,
        "stride": [max(1, q // 2) for q in patch] if a.dims == 3 else None,
        "seed": a.seed, "val_fraction": a.val_fraction, "test_fraction": test_fraction,
        "counts": {"labeled_train": len(train_l), "unlabeled": len(unlabeled), "val": len(val), "test": len(test)},
        "split": split,
        "cases": {c: {"shape": list(converted[c][0].shape), "source_spacing": all_cases[c]["spacing"],
                      "source": all_cases[c]["source"], "labeled": converted[c][1] is not None,
                      "label_counts": None if converted[c][1] is None else
                      np.bincount(converted[c][1].ravel(), minlength=n_classes).tolist()}
                  for c in sorted(converted)},
        "args": vars(a),
    }
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_dataset(tmp, record, converted)
    except BaseException:  # Ctrl-C or a full disk: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)  # --overwrite (checked above)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    print_summary(record, out, time.time() - t0)


def write_dataset(tmp, record, converted):
    """h5 files, list files and dataset.json into tmp (3D: <case>.h5; 2D: the ACDC layout)."""
    split = record["split"]
    train_order = split["train"] + split["unlabeled"]
    lists = {"labeled.list": split["train"], "unlabeled.list": split["unlabeled"], "train.list": train_order,
             "val.list": split["val"], "test.list": split["test"]}
    if record["dims"] == 3:
        for case, (image, label) in converted.items():
            common.write_h5(tmp / f"{case}.h5", image, label)
    else:
        slices = []
        for case in train_order:
            image, label = converted[case]
            for k in range(image.shape[2]):
                slices.append(f"{case}_slice_{k + 1}")
                common.write_h5(tmp / "data" / "slices" / f"{slices[-1]}.h5", image[:, :, k],
                         None if label is None else label[:, :, k])
        for case in split["val"] + split["test"]:
            image, label = converted[case]
            common.write_h5(tmp / "data" / f"{case}.h5", np.moveaxis(image, 2, 0), np.moveaxis(label, 2, 0))
        lists["train_slices.list"] = slices
    for name, entries in lists.items():
        (tmp / name).write_text("".join(f"{e}\n" for e in entries))
    (tmp / "dataset.json").write_text(json.dumps(record, indent=1))


def print_summary(record, out, seconds):
    print(f"\n{'case':<24}{'split':<11}{'shape':<18}{'source spacing':<22}label counts")
    split_of = {c: s for s, cs in record["split"].items() for c in cs}
    for c, info in record["cases"].items():
        sp = "x".join(f"{z:.3g}" for z in info["source_spacing"])
        print(f"{c:<24}{split_of[c]:<11}{'x'.join(map(str, info['shape'])):<18}{sp:<22}{info['label_counts'] or '-'}")
    mapping = {int(k): v for k, v in record["label_mapping"].items()}
    print(f"\nlabel mapping (file value -> class): {mapping}; classes "
          f"{['background'] + record['class_names']}")
    n = record["counts"]
    print(f"{n['labeled_train']} labeled training, {n['unlabeled']} unlabeled, {n['val']} val, {n['test']} test "
          f"cases; patch {record['patch_size']}; written to {out} in {seconds:.1f} s")
    print(f"train with: python train_supervised.py --dataset Custom --root_path {out} --labeled_num {n['labeled_train']}")


if __name__ == "__main__":
    common.cli(main)
