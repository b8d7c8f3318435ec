#!/usr/bin/env bash
# Two variants of the shapes connector recipe side by side, one per GPU, in one call of a lent 2-GPU machine.
#
#   FROM_BUNDLE=DIR bash benchmarks/shapes_ablation.sh WAIT_SECONDS "ARM 0 FLAGS" "ARM 1 FLAGS" [COMMON FLAGS...]
#
# Each arm is its own `ella shapes reproduce` run (/tmp/ablate-<i>, restored from the bundle in DIR) on its own
# GPU, so the two differ only in their flags and train at the same time; both score themselves (eval stage).
# What comes back in $OUT: each arm's eval/results.json, log, and connectors in fp16 (arm-<i>-connector-<v>.safetensors
# with their training.json records folded into the log), so the winning arm's weights need no retraining.
# The 2026-11-30 run, for example:
#
#   run(kind="nvidia-h200-x2", carry=[".whl", ".carry"]): FROM_BUNDLE=benchmarks/shapes/bundle-base \
#       bash benchmarks/shapes_ablation.sh 560 "--feature-noise 0" "--feature-noise 1" --variants tsc \
#       --connector-init .carry/v2 --connector-warmup 200 --connector-minutes 3.5
#
# A call that ends before the arms do leaves them running; the same command again (within the machine's 30 s
# idle window) only watches them and collects. Rehearse on a CPU with tiny sizes (both arms then share the CPU). See shapes_gpu_job.sh for the shipped model
# that must be untracked for the call.
set -u
WAIT=${1:?usage: [FROM_BUNDLE=DIR] shapes_ablation.sh WAIT_SECONDS ARM0_FLAGS ARM1_FLAGS [common flags]}
ARMS=("${2:?arm 0 flags}" "${3:?arm 1 flags}")
shift 3
start=$SECONDS
source benchmarks/shapes_gpu_setup.sh
export PYTHONPATH=/tmp/site:$PWD/src
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
for i in 0 1; do
  RUN=/tmp/ablate-$i
  if [ -n "${FROM_BUNDLE:-}" ] && [ ! -d $RUN ]; then python3 benchmarks/shapes_bundle.py restore "$FROM_BUNDLE" $RUN || exit 1; fi
  if [ -f $RUN.log ]; then echo "arm $i: started by an earlier call; watching"; continue; fi
  # shellcheck disable=SC2086  # an arm's flags are words
  echo "arm $i: ella shapes reproduce --out $RUN $* ${ARMS[$i]}"
  if [ "$GPUS" -ge 2 ]; then export CUDA_VISIBLE_DEVICES=$i; fi
  # Half the cores each: two processes with a thread per core apiece ran the CPU parts (VAE round trips of the
  # ceiling row, the oracle) ten times slower. The exit status is written by the detached process itself: a
  # call that ends first (its time limit) kills whatever else it started, and the next call only watches.
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$(( $(nproc) / 2 )) setsid nohup bash -c 'python3 -m ella.cli shapes reproduce --out "$0" "$@"; echo $? > "$0.rc"' \
    $RUN "$@" ${ARMS[$i]} > $RUN.log 2>&1 < /dev/null &
done
unset CUDA_VISIBLE_DEVICES
while { [ ! -f /tmp/ablate-0.rc ] || [ ! -f /tmp/ablate-1.rc ]; } && (( SECONDS - start < WAIT )); do sleep 5; done
for i in 0 1; do
  RUN=/tmp/ablate-$i
  echo "=== arm $i (${ARMS[$i]}): rc $(cat $RUN.rc 2>/dev/null || echo 'still running')"
  tr '\r' '\n' < $RUN.log | grep -v '^\s*$' | grep -v 'truncated because' | tail -n 12
  [ -f $RUN/eval/results.md ] && cat $RUN/eval/results.md
  for f in $RUN/connector-*/training.json; do [ -f "$f" ] && echo "$f: $(tr -d ' \n' < "$f")"; done
  [ -f $RUN/eval/results.json ] && cp $RUN/eval/results.json "$OUT/arm-$i-results.json"
  for f in $RUN/connector-*/ella.safetensors; do
    [ -f "$f" ] && python3 -c "import sys, torch; from ella.connector import TimestepAwareSemanticConnector as C
C.from_single_file(sys.argv[1], torch_dtype=torch.float16).save_single_file(sys.argv[2])" "$f" "$OUT/arm-$i-$(basename "$(dirname "$f")").safetensors"
  done
  tr '\r' '\n' < $RUN.log | grep -v '^\s*$' | grep -v 'truncated because' > "$OUT/arm-$i.log"
done
exit 0
