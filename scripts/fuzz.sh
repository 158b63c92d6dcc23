#!/usr/bin/env bash
# Builds the AFL++ fuzz targets in fuzz/ (cargo-afl, stable Rust) and runs each
# for a bounded time, one at a time (JOBS=2 runs two at once), then reports
# executions and crashes per target. Crash inputs are copied to
# fuzz/regressions/<target>/ so that tests/fuzz_regressions.rs replays them.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 600 seconds, every target
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-600}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(tar walheader conninfo record pack_index manifest descriptor control_file replication)
fi
command -v cargo-afl >/dev/null || cargo install cargo-afl --locked
export CARGO_TARGET_DIR="$PWD/fuzz/target"
(cd fuzz && cargo afl build --release)
OUT="${FUZZ_OUT:-fuzz/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
run() {
    local t="$1"
    rm -rf "$OUT/$t"
    (cd fuzz && cargo afl fuzz -V "$SECONDS_PER_TARGET" -i "seeds/$t" -o "$OUT/$t" "target/release/$t") >"$OUT/$t.log" 2>&1 || true
}
JOBS="${JOBS:-1}"
running=0
for t in "${TARGETS[@]}"; do
    run "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
crashed=0
printf '%-14s %12s %10s %8s\n' target executions seconds crashes
for t in "${TARGETS[@]}"; do
    stats="$OUT/$t/default/fuzzer_stats"
    execs=$(awk -F': *' '/^execs_done/ {print $2}' "$stats" 2>/dev/null || echo "?")
    secs=$(awk -F': *' '/^run_time/ {print $2}' "$stats" 2>/dev/null || echo "?")
    crashes=$(find "$OUT/$t/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
    printf '%-14s %12s %10s %8s\n' "$t" "$execs" "$secs" "$crashes"
    if [ "$crashes" -gt 0 ]; then
        crashed=1
        mkdir -p "fuzz/regressions/$t"
        for c in "$OUT/$t/default/crashes"/id:*; do
            cp "$c" "fuzz/regressions/$t/$(sha1sum "$c" | cut -c1-16)"
        done
    fi
done
if [ "$crashed" -ne 0 ]; then
    echo "fuzz: crashes found; inputs copied to fuzz/regressions/ (replayed by tests/fuzz_regressions.rs)" >&2
    exit 1
fi
