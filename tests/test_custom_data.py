"""prepare_data.py round trips on synthetic NIfTI folders (3D binary, 2D multi-class, some cases
without labels), the Custom registry entry, unlabeled cases, and every bad-input error."""
import json
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest

import common
import prepare_data
from conftest import REPO, run


def nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), path)


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def example3d(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ex3d")
    prepare_data.write_example(tmp / "nifti", 3)
    prepare_data.main(["--input", str(tmp / "nifti"), "--output", str(tmp / "root"), "--seed", "3"])
    return tmp


def test_3d_conversion_mapping_normalisation_and_unlabeled_cases(example3d):
    root = example3d / "root"
    record = json.loads((root / "dataset.json").read_text())
    assert record["label_mapping"] == {"0": 0, "255": 1} and record["num_classes"] == 2
    assert record["counts"] == {"labeled_train": 6, "unlabeled": 4, "val": 2, "test": 2}
    lists = {n: (root / f"{n}.list").read_text().split() for n in ("labeled", "unlabeled", "train", "val", "test")}
    assert lists["train"] == lists["labeled"] + lists["unlabeled"]
    assert lists["unlabeled"] == ["case010", "case011", "case012", "case013"]  # the cases without labelsTr/
    assert not set(lists["val"] + lists["test"]) & set(lists["train"])
    # normalisation and mapping against values computed here from the source files
    case = lists["labeled"][0]
    src = np.asarray(nib.load(example3d / "nifti" / "imagesTr" / f"{case}_0000.nii.gz").dataobj, np.float64)
    src_label = np.asarray(nib.load(example3d / "nifti" / "labelsTr" / f"{case}.nii.gz").dataobj)
    with h5py.File(root / f"{case}.h5") as f:
        np.testing.assert_allclose(f["image"][...], (src - src.mean()) / src.std(), atol=1e-4)
        assert np.array_equal(f["label"][...], (src_label == 255).astype(np.uint8))
    with h5py.File(root / "case010.h5") as f:
        assert list(f.keys()) == ["image"]  # an unlabeled case holds no label at all


def test_custom_registry_and_labeled_num_counts_labeled_cases_only(example3d):
    root = example3d / "root"
    info = common.get_dataset("Custom", root)
    assert (info.dims, info.num_classes, info.class_names) == (3, 2, ("class1",))
    assert info.patch_size == tuple(json.loads((root / "dataset.json").read_text())["patch_size"])
    ds = common.SegDataset(info, root, "train", common.Transform3D((32, 32, 16)))
    assert ds.has_label == [True] * 6 + [False] * 4
    assert common.labeled_indices(info, ds.names, 3, ds.has_label) == [0, 1, 2]
    assert common.labeled_indices(info, ds.names, "all", ds.has_label) == list(range(6))
    with pytest.raises(common.DataError, match="--labeled_num 7 is more than the 6 labeled cases"):
        common.labeled_indices(info, ds.names, 7, ds.has_label)
    item = ds[(8, 5)]
    assert item["image"].shape == (1, 32, 32, 16) and (item["label"] == -1).all()  # never a class
    with pytest.raises(common.DataError, match="--dataset Custom needs --root_path"):
        common.get_dataset("Custom")
    with pytest.raises(common.DataError, match="dataset.json not found"):
        common.get_dataset("Custom", example3d)


def test_3d_round_trip_train_and_test(example3d, tmp_path):
    root = example3d / "root"
    run("train_supervised.py", "--dataset", "Custom", "--root_path", root, "--labeled_num", "2",
        "--max_iterations", "2", "--patch_size", "32", "32", "16", "--num_workers", "0", "--model_dir", tmp_path)
    out = run("test_3d.py", "--ckpt", tmp_path / "Custom_run_2_labeled" / "supervised" / "last.pth")
    test_cases = (root / "test.list").read_text().split()
    assert all(c in out for c in test_cases) and "cases 2" in out


def test_2d_round_trip_with_remapped_classes(tmp_path):
    prepare_data.write_example(tmp_path / "nifti", 2)
    prepare_data.main(["--input", str(tmp_path / "nifti"), "--output", str(tmp_path / "root"), "--dims", "2",
                       "--classes", "RV", "Myo", "LV"])
    root = tmp_path / "root"
    record = json.loads((root / "dataset.json").read_text())
    assert record["label_mapping"] == {"0": 0, "10": 1, "20": 2, "30": 3}
    slices = (root / "train_slices.list").read_text().split()
    assert slices[0].endswith("_slice_1") and (root / "data" / "slices" / f"{slices[0]}.h5").is_file()
    val_case = (root / "val.list").read_text().split()[0]
    src = np.asarray(nib.load(tmp_path / "nifti" / "imagesTr" / f"{val_case}_0000.nii.gz").dataobj, np.float64)
    with h5py.File(root / "data" / f"{val_case}.h5") as f:
        image = f["image"][...]
        assert image.shape == (src.shape[2], src.shape[0], src.shape[1])  # (slices, H, W) as ACDC volumes
        np.testing.assert_allclose(image, np.moveaxis((src - src.min()) / (src.max() - src.min()), 2, 0), atol=1e-6)
        assert set(np.unique(f["label"][...])) == {0, 1, 2, 3}
    info = common.get_dataset("Custom", root)
    assert info.dims == 2 and info.class_names == ("RV", "Myo", "LV")
    run("train_supervised.py", "--dataset", "Custom", "--root_path", root, "--labeled_num", "2", "--max_iterations",
        "2", "--patch_size", "32", "32", "--batch_size", "2", "--labeled_bs", "2", "--num_workers", "0",
        "--model_dir", tmp_path / "m")
    out = run("test_2d.py", "--ckpt", tmp_path / "m" / "Custom_run_2_labeled" / "supervised" / "last.pth")
    assert "LV     dice" in out and "cases 2" in out
    # a semi-supervised method on the same data: the unlabeled cases (no label) feed its unlabeled stream
    run("train_cifp.py", "--dataset", "Custom", "--root_path", root, "--labeled_num", "2", "--max_iterations", "2",
        "--patch_size", "32", "32", "--batch_size", "4", "--labeled_bs", "2", "--num_workers", "0",
        "--model_dir", tmp_path / "m")
    out = run("test_2d.py", "--ckpt", tmp_path / "m" / "Custom_run_2_labeled" / "cifp" / "last.pth")
    assert "cifp on Custom test" in out and "cases 2" in out


def test_resampling_to_a_target_spacing(tmp_path):
    image = np.random.default_rng(0).random((20, 20, 10)).astype(np.float32)
    label = np.zeros((20, 20, 10), np.uint8)
    label[5:15, 5:15, 2:8] = 1
    for i in range(3):
        nifti(tmp_path / "in" / "imagesTr" / f"c{i}.nii.gz", image, (1.0, 1.0, 2.0))
        nifti(tmp_path / "in" / "labelsTr" / f"c{i}.nii.gz", label, (1.0, 1.0, 2.0))
    prepare_data.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--spacing", "1", "1", "1",
                       "--val_fraction", "0", "--test_fraction", "0"])
    with h5py.File(tmp_path / "out" / "c0.h5") as f:
        assert f["image"].shape == (20, 20, 20) and f["label"][...].sum() == 10 * 10 * 12


