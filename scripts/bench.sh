#!/usr/bin/env bash
# Benchmarks walvault against pgBackRest and Barman (Debian's packages) in one
# run, on the same pgbench database, repositories on local disk:
#   backup   full backup: wall time, CPU time, peak RSS, repository size
#            (Barman: backup_method postgres, i.e. pg_basebackup, zstd 3 on the client)
#   restore  rebuild the data directory (no replay): wall, CPU, peak RSS
#   replay   recovery over N WAL segments fetched by restore_command
#            (walvault archive-get with prefetch vs pgbackrest archive-get, async;
#            Barman is not measured here)
#   wal      archive-push latency and backlog rate (scripts/bench-wal.sh)
#   verify   walvault verify MB/s next to `cat` of the same files
#
#   scripts/bench.sh [--scale N] [--segments N] [--rounds N] [--only LIST] [--keep]
#
# Defaults: pgbench scale 100 (about 1.5 GB), 200 WAL segments, everything.
# Backup and restore run --rounds times (default 3), the tools taking turns, and
# the tables give each figure's median (the machine's speed drifts by 10-20%
# between runs) with every round's wall time beside it. Every backup round is
# a full backup: walvault's chunks of the previous round are removed first.
# Results go to stdout and bench-results/ (as a Markdown table). WV_LEVEL sets
# walvault's zstd level (default 3, pgBackRest's and Barman's are 3 too).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. scripts/bench-lib.sh

SCALE=100
SEGMENTS=200
ROUNDS=3
ONLY="backup,restore,replay,wal,verify"
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE=$2; shift 2 ;;
    --segments) SEGMENTS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: scripts/bench.sh [--scale N] [--segments N] [--rounds N] [--only backup,restore,replay,wal,verify] [--keep]" >&2; exit 2 ;;
  esac
done
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
say() { printf '\n== %s\n' "$*" >&2; }

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
command -v barman >/dev/null || missing+=(barman)
[ -x /usr/bin/time ] || missing+=(time)
command -v python3 >/dev/null || missing+=(python3)
[ -x "$PGBIN/postgres" ] || missing+=(postgresql-15)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

