#!/usr/bin/env bash
# ACDC quick protocol: a CPU-sized version of the SSL4MIS ACDC protocol that every method is compared
# under. 2D U-Net, patch 128x128, 2,000 iterations, batch 8 with 4 labeled (the supervised baseline
# sees the 4 labeled only), SGD 0.01 with poly decay, seed 1337, labeled_num 3 and 7 patients
# (and all 70 as the upper bound), validation every 200 iterations, evaluation of the FINAL
# checkpoint (last.pth) on the 20 ACDC validation volumes. Method scripts keep their own losses and
# weights, network, initialisation and augmentation (results_table.py prints which, per method;
# docs/recipes.md); the flags below override their optimizer's rate and schedule, batch, patch and
# run length. LR timing is every official loop's (the new rate is set after each step).
#
#   bash benchmarks/acdc_quick.sh DATA_ROOT [METHOD ...]      e.g. bash benchmarks/acdc_quick.sh data/ACDC supervised cifp ducisc icl ucseg dualnet_kl
#
# Results: model/ACDC_quick_<n>_labeled/<method>/last_val_summary.csv (and _cases.csv, log.txt, metrics.csv).
set -euo pipefail
root=${1:?usage: bash benchmarks/acdc_quick.sh DATA_ROOT [METHOD ...]}
shift
methods=${*:-supervised}
common=(--dataset ACDC --root_path "$root" --exp quick --patch_size 128 128 --max_iterations 2000
        --batch_size 8 --labeled_bs 4 --base_lr 0.01 --lr_schedule poly --seed 1337 --val_interval 200)
for method in $methods; do
  for n in 3 7 all; do
    if [ "$n" = all ] && [ "$method" != supervised ]; then continue; fi
    time python "train_${method}.py" "${common[@]}" --labeled_num "$n"
    python test_2d.py --ckpt "model/ACDC_quick_${n}_labeled/${method}/last.pth" --split val
    if [ "$method" = dualnet_kl ]; then  # each network of the ensemble alone (A = 0, B = 1), a diagnostic
      for k in 0 1; do python test_2d.py --ckpt "model/ACDC_quick_${n}_labeled/${method}/last.pth" --split val --member "$k"; done
    fi
  done
done
