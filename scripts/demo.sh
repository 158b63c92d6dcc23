#!/usr/bin/env bash
# walvault in a minute and a half: builds walvault, makes a scratch PostgreSQL
# cluster, generates keys, runs the daemon against a file:// repository, writes
# a row every second for a minute, shows `walvault info`, restores to a moment
# in the middle with --replay, and shows that the restored rows are exactly the
# ones committed at that moment. Cleans up after itself (--keep to look around).
#
#   scripts/demo.sh [--keep] [--seconds N]
#
# Needs Debian with Rust; installs PostgreSQL 15 if it is missing. Run as root
# (PostgreSQL then runs as the `postgres` user) or as a user that can run
# PostgreSQL. WALVAULT_DEMO_PROFILE=debug reuses a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
KEEP=0
SECONDS_OF_WRITES=60
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1; shift ;;
    --seconds) SECONDS_OF_WRITES=$2; shift 2 ;;
    *) echo "usage: scripts/demo.sh [--keep] [--seconds N]" >&2; exit 2 ;;
  esac
done

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
[ -n "${NO_COLOR:-}" ] || [ ! -t 1 ] && step() { printf '\n==> %s\n' "$*"; }

PGBIN=/usr/lib/postgresql/15/bin
if [ ! -x $PGBIN/postgres ]; then
  step "installing PostgreSQL 15"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
fi

PROFILE=${WALVAULT_DEMO_PROFILE:-release}
step "building walvault ($PROFILE)"
if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi

D=/tmp/walvault-demo
PORT=55440
if [ "$(id -u)" = 0 ]; then AS=(runuser -u postgres --); OWNER=postgres; else AS=(); OWNER=$(id -un); fi
run() { "${AS[@]}" "$@"; }
cleanup() {
  [ -n "${DAEMON:-}" ] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  for d in $D/pg $D/restored; do
    [ -f $d/postmaster.pid ] && run $PGBIN/pg_ctl -D $d -m fast -w stop >/dev/null 2>&1 || true
  done
  pkill -f "$D/walvault" 2>/dev/null || true
  if [ "$KEEP" = 0 ]; then
    for _ in 1 2 3 4 5; do rm -rf $D 2>/dev/null && break; sleep 1; done
  else
    echo "kept $D (daemon log: $D/daemon.log)"
  fi
}
trap cleanup EXIT
rm -rf $D && mkdir -p $D && cp target/$PROFILE/walvault $D/walvault && chmod 755 $D $D/walvault
[ "$(id -u)" = 0 ] && chown -R postgres $D
WV() { run $D/walvault --config $D/walvault.toml "$@"; }
SQL() { run $PGBIN/psql -X -Atq -h $D -p "${2:-$PORT}" -U "$OWNER" -d postgres -c "$1"; }

step "a scratch PostgreSQL cluster on port $PORT"
run $PGBIN/initdb -k -A trust -U "$OWNER" -D $D/pg >/dev/null
cat >> $D/pg/postgresql.conf <<EOF
port = $PORT
unix_socket_directories = '$D'
listen_addresses = ''
track_commit_timestamp = on
EOF
run $PGBIN/pg_ctl -D $D/pg -l $D/pg.log -w start >/dev/null

step "keys: the restore identity (keep it offline) and the agent's signing key"
run $D/walvault keygen --out $D/keys | tee $D/keygen.txt
REC=$(sed -n 's/^recipients = \["\(.*\)"\]/\1/p' $D/keygen.txt)
PUB=$(sed -n 's/^public_key = "\(.*\)"/\1/p' $D/keygen.txt)
cat > $D/walvault.toml <<EOF
[postgres]
conninfo = "host=$D port=$PORT user=$OWNER"
bin_dir = "$PGBIN"
[repository]
url = "file://$D/repo"
[encryption]
recipients = ["$REC"]
identity_file = "$D/keys/restore.key"
[signing]
key_file = "$D/keys/agent.key"
public_key = "$PUB"
[wal]
partial_interval = "1s"
spool_dir = "$D/spool"
[daemon]
metrics_listen = ""
EOF
chmod 600 $D/walvault.toml; [ "$(id -u)" = 0 ] && chown postgres $D/walvault.toml
cat $D/walvault.toml

step "walvault init"
WV init

step "walvault daemon (streams WAL; takes a first backup because the repository has none)"
run $D/walvault --config $D/walvault.toml daemon > $D/daemon.log 2>&1 &
DAEMON=$!
for _ in $(seq 1 120); do
  [ "$(WV info --json 2>/dev/null | grep -c '"id": "')" -ge 1 ] && break
  sleep 1
done
WV info --json | grep -q '"id": "' || { echo "no backup appeared; daemon log:"; cat $D/daemon.log; exit 1; }
echo "first backup taken"

step "writing a row every second for $SECONDS_OF_WRITES seconds"
SQL "create table demo(id int primary key, note text)"
for i in $(seq 1 "$SECONDS_OF_WRITES"); do
  SQL "insert into demo values ($i, 'row $i written at ' || clock_timestamp())"
  printf '.'; sleep 1
done
echo
MIDDLE=$(( (SECONDS_OF_WRITES + 1) / 2 ))
TARGET=$(SQL "select pg_xact_commit_timestamp(xmin) from demo where id = $MIDDLE")
echo "row $MIDDLE committed at $TARGET: that is the moment we will restore to"
sleep 3   # the streamer uploads the segment in progress every second

step "walvault info"
WV info

step "walvault restore --target-time '$TARGET' --replay"
mkdir -p $D/restore-parent && [ "$(id -u)" = 0 ] && chown postgres $D/restore-parent
WV restore --pgdata $D/restore-parent/data --target-time "$TARGET" --replay

step "the restored database, started on port $((PORT + 1))"
cat >> $D/restore-parent/data/postgresql.auto.conf <<EOF
port = $((PORT + 1))
archive_mode = off
EOF
run $PGBIN/pg_ctl -D $D/restore-parent/data -l $D/restored.log -w start >/dev/null
ln -sfn $D/restore-parent/data $D/restored
GOT=$(SQL "select count(*) || ' rows, last: ' || max(id) from demo" $((PORT + 1)))
WANT=$(SQL "select count(*) || ' rows, last: ' || max(id) from demo where pg_xact_commit_timestamp(xmin) <= '$TARGET'")
NOW=$(SQL "select count(*) || ' rows, last: ' || max(id) from demo")
echo "source database now:               $NOW"
echo "committed at or before the target:  $WANT"
echo "restored database:                  $GOT"
SQL "select id, note from demo order by id desc limit 3" $((PORT + 1)) | sed 's/^/  restored: /'
if [ "$GOT" = "$WANT" ]; then
  step "the restore holds exactly the rows committed at $TARGET"
else
  echo "MISMATCH: the restored rows differ from the target moment" >&2
  exit 1
fi
