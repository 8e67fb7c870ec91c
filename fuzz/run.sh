#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds (default 60), or for a fixed number of runs.
#   fuzz/run.sh [SECONDS]          time-boxed (CI: 60)
#   FUZZ_RUNS=1000000 fuzz/run.sh  a fixed number of executions per target
# Stable Rust works: cargo-fuzz's flags need RUSTC_BOOTSTRAP=1, and --sanitizer none avoids
# the nightly-only ASan. A crash leaves its input in fuzz/artifacts/<target>/ and fails the run;
# turn it into a regression test in the crate that owns the parser.
# Adding a target: fuzz_targets/<name>.rs, a [[bin]] in Cargo.toml, seeds in corpus/<name>/,
# and <name> in TARGETS below.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${1:-60}"
TARGETS=(safetensors_header shard_index step_name dcp_pickle torch_zip)
export RUSTC_BOOTSTRAP=1
for t in "${TARGETS[@]}"; do
  # Fresh findings go to a scratch corpus so the committed seeds stay small.
  work="target/corpus/$t"
  mkdir -p "$work"
  if [[ -n "${FUZZ_RUNS:-}" ]]; then
    limit=(-runs="$FUZZ_RUNS")
  else
    limit=(-max_total_time="$SECONDS_PER_TARGET")
  fi
  echo "== fuzz $t"
  cargo fuzz run --sanitizer none --release "$t" "$work" "corpus/$t" -- \
    "${limit[@]}" -rss_limit_mb=256 -timeout=10 -print_final_stats=1
done