def make_input(tmp_path, n=3, shape=(8, 8, 4)):
    for i in range(n):
        nifti(tmp_path / "in" / "imagesTr" / f"c{i}.nii.gz", np.random.default_rng(i).random(shape).astype(np.float32))
        lab = np.zeros(shape, np.uint8)
        lab[2:5, 2:5, 1:3] = 1
        nifti(tmp_path / "in" / "labelsTr" / f"c{i}.nii.gz", lab)
    return tmp_path / "in"


def run_prep(tmp_path, *extra):
    prepare_data.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--val_fraction", "0",
                       "--test_fraction", "0", *extra])


@pytest.mark.parametrize("breakage,message", [
    (lambda d: nifti(d / "labelsTr" / "c1.nii.gz", np.zeros((8, 8, 5), np.uint8)), r"labelsTr/c1\.nii\.gz: label shape"),
    (lambda d: nifti(d / "labelsTr" / "c1.nii.gz", np.zeros((8, 8, 4), np.uint8), (2, 1, 1)), r"c1\.nii\.gz: affine differs"),
    (lambda d: nifti(d / "labelsTr" / "c9.nii.gz", np.zeros((8, 8, 4), np.uint8)), r"c9\.nii\.gz: label without an image"),
    (lambda d: nifti(d / "labelsTr" / "c1.nii.gz", np.full((8, 8, 4), 0.5, np.float32)), r"c1\.nii\.gz: label values must be integers"),
    (lambda d: nifti(d / "imagesTr" / "c1.nii.gz", np.zeros((8, 8, 4, 2), np.float32)), r"c1\.nii\.gz: 4D image .* --channel"),
])
def test_bad_inputs_name_the_file_and_write_nothing(tmp_path, breakage, message):
    breakage(make_input(tmp_path))
    with pytest.raises(common.DataError, match=message):
        run_prep(tmp_path)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_more_label_values_than_classes(tmp_path):
    d = make_input(tmp_path)
    nifti(d / "labelsTr" / "c2.nii.gz", np.full((8, 8, 4), 2, np.uint8))
    with pytest.raises(common.DataError, match=r"3 distinct values \[0, 1, 2\], more than the 2 classes"):
        run_prep(tmp_path, "--classes", "organ")


