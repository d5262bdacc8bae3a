#!/usr/bin/env bash
# One shard, then two, driven to saturation: FIVE rooms of 50 per shard, one
# sender each every INTERVAL, with PROCS load-generator processes per shard
# (the lean client costs more per received message than a shard per
# delivery). Same environment as scripts/device_ladder.sh (scripts/device_env.sh).
#   scripts/device_saturate.sh OUT_DIR PROCS_PER_SHARD INTERVAL...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT_DIR}; PER=${2:?PROCS_PER_SHARD}; shift 2
mkdir -p "$OUT"
source scripts/device_env.sh
for s in ${SHARDS:-1 2}; do
    for iv in "$@"; do
        name="sat-s$s-$iv"
        echo "== $name" >&2
        timeout 150 "$PY" scripts/bench.py --spawn --python "$PY" --client lean --no-plot \
            --shards "$s" --routers 1 --procs $((PER * s)) --rooms $((5 * s)) --members 50 --senders 1 \
            --interval "$iv" --warmup 1 --duration 5 --drain 1 --connect-timeout 60 \
            --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "   $name failed" >&2
        grep -E "traffic|latency|server|cores:|client|machine" "$OUT/$name.log" >&2
    done
done
