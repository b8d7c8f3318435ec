#!/usr/bin/env bash
# `ella shapes reproduce` on a lent GPU machine whose calls last at most 10 minutes each.
#
# Each NAME is one detached (setsid) job over the same run directory: `torchrun`, one process per
# visible GPU, running `ella shapes reproduce` (every stage data-parallel over them), started with a
# snapshot of src/ once every earlier job has ended (stages already done are skipped). Every call
# waits up to WAIT seconds, prints the logs' tails and writes a bundle of the stages trained so far to
# $OUT/bundle (<= 8 files of <= 16 MiB, benchmarks/shapes_bundle.py). Calls whose NAME already ran on
# this machine only watch it.
#
# A machine goes back after 30 s idle, so plan for a fresh machine at every call: FROM_BUNDLE=DIR
# restores what earlier calls trained (a bundle dir carried in an ignored folder or committed) into the
# run before the job starts, and each call finishes one stage. STOP=SECONDS makes the training loops
# stop (and save) that long after the call began (the recipe's --stop-at), so a stage always ends
# inside the call. For example:
#
#   base (after a call that trained the VAE, whose bundle is in DIR):
#          run(carry=[".whl"]): FROM_BUNDLE=DIR STOP=520 bash benchmarks/shapes_gpu_job.sh base 575 \
#              --until base --base-steps 20000
#   all three connectors and the eval in one detached job spanning back-to-back calls on one warm machine
#   (what the 2026-11-29 run did on 2 H200s: ~23 minutes; the later calls only watch, with the same arguments
#   so that a fresh machine would restart it; the eval runs there too, so every row comes back scored):
#          run(carry=[".whl"]): FROM_BUNDLE=benchmarks/shapes/bundle-base STOP=1500 \
#              bash benchmarks/shapes_gpu_job.sh v2b 540 --connector-minutes 4.5
#   one connector per call (a variant alone trains data-parallel over all the GPUs; its bundle = the
#   restored one + connector-V.safetensors), V in tsc, resampler, mlp:
#          run(carry=[".whl"]): FROM_BUNDLE=benchmarks/shapes/bundle-base STOP=500 \
#              bash benchmarks/shapes_gpu_job.sh conn 560 --until connectors --variants V --connector-steps 50000
#   eval on this machine's CPU (base + 3 connectors + the LLM + wheels exceed a call's 64 MiB), one row as each
#   connector comes back, all into the same run (rows already scored are kept; a bundle's stages that the run
#   already holds are kept): python benchmarks/shapes_bundle.py restore DIR_V /tmp/shapes-eval &&
#          ella shapes reproduce --out /tmp/shapes-eval --variants V --eval-items 100 --device cpu
#      The ceiling and base rows of bundle-base are in benchmarks/shapes/results.json: seed them first with
#      mkdir -p /tmp/shapes-eval/eval && python3 -c "import json; d = json.load(open('benchmarks/shapes/results.json'));
#      d['rows'] = {k: v for k, v in d['rows'].items() if not k.startswith('+')}; json.dump(d,
#      open('/tmp/shapes-eval/eval/results.json', 'w'))"
#
# Try each call on a CPU first with tiny sizes (e.g. --device cpu --n-train 2000 ...; the job starts one
# process when no GPU is visible). ".carry/" must be in .git/info/exclude.
#
# .whl/ (git-ignored) holds the wheels and the packed LLM the machine lacks (benchmarks/shapes_gpu_setup.sh
# installs them). The shipped model under src/ (28 MB, tracked) does not fit beside them: untrack it for the calls
# (`git rm -r --cached -q src/ella/shapes/model` + `/src/ella/shapes/model/` in .git/info/exclude),
# and `git add` it back after.
set -u
NAME=${1:?usage: [FROM_BUNDLE=DIR] [STOP=SECONDS] shapes_gpu_job.sh NAME WAIT_SECONDS [reproduce flags]}
WAIT=${2:?usage: [FROM_BUNDLE=DIR] [STOP=SECONDS] shapes_gpu_job.sh NAME WAIT_SECONDS [reproduce flags]}
shift 2
RUN=/tmp/shapes-run
JOB=/tmp/shapes-job-$NAME
start=$SECONDS
source benchmarks/shapes_gpu_setup.sh
export PYTHONPATH=/tmp/site:$JOB/src PYTHONUNBUFFERED=1
STOP_FLAGS=()
if [ -n "${STOP:-}" ] && [ "$STOP" != 0 ]; then STOP_FLAGS=(--stop-at $(( $(date +%s) + STOP ))); fi
GPUS=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")

others_running() {
  for pid in /tmp/shapes-job-*/pid; do
    [ -f "$pid" ] && [ "$pid" != $JOB/pid ] && kill -0 "$(cat "$pid")" 2>/dev/null && return 0
  done
  return 1
}
if [ ! -f $JOB/pid ]; then
  while others_running && (( SECONDS - start < WAIT )); do sleep 5; done
fi
if [ -f $JOB/pid ] && [ ! -f $JOB/rc ]; then
  echo "job $NAME running (pid $(cat $JOB/pid))"
elif [ -f $JOB/rc ]; then
  echo "job $NAME finished, rc $(cat $JOB/rc)"
elif others_running; then
  echo "job $NAME not started: an earlier job is still running"
else
  mkdir -p $JOB && rm -rf $JOB/src && cp -r src $JOB/src
  if [ -n "${FROM_BUNDLE:-}" ]; then
    PYTHONPATH=/tmp/site:$JOB/src python3 benchmarks/shapes_bundle.py restore "$FROM_BUNDLE" $RUN || exit 1
  fi
  echo "starting on $GPUS process(es): ella shapes reproduce --out $RUN $* ${STOP_FLAGS[*]}"
  setsid nohup bash -c 'echo $$ > '$JOB'/pid; python3 -m torch.distributed.run --standalone --nproc_per_node '$GPUS' \
    -m ella.cli shapes reproduce --out '$RUN' "$@"; echo $? > '$JOB'/rc' \
    job "$@" "${STOP_FLAGS[@]}" > $JOB/log 2>&1 < /dev/null &
  sleep 2
fi

while [ -f $JOB/pid ] && [ ! -f $JOB/rc ] && (( SECONDS - start < WAIT )); do sleep 5; done

for log in /tmp/shapes-job-*/log; do
  echo "=== $log (tail)"; tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 25
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
for f in $RUN/vae/roundtrip.json $RUN/base/training.json $RUN/connector-*/training.json; do
  [ -f "$f" ] && echo "$f: $(tr -d ' \n' < "$f")"
done
[ -f $RUN/eval/results.md ] && cat $RUN/eval/results.md
[ -f $RUN/vae/config.json ] && python3 benchmarks/shapes_bundle.py write $RUN "$OUT/bundle"
for f in /tmp/shapes-job-*/log; do  # every log, whole (tqdm's \r updates as lines)
  [ -f "$f" ] && { echo "=== $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$'; }
done > "$OUT/logs.txt" 2>/dev/null
exit 0