def test_empty_folder_and_existing_output(tmp_path):
    (tmp_path / "in" / "imagesTr").mkdir(parents=True)
    with pytest.raises(common.DataError, match=r"imagesTr: no \.nii or \.nii\.gz files"):
        run_prep(tmp_path)
    with pytest.raises(common.DataError, match=r"imagesTr: folder not found"):
        prepare_data.main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    make_input(tmp_path)
    run_prep(tmp_path)
    with pytest.raises(common.DataError, match="already holds data: pass --overwrite"):
        run_prep(tmp_path)
    run_prep(tmp_path, "--overwrite")
    assert (tmp_path / "out" / "dataset.json").is_file()


def test_4d_image_with_channel(tmp_path):
    d = make_input(tmp_path)
    nifti(d / "imagesTr" / "c1.nii.gz", np.stack([np.zeros((8, 8, 4)), np.ones((8, 8, 4))], -1).astype(np.float32))
    run_prep(tmp_path, "--channel", "1")
    with h5py.File(tmp_path / "out" / "c1.h5") as f:
        assert f["image"].shape == (8, 8, 4)


def test_interrupted_write_leaves_no_dataset(tmp_path, monkeypatch):
    make_input(tmp_path)
    calls = []

    def failing_write(path, image, label=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(path, image, label)
    original = common.write_h5
    monkeypatch.setattr(common, "write_h5", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run_prep(tmp_path)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_cli_error_is_one_line(tmp_path):
    proc = cli("prepare_data.py", "--input", tmp_path / "nowhere", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_images_ts_become_the_test_list(tmp_path):
    d = make_input(tmp_path, n=4)
    for i in (7, 8):
        lab = np.zeros((8, 8, 4), np.uint8)
        lab[1:3, 1:3, 1:3] = 1
        nifti(d / "imagesTs" / f"t{i}.nii.gz", np.random.default_rng(i).random((8, 8, 4)).astype(np.float32))
        nifti(d / "labelsTs" / f"t{i}.nii.gz", lab)
    prepare_data.main(["--input", str(d), "--output", str(tmp_path / "out"), "--val_fraction", "0.25"])
    root = tmp_path / "out"
    assert (root / "test.list").read_text().split() == ["t7", "t8"]  # no labeled training case taken for test
    assert len((root / "val.list").read_text().split()) == 1 and len((root / "labeled.list").read_text().split()) == 3
    (d / "labelsTs" / "t8.nii.gz").unlink()
    with pytest.raises(common.DataError, match=r"no label for test case\(s\) \['t8'\]"):
        prepare_data.main(["--input", str(d), "--output", str(tmp_path / "out2")])
