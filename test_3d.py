"""Evaluate a 3D checkpoint written by any training script of this repository.

    python test_3d.py --ckpt model/<dataset>_<exp>_<labeled_num>_labeled/<method>/last.pth [--split val] [--save_nii]

LA, Pancreas, BraTS2019, Phantom3D: sliding window with the data set's patch and stride.
Prints a per-case table and mean +- sd of Dice, Jaccard, 95HD and ASD (voxels), and writes
<ckpt>_<split>_cases.csv and <ckpt>_<split>_summary.csv next to the checkpoint. The checkpoint
records its data set, data root, patch and network, so --ckpt is the only flag needed.
"""
import common

if __name__ == "__main__":
    common.cli(lambda: common.test_main(dims=3))
