"""Evaluate a 2D checkpoint written by any training script of this repository.

    python test_2d.py --ckpt model/<dataset>_<exp>_<labeled_num>_labeled/<method>/last.pth [--split val] [--save_nii]

ACDC, Phantom2D: slice-wise at the training patch size, zoomed back, metrics per class per volume.
Prints a per-case table and mean +- sd of Dice, Jaccard, 95HD and ASD (voxels), and writes
<ckpt>_<split>_cases.csv and <ckpt>_<split>_summary.csv next to the checkpoint. The checkpoint
records its data set, data root, patch and network, so --ckpt is the only flag needed.
"""
import common

if __name__ == "__main__":
    common.cli(lambda: common.test_main(dims=2))
