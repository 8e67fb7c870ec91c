#!/usr/bin/env bash
# `pma watch --method ema-stream`: cost of one update against this machine's own I/O limit.
#
#   bench/watch_bench.sh [WORK_DIR]      (env: REPS=9, MODEL="make_trajectory.py size flags")
#
# Workload: Llama-shaped bf16 checkpoints from tools/make_trajectory.py (--n 4, reused in a
# cycle), page cache warm. A trainer stand-in hard-links one new checkpoint into a live run dir,
# then `pma watch --once` performs exactly one update (discovery, pin, EMA update, state and
# output written and fsync'd, atomic commit, clean-up), timed as a whole process.
# Limit (the issue's definition): `cat` of the new checkpoint + `cat` of the state + `dd
# conv=fsync` of a state-sized file, measured alternately with the updates: median cat time plus
# state bytes / median fsync'd write bandwidth (2 dd samples per rep), medians of REPS.
# Ratio = update wall / limit (target <= 1.3), from the medians; also the median of the per-rep
# ratios (each update against the limit measured just before it). A second ratio counts the output's bytes in the
# limit's write as well, for the configurations that write a separate output. Three configurations:
#   f32 state, f32 output  the output dir hard-links the state file: no extra bytes written
#   f32 state, bf16 output also writes a bf16 output (an extra half-state write, not in the limit)
#   f64 state, bf16 output
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench/out}
REPS=${REPS:-9}
MODEL=${MODEL:---hidden 1024 --layers 8 --inter 2816 --vocab 32000}
mkdir -p "$WORK"
# PMA=/path/to/pma measures another build (a before/after comparison); otherwise this tree's.
if [ -z "${PMA:-}" ]; then
  PMA=${CARGO_TARGET_DIR:-target}/release/pma
  cargo build --release -q -p pma-cli --no-default-features
fi

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
median() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.4f\n", m}'; }
bytes() { if [ $# -eq 0 ]; then echo 0; else cat "$@" | wc -c; fi; }

traj="$WORK/watch-trajectory"
if [ ! -f "$traj/.complete" ]; then
  rm -rf "$traj"
  # shellcheck disable=SC2086
  python3 tools/make_trajectory.py "$traj" --n 4 $MODEL >/dev/null
  touch "$traj/.complete"
fi
mapfile -t CKPTS < <(find "$traj" -mindepth 1 -maxdepth 1 -name 'step-*' | sort)

# bench LABEL WATCH_ARGS...
bench() {
  local label=$1; shift
  local live="$WORK/watch-live" out="$WORK/watch-merged"
  rm -rf "$live" "$out"; mkdir -p "$live"
  cp -al "${CKPTS[0]}" "$live/step-0000001"
  $PMA watch "$live" --out "$out" --once --settle 0 --quiet --keep 1 "$@"   # initialise the state
  local t_read=() w_bw=() t_upd=() r_pair=() new_b=0 state_b=0 out_b
  out_b=$(bytes $(find "$out" -path '*/step-*' -name '*.safetensors' -links 1))
  for r in $(seq "$REPS"); do
    local step src new state state_mib a b c d e
    step=$(printf 'step-%07d' $((r + 1)))
    src=${CKPTS[$((r % ${#CKPTS[@]}))]}
    cp -al "$src" "$live/$step"
    new=$(find "$live/$step" -name '*.safetensors')
    state=$(find "$out/.pma-watch/tensors" -name '*.safetensors')
    new_b=$(bytes $new); state_b=$(bytes $state)
    state_mib=$(( (state_b + 1048575) / 1048576 ))
    cat $new $state >/dev/null   # both warm, as in a live run right after the trainer wrote
    sync   # start each timing with no one's dirty pages pending (ours or other processes')
    a=$(now); cat $new >/dev/null; cat $state >/dev/null; b=$(now)
    t_read+=("$(calc "$b - $a")")
    # Write bandwidth from two fsync'd writes per rep (state-sized, and state+output-sized),
    # pooled: on a shared virtual disk single writes vary by 2x, whichever comes first.
    local mib
    for mib in $state_mib $(( (state_b + out_b + 1048575) / 1048576 )); do
      sync
      a=$(now)
      dd if=/dev/zero of="$WORK/dd.bin" bs=1M count=$mib conv=fsync status=none
      b=$(now)
      rm -f "$WORK/dd.bin"
      w_bw+=("$(calc "$mib * 1048576 / ($b - $a)")")
    done
    sync
    d=$(now)
    $PMA watch "$live" --out "$out" --once --settle 0 --quiet --keep 1 "$@"
    e=$(now)
    t_upd+=("$(calc "$e - $d")")
    # The same ratio within this rep alone: on a shared machine the load drifts, and a rep's
    # update and limit see the same background.
    local n=${#w_bw[@]}
    r_pair+=("$(calc "($e - $d) / (${t_read[-1]} + $state_b / ${w_bw[$((n - 2))]})")")
    out_b=$(bytes $(find "$out/$step" -name '*.safetensors' -links 1))   # a link to the state is no write
    rm -rf "$live/$(printf 'step-%07d' "$r")"   # the trainer's rotation
  done
  local rd bw lim lim_out upd pair
  rd=$(printf '%s\n' "${t_read[@]}" | median)
  bw=$(printf '%s\n' "${w_bw[@]}" | median)
  lim=$(calc "$rd + $state_b / $bw")
  lim_out=$(calc "$rd + ($state_b + $out_b) / $bw")
  upd=$(printf '%s\n' "${t_upd[@]}" | median)
  pair=$(printf '%s\n' "${r_pair[@]}" | median)
  printf '%-24s new %4.0f MB  state %5.0f MB  output written %4.0f MB  update %6.3f s  limit %6.3f s  ratio %.2f (per-rep median %.2f)  (limit with output write %6.3f s, ratio %.2f)  pma %5.0f MB/s (new+state read, state written); cat %5.0f MB/s, dd fsync %4.0f MB/s\n' \
    "$label" "$(calc "$new_b/1e6")" "$(calc "$state_b/1e6")" "$(calc "$out_b/1e6")" "$upd" "$lim" \
    "$(calc "$upd / $lim")" "$pair" "$lim_out" "$(calc "$upd / $lim_out")" "$(calc "($new_b + 2*$state_b)/$upd/1e6")" \
    "$(calc "($new_b + $state_b)/$rd/1e6")" "$(calc "$bw/1e6")"
  rm -rf "$live" "$out"
}

echo "pma watch ema-stream update benchmark, $(nproc) cores, REPS=$REPS, medians;" \
  "ratio = update / (cat new + cat state + dd fsync of state size)"
bench "f32 state, f32 output" --method ema-stream --alpha 0.01 --state-dtype f32 --dtype f32
bench "f32 state, bf16 output" --method ema-stream --alpha 0.01 --state-dtype f32
bench "f64 state, bf16 output" --method ema-stream --alpha 0.01 --state-dtype f64
