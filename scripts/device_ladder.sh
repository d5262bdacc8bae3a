#!/usr/bin/env bash
# The shard-scaling ladder on a many-core host: --shards 1, 2, 4, 8, the same
# load per shard each time (rooms of 50, one sender each; FIVE rooms per
# shard), so a run with S shards offers S times the load of one shard.
#
#   scripts/device_ladder.sh OUT_DIR [INTERVAL...]
#
# Needs garin and its dependencies importable by $PYTHON (default python3);
# with WHEELS=DIR it installs DIR/*.whl and this checkout into a private
# site directory first (scripts/device_env.sh; for a bare machine that cannot
# reach an index).
# Every run is bench.py --spawn --client lean on loopback, bounded in time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT_DIR}
shift
INTERVALS=("${@:-0.01}")
mkdir -p "$OUT"
source scripts/device_env.sh
echo "cores: $(nproc)  python: $("$PY" --version)"
for iv in "${INTERVALS[@]}"; do
    for s in 1 2 4 8; do
        name="ladder-s$s-$iv"
        echo "== $name" >&2
        timeout 150 "$PY" scripts/bench.py --spawn --python "$PY" --client lean --no-plot \
            --shards "$s" --routers 1 --procs "$s" --rooms $((5 * s)) --members 50 --senders 1 \
            --interval "$iv" --warmup 1 --duration 5 --drain 1 --connect-timeout 60 \
            --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "   $name failed" >&2
        grep -E "traffic|latency|server|cores:|client|machine" "$OUT/$name.log" >&2
    done
done
