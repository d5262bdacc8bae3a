"""garin soak test: clients join, chat, misbehave and leave for N minutes.

    python scripts/soak.py --spawn --minutes 3 --out bench-results/soak.json
    python scripts/soak.py --url ws://127.0.0.1:8080/ --secret ... --server-pid PID
    python -m garin_bench.soak ...     (the same, once garin is installed)

Theory of operation. One trio loop runs a population of trio-websocket
clients until the deadline, each in a loop of short lives:

  members      (--members of them) connect, auth, join one of --rooms rooms,
               chat below the rate limit, and after a few seconds either
               switch rooms (userleave + join), leave with an empty body
               (expect 1000 bye), close the WebSocket, or drop the TCP
               connection (FIN or RST); then start over with a new connection
  misbehavers  (--misbehavers of them) each life breaks one rule: a bad,
               foreign or expired token, no auth, no join, the wrong order,
               invalid JSON, binary or invalid UTF-8 frames, an oversized
               frame, a too long body, a burst over the rate limit, userleave
               + join in a loop past the join limit, or a client that stops
               reading (in a room of its own, fed by a well-behaved sender);
               every one must get the documented close code and reason

What is checked, all from the clients' side (one process, one monotonic clock):

  loss         a member that saw its own join broadcast at time J must receive
               every tracked message sent to its room after J, if the message
               was sent at least --settle seconds before the member began to
               leave (timed rule), or if it received a later message of the
               same sender in that membership (gap rule: per-sender order
               makes a gap a proven loss). Duplicates, reordering per sender,
               messages from another room, echoes of one's own messages and
               altered bodies are errors too.
  room events  every member's view of its room is the shard's order of
               events: after its own join (totalUsers N), each join must say
               N+1 and each userleave N-1, never below 1. A member present
               (by the same causal/timed rules) when another joined or left
               must see that join or userleave.
  closes       misbehavers get exactly the expected code and reason (timeouts
               within a window); members get 1000 bye for an empty body and
               are never closed otherwise.
  after        once every client is gone: each room used is probed with a
               fresh join, which must say totalUsers 1 (no ghost members),
               and every server process must get back to its idle fd count.
  resources    every --sample-every seconds: RSS and open fds of each process
               of the server's tree (/proc/PID/status, /proc/PID/fd), a
               process that restarts, a spawned server that logs errors.
               Reported per process role: start, end, max, and the slope per
               minute of a least-squares line through the samples after
               --warmup, so that a leak shows as a steady climb.

Exit code: 0 if nothing was wrong, 1 if an error or a loss was found, 2 if the
soak could not run, 3 on the hard timeout. Bounded: clients stop sending
--drain seconds before the end, every task is cancelled at the deadline, a
spawned server gets SIGTERM and then SIGKILL (by PID) after a deadline, and an
alarm ends the process if anything still hangs. Loopback only.

The parts: records.py (the plan, the records and counters: plain data),
clients.py (a connection: open, read, auth, join, hang up) and receive.py
(every frame checked as it arrives), members.py and misbehavers.py (with
misbehaviours.py, the rules broken) for the population, watch.py for the
server's processes, run.py for one run, analysis.py and report.py for the
result, cli.py for the options and main.
"""
