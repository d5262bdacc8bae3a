"""garin's benchmark and soak tools, and the harness they share.

The harness: `server` starts a private `garin run` (port, secret, readiness
probe, stop by PID), `procfs` reads a process tree's CPU, RSS and fds,
`wsframe` is the one client-side WebSocket frame encoder and decoder (the
end-to-end tests' hand-made client uses it too), `lean` a minimal trio
WebSocket client on it, `stats` the percentiles and histograms, `options`
the command-line options and run scaffolding the tools share.

The tools: `bench` (with `worker`, `report`, `plot`, and `hosts` for several
garin hosts on one private redis-server), `floor`, `room`,
`summary` and the `soak` package. Each has a thin entry script in scripts/
(`python scripts/bench.py ...`), and runs as `python -m garin_bench.bench`
once installed (`pip install -e '.[test]'` installs it from scripts/garin_bench).
"""
