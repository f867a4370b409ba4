"""Sections 1-5 of the shared code: data set registry, reading, transforms, sampling, phantoms.
Scripts import them through `common` (which re-exports everything here); conventions and sources:
docs/protocol.md (comments cite the protocol specification as "protocol §n", listed there)."""
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

REPO = Path(__file__).resolve().parent


# =============================================================================================
# 1. Data set registry
# =============================================================================================
@dataclass(frozen=True)
class DatasetInfo:
    name: str
    dims: int                      # 2: slice-wise training (ACDC layout), 3: volumes
    num_classes: int               # including background
    class_names: tuple             # foreground classes 1..num_classes-1
    layout: str                    # how a case name maps to a file: see case_path()
    lists: dict                    # split -> list file, relative to the root
    patch_size: tuple
    stride: tuple = None           # 3D sliding-window stride
    labeled_unit: str = "cases"    # what --labeled_num counts: "cases" (files), or slices grouped by
                                   # "patients" (ACDC: both frames) or "volumes" (Custom 2D)
    labeled_num: int = 8           # default --labeled_num
    val_split: str = None          # split used for model selection during training (None: none)
    network: str = "VNet"          # default segmentation network of the field for this data set
    batch_size: int = 4
    labeled_bs: int = 2
    max_iterations: int = 15000
    how_to_get: str = ""
    phantom: bool = False
    unlabeled_cases: bool = False  # training cases may have no label (Custom data from prepare_data.py)

    @property
    def default_root(self):
        return REPO / "data" / self.name


DATASETS = {d.name: d for d in [
    DatasetInfo(  # protocol §1; MC-Net/SS-Net/BCP recipe (15k iterations, batch 4 with 2 labeled)
        name="LA", dims=3, num_classes=2, class_names=("LA",), layout="la",
        lists={"train": "train.list", "test": "test.list"}, patch_size=(112, 112, 80), stride=(18, 18, 4),
        labeled_num=8, how_to_get="the UA-MT release: `yulequan/UA-MT: data/` (2018LA_Seg_Training Set "
        "with train.list and test.list beside it)"),
    DatasetInfo(  # protocol §2.1 (MC-Net protocol)
        name="Pancreas", dims=3, num_classes=2, class_names=("pancreas",), layout="pancreas",
        lists={"train": "train.list", "test": "test.list"}, patch_size=(96, 96, 96), stride=(16, 16, 16),
        labeled_num=6, how_to_get="MC-Net's Pancreas_h5 files and lists (`ycwu1997/MC-Net: data/Pancreas`)"),
    DatasetInfo(  # protocol §3 (SSL4MIS BraTS 2019, whole tumour, FLAIR)
        name="BraTS2019", dims=3, num_classes=2, class_names=("WT",), layout="brats",
        lists={"train": "train.txt", "val": "val.txt", "test": "test.txt"}, patch_size=(96, 96, 96),
        stride=(64, 64, 64), labeled_num=25, val_split="val", network="UNet", max_iterations=30000,
        how_to_get="the SSL4MIS BraTS2019 h5 files (`HiLab-git/SSL4MIS: data/BraTS2019`, see its README)"),
    DatasetInfo(  # protocol §4 (SSL4MIS ACDC)
        name="ACDC", dims=2, num_classes=4, class_names=("RV", "Myo", "LV"), layout="acdc",
        lists={"train": "train_slices.list", "val": "val.list", "test": "test.list"}, patch_size=(256, 256),
        labeled_unit="patients", labeled_num=7, val_split="val", network="UNet", batch_size=24, labeled_bs=12,
        max_iterations=30000, how_to_get="the SSL4MIS ACDC h5 files (`HiLab-git/SSL4MIS: data/ACDC`)"),
    DatasetInfo(  # built-in, generated on first use (section 5); LA layout, binary
        name="Phantom3D", dims=3, num_classes=2, class_names=("target",), layout="la",
        lists={"train": "train.list", "test": "test.list"}, patch_size=(64, 64, 32), stride=(16, 16, 8),
        labeled_num=2, max_iterations=300, phantom=True),
    DatasetInfo(  # built-in, generated on first use (section 5); ACDC layout, 4 classes
        name="Phantom2D", dims=2, num_classes=4, class_names=("RV", "Myo", "LV"), layout="acdc",
        lists={"train": "train_slices.list", "val": "val.list", "test": "test.list"}, patch_size=(96, 96),
        labeled_unit="patients", labeled_num=2, val_split="val", network="UNet", batch_size=8, labeled_bs=4,
        max_iterations=300, phantom=True),
]}


