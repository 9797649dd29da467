#!/usr/bin/env bash
# The GPU check: one script, run whenever a GPU is lent; each part has its own time limit.
#
#   bash bench/gpu_check.sh [DATA_DIR] [OUT] [PART ...]     (defaults: ../shared/data, outputs/gpu_check, and
#                                                            the parts still unmeasured: dg_table domainbed_cmnist)
#
# speed          (~4 min) bench/maml_speed.py on CUDA: every configuration (shot 1/5, meta-batch 4/32, first/second
#                order, 1/5 inner steps) through loop / threads / batched / higher / TorchOpt, plus iMAML; then
#                bench/train_speed.py: the DG step (ERM, RotatedMNIST) with our samplers vs DomainBed's DataLoaders.
#                Measured on an H200 on 2026-11-30 (docs/benchmarks.md).
# reproductions  (~3 min) in parallel: ERM on RotatedMNIST held-out 0 degrees for DomainBed's 5001 steps; the IRM
#                paper's ColoredMNIST (ERM / IRM / VREx, 5 seeds); few-shot Omniglot 5-way 1-shot, 30 s per cell.
#                Measured on an H200 on 2026-11-30.
# dg_table       (~7 min) bench/dg_table.py on RotatedDigits: every DG algorithm, 6 held-out domains, 3 trials,
#                in 12 shards in parallel, then --collect-only writes OUT/dg_table.md.
# domainbed_cmnist (~7 min, beside dg_table) bench/reproduce_domainbed.py: DomainBed's ColoredMNIST, ERM / IRM /
#                VREx, every held-out domain, 3 trials, DomainBed's 5001 steps, both selection methods.
# mmdaae_weights (~6 min) bench/paper_mnist_rotation.py --setup mmdaae: MMD-AAE on the six held-out domains with
#                adversarial weight 0.01, and with 0.01 and MMD weight 1.0 (the two best settings of the held-out-0
#                ablation in docs/benchmarks.md), side by side; tables in OUT/mmdaae_adv*.md.
# Every result lands under OUT; OUT/gpu_results.tar.gz packs the records, `done` markers, JSON, tables and logs (no
# checkpoints) and OUT/gpu_check.log is the whole log. Unpack the dg_table runs and tabulate them here with
# `python bench/dg_table.py --datasets RotatedDigits --output-dir DIR/dg_table --collect-only`.
set -u
PARTS=("${@:3}")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(dg_table domainbed_cmnist)
for name in "${PARTS[@]}"; do
  case $name in
    speed|reproductions|dg_table|domainbed_cmnist|mmdaae_weights) ;;
    *) echo "error: unknown part $name: choose from speed reproductions dg_table domainbed_cmnist mmdaae_weights" >&2
       exit 2 ;;
  esac
done
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

speed() {
  part maml_speed 200 "$PY" bench/maml_speed.py --device cuda --repeats 5 --imaml \
    --paths loop batched higher torchopt --output "$WORK/maml_speed_cuda.json"
  part train_speed 50 "$PY" bench/train_speed.py --data-dir "$DATA_DIR" --device cuda --steps 50 \
    --variants channels_last fused --output "$WORK/train_speed_cuda.json"
}

reproductions() {
  part erm_rotated_mnist 150 "$PY" -m dg_meta.train --algorithm ERM --dataset RotatedMNIST --test-envs 0 \
    --steps 5001 --data-dir "$DATA_DIR" --output-dir "$WORK/erm_rotated_mnist_te0" --device cuda --no-progress &
  part irm_colored_mnist 150 "$PY" bench/irm_colored_mnist.py --data-dir "$DATA_DIR" --device cuda \
    --output-dir "$WORK/irm_colored_mnist" --doc "$WORK/irm_colored_mnist.md" &
  part fewshot_omniglot 150 "$PY" bench/fewshot_omniglot.py --data-dir "$DATA_DIR" --device cuda --minutes 0.5 \
    --settings 5w1s --algorithms MAML UnicornMAML iMAML ProtoNet --episodes 1000 \
    --results "$WORK/fewshot_omniglot_cuda.jsonl" --output "$WORK/fewshot_omniglot.md" &
  wait
}

DG_TABLE=(bench/dg_table.py --datasets RotatedDigits --trials 3 --device cuda --output-dir "$WORK/dg_table"
          --doc "$WORK/dg_table.md")
dg_table() {
  local shard
  for shard in $(seq 0 11); do
    OMP_NUM_THREADS=1 part "dg_table_$shard" 420 "$PY" "${DG_TABLE[@]}" --shard "$shard/12" &
  done
  wait
  part dg_table_collect 60 "$PY" "${DG_TABLE[@]}" --collect-only
}

domainbed_cmnist() {
  part domainbed_cmnist 450 "$PY" bench/reproduce_domainbed.py --data-dir "$DATA_DIR" --algorithms ERM IRM VREx \
    --datasets ColoredMNIST --trials 3 --workers 3 --time-limit 420 --output-dir "$WORK/domainbed_cmnist" \
    --doc "$WORK/domainbed_cmnist.md"
}

mmdaae_weights() {
  local name hparams
  for name in adv001 adv001_mmd1; do
    hparams='{"adv_weight": 0.01}'
    [ "$name" = adv001 ] || hparams='{"adv_weight": 0.01, "mmd_weight": 1.0}'
    part "mmdaae_$name" 450 "$PY" bench/paper_mnist_rotation.py --setup mmdaae --algorithms MMDAAE --device cuda \
      --hparams "$hparams" --data-dir "$DATA_DIR" --output-dir "$WORK/mmdaae_$name" --doc "$WORK/mmdaae_$name.md" &
  done
  wait
}

for name in "${PARTS[@]}"; do
  "$name" &
done
wait

# records, done markers, JSON, tables and logs only (checkpoints stay behind: a device's result files must stay small)
(cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.out' -o -name '*.err' \
  -o -name done \) \
  -print0 | tar -czf "$OUT_DIR/gpu_results.tar.gz" --null -T -) && echo "packed $(du -h "$OUT_DIR/gpu_results.tar.gz")" >>"$LOG"
rm -rf "$WORK"
