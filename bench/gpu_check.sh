#!/usr/bin/env bash
# The GPU check: one script, about 7 minutes on one GPU, run whenever a GPU is available.
#
#   bash bench/gpu_check.sh [DATA_DIR] [OUT]     (defaults: ../shared/data and outputs/gpu_check)
#
# 1. bench/maml_speed.py on CUDA: every configuration (shot 1/5, meta-batch 4/32, first/second order, 1/5 inner
#    steps) through loop / threads / batched / higher / TorchOpt, plus iMAML; interleaved, median of 5.
# 2. bench/train_speed.py on CUDA: the DG step (ERM, RotatedMNIST) with our samplers vs DomainBed's DataLoaders.
# 3. In parallel: ERM on RotatedMNIST held-out 0 degrees for DomainBed's 5001 steps; the IRM paper's ColoredMNIST
#    (ERM / IRM / VREx, 5 seeds, bench/irm_colored_mnist.py); few-shot Omniglot 5-way 1-shot cells with a
#    30-second budget each (bench/fewshot_omniglot.py).
# Every result lands under OUT; OUT/gpu_results.tar.gz packs the records, JSON, tables and logs (no checkpoints)
# and OUT/gpu_check.log
# is the whole log. Each part has its own time limit, so a slow part cannot stop the others.
set -u
DATA_DIR=${1:-../shared/data}
mkdir -p "${2:-outputs/gpu_check}"
OUT_DIR=$(cd "${2:-outputs/gpu_check}" && pwd)
WORK=$(mktemp -d)
LOG="$OUT_DIR/gpu_check.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log its exit status and wall time
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s): $*" >>"$LOG"
  timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
  echo "== $name exit $? after $((SECONDS - start))s" >>"$LOG"
}

{
  date -u +%FT%TZ
  nvidia-smi -L
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version(), \
'gpu', torch.cuda.get_device_name(0), 'cpu threads', torch.get_num_threads())"
} >>"$LOG" 2>&1

part maml_speed 200 "$PY" bench/maml_speed.py --device cuda --repeats 5 --imaml --paths loop batched higher torchopt \
  --output "$WORK/maml_speed_cuda.json"
part train_speed 50 "$PY" bench/train_speed.py --data-dir "$DATA_DIR" --device cuda --steps 50 \
  --variants channels_last fused --output "$WORK/train_speed_cuda.json"

part erm_rotated_mnist 150 "$PY" -m dg_meta.train --algorithm ERM --dataset RotatedMNIST --test-envs 0 \
  --steps 5001 --data-dir "$DATA_DIR" --output-dir "$WORK/erm_rotated_mnist_te0" --device cuda --no-progress &
part irm_colored_mnist 150 "$PY" bench/irm_colored_mnist.py --data-dir "$DATA_DIR" --device cuda \
  --output-dir "$WORK/irm_colored_mnist" --doc "$WORK/irm_colored_mnist.md" &
part fewshot_omniglot 150 "$PY" bench/fewshot_omniglot.py --data-dir "$DATA_DIR" --device cuda --minutes 0.5 \
  --settings 5w1s --algorithms MAML UnicornMAML iMAML ProtoNet --episodes 1000 \
  --results "$WORK/fewshot_omniglot_cuda.jsonl" --output "$WORK/fewshot_omniglot.md" &
wait

# records, JSON, tables and logs only (checkpoints stay behind: a device's result files must stay small)
(cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.out' -o -name '*.err' \) \
  -print0 | tar -czf "$OUT_DIR/gpu_results.tar.gz" --null -T -) && echo "packed $(du -h "$OUT_DIR/gpu_results.tar.gz")" >>"$LOG"
rm -rf "$WORK"