def get_dataset(name, root_path=None):
    """The registry entry; for --dataset Custom, built from the dataset.json in --root_path."""
    canonical = {n.lower(): n for n in [*DATASETS, "Custom"]}.get(str(name).lower())  # --dataset acdc is ACDC
    if canonical == "Custom":
        return custom_dataset(root_path)
    if canonical is None:
        raise DataError(f"--dataset {name!r} is unknown; choose one of {', '.join(DATASETS)}, Custom")
    return DATASETS[canonical]


def custom_dataset(root_path):
    """Registry entry of a data set written by prepare_data.py, from its dataset.json: dims, classes,
    patch and stride; the field's network and batch for its dims (V-Net 2+2 in 3D, U-Net 12+12 in 2D)."""
    if root_path is None:
        raise DataError("--dataset Custom needs --root_path DIR, a folder written by prepare_data.py")
    record_path = Path(root_path) / "dataset.json"
    if not record_path.is_file():
        raise DataError(f"{record_path} not found: --dataset Custom reads the record prepare_data.py writes "
                        f"(python prepare_data.py --input NIFTI_DIR --output {root_path})")
    r = json.loads(record_path.read_text())
    dims = r["dims"]
    return DatasetInfo(
        name="Custom", dims=dims, num_classes=r["num_classes"], class_names=tuple(r["class_names"]),
        layout="custom" if dims == 3 else "acdc",
        lists={"train": "train.list" if dims == 3 else "train_slices.list", "val": "val.list", "test": "test.list"},
        patch_size=tuple(r["patch_size"]), stride=tuple(r["stride"]) if r.get("stride") else None,
        labeled_unit="cases" if dims == 3 else "volumes", labeled_num=max(1, r["counts"]["labeled_train"]),
        val_split="val" if r["counts"]["val"] else None, network="VNet" if dims == 3 else "UNet",
        batch_size=4 if dims == 3 else 24, labeled_bs=2 if dims == 3 else 12, max_iterations=6000,
        how_to_get="a folder written by prepare_data.py", unlabeled_cases=True)


# =============================================================================================
# 2. Reading
# =============================================================================================
class DataError(ValueError):
    """A problem with the data or with the flags that select it; the message names the file or flag.
    Scripts run under common.cli(), which prints it as one line instead of a traceback."""


def resolve_root(info, root_path=None):
    root = Path(root_path) if root_path else info.default_root
    if info.phantom and root_path and not (root / info.lists["train"]).is_file():
        raise DataError(f"--root_path {root} holds no {info.name} (no {info.lists['train']}): the phantom is generated "
                        f"on first use in {info.default_root} only; omit --root_path")
    if info.phantom:
        ensure_phantom(info, root)
    if not root.is_dir():
        raise DataError(f"data root {root} for --dataset {info.name} does not exist. Get {info.how_to_get} "
                        f"and place it there, or pass --root_path DIR.")
    return root


def read_list(info, root, split):
    if split not in info.lists:
        raise DataError(f"--dataset {info.name} has no {split!r} split (it has {', '.join(info.lists)})")
    path = Path(root) / info.lists[split]
    if not path.is_file():
        others = [s for s in info.lists if s != split and s != "train" and (Path(root) / info.lists[s]).is_file()]
        hint = f" This copy has the {others[0]!r} split: --split {others[0]}." if others else f" Get {info.how_to_get}."
        raise DataError(f"list file {path} not found: --dataset {info.name} expects {info.lists[split]} "
                        f"in its root {root}.{hint}")
    names = [line.strip().split(",")[0] for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"list file {path} is empty")
    return names


