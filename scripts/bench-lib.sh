# Shared by the benchmark scripts (sourced, not run).
#
# On a virtual machine (this project's bench machines are Firecracker VMs with
# free page reporting and proactive page-cache reclaim) memory that has not
# been touched for a while is slow to touch again: the host faults it back in
# underneath the guest, and that shows as kernel time in whichever process
# touches it first. Found at pgbench scale 340 (scripts/bench.sh, 2026-11-23):
# - reading the data files: the walsender spent 31% of the machine in the
#   page-cache copy during the first backup after the load, 4% during the next;
# - filling the page cache: the same walvault restore took 10.5 s (15.7 s of
#   system time, half of it in the page-cache copy) as the first restore after
#   the backups, 6.5 s right after it, 4.0 s after another restore's output
#   had been removed.
# The tool that ran first paid for the others. So before each timed run, what
# it will read is read once (`warm_files`) and the memory it will fill is
# touched once (`warm_memory`): every tool starts from the same warm machine,
# as on real hardware, where neither costs more the first time.

# warm_files PATH...: reads every file under the paths once.
warm_files() { find "$@" -type f -exec cat {} + > /dev/null 2>&1 || true; }

# warm_memory BYTES: touches that much fresh memory (at most what is available
# less 1 GiB) and frees it again.
warm_memory() {
  python3 -c '
import sys
with open("/proc/meminfo") as f:
    avail = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:")) * 1024
n = min(int(sys.argv[1]), avail - (1 << 30))
if n > 0:
    b = bytearray(n)
    for i in range(0, n, 4096):
        b[i] = 1
' "$1"
}
