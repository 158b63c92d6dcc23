#!/usr/bin/env bash
# WAL benchmark: walvault archive-push next to pgBackRest's (Debian's package),
# on the same real 16 MiB WAL segments (pgbench), repositories on local disk,
# zstd level 3 for pgBackRest, walvault at its WAL default (compression.wal_level = 1;
# WV_WAL_LEVEL=3 for the same level as pgBackRest).
#
#   latency   archive-push of one segment at a time, no backlog: per-call wall time
#   backlog   N segments waiting as .ready files in a copy of the cluster,
#             drained by PostgreSQL's own archiver running the tool as its
#             archive_command: segments/s until the last one is .done, the
#             median of --rounds rounds (3), tools alternating; walvault
#             both as archive_command and through its archive module
#             (archive_library = 'walvault', pgext/)
#   sync      commit latency of a single-client pgbench with walvault as the
#             synchronous standby (wal.synchronous), next to no synchronous
#             standby and to pg_receivewal --synchronous writing to local disk
#
#   scripts/bench-wal.sh [--segments N] [--rounds N] [--only latency,backlog,sync] [--keep]
#
# walvault always compresses, encrypts (age) and signs; pgBackRest is run
# without encryption (its default) and with repo1-cipher-type=aes-256-cbc.
# The cluster and the segments live on tmpfs (/dev/shm) so that reading them
# costs both tools the same and nothing; repositories and spools are on local
# disk (/tmp), where the fsyncs count.
# Results: a table on stdout, also written to bench-results/wal-<time>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. scripts/bench-lib.sh

SEGMENTS=100
ROUNDS=3
LATENCY_RUNS=${LATENCY_RUNS:-20}
# walvault's WAL compression level (compression.wal_level; its default is 1).
WV_WAL_LEVEL=${WV_WAL_LEVEL:-1}
ONLY="latency,backlog,sync"
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --segments) SEGMENTS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: scripts/bench-wal.sh [--segments N] [--rounds N] [--only latency,backlog,sync] [--keep]" >&2; exit 2 ;;
  esac
done
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
say() { printf '== %s\n' "$*" >&2; }

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
command -v bc >/dev/null || missing+=(bc)
command -v python3 >/dev/null || missing+=(python3)
[ -x "$PGBIN/postgres" ] || missing+=(postgresql-15)
[ -f /usr/include/postgresql/15/server/postgres.h ] || missing+=(postgresql-server-dev-15)
command -v make >/dev/null || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

say "building walvault (release)"
cargo build --release --quiet
W=/dev/shm/walvault-bench-wal
[ -d /dev/shm ] || W=/tmp/walvault-bench-wal-data
R=/tmp/walvault-bench-wal
PORT=55433
PG() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for d in $W/pg $W/fake; do
    [ -f "$d/postmaster.pid" ] && PG "$PGBIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1 || true
  done
  [ -n "${RECEIVER:-}" ] && kill "$RECEIVER" 2>/dev/null || true
  [ -n "${STREAMER:-}" ] && kill "$STREAMER" 2>/dev/null || true
  # runuser does not pass SIGTERM on: stop what it started by name.
  pkill -f "pg_receivewal -h $W " 2>/dev/null || true
  [ "${1:-}" = start ] || [ "$KEEP" = 0 ] && rm -rf $W $R
  return 0
}
cleanup start
trap cleanup EXIT
mkdir -p $W/segs $R
cp target/release/walvault $W/walvault
say "building the archive module (pgext/)"
mkdir -p $W/pgext
cp pgext/walvault.c pgext/Makefile $W/pgext/
make -s -C $W/pgext PG_CONFIG="$PGBIN/pg_config" >/dev/null
chmod 755 $W $W/walvault $W/pgext $W/pgext/walvault.so
chown postgres $W $W/segs $R 2>/dev/null || true
PSQL() { PG "$PGBIN/psql" -X -Atq -h $W -p $PORT -U postgres -d postgres -c "$1"; }
ms() { date +%s%N | cut -b1-13; }

