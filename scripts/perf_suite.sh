#!/usr/bin/env bash
# The README's performance numbers, in about 25 minutes on a 2-core host.
#
#   scripts/perf_suite.sh OUT_DIR [GARINCHAT_BINARY]
#   PARTS="ladder connect" scripts/perf_suite.sh OUT_DIR     # some parts only
#
# Parts (all by default): compare (scripts/perf_compare.sh: the issue's
# load for garin with 1, 2, 4 shards and 2 routers, beside GarinChat and the
# write floor; needs GARINCHAT_BINARY), ladder (--shards 2, faster senders up
# to saturation), connect (2,000 clients connect + auth + join, 1 and 2
# routers), memory (RSS per idle connection at 10,000) and room10k (one room
# of 10,000 members). Every run is bench.py or bench_room.py --spawn on
# loopback, bounded in time. The host's load moves every number by tens of
# percent within minutes: read medians, and compare runs made together.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT_DIR}; GO=${2:-}
PARTS=${PARTS:-compare ladder connect memory room10k}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

run() { # NAME ARGS...
    local name=$1
    shift
    echo "== $name" >&2
    timeout 300 "$PY" scripts/bench.py --spawn --client lean --no-plot --out "$OUT/$name.json" "$@" \
        > "$OUT/$name.log" 2>&1 || echo "   $name failed: see $OUT/$name.log" >&2
}
part() { [[ " $PARTS " == *" $1 "* ]]; }

if part compare; then
    if [ -n "$GO" ]; then scripts/perf_compare.sh "$OUT/compare" "$GO" 3; else echo "compare: no GarinChat binary given; skipped" >&2; fi
fi
if part ladder; then
    # The issue's rooms, faster senders (msg/s = 10 / interval), 2 shards:
    # both cores fan out; two load-generator processes.
    for iv in 0.01 0.005 0.0033 0.0025 0.002; do
        run "ladder-s2-$iv" --shards 2 --procs 2 --interval "$iv" --warmup 2 --duration 8
    done
    "$PY" scripts/bench_summary.py "ladder:2 shards=$OUT/ladder-s2-*.json"
fi
if part connect; then
    CONNECT=(--procs 2 --rooms 200 --members 10 --senders 0 --warmup 0 --duration 1 --drain 0 --connect-concurrency 200)
    for i in 1 2 3; do
        for r in 1 2; do run "conn-r$r-$i" --routers "$r" "${CONNECT[@]}"; done
    done
    "$PY" scripts/bench_summary.py "connect 1 router=$OUT/conn-r1-*.json" "connect 2 routers=$OUT/conn-r2-*.json"
fi
if part memory; then
    run mem10k --procs 2 --rooms 10 --members 1000 --senders 0 --warmup 0 --duration 1 --drain 0 --connect-timeout 120
    "$PY" scripts/bench_summary.py "rss:10k idle=$OUT/mem10k.json"
fi
if part room10k; then
    # One room of 10,000 members (building it sends 50M join frames); then
    # the time for one message to reach the last member.
    echo "== room10k" >&2
    timeout 500 "$PY" scripts/bench_room.py --spawn --members 10000 --messages 5 --timeout 450 \
        --out "$OUT/room10k.json" > "$OUT/room10k.log" 2>&1 || echo "   room10k failed: see $OUT/room10k.log" >&2
    tail -5 "$OUT/room10k.log" >&2
fi
