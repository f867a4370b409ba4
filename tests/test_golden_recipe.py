"""Golden parity of the recipe around the losses (tests/golden/README.md): the learning rate each step
runs at, the crop padding, and the statistics of each 2D augmentation pipeline, against numbers made
by running the official code."""
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import zoom

import common

GOLDEN = np.load(Path(__file__).parent / "golden" / "recipe.npz")


@pytest.mark.parametrize("schedule,key,T", [("poly", "lr_poly_100", 100), ("linear", "lr_linear_100", 100),
                                             ("step", "lr_step_6000", 6000)])
def test_the_rate_each_step_runs_at_is_the_official_loops(schedule, key, T):
    ours = np.array([common.lr_at(schedule, 0.01, k, T) for k in range(T)])
    np.testing.assert_allclose(ours, GOLDEN[key], rtol=1e-12, atol=1e-15)


def test_crop_padding_is_uamts_randomcrop():
    for shape, patch, padded in zip(GOLDEN["crop_shapes"], GOLDEN["crop_patches"], GOLDEN["crop_padded"]):
        image, _ = common.pad_to_patch(np.ones(shape, np.float32), np.ones(shape, np.uint8), tuple(patch))
        assert image.shape == tuple(padded), (shape, patch)
        patch_img, _ = common.random_crop(np.ones(shape, np.float32), np.ones(shape, np.uint8), tuple(patch),
                                          np.random.default_rng(0))
        assert patch_img.shape == tuple(patch)


def classify_draws(pipeline, n=2000):
    """Fractions of draws (unchanged, rot90+flip, rotated) of a Transform2D on an asymmetric image."""
    img, lab = GOLDEN["aug_image"], GOLDEN["aug_label"]
    t = common.Transform2D(img.shape, pipeline)
    variants = [zoom(np.flip(np.rot90(img, k), ax), [s / r for s, r in zip(img.shape, np.rot90(img, k).shape)], order=0)
                for k in range(4) for ax in (0, 1)]
    counts = np.zeros(3)
    for i in range(n):
        out, _ = t(img, lab, np.random.default_rng(i))
        counts[0 if np.array_equal(out, img) else 1 if any(np.array_equal(out, v) for v in variants) else 2] += 1
    return counts / n


@pytest.mark.parametrize("pipeline,key", [("ssl4mis", "gen_ssl4mis"), ("three_way", "gen_icl")])
def test_2d_random_generator_draw_fractions(pipeline, key):
    # 2,000 draws on each side: binomial sd <= 0.011 on a fraction; 0.045 is four sd
    np.testing.assert_allclose(classify_draws(pipeline), GOLDEN[key], atol=0.045)


def test_rotation_angles_span_the_official_range():
    lo, hi = GOLDEN["rotate_angle_range"]
    angles = {int(np.random.default_rng(i).integers(-20, 20)) for i in range(2000)}
    assert min(angles) == lo and max(angles) == hi


def test_ucseg_pipeline_statistics_match_albumentations():
    """Flip rates, unchanged draws, zeroed pixels (CoarseDropout) and label agreement after the matched flip
    (how far ShiftScaleRotate and the distortions move the label), over 1,500 draws each side."""
    img, lab = GOLDEN["ucseg_image"], GOLDEN["ucseg_label"]
    t = common.Transform2D(img.shape, "ucseg")
    variants = [(h, v) for h in (0, 1) for v in (0, 1)]
    flip = lambda a, h, v: (a[:, ::-1] if h else a)[::-1] if v else (a[:, ::-1] if h else a)  # noqa: E731
    stats = []
    for i in range(1500):
        o, ol = t(img, lab, np.random.default_rng(i))
        c = [np.corrcoef(o.ravel(), flip(img, h, v).ravel())[0, 1] for h, v in variants]
        h, v = variants[int(np.argmax(c))]
        stats.append([h, v, np.array_equal(o, img), (o == 0).mean(), (ol == flip(lab, h, v)).mean()])
    ours = np.array(stats, float).mean(0)
    np.testing.assert_allclose(ours[:3], GOLDEN["ucseg_stats"][:3], atol=0.05)      # rates: 4 binomial sd
    np.testing.assert_allclose(ours[3:], GOLDEN["ucseg_stats"][3:], rtol=0.25)      # magnitudes