def case_path(info, root, name, split):
    root = Path(root)
    if info.layout == "la":
        return root / "2018LA_Seg_Training Set" / name / "mri_norm2.h5"
    if info.layout == "pancreas":
        return root / "Pancreas_h5" / f"{name}_norm.h5"
    if info.layout == "custom":
        return root / f"{name}.h5"
    if info.layout == "brats":
        return root / "data" / f"{name}.h5"
    if info.layout == "acdc":  # training slices in data/slices/, or flat in data/ in some copies
        if split == "train" and (root / "data" / "slices" / f"{name}.h5").is_file():
            return root / "data" / "slices" / f"{name}.h5"
        return root / "data" / f"{name}.h5"
    raise ValueError(f"unknown layout {info.layout!r}")


def read_case(path, num_classes, ndim, require_label=True):
    """Read and validate one h5 case: float32 image and uint8 label of the same shape. With
    require_label=False a file holding only `image` is an unlabeled case: label None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (named in the list file)")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f and (k == "image" or require_label)]
            if missing:
                raise DataError(f"{path}: no {' or '.join(missing)} dataset (keys: {list(f.keys())})")
            image = f["image"][...].astype(np.float32)
            label = f["label"][...] if "label" in f else None
    except (OSError, KeyError, ValueError, TypeError) as e:  # h5py's errors for truncated or non-HDF5 files
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot be read as an HDF5 case ({str(e).splitlines()[0]}); replace the file "
                        f"(a truncated download or copy?)") from None
    if label is None:
        if image.ndim != ndim:
            raise DataError(f"{path}: expected a {ndim}D array, got shape {image.shape}")
        return image, None
    if image.shape != label.shape:
        raise DataError(f"{path}: image shape {image.shape} and label shape {label.shape} differ")
    if image.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}D array, got shape {image.shape}")
    lo, hi = label.min(), label.max()
    if lo < 0 or hi >= num_classes or not np.array_equal(label, np.round(label)):
        raise DataError(f"{path}: label values must be integers in [0, {num_classes}); found min {lo}, max {hi}")
    return image, label.astype(np.uint8)


def load_cases(info, root, split, names=None, progress=False):
    """[(name, image, label)] for a split; 2D data sets' val/test cases are (slices, H, W) volumes."""
    names = names or read_list(info, root, split)
    ndim = 2 if (info.dims == 2 and split == "train") else 3
    unlabeled_ok = info.unlabeled_cases and split == "train"  # val/test cases always need labels
    # the bar is closed on an error too, so the error line is the last thing printed
    with tqdm(names, desc=f"reading {info.name} {split}", leave=False, disable=not progress) as it:
        return [(n, *read_case(case_path(info, root, n, split), info.num_classes, ndim, not unlabeled_ok))
                for n in it]


class SegDataset(Dataset):
    """Training cases (3D volumes or 2D slices) with a transform; decoded once into memory.

    An index is an int or an (int, seed) pair as TwoStreamBatchSampler yields: the seed makes the
    augmentation of that draw a function of the sampler alone, so results do not depend on the
    number of loader workers and a resumed run replays the same crops.
    """

    def __init__(self, info, root, split="train", transform=None, names=None):
        self.info, self.transform = info, transform
        self.cases = load_cases(info, root, split, names, progress=True)
        self.names = [c[0] for c in self.cases]
        self.has_label = [c[2] is not None for c in self.cases]

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        _, image, label = self.cases[index]
        labeled = label is not None
        if not labeled:  # an unlabeled case: transform a dummy label, hand out -1 (never a class)
            label = np.zeros(image.shape, np.uint8)
        if self.transform is not None:
            image, label = self.transform(image, label, np.random.default_rng(seed))
        label = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                "label": label if labeled else torch.full_like(label, -1), "index": index}


