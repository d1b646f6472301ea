#!/usr/bin/env bash
# Train configs/object_count.yaml on the local Qwen2.5-Coder-1.5B (task, backward and optimizer)
# in the given modes, one after the other; each prints its run directory on its last line.
# Needs: pip install -e ".[local]"; the Qwen GGUF in $AUTODIFF_MODELS; `autodiff data fetch object_counting`.
# Usage: benchmarks/train_object_count.sh [MODE...]   (default: autodiff no_gradient)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
model=local/qwen2.5-coder-1.5b
for mode in "${@:-autodiff no_gradient}"; do
  for m in $mode; do
    autodiff train "$here/configs/object_count.yaml" --runs-dir "${RUNS_DIR:-runs}" \
      --set models.task.model=$model --set models.backward.model=$model --set models.optimizer.model=$model \
      --set train.mode=$m --set train.max_steps=4 --set train.batch_size=4 --set train.max_proposals=2 \
      --set train.max_error_samples=3 --set train.max_correct_samples=1 --set train.seed=0
  done
done
