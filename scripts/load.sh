#!/usr/bin/env bash
# Load test: does the daemon keep up with PostgreSQL writing as fast as it can?
#
#   sustained  pgbench at full speed (4 clients) for N minutes with the daemon
#              streaming into a file repository: every 10 s, the WAL written,
#              the daemon's lag (walvault_wal_lag_bytes / _seconds from its
#              /metrics, and the slot's flush position) and its RSS
#   backlog    the daemon stopped while PostgreSQL writes B segments (its slot
#              keeps them); started again: time until the repository has
#              caught up, segments/s, and RSS while draining
#
#   scripts/load.sh [--minutes N] [--backlog B] [--scale S] [--keep]
#
# Defaults: 10 minutes, 500 segments, pgbench scale 50. Results: a table on
# stdout and in bench-results/load-<time>.md; samples in bench-results/load-<time>.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MINUTES=10
BACKLOG=500
SCALE=50
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES=$2; shift 2 ;;
    --backlog) BACKLOG=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: scripts/load.sh [--minutes N] [--backlog B] [--scale S] [--keep]" >&2; exit 2 ;;
  esac
done
say() { printf '== %s\n' "$*" >&2; }

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
[ -x "$PGBIN/postgres" ] || { echo "PostgreSQL server binaries not found in $PGBIN (set PGBIN)" >&2; exit 1; }
command -v curl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }

say "building walvault (release)"
cargo build --release --quiet
W=/tmp/walvault-load
PORT=55440
METRICS=127.0.0.1:55441
PG() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PSQL() { PG "$PGBIN/psql" -X -Atq -h $W -p $PORT -U postgres -d postgres -c "$1"; }
DAEMON=
cleanup() {
  [ -n "$DAEMON" ] && stop_daemon
  [ -f $W/pg/postmaster.pid ] && PG "$PGBIN/pg_ctl" -D $W/pg stop -m immediate >/dev/null 2>&1
  [ "${1:-}" = start ] || [ "$KEEP" = 1 ] || rm -rf $W
  return 0
}
cleanup start
rm -rf $W
trap cleanup EXIT
mkdir -p $W
cp target/release/walvault $W/walvault
chmod 755 $W $W/walvault
chown postgres $W

PG $W/walvault keygen --out $W/keys > $W/keygen.txt
REC=$(sed -n 's/^recipients = \["\(.*\)"\]/\1/p' $W/keygen.txt)
PUB=$(sed -n 's/^public_key = "\(.*\)"/\1/p' $W/keygen.txt)
cat > $W/walvault.toml <<EOF
[postgres]
conninfo = "host=$W port=$PORT user=postgres"
bin_dir = "$PGBIN"
[repository]
url = "file://$W/repo"
[encryption]
recipients = ["$REC"]
identity_file = "$W/keys/restore.key"
[signing]
key_file = "$W/keys/agent.key"
public_key = "$PUB"
[wal]
spool_dir = "$W/spool"
[schedule]
base_backup = "0 0 3 1 1 *"
[daemon]
metrics_listen = "$METRICS"
slot_warn_bytes = "64GiB"
EOF
chown postgres $W/walvault.toml
chmod 600 $W/walvault.toml

say "a PostgreSQL 15 cluster, pgbench scale $SCALE"
PG "$PGBIN/initdb" -k -A trust -U postgres -D $W/pg >/dev/null
cat >> $W/pg/postgresql.conf <<EOF
port = $PORT
unix_socket_directories = '$W'
listen_addresses = ''
shared_buffers = 256MB
max_wal_size = 2GB
synchronous_commit = on
EOF
PG "$PGBIN/pg_ctl" -D $W/pg -l $W/pg.log -w start >/dev/null
PG "$PGBIN/pgbench" -h $W -p $PORT -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
PG $W/walvault --config $W/walvault.toml -q init >/dev/null

