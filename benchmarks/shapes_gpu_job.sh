#!/usr/bin/env bash
# `ella shapes reproduce` on a lent GPU machine whose calls last at most 10 minutes each.
#
# Each NAME is one detached (setsid) `reproduce` job over the same run directory, started with a
# snapshot of src/ once every earlier job has ended (stages already done are skipped). Every call
# waits up to WAIT seconds, prints the logs' tails and writes a bundle of the stages trained so far to
# $OUT/bundle (<= 8 files of <= 16 MiB). Calls whose NAME already ran on this machine only watch it.
#
# A machine goes back after 30 s idle, so plan for a fresh machine at every call: each call restores
# what earlier calls trained (--from-bundle, a bundle dir carried in an ignored folder or committed)
# and finishes one stage. STOP=SECONDS makes the training loops stop (and save) that long after the
# call began (the recipe's --stop-at), so a stage always ends inside the call:
#
#   A  run(carry=[".whl"]): STOP=520 bash benchmarks/shapes_gpu_job.sh base 575 \
#          --from-bundle benchmarks/shapes/bundle-vae --until base --base-steps 20000
#      (done 2026-11-27: its bundle, VAE + base, is committed as benchmarks/shapes/bundle-base/)
#   B  run(carry=[".whl"]), once per variant V in tsc, resampler, mlp (a fresh machine each time):
#          STOP=500 bash benchmarks/shapes_gpu_job.sh conn 560 --from-bundle benchmarks/shapes/bundle-base \
#          --until connectors --variants V --connector-steps 50000
#      (one variant alone trains data-parallel over all 4 GPUs; its bundle = A's + connector-V.safetensors;
#      done 2026-11-27 with --connector-batch 1024 --connector-lr 6e-4, now the defaults, STOP=500, and for mlp
#      --connector-steps 5300 to match the TSC's 5,300: benchmarks/RESULTS.md, fourth run)
#   C  eval on this machine's CPU (base + 3 connectors + the LLM + wheels exceed a call's 64 MiB), one row as
#      each connector comes back, all into the same --out (rows already scored are kept; ~15 min a row for 100
#      items): ella shapes reproduce --out /tmp/shapes-eval --from-bundle DIR_V --variants V --eval-items 100 \
#          --device cpu
#      The ceiling and base rows of bundle-base are in benchmarks/shapes/results.json: seed them first with
#      mkdir -p /tmp/shapes-eval/eval && python3 -c "import json; d = json.load(open('benchmarks/shapes/results.json'));
#      d['rows'] = {k: v for k, v in d['rows'].items() if not k.startswith('+')}; json.dump(d,
#      open('/tmp/shapes-eval/eval/results.json', 'w'))"
#
# Each was run on this machine's CPU with tiny sizes (--device cpu --n-train 2000 --processes 2 ...)
# before it went to a GPU. ".carry/" must be in .git/info/exclude.
#
# .whl/ (git-ignored) holds the wheels the machine lacks (diffusers, importlib_metadata, webdataset,
# braceexpand) and the LLM packed by benchmarks/shapes_pack_llm.py (minilm.tar.xz, ~19 MiB). The
# shipped model under src/ (28 MB, tracked) does not fit beside them: untrack it for the calls
# (`git rm -r --cached -q src/ella/shapes/model` + `/src/ella/shapes/model/` in .git/info/exclude),
# and `git add` it back after.
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
if [ ! -f /tmp/minilm/config.json ]; then
  if [ -f .whl/minilm.tar.xz ]; then
    python3 -c "import io, lzma, sys, tarfile; tarfile.open(fileobj=io.BytesIO(lzma.decompress(open(sys.argv[1], 'rb').read()))).extractall(sys.argv[2], filter='data')" .whl/minilm.tar.xz /tmp/minilm || exit 1
  else
    cp -r .whl/minilm /tmp/minilm || exit 1
  fi
fi
export PYTHONPATH=/tmp/site:$JOB/src PYTHONUNBUFFERED=1 ELLA_SHAPES_LLM=/tmp/minilm
STOP_FLAGS=()
if [ -n "${STOP:-}" ] && [ "$STOP" != 0 ]; then STOP_FLAGS=(--stop-at $(( $(date +%s) + STOP ))); fi

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
  echo "starting: ella shapes reproduce --out $RUN $* ${STOP_FLAGS[*]}"
  setsid nohup bash -c 'echo $$ > '$JOB'/pid; python3 -m ella.cli shapes reproduce --out '$RUN' "$@"; echo $? > '$JOB'/rc' \
    job "$@" "${STOP_FLAGS[@]}" > $JOB/log 2>&1 < /dev/null &
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
for f in $RUN/vae/roundtrip.json $RUN/base/training.json $RUN/connector-*/training.json; do
  [ -f "$f" ] && echo "$f: $(tr -d ' \n' < "$f")"
done
[ -f $RUN/eval/results.md ] && cat $RUN/eval/results.md
[ -d $RUN ] && python3 -c "import sys; from pathlib import Path; from ella.shapes.bundle import write_bundle; \
print('bundle:', [p.name for p in write_bundle(Path(sys.argv[1]), Path(sys.argv[2]))])" $RUN "$OUT/bundle"
for f in /tmp/shapes-job-*/log $RUN/connector-*.log; do  # every log, whole (tqdm's \r updates as lines)
  [ -f "$f" ] && { echo "=== $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$'; }
done > "$OUT/logs.txt" 2>/dev/null
exit 0
