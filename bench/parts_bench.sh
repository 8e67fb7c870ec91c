#!/usr/bin/env bash
# Partitioned merge overhead: K parts on ONE machine (then --finalize) against one process.
#
#   bench/parts_bench.sh [WORK_DIR]     (env: K=4, REPS=3, PMA=binary, SIZE=small|medium,
#                                         PMA_PYTHON=python with numpy)
#
# Workload: 4 Llama-shaped bf16 checkpoints from tools/make_trajectory.py (SIZE=small: 34M
# params, 68 MB each; medium: 271M params, 0.54 GB each), page cache warm, SMA to bf16, 10 MB
# shards (small) or 100 MB shards (medium): at least K shards for K <= 6, so no part cuts the
# shards smaller than the single-process merge does (with more parts, pass a K that fits).
# Measured, medians of REPS:
#   single      one `pma merge` (all cores);
#   sequential  parts 0..K-1 one after another (all cores each) + the finalize: the total is the
#               partitioning overhead (issue #10 target: within 1.2x of single);
#   concurrent  the K parts at once (cores/K threads each) + the finalize;
#   per part    each part's wall time in the sequential runs, and the finalize's.
# Expected wall on N nodes (N=16): the slowest part of a K=N split is about
#   (sum of sequential part times) / N, plus the finalize, assuming every node reads its inputs
# as fast as this machine; the finalize checks each part file's size, inode and mtime against
# its manifest and links the files (FINALIZE_FLAGS=--verify-parts also reads every file back
# against its CRC-32: measure that cost with it).
# The outputs are compared byte for byte with the single-process merge.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench/out}
K=${K:-4}
REPS=${REPS:-3}
SIZE=${SIZE:-small}
mkdir -p "$WORK"
if [ -z "${PMA:-}" ]; then
  PMA=target/release/pma
  cargo build --release -q -p pma-cli --no-default-features
fi
case "$SIZE" in
  small) GEN=(--n 4 --hidden 512 --layers 8 --inter 1408 --vocab 8000); SHARD=10MB ;;
  medium) GEN=(--n 4 --hidden 1024 --layers 16 --inter 2816 --vocab 32000); SHARD=100MB ;;
  *) echo "SIZE must be small or medium" >&2; exit 2 ;;
esac
RUN="$WORK/parts-run-$SIZE"
if [ ! -f "$RUN/.complete" ]; then
  rm -rf "$RUN"
  "${PMA_PYTHON:-python3}" tools/make_trajectory.py "$RUN" "${GEN[@]}" --dtype bf16 >/dev/null
  touch "$RUN/.complete"
fi
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.3f\", $* }"; }
median() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f\n", m}'; }
merge() { "$PMA" merge --quiet --overwrite --method sma --max-shard-size "$SHARD" --run "$RUN" "$@"; }
cores=$(nproc)
per_part_threads=$(( cores / K > 0 ? cores / K : 1 ))
find "$RUN" -name '*.safetensors' -exec cat {} + >/dev/null # warm the page cache

t_single=() t_seq=() t_conc=() t_fin=()
declare -A t_part
for r in $(seq "$REPS"); do
  a=$(now); merge --out "$WORK/single"; b=$(now)
  t_single+=("$(calc "$b - $a")")

  a=$(now)
  for i in $(seq 0 $((K - 1))); do
    p0=$(now); merge --out "$WORK/seq" --part "$i" --parts "$K"; p1=$(now)
    t_part[$i]+="$(calc "$p1 - $p0") "
  done
  f0=$(now); merge --out "$WORK/seq" --finalize ${FINALIZE_FLAGS:-}; b=$(now)
  t_fin+=("$(calc "$b - $f0")")
  t_seq+=("$(calc "$b - $a")")

  a=$(now)
  pids=()
  for i in $(seq 0 $((K - 1))); do
    merge --out "$WORK/conc" --part "$i" --parts "$K" --threads "$per_part_threads" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  merge --out "$WORK/conc" --finalize ${FINALIZE_FLAGS:-}; b=$(now)
  t_conc+=("$(calc "$b - $a")")
done

for out in seq conc; do
  for f in "$WORK/single"/*; do
    cmp -s "$f" "$WORK/$out/$(basename "$f")" || { echo "FAIL: $out/$(basename "$f") differs (or is missing: fewer shards than parts makes the parts cut smaller shards)" >&2; exit 1; }
  done
done

s=$(printf '%s\n' "${t_single[@]}" | median)
q=$(printf '%s\n' "${t_seq[@]}" | median)
c=$(printf '%s\n' "${t_conc[@]}" | median)
fin=$(printf '%s\n' "${t_fin[@]}" | median)
sum_parts=0
parts_line=""
for i in $(seq 0 $((K - 1))); do
  m=$(printf '%s\n' ${t_part[$i]} | median)
  parts_line+=" $m"
  sum_parts=$(calc "$sum_parts + $m")
done
n_files=$(ls "$WORK/single" | wc -l)
echo "workload: $SIZE, $(du -sh "$RUN" | cut -f1) of inputs, $n_files output files, K=$K, $cores cores, REPS=$REPS (medians)"
echo "single process:            ${s}s"
echo "K parts sequential+final:  ${q}s  ratio $(calc "$q / $s")  (target <= 1.2)"
echo "K parts concurrent+final:  ${c}s  ratio $(calc "$c / $s")  ($per_part_threads threads each)"
echo "K parts alone (sum):       ${sum_parts}s  ratio $(calc "$sum_parts / $s")  (the finalize excluded)"
echo "per part (s):              $parts_line   finalize: ${fin}s"
echo "expected on 16 nodes:      $(calc "$sum_parts / 16 + $fin")s  (sum of part times / 16 + finalize; each node reading as fast as this one)"
echo "outputs: byte-identical to the single-process merge"
rm -rf "$WORK/single" "$WORK/seq" "$WORK/conc"
