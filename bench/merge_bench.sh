#!/usr/bin/env bash
# Merge throughput against this machine's own streaming limit, measured in the same run.
#
#   bench/merge_bench.sh [WORK_DIR]        (env: REPS=5, SKIP_COLD=0, SKIP_SCALING=0, PMA=binary)
#
# Workload (issue #2): 8 Llama-shaped bf16 checkpoints from tools/make_trajectory.py (271M params,
# 0.54 GB each), page cache warm, merged by SMA to bf16.
# Limit: `cat` of the inputs to /dev/null + `dd ... conv=fsync` of an output-sized file, the two
# alternated with pma runs; medians of REPS. Ratio = pma wall / limit (<= 1.0 is the target).
# Also: peak RSS (/usr/bin/time -v "Maximum resident set size") for N=2 vs N=8 and for a second,
# smaller model, and one cold-cache run (inputs evicted with posix_fadvise DONTNEED).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench/out}
REPS=${REPS:-5}
mkdir -p "$WORK"
# PMA=/path/to/pma measures another build (a before/after comparison); otherwise this tree's.
if [ -z "${PMA:-}" ]; then
  PMA=target/release/pma
  cargo build --release -q -p pma-cli --no-default-features
fi

gen() { # gen DIR ARGS...
  local dir=$1; shift
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    python3 tools/make_trajectory.py "$dir" "$@" >/dev/null
    touch "$dir/.complete"
  fi
}
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
median() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f\n", m}'; }
evict() { python3 - "$@" <<'PY'
import os, sys
for root in sys.argv[1:]:
    for dp, _, fs in os.walk(root):
        for f in fs:
            fd = os.open(os.path.join(dp, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
PY
}

# bench RUN_DIR LABEL EXTRA_ARGS... -> prints one summary line
bench() {
  local run=$1 label=$2; shift 2
  local out="$WORK/merged-$label" files plan
  # The limit reads exactly the files this merge reads.
  plan=$($PMA merge --run "$run" --method sma "$@" --dry-run --json --out "$out")
  files=$(echo "$plan" | python3 -c 'import json,sys
for i in json.load(sys.stdin)["plan"]["inputs"]: print(i["path"])' | while read -r d; do find "$d/" -name '*.safetensors'; done | sort)
  local in_bytes out_bytes out_mib
  in_bytes=$(cat $files | wc -c)
  out_bytes=$(echo "$plan" | python3 -c 'import json,sys; print(json.load(sys.stdin)["plan"]["bytes_written"])')
  out_mib=$(( (out_bytes + 1048575) / 1048576 ))
  cat $files >/dev/null
  local t_lim=() t_pma=() rss=()
  for _ in $(seq "$REPS"); do
    local a b c
    a=$(now); cat $files >/dev/null; b=$(now)
    dd if=/dev/zero of="$WORK/dd.bin" bs=1M count=$out_mib conv=fsync status=none; c=$(now)
    rm -f "$WORK/dd.bin"
    t_lim+=("$(calc "$b - $a + $c - $b")")
    a=$(now)
    /usr/bin/time -v -o "$WORK/time.txt" $PMA merge --run "$run" --method sma "$@" --overwrite --quiet --out "$out"
    b=$(now)
    t_pma+=("$(calc "$b - $a")")
    rss+=("$(awk -F: '/Maximum resident/ {gsub(/ /,"",$2); print $2}' "$WORK/time.txt")")
  done
  local lim pm r mrss ratios=() i
  for i in "${!t_pma[@]}"; do ratios+=("$(calc "${t_pma[$i]} / ${t_lim[$i]}")"); done
  lim=$(printf '%s\n' "${t_lim[@]}" | median)
  pm=$(printf '%s\n' "${t_pma[@]}" | median)
  mrss=$(printf '%s\n' "${rss[@]}" | sort -n | tail -1)
  r=$(calc "$pm / $lim")
  printf '%-14s in %6.2f GB  out %5.2f GB  limit %6.3f s  pma %6.3f s  ratio %.3f  %7.0f MB/s read  peak RSS %4d MiB\n' \
    "$label" "$(calc "$in_bytes/1e9")" "$(calc "$out_bytes/1e9")" "$lim" "$pm" "$r" \
    "$(calc "$in_bytes/$pm/1e6")" "$((mrss / 1024))"
  # Each rep's pma time over the limit measured just before it (the spread shows the noise).
  printf '%-14s per-rep ratio: median %.3f  min %.3f  max %.3f\n' "$label" \
    "$(printf '%s\n' "${ratios[@]}" | median)" \
    "$(printf '%s\n' "${ratios[@]}" | sort -g | head -1)" \
    "$(printf '%s\n' "${ratios[@]}" | sort -g | tail -1)"
  rm -rf "$out"
}

echo "pma merge benchmark, $(nproc) cores, REPS=$REPS, medians; ratio = pma / (cat inputs + dd fsync of output); load: $(cut -d' ' -f1-3 /proc/loadavg)"
gen "$WORK/llama-271m" --n 8
bench "$WORK/llama-271m" "271M N=8"
if [ "${SKIP_SCALING:-0}" != 1 ]; then
  bench "$WORK/llama-271m" "271M N=2" --last 2
  gen "$WORK/llama-68m" --n 8 --hidden 512 --layers 8 --inter 1408 --vocab 32000
  bench "$WORK/llama-68m" "68M N=8"
fi
if [ "${SKIP_COLD:-0}" != 1 ]; then
  run="$WORK/llama-271m"; files=$(find "$run/" -name '*.safetensors' | sort)
  out_mib=$(( ($(du -cb $files | tail -1 | cut -f1) / 8 + 1048575) / 1048576 ))
  evict "$run"; a=$(now); cat $files >/dev/null; b=$(now)
  dd if=/dev/zero of="$WORK/dd.bin" bs=1M count=$out_mib conv=fsync status=none; c=$(now); rm -f "$WORK/dd.bin"
  evict "$run"; d=$(now)
  /usr/bin/time -v -o "$WORK/time.txt" $PMA merge --run "$run" --method sma --overwrite --quiet --out "$WORK/merged-cold"
  e=$(now)
  lim=$(calc "$b - $a + $c - $b"); pm=$(calc "$e - $d")
  printf '%-14s cold read %.3f s + fsync write %.3f s = limit %.3f s  pma %.3f s  ratio %.3f  peak RSS %d MiB\n' \
    "cold 271M N=8" "$(calc "$b - $a")" "$(calc "$c - $b")" "$lim" "$pm" "$(calc "$pm / $lim")" \
    "$(( $(awk -F: '/Maximum resident/ {gsub(/ /,"",$2); print $2}' "$WORK/time.txt") / 1024 ))"
  rm -rf "$WORK/merged-cold"
fi
