# Shared helpers for the bench/ scripts (sourced). Data set and method follow
# ../shared/BENCHMARKING.md: 2 GiB virtual, 1 GiB seeded random data in 1 MiB
# runs at random MiB slots; throughput = data bytes / seconds; interleaved
# runs; medians; ratios against the QEMU peer measured in the same run.

W=${W:-/tmp/ds-bench}
REPEAT=${REPEAT:-3}
SIZE_MIB=${SIZE_MIB:-2048}
DATA_MIB=${DATA_MIB:-1024}
SEED=${SEED:-42}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DS=${DISKSTREAM_BIN:-$ROOT/target/release/diskstream}
T=$W/tools
mkdir -p "$W" "$T"

log() { echo "# $* [loadavg $(cut -d' ' -f1-3 /proc/loadavg)]" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
emit() { echo "$1=$2"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
mibps() { awk -v m="$1" -v s="$2" 'BEGIN{printf "%.1f", m/s}'; }
join() { local IFS=,; echo "$*"; }

build_ds() {
    if [ -z "${DISKSTREAM_BIN:-}" ]; then
        (cd "$ROOT" && cargo build --release -q --bin diskstream)
    fi
}

# base.qcow2 and base.raw (sparse): the data set.
make_base() {
    if [ -e "$W/base.qcow2" ] && [ -e "$W/base.raw" ]; then return; fi
    log "generating base: ${SIZE_MIB} MiB virtual, ${DATA_MIB} MiB random in 1 MiB runs, seed $SEED"
    cat > "$T/gen.py" <<'PY'
import os, random, sys
path, size_mib, data_mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
slots = sorted(rng.sample(range(size_mib), data_mib))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size_mib << 20)
for s in slots:
    os.pwrite(fd, rng.randbytes(1 << 20), s << 20)
os.close(fd)
PY
    python3 "$T/gen.py" "$W/base.raw" "$SIZE_MIB" "$DATA_MIB" "$SEED"
    qemu-img convert -f raw -O qcow2 "$W/base.raw" "$W/base.qcow2"
    sync
}

warm() { cat "$@" >/dev/null; }

# A minimal QMP client (no dependencies), as in shared/reference/qemu-anchor.sh.
write_qmp_tool() {
    cat > "$T/qmp.py" <<'PY'
import json, socket, sys, time
class QMP:
    def __init__(self, path, timeout=30.0):
        end = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path); break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > end: raise
                time.sleep(0.01)
        self.s, self.buf, self.events = s, b"", []
        self.recv(); self.cmd("qmp_capabilities")
    def recv(self, timeout=None):
        self.s.settimeout(timeout)
        while b"\n" not in self.buf:
            try: c = self.s.recv(65536)
            except socket.timeout: return None
            if not c: raise EOFError("QMP closed")
            self.buf += c
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)
    def cmd(self, name, **args):
        m = {"execute": name}
        if args: m["arguments"] = args
        self.s.sendall(json.dumps(m).encode() + b"\n")
        while True:
            r = self.recv()
            if "event" in r: self.events.append(r); continue
            if "error" in r: raise RuntimeError(f"{name}: {r['error']}")
            return r["return"]
    def wait(self, pred, timeout):
        end = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if pred(e): return self.events.pop(i)
            left = end - time.monotonic()
            if left <= 0: return None
            r = self.recv(timeout=left)
            if r is not None and "event" in r: self.events.append(r)
sock, op = sys.argv[1], sys.argv[2]
q = QMP(sock)
if op == "stream":
    args = {"job-id": "s1", "device": sys.argv[3]}
    if len(sys.argv) > 4 and int(sys.argv[4]): args["speed"] = int(sys.argv[4])
    t0 = time.monotonic()
    q.cmd("block-stream", **args)
    e = q.wait(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"), 900)
    t1 = time.monotonic()
    if e is None or e["event"] != "BLOCK_JOB_COMPLETED" or e["data"].get("error"):
        sys.exit(f"stream failed: {e}")
    print(f"{t1-t0:.3f}")
elif op == "quit":
    try: q.cmd("quit")
    except EOFError: pass
PY
}
