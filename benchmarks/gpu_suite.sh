#!/usr/bin/env bash
# The GPU figures in one run that fits a GPU lease (15 minutes of device time, start-up included):
#
#   source .carry/setup.sh && bash benchmarks/gpu_suite.sh          # on the GPU machine
#   bash benchmarks/gpu_suite.sh --tiny                              # a CPU check of every part, ~1 min
#
# .carry: `../shared/device/pack-carry qwix` here first (the image lacks ml_collections, clu, qwix;
# tests/test_gpu_suite.py runs --tiny with what it lacks unimportable). Through the device tool:
#   carry [".carry"], command: source .carry/setup.sh && bash benchmarks/gpu_suite.sh --output_dir=$OUT 2>&1 |
#   tee $OUT/gpu_suite.log      (JSONs straight into $OUT: they come back even if the command is stopped)
# Options: --tiny; --budget_s=540 (the whole suite's wall time); --output_dir=benchmarks/results.
# Parts, in order, each handed a deadline (a share of the budget from the start) that its script keeps
# by skipping what it estimates would end past it, saying so in its JSON (written after each run, so a
# part stopped from outside keeps what it measured); a part still running GRACE_S past its deadline is
# stopped. Time a part leaves unused goes to the next:
#   tune        configs/fast.py: learning rate on a validation split, then steps per call      0.15
#   fast        configs/fast.py, 5 seeds with the tuned values: train time, test accuracy + TTA 0.35
#   fast_muon   the same with optim.name=muon (it beat SGD on 2 CPU cores: docs/training.md)  0.55
#   throughput  resnet18 + resnet34 train step, batch 512 bf16, vs PyTorch; device pipeline; memory 0.74
#   resnet18    configs/resnet18.py (the seed recipe), as many epochs as the time left allows  0.94
# then benchmarks/gpu_suite_summary.py prints the figures against the targets and writes
# gpu_suite_<device>.json, which lists every part's exit status, seconds and JSON.
# Data: $CIFAR10_JPEG_DIR (set by .carry/setup.sh), the real CIFAR-10 JPEGs; --tiny runs each config
# as benchmarks/common.py's tiny() shrinks it, on synthetic images unless $CIFAR10_JPEG_DIR is set.
set -uo pipefail
cd "$(dirname "$0")/.."

budget_s=540
output_dir=benchmarks/results
tiny=()
for arg in "$@"; do
  case $arg in
    --tiny) tiny=(--tiny) ;;
    --budget_s=*) budget_s=${arg#*=} ;;
    --output_dir=*) output_dir=${arg#*=} ;;
    *) echo "gpu_suite.sh: unknown option $arg (options: --tiny, --budget_s=S, --output_dir=DIR)" >&2; exit 2 ;;
  esac
done

[[ $budget_s =~ ^[0-9]+$ ]] || { echo "gpu_suite.sh: --budget_s=$budget_s is not a whole number of seconds" >&2; exit 2; }
python=${PYTHON:-python3}
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
parts=$work/parts.tsv
GRACE_S=15
# Compiled programs and GPU autotuning results shared by the parts and runs. The seed and the learning
# rate are inputs of the train step: the seeds of a part run its first seed's program, and the later parts
# (processes of their own) load the programs of the same config from this cache; each JSON records the
# compile seconds of every run.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$work/jax_cache}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

# part NAME SHARE COMMAND...: runs COMMAND with a deadline at SHARE of the budget (stopped GRACE_S
# after it); appends NAME, exit status, seconds and the JSON it wrote last to the parts file.
part() {
  local name=$1 share=$2
  shift 2
  local deadline limit part_start=$SECONDS
  deadline=$(awk -v start="$start" -v share="$share" -v budget="$budget_s" 'BEGIN { printf "%d", start + share * budget }')
  limit=$((deadline - $(date +%s) + GRACE_S))
  ((limit >= GRACE_S)) || limit=$GRACE_S # Past its deadline already (timeout 0 would mean none): it skips, says so.
  echo "== $name: until $(date -d "@$deadline" +%T), $(($(date +%s) - start)) s into the suite"
  timeout --kill-after=10 "$limit" \
    "$@" ${tiny[@]+"${tiny[@]}"} --output_dir="$output_dir" --deadline="$deadline" 2>&1 | tee "$work/$name.log"
  local status=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - part_start))" \
    "$(sed -n 's/^results: //p' "$work/$name.log" | tail -n 1)" >>"$parts"
}

results_of() { awk -F'\t' -v name="$1" '$1 == name { print $4 }' "$parts"; }

part tune 0.15 "$python" benchmarks/time_to_accuracy.py --config=configs/fast.py --seeds=0 \
  --tune_learning_rates=0.8,1.2,0.5 --tune_steps_per_call=1,8 --run_estimate_s=40
tuned=$(results_of tune)
part fast 0.35 "$python" benchmarks/time_to_accuracy.py --config=configs/fast.py --seeds=5 \
  ${tuned:+--tuned="$tuned"} --run_estimate_s=40
part fast_muon 0.55 "$python" benchmarks/time_to_accuracy.py --config=configs/fast.py --config.optim.name=muon \
  --seeds=5 ${tuned:+--tuned="$tuned"} --run_estimate_s=40
part throughput 0.74 "$python" benchmarks/throughput.py --models=resnet18,resnet34 --batch_size=512 --repeats=3
part resnet18 0.94 "$python" benchmarks/time_to_accuracy.py --config=configs/resnet18.py --seeds=1 \
  --config.data.pipeline=device --config.half_precision=True --fit_epochs --run_estimate_s=60

"$python" benchmarks/gpu_suite_summary.py --parts="$parts" --budget_s="$budget_s" \
  --wall_s=$(($(date +%s) - start)) --output_dir="$output_dir" ${tiny[@]+"${tiny[@]}"}