# --- the cluster and its WAL ------------------------------------------------
say "creating a PostgreSQL 15 cluster and $SEGMENTS+ WAL segments (pgbench)"
PG "$PGBIN/initdb" -k -A trust -U postgres -D $W/pg >/dev/null
cat >> $W/pg/postgresql.conf <<EOF
port = $PORT
unix_socket_directories = '$W'
listen_addresses = ''
shared_buffers = 128MB
max_wal_size = 512MB
archive_mode = on
archive_command = 'cp %p $W/segs/%f'
EOF
PG "$PGBIN/pg_ctl" -D $W/pg -l $W/pg.log -w start >/dev/null
PG "$PGBIN/pgbench" -h $W -p $PORT -U postgres -i -s 10 -q postgres >/dev/null 2>&1
nsegs() { find $W/segs -name '????????????????????????' | wc -l; }
while [ "$(nsegs)" -lt $((SEGMENTS + 10)) ]; do
  PG "$PGBIN/pgbench" -h $W -p $PORT -U postgres -n -c 4 -j 2 -T 5 postgres >/dev/null 2>&1
done
SYSID=$(PSQL "select system_identifier from pg_control_system()")

# walvault: keys, configuration, an initialized repository as a template.
PG $W/walvault keygen --out $W/keys > $W/keygen.txt
REC=$(sed -n 's/^recipients = \["\(.*\)"\]/\1/p' $W/keygen.txt)
PUB=$(sed -n 's/^public_key = "\(.*\)"/\1/p' $W/keygen.txt)
wv_config() { # repo dir, spool dir, push_parallel
  cat > $W/walvault.toml <<EOF
[postgres]
conninfo = "host=$W port=$PORT user=postgres"
[repository]
url = "file://$1"
[encryption]
recipients = ["$REC"]
identity_file = "$W/keys/restore.key"
[signing]
key_file = "$W/keys/agent.key"
public_key = "$PUB"
[compression]
wal_level = $WV_WAL_LEVEL
[wal]
spool_dir = "$2"
push_parallel = $3
EOF
  chmod 600 $W/walvault.toml
  chown postgres $W/walvault.toml 2>/dev/null || true
}
wv_config $R/wv-template $R/wv-spool 4
PG $W/walvault --config $W/walvault.toml -q init >/dev/null

# pgBackRest: stanzas (plain and encrypted) created against the running cluster, as templates.
br_config() { # name, repo dir, async y|n, cipher y|n
  local cipher=""
  [ "$4" = y ] && cipher=$'repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench-not-a-secret'
  cat > $W/pgbackrest-$1.conf <<EOF
[global]
repo1-path=$2
$cipher
compress-type=zst
compress-level=3
process-max=2
archive-async=$3
spool-path=$R/pgbr-spool-$1
log-path=$R/pgbr-log
lock-path=$R/pgbr-lock-$1
log-level-console=warn
log-level-file=off
[bench]
pg1-path=$W/fake
pg1-port=$PORT
pg1-socket-path=$W
EOF
  chown postgres $W/pgbackrest-$1.conf 2>/dev/null || true
}
mkdir -p $R/pgbr-log
chown -R postgres $W $R
for c in n y; do
  br_config tpl-$c $R/br-template-$c n $c
  sed -i "s|pg1-path=.*|pg1-path=$W/pg|" $W/pgbackrest-tpl-$c.conf
  PG pgbackrest --config=$W/pgbackrest-tpl-$c.conf --stanza=bench stanza-create >/dev/null
done
PG "$PGBIN/pg_ctl" -D $W/pg -w stop -m fast >/dev/null