start_daemon() {
  PG $W/walvault --config $W/walvault.toml daemon >>$W/daemon.log 2>&1 &
  DAEMON=$!
  for _ in $(seq 1 600); do
    [ "$(PSQL "select count(*) from pg_stat_replication where state = 'streaming'")" = 1 ] && return 0
    sleep 0.2
  done
  echo "the daemon did not start streaming; see $W/daemon.log" >&2
  exit 1
}
daemon_pid() { pgrep -f "^$W/walvault --config $W/walvault.toml daemon" | head -1; }
stop_daemon() {
  local pid; pid=$(daemon_pid)
  [ -n "$pid" ] && kill "$pid"
  while [ -n "$(daemon_pid)" ]; do sleep 0.2; done
  wait "$DAEMON" 2>/dev/null || true
  DAEMON=
}
metric() { curl -s "http://$METRICS/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
rss_kib() { awk '/^VmRSS/ {print $2}' /proc/"$(daemon_pid)"/status 2>/dev/null || echo 0; }
# WAL the slot still holds for the daemon (written but not yet in the repository).
slot_lag() { PSQL "select coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, pg_current_wal_lsn() - restart_lsn, 0)::bigint from pg_replication_slots where slot_name = 'walvault'"; }

mkdir -p bench-results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
CSV=$ROOT/bench-results/load-$STAMP.csv
echo "phase,seconds,wal_bytes,slot_lag_bytes,daemon_lag_bytes,daemon_lag_seconds,rss_kib" > "$CSV"

# The daemon's first base backup (it takes one when the repository has none):
# wait for it so that the load phase measures streaming, not the backup.
start_daemon
for _ in $(seq 1 1800); do
  [ "$(metric walvault_backups_completed_total)" = 1 ] && break
  sleep 0.5
done

say "sustained: pgbench, 4 clients, $MINUTES minutes"
W0=$(PSQL "select pg_current_wal_lsn() - '0/0'::pg_lsn")
T0=$(date +%s)
PG "$PGBIN/pgbench" -h $W -p $PORT -U postgres -n -c 4 -j 2 -T $((MINUTES * 60)) -P 60 postgres >$W/pgbench.log 2>&1 &
BENCH=$!
while kill -0 $BENCH 2>/dev/null; do
  sleep 10
  now=$(( $(date +%s) - T0 ))
  echo "sustained,$now,$(( $(PSQL "select pg_current_wal_lsn() - '0/0'::pg_lsn") - W0 )),$(slot_lag),$(metric walvault_wal_lag_bytes),$(metric walvault_wal_lag_seconds),$(rss_kib)" >> "$CSV"
done
wait $BENCH || { cat $W/pgbench.log >&2; exit 1; }
TPS=$(awk '/^tps/ {print $3; exit}' $W/pgbench.log)
SECS=$(( $(date +%s) - T0 ))
WAL=$(( $(PSQL "select pg_current_wal_lsn() - '0/0'::pg_lsn") - W0 ))
# How long until the repository holds everything once pgbench stops?
TC=$(date +%s.%N)
for _ in $(seq 1 600); do [ "$(slot_lag)" -lt 1048576 ] && break; sleep 0.1; done
CATCHUP=$(echo "$(date +%s.%N) - $TC" | bc)
AFTER=$(slot_lag)

say "backlog: $BACKLOG segments written with the daemon stopped"
stop_daemon
B0=$(PSQL "select pg_current_wal_lsn() - '0/0'::pg_lsn")
PSQL "create table filler(id bigint, pad text)" >/dev/null
while [ $(( ($(PSQL "select pg_current_wal_lsn() - '0/0'::pg_lsn") - B0) / 16777216 )) -lt "$BACKLOG" ]; do
  PSQL "insert into filler select g, md5(g::text) || repeat(md5((g * 7)::text), 12) from generate_series(1, 200000) g" >/dev/null
  PSQL "truncate filler" >/dev/null
done
HELD=$(slot_lag)
T1=$(date +%s.%N)
start_daemon
while [ "$(slot_lag)" -gt 16777216 ]; do
  sleep 1
  echo "backlog,$(echo "$(date +%s.%N) - $T1" | bc | cut -d. -f1),,$(slot_lag),$(metric walvault_wal_lag_bytes),$(metric walvault_wal_lag_seconds),$(rss_kib)" >> "$CSV"
done
DRAIN=$(echo "$(date +%s.%N) - $T1" | bc)
stop_daemon

say "verifying the repository"
PG $W/walvault --config $W/walvault.toml -q verify >$W/verify.log 2>&1 || { cat $W/verify.log >&2; exit 1; }

col() { awk -F, -v p="$1" -v c="$2" '$1 == p && $c != "" {print $c}' "$CSV"; }
max() { sort -n | tail -1; }
p95() { sort -n | awk '{a[NR]=$1} END {print a[int(NR*0.95+0.5)] + 0}'; }
first_min() { awk -F, -v c="$1" '$1 == "sustained" && $2 <= 60 {print $c}' "$CSV" | sort -n | tail -1; }
last_min() { awk -F, -v c="$1" -v end="$SECS" '$1 == "sustained" && $2 > end - 60 {print $c}' "$CSV" | sort -n | tail -1; }
mib() { echo "scale=1; ${1:-0} / 1048576" | bc; }
OUT=$ROOT/bench-results/load-$STAMP.md
{
  echo "# walvault daemon under load: PostgreSQL 15, pgbench scale $SCALE, $(nproc) cores, file repository"
  echo
  echo "| sustained: pgbench -c 4 for $MINUTES min | |"
  echo "|---|---|"
  echo "| pgbench tps | $TPS |"
  echo "| WAL written | $(mib "$WAL") MiB ($(echo "scale=1; $WAL / 1048576 / $SECS" | bc) MiB/s) |"
  echo "| slot lag, p95 / max (10 s samples) | $(mib "$(col sustained 4 | p95)") / $(mib "$(col sustained 4 | max)") MiB |"
  echo "| daemon lag (walvault_wal_lag_seconds), p95 / max | $(col sustained 6 | p95) / $(col sustained 6 | max) s |"
  echo "| caught up (slot lag under 1 MiB) after the load stopped | in $(printf '%.1f' "$CATCHUP") s (lag then $(mib "$AFTER") MiB) |"
  echo "| daemon RSS, max in the first / last minute | $(mib "$(( $(first_min 7) * 1024 ))") / $(mib "$(( $(last_min 7) * 1024 ))") MiB |"
  echo
  echo "| backlog | |"
  echo "|---|---|"
  echo "| WAL held by the slot when the daemon started | $(mib "$HELD") MiB ($(( HELD / 16777216 )) segments) |"
  echo "| drained in | $(printf '%.1f' "$DRAIN") s ($(echo "scale=1; $HELD / 16777216 / $DRAIN" | bc) segments/s) |"
  echo "| daemon RSS while draining, max | $(mib "$(( $(col backlog 7 | max) * 1024 ))") MiB |"
} | tee "$OUT"