# =============================================================================================
# 3. Transforms: (image, label, rng) -> (image, label); image and label always move together
# =============================================================================================
def random_rot_flip(image, label, rng):
    """k quarter turns in the plane of the first two axes, then one flip along axis 0 or 1 (protocol §1.4)."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
    return np.flip(image, axis=axis).copy(), np.flip(label, axis=axis).copy()


def pad_to_patch(image, label, patch):
    """UA-MT/MC-Net/SSL4MIS `RandomCrop` padding: once any axis is <= its patch size, zero-pad *every*
    axis by max((patch - size) // 2 + 3, 0) on both sides (floor division, so an axis up to 5 voxels
    larger than its patch is padded too). Shape 100x97x90, patch 96^3 -> 102x101x102."""
    if all(s > p for s, p in zip(image.shape, patch)):
        return image, label
    pad = [(max((p - s) // 2 + 3, 0),) * 2 for s, p in zip(image.shape, patch)]
    return np.pad(image, pad), np.pad(label, pad)


def random_crop(image, label, patch, rng):
    """Random patch; the corner is drawn from 0..size-patch-1 as the anchors do (the last offset never)."""
    image, label = pad_to_patch(image, label, patch)
    corner = [int(rng.integers(0, s - p)) for s, p in zip(image.shape, patch)]
    sl = tuple(slice(c, c + p) for c, p in zip(corner, patch))
    return image[sl], label[sl]


def center_crop(image, label, patch):
    image, label = pad_to_patch(image, label, patch)
    corner = [int(round((s - p) / 2.0)) for s, p in zip(image.shape, patch)]
    sl = tuple(slice(c, c + p) for c, p in zip(corner, patch))
    return image[sl], label[sl]


def random_rotate_2d(image, label, rng):
    """Rotation by an integer angle in [-20, 19] degrees, nearest neighbour, same size (SSL4MIS)."""
    angle = int(rng.integers(-20, 20))
    return (ndimage.rotate(image, angle, order=0, reshape=False),
            ndimage.rotate(label, angle, order=0, reshape=False))


def zoom_to(array, size, order=0):
    """Resize a 2D array to `size` with SciPy zoom (order 0 for image and label, as SSL4MIS)."""
    out = ndimage.zoom(array, [t / s for t, s in zip(size, array.shape)], order=order)
    if out.shape != tuple(size):
        raise ValueError(f"zoom of {array.shape} to {size} gave {out.shape}")
    return out


class Transform3D:
    """Training augmentation of the 3D anchors: optional random rot90/flip, then a random crop."""

    def __init__(self, patch_size, rot_flip=True):
        self.patch_size, self.rot_flip = tuple(patch_size), rot_flip

    def __call__(self, image, label, rng):
        if self.rot_flip:
            image, label = random_rot_flip(image, label, rng)
        return random_crop(image, label, self.patch_size, rng)


# ---- UC-Seg's ACDC pipeline (albumentations in its code), written with scipy; parameters named after the calls ----
def shift_scale_rotate(image, label, rng, shift_limit=0.0625, scale_limit=0.05, rotate_limit=10):
    """`ShiftScaleRotate`: rotation by U(-rotate_limit, rotate_limit) degrees and zoom by 1 + U(-scale_limit,
    scale_limit) about the centre, then a shift by U(-shift_limit, shift_limit) of each side; image linear,
    label nearest, reflect-101 border (cv2's default there, scipy's 'mirror')."""
    angle = rng.uniform(-rotate_limit, rotate_limit)
    scale = 1.0 + rng.uniform(-scale_limit, scale_limit)
    dx, dy = rng.uniform(-shift_limit, shift_limit), rng.uniform(-shift_limit, shift_limit)
    h, w = image.shape
    a = math.radians(angle)
    # output (row, col) = S R (input - c) + c + t; affine_transform wants input = M out + offset
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * scale  # sign immaterial: U(-l, l)
    inv = np.linalg.inv(rot)
    c, t = np.array([(h - 1) / 2, (w - 1) / 2]), np.array([dy * h, dx * w])
    offset = c - inv @ (c + t)
    image = ndimage.affine_transform(image, inv, offset, order=1, mode="mirror")
    label = ndimage.affine_transform(label, inv, offset, order=0, mode="mirror")
    return image, label


def grid_distortion(image, label, rng, num_steps=5, distort_limit=0.05):
    """`GridDistortion`: the image is cut into num_steps cells per axis and each cell's width (height) is
    scaled by 1 + U(-distort_limit, distort_limit); image linear, label nearest, reflect-101 border."""
    coords = []
    for size in image.shape:
        step, steps = size // num_steps, 1 + rng.uniform(-distort_limit, distort_limit, num_steps + 1)
        grid, prev = np.zeros(size, np.float64), 0.0
        for i in range(num_steps + 1):
            start, end = i * step, min(i * step + step, size)
            cur = size if i * step + step > size else prev + step * steps[i]
            grid[start:end] = np.linspace(prev, cur, end - start)
            prev = cur
        coords.append(grid)
    rows, cols = np.meshgrid(*coords, indexing="ij")
    return (ndimage.map_coordinates(image, [rows, cols], order=1, mode="mirror"),
            ndimage.map_coordinates(label, [rows, cols], order=0, mode="mirror"))


def elastic(image, label, rng, alpha=1.0, sigma=50.0):
    """`ElasticTransform` without its affine part: a displacement field of uniform noise in [-1, 1]
    smoothed by a Gaussian of sigma and scaled by alpha, per axis (at alpha 1, sigma 50 it moves pixels by
    hundredths of a pixel: the official setting is nearly the identity)."""
    rows, cols = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in image.shape], indexing="ij")
    d = [alpha * ndimage.gaussian_filter(rng.uniform(-1, 1, image.shape), sigma, mode="constant") for _ in range(2)]
    return (ndimage.map_coordinates(image, [rows + d[0], cols + d[1]], order=1, mode="mirror"),
            ndimage.map_coordinates(label, [rows + d[0], cols + d[1]], order=0, mode="mirror"))


def coarse_dropout(image, label, rng, min_holes=5, max_holes=8, size_fraction=1 / 20):
    """`CoarseDropout(max_holes=8, min_holes=5, max_height=H // 20, max_width=W // 20, fill_value=0,
    mask_fill_value=0)`: 5 to 8 holes of exactly (H // 20) x (W // 20) pixels (the minimum sizes default
    to the maximum), anywhere inside, set to 0 in the image and to background in the label."""
    image, label = image.copy(), label.copy()
    hh, hw = max(1, int(image.shape[0] * size_fraction)), max(1, int(image.shape[1] * size_fraction))
    for _ in range(int(rng.integers(min_holes, max_holes + 1))):
        y, x = int(rng.integers(0, image.shape[0] - hh + 1)), int(rng.integers(0, image.shape[1] - hw + 1))
        image[y:y + hh, x:x + hw], label[y:y + hh, x:x + hw] = 0, 0
    return image, label


def ucseg_acdc_augment(image, label, rng):
    """UC-Seg's ACDC training pipeline after the resize: horizontal flip (p 0.5), vertical flip (p 0.5),
    ShiftScaleRotate (p 0.5), one of GridDistortion / ElasticTransform (p 0.25), CoarseDropout (p 0.5)."""
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < 0.5:
        image, label = image[::-1], label[::-1]
    image, label = np.ascontiguousarray(image), np.ascontiguousarray(label)
    if rng.random() < 0.5:
        image, label = shift_scale_rotate(image, label, rng)
    if rng.random() < 0.25:
        image, label = (grid_distortion if rng.random() < 0.5 else elastic)(image, label, rng)
    if rng.random() < 0.5:
        image, label = coarse_dropout(image, label, rng)
    return image, label


PIPELINES_2D = ("ssl4mis", "three_way", "ucseg")


class Transform2D:
    """The 2D `RandomGenerator`s, then a nearest zoom to the patch (protocol §4.3). Pipelines:
    'ssl4mis' (SSL4MIS): rot90+flip with p 1/2, else a random rotation: every draw is changed;
    'three_way' (ICL's and UniMatch's copies): rot90+flip with p 1/2, else a rotation with p 1/2, else
    nothing: rotations 1/4 and unchanged 1/4 of the draws;
    'ucseg' (UC-Seg's albumentations pipeline): nearest resize to the patch first, then
    `ucseg_acdc_augment`."""

    def __init__(self, patch_size, pipeline="ssl4mis"):
        if pipeline not in PIPELINES_2D:
            raise ValueError(f"pipeline must be one of {PIPELINES_2D}, got {pipeline!r}")
        self.patch_size, self.pipeline = tuple(patch_size), pipeline

    def __call__(self, image, label, rng):
        if self.pipeline == "ucseg":
            return ucseg_acdc_augment(zoom_to(image, self.patch_size), zoom_to(label, self.patch_size), rng)
        if rng.random() > 0.5:
            image, label = random_rot_flip(image, label, rng)
        elif self.pipeline == "ssl4mis" or rng.random() > 0.5:
            image, label = random_rotate_2d(image, label, rng)
        return zoom_to(image, self.patch_size), zoom_to(label, self.patch_size)


def train_transform(info, patch_size, rot_flip=None, pipeline="ssl4mis"):
    """The data set's training augmentation. 2D: Transform2D with the named pipeline. 3D: rot90/flip
    then crop (UA-MT), crop only for Pancreas (MC-Net); rot_flip=True/False forces either."""
    if info.dims == 2:
        return Transform2D(patch_size, pipeline)
    return Transform3D(patch_size, rot_flip=info.name != "Pancreas" if rot_flip is None else rot_flip)


# =============================================================================================
# 4. Sampling
# =============================================================================================
class TwoStreamBatchSampler(Sampler):
    """SSL4MIS/UA-MT semantics (protocol §7): each epoch the labeled indices are shuffled once and cut
    into groups of labeled_bs (an incomplete last group is dropped); the unlabeled indices form an
    endless stream of fresh permutations cut into groups of batch_size - labeled_bs; batch k is
    labeled group k followed by unlabeled group k. Length = len(labeled) // labeled_bs.

    Deviation, for reproducibility: permutations come from a generator seeded by (seed, epoch)
    instead of NumPy's global state, and each index is yielded with its own augmentation seed, so
    `set_epoch(epoch, skip)` replays any epoch from any batch (resume). batch_size == labeled_bs
    gives labeled-only batches (the supervised baseline).
    """

    def __init__(self, labeled_indices, unlabeled_indices, batch_size, labeled_bs, seed=0):
        self.labeled, self.unlabeled = list(labeled_indices), list(unlabeled_indices)
        self.labeled_bs, self.unlabeled_bs = labeled_bs, batch_size - labeled_bs
        if labeled_bs < 1 or self.unlabeled_bs < 0:
            raise DataError(f"need 1 <= --labeled_bs <= --batch_size, got {labeled_bs} and {batch_size}")
        if len(self.labeled) < labeled_bs:
            raise DataError(f"{len(self.labeled)} labeled samples cannot fill --labeled_bs {labeled_bs}")
        if self.unlabeled_bs and len(self.unlabeled) < self.unlabeled_bs:
            raise DataError(f"{len(self.unlabeled)} unlabeled samples cannot fill "
                             f"{self.unlabeled_bs} unlabeled slots per batch")
        self.seed, self.epoch, self.skip = seed, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return len(self.labeled) // self.labeled_bs

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        labeled = rng.permutation(self.labeled)
        stream = np.concatenate([rng.permutation(self.unlabeled)
                                 for _ in range(math.ceil(len(self) * self.unlabeled_bs / len(self.unlabeled)))]
                                ) if self.unlabeled_bs else np.zeros(0, dtype=int)
        seeds = rng.integers(0, 2**31, size=(len(self), self.labeled_bs + self.unlabeled_bs))
        for k in range(self.skip, len(self)):
            batch = list(labeled[k * self.labeled_bs:(k + 1) * self.labeled_bs])
            batch += list(stream[k * self.unlabeled_bs:(k + 1) * self.unlabeled_bs])
            yield [(int(i), int(s)) for i, s in zip(batch, seeds[k])]


def patient_of(slice_name):
    """'patient099_frame01_slice_15' -> 'patient099' (both frames of a patient count as one);
    '<case>_slice_3' -> '<case>' for data written by prepare_data.py."""
    if "_frame" in slice_name:
        return slice_name.split("_frame")[0]
    return slice_name.rsplit("_slice_", 1)[0]


def labeled_indices(info, names, labeled_num, has_label=None):
    """Indices of the labeled training samples: the first labeled_num cases (3D), or every slice of
    the first labeled_num patients in list order (2D: ACDC 3/7/14 patients -> 68/136/256 slices).
    has_label[i] False marks a case without a label: it is never counted or chosen."""
    candidates = [i for i in range(len(names)) if has_label is None or has_label[i]]
    kind = "labeled " if has_label is not None and len(candidates) < len(names) else ""
    if labeled_num == "all":
        return candidates
    if info.labeled_unit in ("patients", "volumes"):
        patients = list(dict.fromkeys(patient_of(names[i]) for i in candidates))
        if labeled_num > len(patients):
            raise DataError(f"--labeled_num {labeled_num} is more than the {len(patients)} {kind}{info.labeled_unit} "
                            f"in the {info.name} training list")
        chosen = set(patients[:labeled_num])
        return [i for i in candidates if patient_of(names[i]) in chosen]
    if labeled_num > len(candidates):
        raise DataError(f"--labeled_num {labeled_num} is more than the {len(candidates)} {kind}cases "
                        f"in the {info.name} training list")
    return candidates[:labeled_num]


# =============================================================================================
# 5. Phantoms: small deterministic data sets in the LA and ACDC layouts, generated on first use
# =============================================================================================
def _smooth_field(rng, shape, sigma, amplitude):
    """A smooth random field in [-amplitude, amplitude] (bias field, shape deformation)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return amplitude * f / (np.abs(f).max() + 1e-8)


def _grid(shape):
    return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")


def _blob(grid, center, radii, wobble):
    """Mask of a deformed ellipsoid/ellipse: normalised radius below 1 + a smooth wobble field."""
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))
    return np.sqrt(r2) < 1.0 + wobble


