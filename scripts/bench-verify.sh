#!/usr/bin/env bash
# How fast `walvault verify` reads a file repository, next to `cat` reading the
# same files. Builds a repository: pgbench at scale SCALE, a backup, pgbench
# updates and EXTRA_MB of poorly compressible rows (random md5 text, so the
# repository has some size: pgbench's data compresses about 20 times), a
# second backup, their WAL; then times cat of every object (the store's speed)
# and verify (key-less), from the page cache and from the disk (only the
# repository's own pages are evicted, with posix_fadvise: the machine may be
# shared), and verify --deep once.
#
#   scripts/bench-verify.sh [SCALE [DIR]]      # default 50, a temp dir
#
# Env: EXTRA_MB (default 1024), WALVAULT_BIN (default target/release/walvault, else target/debug/walvault),
# PG_BIN (default /usr/lib/postgresql/15/bin), KEEP=1 keeps DIR, RUNS (default 3).
# Runs PostgreSQL and walvault as `postgres` when started as root.
set -euo pipefail

scale=${1:-50}
repo_root=$(cd "$(dirname "$0")/.." && pwd)
pg_bin=${PG_BIN:-/usr/lib/postgresql/15/bin}
runs=${RUNS:-3}
bin=${WALVAULT_BIN:-}
if [ -z "$bin" ]; then
    if [ -x "$repo_root/target/release/walvault" ]; then bin=$repo_root/target/release/walvault; else bin=$repo_root/target/debug/walvault; fi
fi
dir=${2:-$(mktemp -d /tmp/walvault-bench-verify.XXXXXX)}
mkdir -p "$dir"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

cleanup() {
    as_pg "$pg_bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    if [ -z "${KEEP:-}" ]; then rm -rf "$dir"; else echo "kept $dir" >&2; fi
}
trap cleanup EXIT

cp "$bin" "$dir/walvault"
[ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
wv="$dir/walvault --config $dir/walvault.toml"
psql="$pg_bin/psql -h $dir -p $port -U postgres -qAt"

echo "== building the repository (pgbench scale $scale; walvault $bin)" >&2
as_pg "$pg_bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
cat >>"$dir/data/postgresql.conf" <<EOF
port = $port
unix_socket_directories = '$dir'
listen_addresses = ''
archive_mode = on
archive_command = '$dir/walvault --config $dir/walvault.toml archive-push %p'
max_wal_size = '1GB'
EOF
echo "local replication all trust" >>"$dir/data/pg_hba.conf"
keys=$(as_pg "$dir/walvault" keygen --out "$dir/keys")
recipient=$(grep -o 'age1[0-9a-z]*' <<<"$keys" | head -1)
pubkey=$(grep -o 'ed25519:[A-Za-z0-9+/=]*' <<<"$keys" | head -1)
cat >"$dir/walvault.toml" <<EOF
[postgres]
conninfo = "host=$dir port=$port user=postgres"
[repository]
url = "file://$dir/repo"
[encryption]
recipients = ["$recipient"]
identity_file = "$dir/keys/restore.key"
[signing]
key_file = "$dir/keys/agent.key"
public_key = "$pubkey"
[wal]
spool_dir = "$dir/spool"
EOF
chmod 600 "$dir/walvault.toml"
[ "$(id -u)" = 0 ] && chown postgres: "$dir/walvault.toml"
as_pg "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w start >/dev/null
as_pg $wv init >/dev/null
as_pg "$pg_bin/pgbench" -h "$dir" -p "$port" -U postgres -i -s "$scale" -q postgres 2>/dev/null
as_pg $wv backup >/dev/null 2>&1
as_pg "$pg_bin/pgbench" -h "$dir" -p "$port" -U postgres -c 2 -t $((scale * 400)) -N postgres >/dev/null 2>&1
rows=$(( ${EXTRA_MB:-1024} * 10000 ))
as_pg $psql -c "create table filler as select g, md5(random()::text) || md5(random()::text) as v from generate_series(1, $rows) g"
as_pg $wv backup >/dev/null 2>&1
last=$(as_pg $psql -c "select pg_walfile_name(pg_switch_wal())")
until [ "$(as_pg $psql -c "select coalesce(last_archived_wal, '') >= '$last' from pg_stat_archiver")" = t ]; do sleep 0.5; done
as_pg "$pg_bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null

objects=$(find "$dir/repo" -type f | wc -l)
bytes=$(find "$dir/repo" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
echo "repository: $objects objects, $(mib "$bytes") MiB ($(find "$dir/repo/wal" -type f | wc -l) WAL objects, $(find "$dir/repo/packs" -name '*.pack' | wc -l) packs)"

# Warm the page cache, then time each reader RUNS times; report the best.
find "$dir/repo" -type f -print0 | xargs -0 cat >/dev/null
best() { sort -n | head -1; }
t_cat=$(for _ in $(seq "$runs"); do
    s=$(date +%s.%N); find "$dir/repo" -type f -print0 | xargs -0 cat >/dev/null; e=$(date +%s.%N)
    echo "$e - $s" | bc
done | best)
t_verify=$(for _ in $(seq "$runs"); do
    as_pg $wv verify --json | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["ok"], r["problems"]; print(r["duration_ms"] / 1000)'
done | best)
evict() {
    find "$dir/repo" -type f -print0 | python3 -c '
import os, sys
for p in sys.stdin.buffer.read().split(b"\0"):
    if p:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)'
}
t_cat_cold=$(for _ in $(seq "$runs"); do
    evict
    s=$(date +%s.%N); find "$dir/repo" -type f -print0 | xargs -0 cat >/dev/null; e=$(date +%s.%N)
    echo "$e - $s" | bc
done | best)
t_verify_cold=$(for _ in $(seq "$runs"); do
    evict
    as_pg $wv verify --json | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["ok"], r["problems"]; print(r["duration_ms"] / 1000)'
done | best)
t_deep=$(as_pg $wv verify --json --deep | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["ok"], r["problems"]; print(r["duration_ms"] / 1000)')
rate() { awk -v b="$bytes" -v t="$1" 'BEGIN {printf "%.0f MiB/s", b / 1048576 / t}'; }
printf '%-28s %8s s  %s\n' "cat (page cache)" "$t_cat" "$(rate "$t_cat")"
printf '%-28s %8s s  %s\n' "verify (page cache)" "$t_verify" "$(rate "$t_verify")"
printf '%-28s %8s s  %s\n' "cat (disk)" "$t_cat_cold" "$(rate "$t_cat_cold")"
printf '%-28s %8s s  %s\n' "verify (disk)" "$t_verify_cold" "$(rate "$t_verify_cold")"
printf '%-28s %8s s  %s (of stored bytes; it also decompresses)\n' "verify --deep" "$t_deep" "$(rate "$t_deep")"
