#!/usr/bin/env bash
# The Qwen2.5-Coder-1.5B benchmarks of issues 4 and 5, exactly as recorded in RESULTS.md.
# Usage (from the repository root): benchmarks/qwen_benchmarks.sh [objectcount|trec|hotpot|demos]...
# (demos = demos_trec then demos_objectcount; each can be run alone)
# Each part is a benchmarks/run.py command: stop it at any time, run it again to resume.
# BENCH_OPTS is added to each (e.g. BENCH_OPTS=--dry-run shows what would be reused or started).
# Needs: pip install -e ".[local]"; the GGUF (autodiff models pull qwen2.5-coder-1.5b); the data
# (autodiff data fetch object_counting|trec|hotpotqa [--from DIR]) in datasets/ or $AUTODIFF_DATA.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
Q=local/qwen2.5-coder-1.5b
M=(--set "models.task.model=$Q" --set "models.backward.model=$Q" --set "models.optimizer.model=$Q"
   --set models.optimizer.temperature=0.7)
OC=("${M[@]}" --set train.max_steps=6 --set train.batch_size=4 --set train.max_proposals=3
    --set train.max_error_samples=3 --set train.max_correct_samples=1)
TREC=("${M[@]}" --set train.max_steps=4 --set train.max_proposals=3
      --set models.backward.max_tokens=512 --set models.optimizer.max_tokens=512)
CAPS=(--set models.backward.max_tokens=512 --set models.optimizer.max_tokens=512)
DEMOS=(--variant 'instruction only=' --variant 'demos only=train.demos=demos_only'
       --variant 'both=train.demos=text_then_demos')

objectcount() {
  "$PY" benchmarks/run.py ${BENCH_OPTS:-} --config configs/object_count.yaml \
    --mode autodiff --mode no_gradient --mode none --mode textgrad --seed 1 "${OC[@]}" \
    --section "ObjectCount on Qwen2.5-Coder-1.5B (issue 4)"
}
trec() {
  "$PY" benchmarks/run.py ${BENCH_OPTS:-} --config configs/trec.yaml \
    --mode none --mode autodiff --mode textgrad --mode no_gradient --seed 0 --seed 1 --seed 2 "${TREC[@]}" \
    --section "TREC on Qwen2.5-Coder-1.5B (issue 4)"
}
hotpot() {
  "$PY" benchmarks/run.py ${BENCH_OPTS:-} --config configs/hotpot_vanilla_rag.yaml --config configs/hotpot_multihop_rag.yaml \
    --config configs/hotpot_multihop_cycle.yaml --mode none --mode autodiff --seed 0 \
    "${M[@]}" --set train.max_steps=3 --set train.max_proposals=2 "${CAPS[@]}" \
    --section "HotpotQA RAG on Qwen2.5-Coder-1.5B (issue 4)"
  "$PY" benchmarks/run.py ${BENCH_OPTS:-} --config configs/hotpot_react.yaml --mode none --mode autodiff --seed 0 \
    "${M[@]}" --set train.max_steps=2 --set train.max_proposals=2 --set nodes.react.max_iters=3 "${CAPS[@]}" \
    --section "HotpotQA ReAct on Qwen2.5-Coder-1.5B (issue 4)"
}
demos() { demos_trec; demos_objectcount; }
demos_objectcount() {
  "$PY" benchmarks/run.py ${BENCH_OPTS:-} --config configs/object_count.yaml --mode autodiff --seed 1 "${OC[@]}" "${DEMOS[@]}" \
    --section "Demos on ObjectCount (issue 5)"
}
demos_trec() {
  "$PY" benchmarks/run.py ${BENCH_OPTS:-} --config configs/trec.yaml --mode autodiff --seed 0 "${TREC[@]}" "${DEMOS[@]}" \
    --section "Demos on TREC (issue 5)"
}

rc=0
for part in "${@:-objectcount trec hotpot demos}"; do
  for p in $part; do
    case "$p" in
      objectcount|trec|hotpot|demos|demos_trec|demos_objectcount) "$p" || rc=$? ;;
      *) echo "unknown part: $p (objectcount, trec, hotpot, demos, demos_trec, demos_objectcount)" >&2; exit 2 ;;
    esac
  done
done
exit "$rc"
