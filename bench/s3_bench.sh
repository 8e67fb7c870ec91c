#!/usr/bin/env bash
# Merge throughput on object storage against `object_store` alone, measured in the same run.
#
#   bench/s3_bench.sh [WORK_DIR]      (env: REPS=3, N=4, K=4, PMA=binary, PMA_S3_ENDPOINT=http://...)
#
# Workload: N Llama-shaped bf16 checkpoints from tools/make_trajectory.py (67M params, ~134 MB
# each) uploaded to a local moto_server (started here unless PMA_S3_ENDPOINT is set; it keeps
# objects in memory), merged by SMA to bf16:
# - pma S3->S3 against the floor "object_store reads every input byte (ranged GETs, 8 in flight)
#   + writes an output-sized object (multipart)" (crates/pma-format/examples/s3_raw_io.rs);
# - pma S3->local against the floor's read time alone;
# - a partitioned S3->S3 merge, K parts one after another then --finalize (server-side copies
#   into place, index last), against the single-process S3->S3 merge: the cost of partitioning
#   to a store, whose gain needs several machines.
# The floor runs alternate with pma runs. Prints each ratio's median, min and max over REPS.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench/out-s3}
REPS=${REPS:-3}
N=${N:-4}
K=${K:-4}
PY=${PMA_PYTHON:-python3}
mkdir -p "$WORK"
if [ -z "${PMA:-}" ]; then
  PMA=target/release/pma
  cargo build --release -q -p pma-cli --no-default-features
fi
cargo build --release -q -p pma-format --example s3_raw_io
RAW=target/release/examples/s3_raw_io

RUN="$WORK/run"
if [ ! -f "$RUN/.complete" ]; then
  rm -rf "$RUN"
  "$PY" tools/make_trajectory.py "$RUN" --n "$N" --hidden 768 --layers 6 --inter 2048 \
    --vocab 16000 --heads 12 --dtype bf16 >/dev/null
  touch "$RUN/.complete"
fi

MOTO_PID=
if [ -z "${PMA_S3_ENDPOINT:-}" ]; then
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${MOTO:-moto_server}" -H 127.0.0.1 -p "$port" >"$WORK/moto.log" 2>&1 &
  MOTO_PID=$!
  trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT
  PMA_S3_ENDPOINT="http://127.0.0.1:$port"
  for _ in $(seq 1 150); do
    "$PY" -c "import urllib.request; urllib.request.urlopen('$PMA_S3_ENDPOINT/')" 2>/dev/null && break
    sleep 0.2
  done
fi
export AWS_ENDPOINT_URL="$PMA_S3_ENDPOINT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
BUCKET=pma-bench-$$
"$PY" - "$PMA_S3_ENDPOINT" "$BUCKET" "$RUN" <<'PY'
import os, sys, urllib.request
endpoint, bucket, run = sys.argv[1:]
def put(path, data=b""):
    # octet-stream: moto would parse a form-encoded binary body (urllib's default) and hang.
    req = urllib.request.Request(f"{endpoint}/{path}", data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req).read()
put(bucket)
for dp, _, fs in os.walk(run):
    for f in fs:
        if f.startswith("."):
            continue
        p = os.path.join(dp, f)
        with open(p, "rb") as fh:
            put(f"{bucket}/run/{os.path.relpath(p, run)}", fh.read())
PY

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.4f\", $* }"; }
stats() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "median %.3f  min %.3f  max %.3f", m, a[1], a[NR]}'; }

in_bytes=$(find "$RUN" -name '*.safetensors' -printf '%s\n' | awk '{s+=$1} END {print s}')
plan=$($PMA merge --run "s3://$BUCKET/run" --method sma --dry-run --json --out "$WORK/plan-out")
out_bytes=$(echo "$plan" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["plan"]["bytes_written"])')
echo "inputs: $N checkpoints, $in_bytes bytes; output $out_bytes bytes; REPS=$REPS"

r_s3s3=() r_s3local=() r_parts=()
for rep in $(seq "$REPS"); do
  line=$($RAW "s3://$BUCKET/run" "s3://$BUCKET/raw-$rep/model.safetensors" "$out_bytes")
  read_s=$(echo "$line" | sed 's/.*read_secs=\([0-9.]*\).*/\1/')
  write_s=$(echo "$line" | sed 's/.*write_secs=\([0-9.]*\).*/\1/')
  a=$(now)
  $PMA merge --quiet --run "s3://$BUCKET/run" --method sma --out "s3://$BUCKET/merged-$rep"
  b=$(now)
  $PMA merge --quiet --run "s3://$BUCKET/run" --method sma --out "$WORK/merged-local"
  c=$(now)
  rm -rf "$WORK/merged-local"
  for part in $(seq 0 $((K - 1))); do
    $PMA merge --quiet --run "s3://$BUCKET/run" --method sma --out "s3://$BUCKET/parts-$rep" \
      --part "$part" --parts "$K"
  done
  d=$(now)
  $PMA merge --quiet --run "s3://$BUCKET/run" --method sma --out "s3://$BUCKET/parts-$rep" --finalize
  e=$(now)
  t_s3s3=$(calc "$b - $a"); t_s3local=$(calc "$c - $b")
  t_parts=$(calc "$d - $c"); t_finalize=$(calc "$e - $d")
  r_s3s3+=("$(calc "$t_s3s3 / ($read_s + $write_s)")")
  r_s3local+=("$(calc "$t_s3local / $read_s")")
  r_parts+=("$(calc "($t_parts + $t_finalize) / $t_s3s3")")
  echo "rep $rep: object_store read ${read_s}s write ${write_s}s | pma S3->S3 ${t_s3s3}s S3->local ${t_s3local}s | $K parts ${t_parts}s + finalize ${t_finalize}s"
done
echo "S3->S3    pma / (object_store read + write): $(printf '%s\n' "${r_s3s3[@]}" | stats)"
echo "S3->local pma / (object_store read):         $(printf '%s\n' "${r_s3local[@]}" | stats)"
echo "S3->S3    $K parts + finalize / one process:  $(printf '%s\n' "${r_parts[@]}" | stats)"
