import h5py
import numpy as np
import pytest

import common

ACDC = common.get_dataset("ACDC")
LA = common.get_dataset("LA")


# ---- sampler ----
def check_sampler_contract(labeled, unlabeled, batch_size, labeled_bs, epochs=3):
    s = common.TwoStreamBatchSampler(labeled, unlabeled, batch_size, labeled_bs, seed=7)
    assert len(s) == len(labeled) // labeled_bs
    for epoch in range(epochs):
        s.set_epoch(epoch)
        batches = [[i for i, _ in b] for b in s]
        assert len(batches) == len(s)
        seen = []
        for b in batches:
            assert len(b) == batch_size
            assert set(b[:labeled_bs]) <= set(labeled)          # labeled slots first
            assert set(b[labeled_bs:]) <= set(unlabeled)        # no labeled index in the unlabeled slots
            seen += b[:labeled_bs]
        assert len(seen) == len(set(seen))                      # each labeled sample at most once per epoch
        assert len(seen) == len(labeled) - len(labeled) % labeled_bs  # all of them but an incomplete last group
        stream = [i for b in batches for i in b[labeled_bs:]]
        n = len(unlabeled)
        for k in range(0, len(stream) - n + 1, n or 1):       # the stream is made of whole permutations
            assert sorted(stream[k:k + n]) == sorted(unlabeled)
        assert len(stream) == len(batches) * (batch_size - labeled_bs)


def test_two_stream_sampler_contract():
    check_sampler_contract(list(range(16)), list(range(16, 80)), 4, 2)   # LA 16 labeled: 8 batches
    check_sampler_contract(list(range(7)), list(range(7, 12)), 5, 2)     # odd sizes, stream wraps
    check_sampler_contract(list(range(10)), [], 3, 3)                   # labeled-only (supervised)


def test_sampler_lengths_match_the_anchors():
    assert len(common.TwoStreamBatchSampler(range(136), range(136, 1312), 24, 12)) == 11
    assert len(common.TwoStreamBatchSampler(range(68), range(68, 1312), 24, 12)) == 5
    assert len(common.TwoStreamBatchSampler(range(8), range(8, 80), 4, 2)) == 4


def test_sampler_epochs_differ_and_replay():
    s = common.TwoStreamBatchSampler(range(8), range(8, 40), 4, 2, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0, skip=3)  # resume mid-epoch: the same batches, augmentation seeds included
    assert list(s) == e0[3:]


def test_sampler_rejects_impossible_batches():
    with pytest.raises(ValueError, match="labeled"):
        common.TwoStreamBatchSampler(range(1), range(1, 10), 4, 2)
    with pytest.raises(ValueError, match="unlabeled"):
        common.TwoStreamBatchSampler(range(4), range(4, 5), 4, 2)
    with pytest.raises(ValueError, match="labeled_bs"):
        common.TwoStreamBatchSampler(range(4), range(4, 10), 2, 3)


# ---- labeled selection ----
def test_labeled_slices_are_whole_patients_in_list_order():
    names = []
    for p, n_slices in (("patient099", 3), ("patient038", 2), ("patient050", 4), ("patient100", 1)):
        for frame in ("01", "02"):
            names += [f"{p}_frame{frame}_slice_{k + 1}" for k in range(n_slices)]
    assert common.labeled_indices(ACDC, names, 1) == list(range(6))
    assert common.labeled_indices(ACDC, names, 2) == list(range(10))
    assert common.labeled_indices(ACDC, names, 3) == list(range(18))
    assert common.labeled_indices(ACDC, names, "all") == list(range(len(names)))
    with pytest.raises(ValueError, match="--labeled_num 5 is more than the 4 patients"):
        common.labeled_indices(ACDC, names, 5)