def phantom3d_case(rng):
    """Binary 'atrium': a large deformed ellipsoid with a thin dark wall, among bright distractors of
    the same intensity range (round blobs, half of them walled too, and a tube), on a textured
    background, with a smooth multiplicative bias field and noise; z-scored like the LA files. Only
    size, shape and position tell the target apart."""
    shape = (int(rng.integers(72, 88)), int(rng.integers(68, 80)), 40)
    grid = _grid(shape)
    image = 0.35 + _smooth_field(rng, shape, 3, 0.15)  # textured background tissue
    center = [s / 2 + rng.uniform(-6, 6) for s in shape[:2]] + [shape[2] / 2 + rng.uniform(-3, 3)]
    radii = [rng.uniform(13, 20), rng.uniform(11, 17), rng.uniform(8, 12)]
    wobble = _smooth_field(rng, shape, 6, 0.25)
    target = _blob(grid, center, radii, wobble)
    wall = _blob(grid, center, [r + 2.5 for r in radii], wobble) & ~target
    image[wall] = 0.2
    image[target] = rng.uniform(0.6, 0.8)
    for _ in range(int(rng.integers(3, 7))):  # distractors: bright, overlapping intensities
        c = [rng.uniform(6, s - 6) for s in shape]
        r = rng.uniform(5, 11)
        d = _blob(grid, c, [r] * 3, 0.0) & ~wall & ~target
        if rng.random() < 0.5:  # a dark wall is no unique cue either
            image[_blob(grid, c, [r + 2.5] * 3, 0.0) & ~d & ~wall & ~target] = 0.2
        image[d] = rng.uniform(0.55, 0.85)
    axis_c = [rng.uniform(10, shape[0] - 10), rng.uniform(10, shape[1] - 10)]  # a bright tube along z
    tube = ((grid[0] - axis_c[0]) ** 2 + (grid[1] - axis_c[1]) ** 2 < rng.uniform(9, 25)) & ~wall & ~target
    image[tube] = rng.uniform(0.6, 0.8)
    image *= 1.0 + _smooth_field(rng, shape, 12, 0.3)  # bias field
    image += rng.normal(0, 0.12, shape)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), target.astype(np.uint8)