# A stopped copy of the cluster whose pg_wal holds the segments as .ready:
# what an archive backlog looks like to both tools.
ALL=$(cd $W/segs && ls | grep -E '^[0-9A-F]{24}$' | sort | head -n $((SEGMENTS + 10)))
LAT_SEGS=$(echo "$ALL" | head -n $LATENCY_RUNS)
BACKLOG_SEGS=$(echo "$ALL" | tail -n $SEGMENTS)
fresh_fake() {
  rm -rf $W/fake
  PG mkdir -p $W/fake
  (cd $W/pg && tar -cf - .) | PG tar -C $W/fake -xf -
  PG mkdir -p $W/fake/pg_wal/archive_status
  rm -f $W/fake/pg_wal/archive_status/*.ready
  for s in $BACKLOG_SEGS; do
    rm -f $W/fake/pg_wal/$s $W/fake/pg_wal/archive_status/$s.done
    PG ln $W/segs/$s $W/fake/pg_wal/$s
    PG touch $W/fake/pg_wal/archive_status/$s.ready
  done
}
fresh_repos() {
  rm -rf $R/wv-repo $R/wv-spool $R/br-repo $R/pgbr-spool-* $R/pgbr-lock-*
  cp -a $R/wv-template $R/wv-repo
  PG mkdir -p $R/wv-spool
  chown -R postgres $R/wv-repo
}

RESULTS=()
row() { RESULTS+=("$*"); }
# Every timed run starts from the same warm machine (scripts/bench-lib.sh):
# the segments read once, and as much memory touched as the run will fill.
warm() { warm_files $W/segs; warm_memory $(( (SEGMENTS + 10) * 16 * 1024 * 1024 )); sync; sleep 1; }
# `pg_drive NAME 'ARCHIVE_COMMAND'`: PostgreSQL's own archiver drains the
# backlog. The copy starts with archiving configured off, so the .ready files
# wait; the command is then set and the configuration reloaded, and the time
# runs until no .ready file is left (each .done once the command exited 0).
# `pg_drive NAME module` uses walvault's archive module instead. A change of
# archive_library restarts the archiver, which the postmaster does only after
# a pause of its own (30 s here), so the module is set before the start, and
# its server (started at the first ready file) waits for a go file to exist
# before it runs walvault; the time runs from creating that file.
# Sets DRIVE_TOTAL (ms).
pg_drive() {
  local name=$1 cmd=$2 go=""
  fresh_fake
  PG sh -c "echo \"archive_command = ''\" >> $W/fake/postgresql.conf"
  if [ "$cmd" = module ]; then
    go=$W/go
    rm -f $go
    printf '#!/bin/sh\nwhile [ ! -e %s ]; do sleep 0.005; done\nexec %s --config %s -q "$@"\n' $go $W/walvault $W/walvault.toml > $W/wvm-wait.sh
    chmod 755 $W/wvm-wait.sh
    printf "archive_library = '%s'\nwalvault.command = '%s'\n" $W/pgext/walvault.so $W/wvm-wait.sh | PG sh -c "cat >> $W/fake/postgresql.conf"
  fi
  PG "$PGBIN/pg_ctl" -D $W/fake -l $W/fake-$name.log -w start >/dev/null
  local ready; ready=$(ls $W/fake/pg_wal/archive_status | grep -c '\.ready$')
  [ "$ready" = "$SEGMENTS" ] || { echo "the backlog has $ready ready segments, not $SEGMENTS" >&2; exit 1; }
  warm
  [ -n "$go" ] || PG sh -c "echo \"archive_command = '$cmd'\" >> $W/fake/postgresql.conf"
  DRIVE_TOTAL=$(python3 - $W/fake/pg_wal/archive_status "$(id -u)" "$PGBIN/pg_ctl" $W/fake "$go" <<'PY'
import os, subprocess, sys, time
status, uid, pg_ctl, data, go = sys.argv[1:6]
reload = [pg_ctl, "-D", data, "reload"]
if uid == "0":
    reload = ["runuser", "-u", "postgres", "--"] + reload
t0 = time.monotonic()
if go:
    open(go, "w").close()
else:
    subprocess.run(reload, stdout=subprocess.DEVNULL, check=True)
while any(n.endswith(".ready") for n in os.listdir(status)):
    if time.monotonic() - t0 > 600:
        sys.exit("the archiver has not drained the backlog after 600 s")
    time.sleep(0.01)
print(int((time.monotonic() - t0) * 1000))
PY
) || { echo "archiving did not finish: see $W/fake-$name.log" >&2; exit 1; }
  PG "$PGBIN/pg_ctl" -D $W/fake -w stop -m fast >/dev/null
}
stats() { # file of "call N" lines -> "mean median p95" in ms
  grep '^call ' "$1" | awk '{print $2}' | sort -n | awk '{a[NR]=$1; s+=$1} END {printf "%.0f %.0f %.0f\n", s/NR, a[int((NR+1)/2)], a[int(NR*0.95+0.5)]}'
}
rate() { echo "scale=1; $SEGMENTS * 1000 / $1" | bc; }

WV="$W/walvault --config $W/walvault.toml -q archive-push"
BR_SYNC="pgbackrest --config=$W/pgbackrest-sync.conf --stanza=bench archive-push"
BR_ASYNC="pgbackrest --config=$W/pgbackrest-async.conf --stanza=bench archive-push"
BR_ASYNC_AES="pgbackrest --config=$W/pgbackrest-async-aes.conf --stanza=bench archive-push"
BR_SYNC_AES="pgbackrest --config=$W/pgbackrest-sync-aes.conf --stanza=bench archive-push"
br_config sync $R/br-repo n n
br_config async $R/br-repo y n
br_config sync-aes $R/br-repo n y
br_config async-aes $R/br-repo y y
br_repo() { rm -rf $R/br-repo; cp -a $R/br-template-$1 $R/br-repo; chown -R postgres $R/br-repo; }

# --- latency: one segment at a time, nothing else waiting --------------------
if want latency; then
  say "latency: $LATENCY_RUNS segments pushed one at a time"
  lat() { # name, repo-kind, command
    local name=$1 kind=$2; shift 2
    fresh_repos; br_repo $kind
    rm -rf $W/fake; fresh_fake
    rm -f $W/fake/pg_wal/archive_status/*.ready $W/fake/pg_wal/0*
    : > $W/lat-$name.txt
    warm
    for s in $LAT_SEGS; do
      PG ln $W/segs/$s $W/fake/pg_wal/$s
      PG touch $W/fake/pg_wal/archive_status/$s.ready
      local t0; t0=$(ms)
      (cd $W/fake && PG "$@" pg_wal/$s >>$W/latency-$name.log 2>&1)
      echo "call $(( $(ms) - t0 ))" >> $W/lat-$name.txt
      PG mv $W/fake/pg_wal/archive_status/$s.ready $W/fake/pg_wal/archive_status/$s.done
    done
    read -r mean median p95 < <(stats $W/lat-$name.txt)
    echo "$mean $median $p95"
  }
  wv_config $R/wv-repo $R/wv-spool 4
  read -r wv_mean wv_med wv_p95 < <(lat wv n $WV)
  read -r br_mean br_med br_p95 < <(lat br n $BR_SYNC)
  read -r bra_mean bra_med bra_p95 < <(lat bra y $BR_SYNC_AES)
  row "| latency per 16 MiB segment, mean (median, p95) | $wv_mean ms ($wv_med, $wv_p95) | $br_mean ms ($br_med, $br_p95) | $bra_mean ms ($bra_med, $bra_p95) | $(echo "scale=2; $br_mean / $wv_mean" | bc)x faster |"
fi

# --- backlog: N .ready segments, PostgreSQL's archiver ----------------------
if want backlog; then
  say "backlog: $SEGMENTS segments waiting, $ROUNDS rounds"
  backlog_run() { # name, walvault push_parallel or pgBackRest repo kind, archive_command
    fresh_repos
    case $1 in
      wv*) wv_config $R/wv-repo $R/wv-spool $2 ;;
      *) br_repo $2 ;;
    esac
    pg_drive $1 "$3"
    echo "$DRIVE_TOTAL" >> $W/backlog-$1.txt
  }
  rm -f $W/backlog-*.txt
  for r in $(seq "$ROUNDS"); do
    say "backlog round $r of $ROUNDS"
    backlog_run wv4 4 "$WV %p"
    backlog_run wvm 4 module
    backlog_run bra n "$BR_ASYNC %p"
    backlog_run wv1 1 "$WV %p"
    backlog_run brs n "$BR_SYNC %p"
    backlog_run braa y "$BR_ASYNC_AES %p"
    backlog_run brsa y "$BR_SYNC_AES %p"
  done
  wv_config $R/wv-repo $R/wv-spool 4
  # The median round's rate, then every round's.
  rates() { # name -> "median (r1 / r2 / ...)" in segments/s
    local all; all=$(while read -r t; do rate "$t"; done < $W/backlog-$1.txt)
    echo "$(echo "$all" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') ($(echo "$all" | paste -sd/ | sed 's|/| / |g'))"
  }
  med() { sort -n $W/backlog-$1.txt | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  row "| backlog of $SEGMENTS, synchronous (segments/s) | $(rates wv1) (push_parallel = 1) | $(rates brs) | $(rates brsa) | $(echo "scale=2; $(med brs) / $(med wv1)" | bc)x |"
  row "| backlog of $SEGMENTS, parallel (segments/s) | $(rates wv4) (push_parallel = 4) | $(rates bra) (async, process-max 2) | $(rates braa) (async) | $(echo "scale=2; $(med bra) / $(med wv4)" | bc)x |"
  row "| backlog of $SEGMENTS, parallel, walvault's archive module (segments/s) | $(rates wvm) (archive_library, push_parallel = 4) | $(rates bra) (async, process-max 2) | $(rates braa) (async) | $(echo "scale=2; $(med bra) / $(med wvm)" | bc)x |"
  # Each round runs the tools back to back: a round's ratio is the least
  # exposed to this machine's drift from one minute to the next.
  per_round() { # walvault name, pgBackRest name -> "r1 / r2 / ..."
    paste -d' ' $W/backlog-$1.txt $W/backlog-$2.txt | awk '{printf "%s%.2fx", (NR > 1 ? " / " : ""), $2 / $1}'
  }
  ROUND_NOTE="Per round (walvault and pgBackRest back to back), walvault's backlog rate over pgBackRest's: synchronous $(per_round wv1 brs); parallel $(per_round wv4 bra); parallel against encrypting pgBackRest $(per_round wv4 braa); archive module $(per_round wvm bra), against encrypting pgBackRest $(per_round wvm braa)."
fi

# --- sync: commit latency with walvault as the synchronous standby ----------
if want sync; then
  say "sync: commit latency, single client"
  rm -rf $W/fake
  PG "$PGBIN/pg_ctl" -D $W/pg -l $W/pg.log -w start -o "-c archive_mode=off" >/dev/null
  bench_tps() { # -> "latency_ms tps"
    PG "$PGBIN/pgbench" -h $W -p $PORT -U postgres -n -c 1 -T 10 postgres 2>/dev/null |
      awk '/latency average/ {l=$4} /^tps/ {t=$3} END {print l, t}'
  }
  read -r none_lat none_tps < <(bench_tps)
  fresh_repos
  cat >> $W/walvault.toml <<EOF
synchronous = true
EOF
  sed -i 's/^\[postgres\]/[postgres]\napplication_name = "walvault"/' $W/walvault.toml
  PSQL "alter system set synchronous_standby_names = 'walvault'" >/dev/null
  PSQL "select pg_reload_conf()" >/dev/null
  PG $W/walvault --config $W/walvault.toml -q stream >$W/stream.log 2>&1 &
  STREAMER=$!
  until [ "$(PSQL "select sync_state from pg_stat_replication where application_name = 'walvault'")" = sync ]; do sleep 0.2; done
  read -r wv_lat wv_tps < <(bench_tps)
  kill $STREAMER; wait $STREAMER 2>/dev/null || true; STREAMER=
  PSQL "alter system set synchronous_standby_names = 'pg_receivewal'" >/dev/null
  PSQL "select pg_reload_conf()" >/dev/null
  PG mkdir -p $R/receivewal
  PG "$PGBIN/pg_receivewal" -h $W -p $PORT -U postgres -D $R/receivewal --synchronous --slot=bench_rw --create-slot >/dev/null 2>&1 || true
  PG "$PGBIN/pg_receivewal" -h $W -p $PORT -U postgres -D $R/receivewal --synchronous --slot=bench_rw >$W/receivewal.log 2>&1 &
  RECEIVER=$!
  until [ "$(PSQL "select sync_state from pg_stat_replication where application_name = 'pg_receivewal'")" = sync ]; do sleep 0.2; done
  read -r rw_lat rw_tps < <(bench_tps)
  kill $RECEIVER; pkill -f "pg_receivewal -h $W " 2>/dev/null || true; wait $RECEIVER 2>/dev/null || true; RECEIVER=
  PSQL "alter system reset synchronous_standby_names" >/dev/null
  PG "$PGBIN/pg_ctl" -D $W/pg -w stop -m fast >/dev/null
  SYNC_ROWS=(
    "| no synchronous standby | $none_lat | $none_tps |"
    "| walvault stream, wal.synchronous (file repository) | $wv_lat | $wv_tps |"
    "| pg_receivewal --synchronous (local directory) | $rw_lat | $rw_tps |"
  )
fi

# --- report -------------------------------------------------------------------
mkdir -p bench-results
OUT=bench-results/wal-$(date -u +%Y%m%dT%H%M%SZ).md
{
  echo "# WAL: walvault vs pgBackRest $(pgbackrest version | awk '{print $2}'), PostgreSQL 15, 16 MiB segments, $(nproc) cores, repositories on local disk"
  echo
  if [ ${#RESULTS[@]} -gt 0 ]; then
    echo "| archive-push | walvault (zstd $WV_WAL_LEVEL, age, signed) | pgBackRest (zstd 3) | pgBackRest (zstd 3, aes-256-cbc) | walvault vs pgBackRest |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
    echo
    echo "Ratios: pgBackRest's time over walvault's (latency), walvault's rate over pgBackRest's (backlog), unencrypted pgBackRest."
    [ -n "${ROUND_NOTE:-}" ] && { echo; echo "$ROUND_NOTE"; }
  fi
  if [ -n "${SYNC_ROWS+x}" ]; then
    echo
    echo "| pgbench, 1 client, 10 s | latency (ms) | tps |"
    echo "|---|---|---|"
    printf '%s\n' "${SYNC_ROWS[@]}"
  fi
} | tee "$OUT"