say "building walvault (release)"
cargo build --release --quiet
W=/tmp/walvault-bench
if [ -d $W ]; then
  for d in $W/pg $W/r-*; do [ -f "$d/postmaster.pid" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1 || true; done
  rm -rf $W
fi
mkdir -p $W
cp target/release/walvault $W/walvault
chmod 755 $W $W/walvault
PORT=55432
PG() { runuser -u postgres -- "$@"; }
PSQL() { PG "$PGBIN/psql" -X -Atq -h $W -p $PORT -U postgres -d postgres -c "$1"; }

# --- walvault --------------------------------------------------------------
$W/walvault keygen --out $W/keys > $W/keygen.txt
REC=$(sed -n 's/^recipients = \["\(.*\)"\]/\1/p' $W/keygen.txt)
PUB=$(sed -n 's/^public_key = "\(.*\)"/\1/p' $W/keygen.txt)
cat > $W/walvault.toml <<EOF
[postgres]
conninfo = "host=$W port=$PORT user=postgres"
bin_dir = "$PGBIN"
[repository]
url = "file://$W/wv-repo"
[encryption]
recipients = ["$REC"]
identity_file = "$W/keys/restore.key"
[signing]
key_file = "$W/keys/agent.key"
public_key = "$PUB"
[wal]
spool_dir = "$W/wv-spool"
[compression]
level = ${WV_LEVEL:-3}
EOF
chmod 600 $W/walvault.toml

# --- pgBackRest ------------------------------------------------------------
cat > $W/pgbackrest.conf <<EOF
[global]
repo1-path=$W/pgbr-repo
compress-type=zst
compress-level=3
process-max=2
start-fast=y
archive-async=y
spool-path=$W/pgbr-spool
log-path=$W/pgbr-log
lock-path=$W/pgbr-lock
log-level-console=warn
[bench]
pg1-path=$W/pg
pg1-port=$PORT
pg1-socket-path=$W
EOF
mkdir -p $W/pgbr-repo $W/pgbr-spool $W/pgbr-log $W/pgbr-lock $W/wv-spool
chown -R postgres $W
BR="pgbackrest --config=$W/pgbackrest.conf --stanza=bench"

# --- Barman ------------------------------------------------------------------
# pg_basebackup with client-side zstd 3 into tar files; WAL by pg_receivewal
# on a slot (streaming_archiver), as Barman's documentation recommends.
mkdir -p $W/bm-home $W/bm-staging
chown barman $W/bm-home $W/bm-staging
cat > $W/barman.conf <<EOF
[barman]
barman_user = barman
barman_home = $W/bm-home
log_file = $W/bm-home/barman.log
log_level = WARNING
[bench]
description = walvault benchmark
conninfo = host=$W port=$PORT user=postgres dbname=postgres
streaming_conninfo = host=$W port=$PORT user=postgres
backup_method = postgres
streaming_archiver = on
slot_name = barman
create_slot = auto
backup_compression = zstd
backup_compression_format = tar
backup_compression_level = 3
path_prefix = $PGBIN
recovery_staging_path = $W/bm-staging
EOF
chmod 644 $W/barman.conf
BM="runuser -u barman -- barman -c $W/barman.conf"

say "creating a PostgreSQL 15 cluster with pgbench scale $SCALE"
PG "$PGBIN/initdb" -k -A trust -U postgres -D $W/pg >/dev/null
cat >> $W/pg/postgresql.conf <<EOF
port = $PORT
unix_socket_directories = '$W'
listen_addresses = ''
shared_buffers = 256MB
max_wal_size = 4GB
archive_mode = on
archive_command = '$W/walvault --config $W/walvault.toml archive-push %p && $BR archive-push %p'
EOF
PG "$PGBIN/pg_ctl" -D $W/pg -l $W/pg.log -w start >/dev/null
PG $W/walvault --config $W/walvault.toml init >/dev/null
PG $BR stanza-create >/dev/null
PG "$PGBIN/pgbench" -h $W -p $PORT -U postgres -i -s "$SCALE" -q postgres 2>&1 | tail -1 >&2
PSQL "checkpoint" >/dev/null
DBSIZE=$(PSQL "select pg_database_size('postgres')")
# Barman's WAL: its cron starts pg_receivewal; a switch proves it arrives.
# When pg_receivewal starts only after the switched segment was complete, it
# never receives that one: run cron again and switch once more.
bm_wal() { $BM switch-wal --force --archive --archive-timeout "$1" bench >/dev/null 2>&1; }
$BM cron >/dev/null 2>&1
bm_wal 30 || { $BM cron >/dev/null 2>&1; bm_wal 60; } || echo "Barman's WAL streaming did not start; its figures will be missing" >&2
# Loading the database left ~100 segments for archive_command (both tools'
# archive-push): let it finish, or it competes with the first rounds for the cores.
say "waiting for the archiver to catch up with the load's WAL"
for _ in $(seq 600); do
  ready=$(find $W/pg/pg_wal/archive_status -name '*.ready' | wc -l)
  [ "$ready" -gt 0 ] || break
  sleep 0.5
done

# `measure NAME CMD...`: wall seconds, CPU seconds (user+sys), peak RSS (KiB) into $W/m-NAME.
measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o $W/m-$name "$@" > $W/out-$name 2>&1 || { cat $W/out-$name >&2; return 1; }
  cp $W/m-$name $W/raw-$name  # wall user sys rss, kept for reading
  read -r wall user sys rss < $W/m-$name
  printf '%s %s %s\n' "$wall" "$(echo "$user + $sys" | bc)" "$rss" > $W/m-$name
}
col() { cut -d' ' -f"$2" $W/m-$1; }
# `median NAME`: m-NAME-r1..rN -> m-NAME, each column's median.
median() {
  for c in 1 2 3; do
    cat $W/m-$1-r* | awk -v c=$c '{print $c}' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
  done | paste -sd' ' > $W/m-$1
}
# `walls NAME`: every round's wall time, in round order.
walls() { for f in $W/m-$1-r*; do cut -d' ' -f1 "$f"; done | paste -sd'/' | sed 's|/| / |g'; }
ratio() { echo "scale=2; $1 / $2" | bc; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
RESULTS=()
row() { RESULTS+=("$*"); }

# Before each timed run the machine is warmed the same way for every tool
# (scripts/bench-lib.sh says why).
if want backup; then
  for r in $(seq "$ROUNDS"); do
    if [ "$r" -gt 1 ]; then rm -rf $W/wv-repo/packs $W/wv-repo/backups; fi
    say "backup round $r of $ROUNDS: walvault"
    warm_files $W/pg; sync; sleep 1
    measure wv-backup-r$r runuser -u postgres -- $W/walvault --config $W/walvault.toml backup
    say "backup round $r of $ROUNDS: pgBackRest (zstd 3, process-max 2)"
    warm_files $W/pg; sync; sleep 1
    measure br-backup-r$r runuser -u postgres -- $BR --type=full backup
    say "backup round $r of $ROUNDS: Barman (pg_basebackup, zstd 3)"
    warm_files $W/pg; sync; sleep 1
    measure bm-backup-r$r $BM backup --wait bench || echo "0 0 0" > $W/m-bm-backup-r$r
  done
  for t in wv br bm; do median $t-backup; done
  # One backup each: walvault's last round; pgBackRest's and Barman's newest.
  WV_SIZE=$(du -sb $W/wv-repo/packs $W/wv-repo/backups | awk '{s+=$1} END {print s}')
  BR_SIZE=$(du -sb "$(ls -d $W/pgbr-repo/backup/bench/*F | tail -1)" | awk '{print $1}')
  BM_SIZE=$( (du -sb "$(ls -d $W/bm-home/bench/base/*/ 2>/dev/null | tail -1)" 2>/dev/null || true) | awk '{print $1}')
  BM_SIZE=${BM_SIZE:-0}
  row "backup wall s | $(col wv-backup 1) | $(col br-backup 1) | $(col bm-backup 1) | $(ratio "$(col br-backup 1)" "$(col wv-backup 1)")x faster | $(ratio "$(col bm-backup 1)" "$(col wv-backup 1)")x faster"
  row "backup wall s, each round | $(walls wv-backup) | $(walls br-backup) | $(walls bm-backup) | | "
  row "backup CPU s | $(col wv-backup 2) | $(col br-backup 2) | $(col bm-backup 2) | $(ratio "$(col br-backup 2)" "$(col wv-backup 2)")x less | $(ratio "$(col bm-backup 2)" "$(col wv-backup 2)")x less"
  row "backup peak RSS MiB | $(echo "scale=1; $(col wv-backup 3)/1024" | bc) | $(echo "scale=1; $(col br-backup 3)/1024" | bc) | $(echo "scale=1; $(col bm-backup 3)/1024" | bc) | | "
  row "repository size MiB | $(mib "$WV_SIZE") | $(mib "$BR_SIZE") | $(mib "$BM_SIZE") | $(ratio "$BR_SIZE" "$WV_SIZE")x smaller | $(ratio "$BM_SIZE" "$WV_SIZE")x smaller"
fi

if want restore; then
  # Each restore starts on a quiet machine: the previous one's directory is
  # removed and its dirty pages written back first (otherwise the first tool
  # of a round pays for the writeback of the last one's output).
  fresh_target() { # tool, owner, its repository
    # (once, rm met a directory still being filled just after pgBackRest's
    # restore had exited: try again after a moment)
    rm -rf $W/r-wv $W/r-br $W/r-bm 2>/dev/null || { sleep 2; rm -rf $W/r-wv $W/r-br $W/r-bm; }
    sync
    warm_files "$3"
    warm_memory $((DBSIZE * 12 / 10))
    mkdir -p $W/r-$1
    chown "$2" $W/r-$1
    sleep 1
  }
  for r in $(seq "$ROUNDS"); do
    say "restore round $r of $ROUNDS: walvault"
    fresh_target wv postgres $W/wv-repo
    measure wv-restore-r$r runuser -u postgres -- $W/walvault --config $W/walvault.toml restore --pgdata $W/r-wv/data --target-immediate
    say "restore round $r of $ROUNDS: pgBackRest (process-max 2)"
    fresh_target br postgres $W/pgbr-repo
    measure br-restore-r$r runuser -u postgres -- $BR --pg1-path=$W/r-br/data --type=immediate restore
    say "restore round $r of $ROUNDS: Barman (recover, local)"
    fresh_target bm barman $W/bm-home
    measure bm-restore-r$r $BM recover --target-immediate bench latest $W/r-bm/data || echo "0 0 0" > $W/m-bm-restore-r$r
  done
  for t in wv br bm; do median $t-restore; done
  row "restore wall s | $(col wv-restore 1) | $(col br-restore 1) | $(col bm-restore 1) | $(ratio "$(col br-restore 1)" "$(col wv-restore 1)")x faster | $(ratio "$(col bm-restore 1)" "$(col wv-restore 1)")x faster"
  row "restore wall s, each round | $(walls wv-restore) | $(walls br-restore) | $(walls bm-restore) | | "
  row "restore CPU s | $(col wv-restore 2) | $(col br-restore 2) | $(col bm-restore 2) | $(ratio "$(col br-restore 2)" "$(col wv-restore 2)")x less | $(ratio "$(col bm-restore 2)" "$(col wv-restore 2)")x less"
  row "restore peak RSS MiB | $(echo "scale=1; $(col wv-restore 3)/1024" | bc) | $(echo "scale=1; $(col br-restore 3)/1024" | bc) | $(echo "scale=1; $(col bm-restore 3)/1024" | bc) | | "
  rm -rf $W/r-wv $W/r-br $W/r-bm
fi

if want replay; then
  say "replay: writing $SEGMENTS WAL segments after a fresh backup of each tool"
  PG $W/walvault --config $W/walvault.toml backup > /dev/null
  PG $BR --type=full backup > /dev/null
  START=$(PSQL "select pg_walfile_name(pg_current_wal_lsn())")
  PSQL "create table if not exists wal_filler(id bigint, pad text)" >/dev/null
  while :; do
    NOW=$(PSQL "select pg_walfile_name(pg_current_wal_lsn())")
    n=$(( 16#${NOW:16:8} - 16#${START:16:8} + 256 * (16#${NOW:8:8} - 16#${START:8:8}) ))
    [ "$n" -ge "$SEGMENTS" ] && break
    PG "$PGBIN/pgbench" -h $W -p $PORT -U postgres -n -c 2 -T 5 postgres >/dev/null 2>&1 &
    PSQL "insert into wal_filler select g, md5(g::text) || repeat('x', 400) from generate_series(1, 60000) g" >/dev/null
    wait
  done
  PSQL "select pg_switch_wal()" >/dev/null
  LAST=$(PSQL "select pg_walfile_name(pg_current_wal_lsn() - 1)")
  # Wait for both archives to hold the last segment.
  for _ in $(seq 1 600); do
    [ "$(PSQL "select last_archived_wal >= '$LAST' from pg_stat_archiver")" = t ] && break; sleep 0.5
  done
  sleep 2
  replay() { # tool dir: start the restored cluster and wait until it has promoted
    local dir=$1 port=$2
    cat >> $dir/postgresql.auto.conf <<EOF
port = $port
unix_socket_directories = '$W'
archive_mode = off
EOF
    chown postgres $dir/postgresql.auto.conf
    PG "$PGBIN/pg_ctl" -D $dir -l $dir.log -w -t 3600 start >/dev/null
    until [ "$(PG "$PGBIN/psql" -X -Atq -h $W -p $port -U postgres -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; do sleep 0.2; done
    PG "$PGBIN/pg_ctl" -D $dir -m fast -w stop >/dev/null
  }
  for tool in wv br; do mkdir -p $W/rp-$tool; chown postgres $W/rp-$tool; done
  PG $W/walvault --config $W/walvault.toml restore --pgdata $W/rp-wv/data >/dev/null
  PG $BR --pg1-path=$W/rp-br/data restore >/dev/null
  export -f replay PG; export W PGBIN
  say "replay: walvault archive-get (prefetch)"
  warm_files $W/rp-wv/data $W/wv-repo; sync; sleep 1
  measure wv-replay bash -c "replay $W/rp-wv/data 55433"
  say "replay: pgbackrest archive-get (async)"
  warm_files $W/rp-br/data $W/pgbr-repo; sync; sleep 1
  measure br-replay bash -c "replay $W/rp-br/data 55434"
  SEGS=$(grep -c 'restored log file' $W/rp-wv/data.log || true)
  row "replay of $SEGS segments s | $(col wv-replay 1) | $(col br-replay 1) | | $(ratio "$(col br-replay 1)" "$(col wv-replay 1)")x faster | "
fi

if want verify; then
  say "verify: walvault verify vs cat of the repository files"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  measure wv-verify runuser -u postgres -- $W/walvault --config $W/walvault.toml verify
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  measure cat-repo bash -c "find $W/wv-repo -type f -print0 | xargs -0 cat > /dev/null"
  BYTES=$(du -sb $W/wv-repo | awk '{print $1}')
  row "verify MB/s (walvault / cat) | $(echo "scale=0; $BYTES / 1000000 / $(col wv-verify 1)" | bc) | $(echo "scale=0; $BYTES / 1000000 / $(col cat-repo 1)" | bc) | | | "
fi

if want wal && [ -x scripts/bench-wal.sh ]; then
  say "WAL: archive-push (scripts/bench-wal.sh)"
  scripts/bench-wal.sh || echo "bench-wal.sh failed" >&2
fi

$BM receive-wal --stop bench >/dev/null 2>&1 || true
PG "$PGBIN/pg_ctl" -D $W/pg -m fast -w stop >/dev/null || true
mkdir -p bench-results
OUT="bench-results/bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "# walvault vs pgBackRest $(pgbackrest version | awk '{print $2}') and Barman $(barman --version 2>&1 | awk '{print $1; exit}'), PostgreSQL 15, pgbench scale $SCALE ($(mib "$DBSIZE") MiB), $(nproc) cores"
  echo
  echo "| measure | walvault | pgBackRest | Barman | vs pgBackRest | vs Barman |"
  echo "|---|---|---|---|---|---|"
  for r in "${RESULTS[@]}"; do echo "| $r |"; done
} | tee "$OUT"
[ "$KEEP" = 1 ] || rm -rf $W