def phantom2d_volume(rng, n_slices):
    """Cardiac-like 4-class volume: LV disk (3) inside a myocardial ring (2), an RV crescent (1)
    beside it, shrinking towards the apex; bright distractors and a dark ring distractor; bias
    field and noise; min-max to [0, 1] per volume like the ACDC files."""
    h, w = int(rng.integers(88, 120)), int(rng.integers(88, 120))
    grid = _grid((h, w))
    cy, cx = h / 2 + rng.uniform(-8, 8), w / 2 + rng.uniform(-8, 8)
    r_lv, thick = rng.uniform(9, 14), rng.uniform(3, 5)
    rv_angle = rng.uniform(-0.6, 0.6) + np.pi  # RV sits on the left of the LV
    images, labels = [], []
    distractors = [([rng.uniform(8, h - 8), rng.uniform(8, w - 8)], rng.uniform(5, 10))
                   for _ in range(int(rng.integers(4, 7)))]
    for z in range(n_slices):
        scale = 1.0 - 0.5 * z / max(n_slices - 1, 1)  # base to apex
        wobble = _smooth_field(rng, (h, w), 5, 0.12)
        lv = _blob(grid, (cy, cx), (r_lv * scale, r_lv * scale * rng.uniform(0.85, 1.15)), wobble)
        myo = _blob(grid, (cy, cx), ((r_lv + thick) * scale,) * 2, wobble) & ~lv
        rv_c = (cy + np.sin(rv_angle) * (r_lv + thick) * scale, cx + np.cos(rv_angle) * (r_lv + thick) * scale)
        rv = _blob(grid, rv_c, (1.6 * r_lv * scale, 0.8 * r_lv * scale), wobble) & ~lv & ~myo
        image = 0.3 + _smooth_field(rng, (h, w), 2, 0.12)
        label = np.zeros((h, w), np.uint8)
        for mask, cls, level in ((rv, 1, rng.uniform(0.65, 0.8)), (myo, 2, rng.uniform(0.15, 0.25)),
                                 (lv, 3, rng.uniform(0.7, 0.85))):
            image[mask], label[mask] = level, cls
        for c, r in distractors:  # bright round structures (aorta, stomach): same range as the cavities
            d = _blob(grid, c, (r, r), 0.0) & (label == 0)
            image[d] = rng.uniform(0.65, 0.85)
        ring = _blob(grid, distractors[0][0], (distractors[0][1] + 3,) * 2, 0.0) & (label == 0) & (image < 0.6)
        image[ring] = 0.2  # a dark ring like the myocardium around a distractor
        image *= 1.0 + _smooth_field(rng, (h, w), 10, 0.25)
        image += rng.normal(0, 0.06, (h, w))
        images.append(image)
        labels.append(label)
    image = np.stack(images)
    image = (image - image.min()) / (image.max() - image.min())
    return image.astype(np.float32), np.stack(labels)


