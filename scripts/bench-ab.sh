#!/usr/bin/env bash
# Compares two builds of dvs (e.g. before and after a change) on this machine, in alternating
# blocks so that both see the same noise: `dvs bench ipc`, then `dvs bench migration` (criu)
# for servers of 2, 64, 256 and 1024 MiB. Prints one table per bench; the raw JSON of every
# block stays in OUT.
#
#   scripts/bench-ab.sh BEFORE_DIR AFTER_DIR [OUT]
#
# BEFORE_DIR and AFTER_DIR hold a release build's binaries (dvs and the example programs,
# e.g. target/release of two checkouts). Run as root (criu). Takes about 10 minutes.
set -euo pipefail

before=${1:?usage: bench-ab.sh BEFORE_DIR AFTER_DIR [OUT]}
after=${2:?usage: bench-ab.sh BEFORE_DIR AFTER_DIR [OUT]}
out=${3:-/tmp/dvs-bench-ab}
rounds=${ROUNDS:-2}
mkdir -p "$out"

run() { # NAME BIN ARGS...: one block, JSON to OUT/NAME.json
    local name=$1 bin=$2
    shift 2
    "$bin/dvs" "$@" --dir "$out/cluster" --json >"$out/$name.json" 2>"$out/$name.log" || {
        echo "bench-ab: $name failed (see $out/$name.log)" >&2
        return 1
    }
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
    for side in before after; do
        bin=$before
        [ "$side" = after ] && bin=$after
        run "ipc-$side-$r" "$bin" bench ipc --iterations 5000 --bulk-mib 128
        for mb in 2 64 256 1024; do
            runs=10
            [ "$mb" -ge 256 ] && runs=3
            run "migr$mb-$side-$r" "$bin" bench migration --backend criu --runs "$runs" --ballast-mb "$mb"
        done
    done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(name):
    with open(f"{out}/{name}.json") as f:
        return json.load(f)
def med(xs):
    return statistics.median(xs) if xs else float("nan")
print("\n`dvs bench ipc` (median over blocks)\n")
print("| figure | before | after | after/before |")
print("|---|---|---|---|")
rows = [
    ("raw Unix RTT µs", lambda d: d["raw"]["unix_rtt"]["median_us"]),
    ("raw TCP RTT µs", lambda d: d["raw"]["tcp_rtt"]["median_us"]),
    ("sendrec local µs", lambda d: d["dvs"]["sendrec_local"]["median_us"]),
    ("sendrec remote µs", lambda d: d["dvs"]["sendrec_remote"]["median_us"]),
    ("send local msg/s", lambda d: d["dvs"]["send_local_msgs_s"]),
    ("send remote msg/s", lambda d: d["dvs"]["send_remote_msgs_s"]),
    ("vcopy local MB/s", lambda d: d["dvs"]["vcopy_local_mb_s"]),
    ("vcopy remote MB/s", lambda d: d["dvs"]["vcopy_remote_mb_s"]),
    ("raw TCP stream MB/s", lambda d: d["raw"]["tcp_stream_mb_s"]),
]
for label, get in rows:
    b = med([get(load(f"ipc-before-{r}")) for r in range(1, rounds + 1)])
    a = med([get(load(f"ipc-after-{r}")) for r in range(1, rounds + 1)])
    print(f"| {label} | {b:.1f} | {a:.1f} | {a / b:.2f} |")
print("\n`dvs bench migration --backend criu` (median over every run of every block)\n")
print("| server | before: migration / stall ms | after: migration / stall ms | before / after longest link silence ms | violations |")
print("|---|---|---|---|---|")
for mb in (2, 64, 256, 1024):
    cells = []
    silence = []
    viol = 0
    for side in ("before", "after"):
        mig, stall, sil = [], [], []
        for r in range(1, rounds + 1):
            b = load(f"migr{mb}-{side}-{r}")["backends"][0]
            ok = [s for s in b["samples"] if (s.get("summary") or {}).get("committed")]
            mig += [s["summary"]["migration_ms"] for s in ok]
            stall += [s["client"]["max_stall_ms"] for s in ok if s.get("client")]
            sil.append(b["max_link_silence_ms"])
            viol += len(b["violations"])
        cells.append(f"{med(mig):.0f} / {med(stall):.0f} (n={len(mig)})")
        silence.append(f"{max(sil):.0f}")
    print(f"| {mb} MiB | {cells[0]} | {cells[1]} | {silence[0]} / {silence[1]} | {viol} |")
EOF
