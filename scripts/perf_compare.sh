#!/usr/bin/env bash
# garin beside the Go GarinChat server and the write floor, at the issue's
# load (10 rooms x 50 members, one sender per room every 10 ms), in
# interleaved rounds so that every setup sees the same machine noise:
#
#   scripts/perf_compare.sh OUT_DIR GARINCHAT_BINARY [ROUNDS]
#
# GARINCHAT_BINARY: built by ../shared/tools/build-garinchat.sh (rate limit
# lifted). Each garin run is bench.py --spawn with --floor 10 (the same
# writes without a server, right after the run); GarinChat runs on a free
# loopback port with the same load generator. Then bench_summary.py prints
# the medians. Loopback only, every run bounded in time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT_DIR}; GO=${2:?GARINCHAT_BINARY}; ROUNDS=${3:-3}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
LOAD=(--client lean --procs 1 --rooms 10 --members 50 --senders 1 --interval 0.01 --warmup 2 --duration 10 --no-plot)
SECRET=$(head -c 32 /dev/urandom | base64)

garin() { # NAME ARGS...
    local name=$1; shift
    echo "== $name" >&2
    timeout 300 "$PY" scripts/bench.py --spawn "${LOAD[@]}" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 \
        || echo "   $name failed: see $OUT/$name.log" >&2
}

garinchat() { # NAME
    local name=$1 port pid try
    echo "== $name" >&2
    # GarinChat panics (the whole server) when two goroutines write to one
    # socket: connect one member at a time, and try a run it died in again.
    for try in 1 2 3 4; do
        port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        PORT=$port JWT_DECODE_SECRET=$SECRET ALLOWED_ORIGINS=http://bench.local "$GO" > "$OUT/$name.server.log" 2>&1 &
        pid=$!
        sleep 1
        timeout 300 "$PY" scripts/bench.py --url "ws://127.0.0.1:$port/" --server-pid $pid --secret "$SECRET" \
            --origin http://bench.local --connect-concurrency 1 --connect-timeout 120 --floor 10 \
            "${LOAD[@]}" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
        kill $pid 2>/dev/null; wait $pid 2>/dev/null
        # It often panics while the members close (concurrent writes): the
        # run counts if every member joined and stayed.
        if grep -q "500/500 joined" "$OUT/$name.log" && ! grep -q "disconnected during the run" "$OUT/$name.log"; then
            return
        fi
        echo "   $name: GarinChat crashed during the run (try $try)" >&2
    done
}

for i in $(seq "$ROUNDS"); do
    garin "garin-s2-$i" --shards 2 --floor 10
    garinchat "garinchat-$i"
    garin "garin-s1-$i" --shards 1
    garin "garin-s4-$i" --shards 4
    garin "garin-r2-$i" --shards 2 --routers 2
done
"$PY" scripts/bench_summary.py "cpu:garin 2 shards=$OUT/garin-s2-*.json" "cpu:GarinChat=$OUT/garinchat-*.json" \
    "cpu:garin 1 shard=$OUT/garin-s1-*.json" "cpu:garin 4 shards=$OUT/garin-s4-*.json" \
    "cpu:garin 2 routers=$OUT/garin-r2-*.json"
