#!/usr/bin/env bash
# Lab train/eval throughput next to the PyTorch CPU reference of the identical model, batch and
# sequence length, on this machine.
#
#   bench/lab_bench.sh [LAYERS HIDDEN HEADS BATCH SEQ STEPS [moe]]     (default 4 128 4 16 128 10)
#
# THREADS (default 2) sets RAYON_NUM_THREADS for the lab and torch.set_num_threads for PyTorch.
# The PyTorch half is skipped where torch/transformers are not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-4} H=${2:-128} A=${3:-4} B=${4:-16} T=${5:-128} S=${6:-10} KIND=${7:-dense}
THREADS=${THREADS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p pma-lab --example lab_bench
echo "== pma-lab (candle, $THREADS threads)"
RAYON_NUM_THREADS=$THREADS "$CARGO_TARGET_DIR/release/examples/lab_bench" "$L" "$H" "$A" "$B" "$T" "$S" "$KIND"
echo "== PyTorch reference ($THREADS threads)"
MOE=()
[ "$KIND" = moe ] && MOE=(--moe)
python3 bench/lab_torch_reference.py --layers "$L" --hidden "$H" --heads "$A" --batch "$B" --seq "$T" \
  --steps "$S" --threads "$THREADS" "${MOE[@]}" 2> >(grep -v -i warn >&2)
