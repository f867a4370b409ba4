#!/usr/bin/env bash
# CUDA smoke test: every training script for a few iterations on the phantoms with --amp on the GPU,
# then the test script on its checkpoint (also with --amp), then --resume for two more iterations.
# The CPU test suite cannot reach the CUDA branches (autocast, GradScaler, device placement of
# buffers and queues); run this on a machine with a GPU after changing a script.
#
#   bash benchmarks/cuda_smoke.sh [METHOD ...]        (default: every train_*.py)
set -euo pipefail
cd "$(dirname "$0")/.."
methods=${*:-supervised cifp ducisc dualnet_kl icl ucseg}
out=$(mktemp -d)
p2=(--dataset Phantom2D --labeled_num 2 --patch_size 64 64 --batch_size 4 --labeled_bs 2 --num_workers 0 --val_interval 2)
p3=(--dataset Phantom3D --labeled_num 2 --patch_size 32 32 16 --batch_size 4 --labeled_bs 2 --num_workers 0)
for m in $methods; do
  for d in 2 3; do
    if [ "$d" = 2 ]; then flags=("${p2[@]}"); data=Phantom2D; else flags=("${p3[@]}"); data=Phantom3D; fi
    echo "== $m $data"
    python "train_$m.py" "${flags[@]}" --device cuda --amp --max_iterations 4 --model_dir "$out" | tail -n 1
    python "test_${d}d.py" --ckpt "$out/${data}_run_2_labeled/$m/last.pth" --amp | tail -n 2
    python "train_$m.py" "${flags[@]}" --device cuda --amp --max_iterations 6 --model_dir "$out" --resume | tail -n 1
  done
done
rm -rf "$out"
# UC-Seg's largest-component step on the GPU against SciPy on the host (times and equality)
if [ -d data/ACDC ]; then python benchmarks/lcc_speed.py --device cuda; else python benchmarks/lcc_speed.py --dataset Phantom2D --device cuda; fi
echo "cuda smoke: all passed"