def test_labeled_cases_3d():
    names = [f"c{i}" for i in range(10)]
    assert common.labeled_indices(LA, names, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--labeled_num 11 is more than the 10 cases"):
        common.labeled_indices(LA, names, 11)


def test_official_acdc_list_gives_68_136_256_slices(shared_data):
    names = common.read_list(ACDC, shared_data / "ACDC", "train")
    assert len(names) == 1312
    assert [len(common.labeled_indices(ACDC, names, n)) for n in (3, 7, 14)] == [68, 136, 256]


# ---- transforms keep image and label aligned ----
def test_transforms_keep_image_and_label_aligned():
    rng = np.random.default_rng(0)
    label3 = (rng.random((40, 36, 20)) > 0.5).astype(np.uint8)
    image3 = label3.astype(np.float32) * 3 + 1  # image is a function of the label: alignment is checkable
    t3 = common.Transform3D((24, 24, 16))
    for seed in range(20):
        img, lab = t3(image3, label3, np.random.default_rng(seed))
        assert img.shape == lab.shape == (24, 24, 16)
        assert np.array_equal(img, lab * 3.0 + 1)
    label2 = (rng.random((50, 70)) * 4).astype(np.uint8)
    image2 = label2.astype(np.float32) + 1
    for pipeline in ("ssl4mis", "three_way"):
        t2 = common.Transform2D((64, 64), pipeline)
        for seed in range(20):
            img, lab = t2(image2, label2, np.random.default_rng(seed))
            assert img.shape == lab.shape == (64, 64)
            inside = img > 0  # rotation fills the corners with 0 in both
            assert np.array_equal(img[inside], lab[inside] + 1.0)


def test_random_crop_pads_small_volumes_and_follows_the_anchor_range():
    image = np.ones((10, 30, 8), np.float32)
    img, lab = common.random_crop(image, np.ones((10, 30, 8), np.uint8), (16, 16, 8), np.random.default_rng(0))
    assert img.shape == (16, 16, 8)
    # axis 0: 10 <= 16 -> padded by (16 - 10) // 2 + 3 = 6 per side = 22; axis 2: 8 <= 8 -> 3 per side = 14
    padded, _ = common.pad_to_patch(image, image, (16, 16, 8))
    assert padded.shape == (22, 30, 14)
    corners = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        corners.add(int(rng.integers(0, 30 - 16)))
    assert max(corners) == 13  # 0 .. size - patch - 1, as UA-MT


def test_center_crop():
    image = np.arange(20 * 20 * 10, dtype=np.float32).reshape(20, 20, 10)
    img, _ = common.center_crop(image, image, (10, 10, 6))
    assert np.array_equal(img, image[5:15, 5:15, 2:8])


# ---- reading and errors ----
def write_h5(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


def test_read_case_errors_name_the_file(tmp_path):
    good = tmp_path / "good.h5"
    write_h5(good, image=np.zeros((4, 4, 4), np.float32), label=np.ones((4, 4, 4), np.uint8))
    image, label = common.read_case(good, 2, 3)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    no_label = tmp_path / "nolabel.h5"
    write_h5(no_label, image=np.zeros((4, 4, 4)))
    with pytest.raises(common.DataError, match=r"nolabel\.h5: no label"):
        common.read_case(no_label, 2, 3)
    mismatch = tmp_path / "mismatch.h5"
    write_h5(mismatch, image=np.zeros((4, 4, 4)), label=np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(common.DataError, match=r"mismatch\.h5: image shape \(4, 4, 4\) and label shape"):
        common.read_case(mismatch, 2, 3)
    out_of_range = tmp_path / "range.h5"
    write_h5(out_of_range, image=np.zeros((4, 4, 4)), label=np.full((4, 4, 4), 2, np.uint8))
    with pytest.raises(common.DataError, match=r"range\.h5: label values must be integers in \[0, 2\)"):
        common.read_case(out_of_range, 2, 3)
    with pytest.raises(common.DataError, match=r"missing\.h5: file not found"):
        common.read_case(tmp_path / "missing.h5", 2, 3)
    float_label = tmp_path / "floatlabel.h5"  # Pancreas stores float32 0/1 labels: accepted
    write_h5(float_label, image=np.zeros((4, 4, 4)), label=np.ones((4, 4, 4), np.float32))
    assert common.read_case(float_label, 2, 3)[1].dtype == np.uint8


def test_missing_root_and_list_say_where(tmp_path):
    with pytest.raises(common.DataError, match=r"does not exist\. Get the UA-MT release"):
        common.resolve_root(LA, tmp_path / "nowhere")
    with pytest.raises(common.DataError, match=r"train\.list not found"):
        common.read_list(LA, tmp_path, "train")
    with pytest.raises(common.DataError, match="has no 'val' split"):
        common.read_list(LA, tmp_path, "val")
    (tmp_path / "train.list").write_text("CASE1\n")
    with pytest.raises(common.DataError, match=r"CASE1/mri_norm2\.h5: file not found"):
        common.load_cases(LA, tmp_path, "train")


def test_acdc_flat_layout_is_accepted(tmp_path):
    write_h5(tmp_path / "data" / "p001_frame01_slice_1.h5", image=np.zeros((8, 8), np.float32),
             label=np.zeros((8, 8), np.uint8))
    (tmp_path / "train_slices.list").write_text("p001_frame01_slice_1\n")
    assert common.case_path(ACDC, tmp_path, "p001_frame01_slice_1", "train") == \
        tmp_path / "data" / "p001_frame01_slice_1.h5"
    assert len(common.load_cases(ACDC, tmp_path, "train")) == 1


def test_real_files(shared_data):
    la = common.load_cases(LA, shared_data / "LA", "test")
    assert len(la) == 4 and all(img.shape[2] == 88 and set(np.unique(lab)) == {0, 1} for _, img, lab in la)
    val = common.load_cases(ACDC, shared_data / "ACDC", "val")
    assert len(val) == 20 and all(img.ndim == 3 and set(np.unique(lab)) == {0, 1, 2, 3} for _, img, lab in val)
    ds = common.SegDataset(ACDC, shared_data / "ACDC", "train", common.Transform2D((128, 128)),
                           names=common.read_list(ACDC, shared_data / "ACDC", "train")[:5])
    item = ds[(3, 11)]
    assert item["image"].shape == (1, 128, 128) and item["label"].shape == (128, 128)
    assert (ds[(3, 11)]["image"] == item["image"]).all()  # the seed fixes the augmentation


# ---- phantoms ----
def test_phantoms_are_deterministic_and_in_the_anchor_layouts(tmp_path):
    for name in ("Phantom2D", "Phantom3D"):
        info = common.get_dataset(name)
        common.generate_phantom(info, tmp_path / "a", seed=5)
        common.generate_phantom(info, tmp_path / "b", seed=5)
        for split in info.lists:
            a = common.load_cases(info, tmp_path / "a", split)
            b = common.load_cases(info, tmp_path / "b", split)
            assert [n for n, *_ in a] == [n for n, *_ in b]
            assert all(np.array_equal(x[1], y[1]) and np.array_equal(x[2], y[2]) for x, y in zip(a, b))
            for _, image, label in a:
                assert set(np.unique(label)) <= set(range(info.num_classes)) and label.max() > 0
                fg = image[label > 0]
                bg = image[label == 0]
                # not separable by intensity: bright background voxels overlap the foreground range
                assert (bg > np.percentile(fg, 25)).sum() > 0.05 * fg.size


def test_phantom2d_lists_follow_acdc():
    info = common.get_dataset("Phantom2D")
    root = common.resolve_root(info)
    names = common.read_list(info, root, "train")
    assert (root / "data" / "slices" / f"{names[0]}.h5").is_file()
    assert names[0].endswith("_slice_1")
    assert len(common.read_list(info, root, "val")) == 6