def write_h5(path, image, label=None):
    """One case in this repository's h5 format: gzip `image` (float32) and, if given, `label` (uint8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.asarray(image, np.float32), compression="gzip")
        if label is not None:
            f.create_dataset("label", data=np.asarray(label, np.uint8), compression="gzip")


def generate_phantom(info, root, seed=2024):
    """Write a phantom data set into root (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    lists = {}
    if info.dims == 3:  # LA layout: 16 training and 4 test cases
        names = [f"case{i:03d}" for i in range(20)]
        for n in names:
            write_h5(case_path(info, root, n, "train"), *phantom3d_case(rng))
        lists = {"train.list": names[:16], "test.list": names[16:]}
    else:  # ACDC layout: 12 training patients as slices, 3 val and 3 test patients as volumes
        train_vols, slices, vols = [], [], {"val.list": [], "test.list": []}
        for p in range(18):
            split = "train.list" if p < 12 else ("val.list" if p < 15 else "test.list")
            n_slices = int(rng.integers(6, 11))
            for frame in (1, 2):
                name = f"patient{p + 1:03d}_frame{frame:02d}"
                image, label = phantom2d_volume(rng, n_slices)
                if split == "train.list":
                    train_vols.append(name)
                    for k in range(n_slices):  # slice numbers count from 1, as the ACDC lists
                        slices.append(f"{name}_slice_{k + 1}")
                        write_h5(root / "data" / "slices" / f"{slices[-1]}.h5", image[k], label[k])
                else:
                    vols[split].append(name)
                    write_h5(root / "data" / f"{name}.h5", image, label)
        lists = {"train_slices.list": slices, "train.list": train_vols, **vols}
    for fname, names in lists.items():
        (root / fname).write_text("\n".join(names) + "\n")


def ensure_phantom(info, root):
    """Generate the phantom into root once (atomically: a temporary folder renamed into place)."""
    root = Path(root)
    if (root / info.lists["train"]).is_file():
        return
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    print(f"generating the {info.name} phantom into {root} (once) ...", file=sys.stderr)
    generate_phantom(info, tmp)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process generated it first
        shutil.rmtree(tmp, ignore_errors=True)


