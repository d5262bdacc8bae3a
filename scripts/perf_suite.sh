#!/usr/bin/env bash
# The README's performance numbers and docs/perf.png, in about 25 minutes.
#
#   scripts/perf_suite.sh [OUT_DIR]          # default bench-results/suite
#   BEFORE=/path/to/older/garin/checkout scripts/perf_suite.sh
#
# Every run is bench.py --spawn --client lean (loopback only, bounded in
# time). The issue's load runs with one load-generator process (bench.py's
# default): on two cores the router and the load generator get one each, and
# loopback charges the wake-up of every reader process a burst reaches to
# the writer. The ladder, connect and memory runs use two (one could not
# send fast enough). With BEFORE set, the same load also runs against that
# checkout (interleaved, so both see the same machine noise) and the plot
# shows it as "before". The machine is shared and noisy: read medians, and
# compare groups measured in one session.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/suite}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
HERE=$(pwd)
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")

run() { # NAME DIR ARGS...
    local name=$1 dir=$2
    shift 2
    echo "== $name" >&2
    (cd "$dir" && timeout 300 "$PY" scripts/bench.py --spawn --client lean --no-plot \
        --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1) || echo "   $name failed: see $OUT/$name.log" >&2
}

ONE=(--procs 1)
TWO=(--procs 2)

# The issue's load: 10 rooms x 50 members, one sender per room every 10 ms;
# also with two load-generator processes, the setup of earlier suites. The
# host's load moves every number by tens of percent within minutes: these
# runs measure the write floor right after themselves (--floor), to read
# garin against (the table's x_floor).
for i in 1 2 3; do
    [ -n "${BEFORE:-}" ] && run target-before-$i "$BEFORE" "${ONE[@]}"
    run target-r1-$i "$HERE" "${ONE[@]}" --floor 10
    run target-p2-$i "$HERE" "${TWO[@]}" --floor 10
done
for i in 1 2 3; do run target-r2-$i "$HERE" "${ONE[@]}" --routers 2; done
for s in 1 4; do for i in 1 2; do run target-s$s-$i "$HERE" "${ONE[@]}" --shards $s; done; done

# Throughput: the same rooms, faster senders (msg/s = 10 / interval).
for iv in 0.0067 0.005 0.004 0.0033 0.0025; do
    for r in 1 2; do run ladder-r$r-$iv "$HERE" "${TWO[@]}" --routers $r --interval $iv; done
    [ -n "${BEFORE:-}" ] && run ladder-before-$iv "$BEFORE" "${TWO[@]}" --interval $iv
done

# Connection setup: 2,000 members in 200 rooms of 10, connect + auth + join.
CONNECT=("${TWO[@]}" --rooms 200 --members 10 --senders 0 --warmup 0 --duration 1 --drain 0 --connect-concurrency 200)
for i in 1 2 3; do
    for r in 1 2; do run conn-r$r-$i "$HERE" --routers $r "${CONNECT[@]}"; done
done

# Memory: RSS per idle joined connection at 10,000 connections.
IDLE=("${TWO[@]}" --rooms 10 --members 1000 --senders 0 --warmup 0 --duration 1 --drain 0 --connect-timeout 120)
run mem10k "$HERE" "${IDLE[@]}"
[ -n "${BEFORE:-}" ] && run mem10k-before "$BEFORE" "${IDLE[@]}"

# Scale: one room of 10,000 members (building it sends 50M join frames); then
# the time for one message to reach the last member.
echo "== room10k" >&2
timeout 500 "$PY" scripts/bench_room.py --spawn --members 10000 --messages 5 --timeout 450 \
    --out "$OUT/room10k.json" > "$OUT/room10k.log" 2>&1 || echo "   room10k failed: see $OUT/room10k.log" >&2
cat "$OUT/room10k.log" >&2

groups=()
[ -n "${BEFORE:-}" ] && groups+=("cpu:before=$OUT/target-before-*.json")
groups+=("cpu:1 router=$OUT/target-r1-*.json" "cpu:2 load procs=$OUT/target-p2-*.json"
         "cpu:2 routers=$OUT/target-r2-*.json"
         "cpu:1 shard=$OUT/target-s1-*.json" "cpu:4 shards=$OUT/target-s4-*.json")
[ -n "${BEFORE:-}" ] && groups+=("ladder:before, 1 router=$OUT/ladder-before-*.json")
groups+=("ladder:1 router=$OUT/ladder-r1-*.json" "ladder:2 routers=$OUT/ladder-r2-*.json")
[ -n "${BEFORE:-}" ] && groups+=("rss:before=$OUT/mem10k-before.json")
groups+=("rss:now=$OUT/mem10k.json" "connect 1 router=$OUT/conn-r1-*.json" "connect 2 routers=$OUT/conn-r2-*.json")
"$PY" scripts/bench_summary.py --plot "$OUT/perf.png" "${groups[@]}"
