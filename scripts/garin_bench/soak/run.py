"""One soak run: the population of members and misbehavers until the
deadline, the server watched meanwhile; then every room probed for ghost
members and every server process waited on until it is back to idle.
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys

import trio
import trio_websocket

from garin_bench.server import SpawnedServer, TokenMinter
from garin_bench.soak.clients import CLOSE_WAIT_S, Clients
from garin_bench.soak.members import Members
from garin_bench.soak.misbehavers import Misbehavers
from garin_bench.soak.records import Ledger, SoakPlan, now, trio_at
from garin_bench.soak.watch import ServerWatch


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, host: str, port: int, origin: str,
                 minter: TokenMinter, server_pid: int | None, spawned: SpawnedServer | None) -> None:
        run_id = secrets.token_hex(3)
        self.url = url
        self.spawned = spawned
        self.plan = SoakPlan(args, run_id, [f"soak-{run_id}-r{i}" for i in range(args.rooms)], random.Random(args.seed))
        self.ledger = Ledger()
        self.clients = Clients(self.plan, self.ledger, host, port, origin, minter)
        self.members = Members(self.plan, self.ledger, self.clients)
        self.misbehavers = Misbehavers(self.plan, self.ledger, self.clients)
        self.watch = ServerWatch(self.plan, self.ledger, server_pid, spawned)

    async def run(self) -> None:
        args = self.plan.args
        self.plan.t0 = now()
        duration = args.minutes * 60
        self.plan.t_end = self.plan.t0 + duration
        self.plan.t_quiet = self.plan.t_end - args.drain
        # Idle: let the readiness probes' connections finish closing first.
        await trio.sleep(2.5)
        self.watch.idle_before = self.watch.idle_fds()
        self.plan.t0 = now()
        self.plan.t_end = self.plan.t0 + duration
        self.plan.t_quiet = self.plan.t_end - args.drain
        print(f"soak: {args.members} members + {args.misbehavers} misbehavers in {args.rooms} rooms "
              f"for {args.minutes:g} min -> {self.url}", file=sys.stderr)
        async with trio.open_nursery() as top:
            population = trio.CancelScope(deadline=trio_at(self.plan.t_end))
            top.start_soon(self.watch.sampler, population)
            top.start_soon(self._progress)
            with population:
                async with trio.open_nursery() as pop:
                    ramp = min(5.0, duration / 10)
                    for i in range(args.members):
                        pop.start_soon(self.members.loop, ramp * i / args.members)
                    for j in range(args.misbehavers):
                        pop.start_soon(self.misbehavers.loop, ramp * (j + 0.5) / max(1, args.misbehavers))
            self.plan.t_stop = now()
            top.cancel_scope.cancel()
        for m in self.ledger.memberships:
            self.ledger.end_membership(m, self.plan.t_stop, self.plan.t_stop, "deadline")
        if self.plan.cut:
            return
        self.watch.final_sample()
        # Every client is gone: no room may still count members, no process hold more fds.
        await trio.sleep(3.0)
        with trio.move_on_after(20):
            async with trio.open_nursery() as probes:
                limit = trio.Semaphore(10)

                async def probe(room: int) -> None:
                    async with limit:
                        await self.probe_room(room)

                for room in range(len(self.plan.rooms)):
                    probes.start_soon(probe, room)
        await trio.sleep(2.5)
        await self.watch.wait_idle()

    async def probe_room(self, room: int) -> None:
        conn = self.clients.new_conn("probe")
        async with trio.open_nursery() as nursery:
            try:
                m = await self.clients.enter(conn, nursery, room)
                if m is not None:
                    m.tracked = False
                    if m.count != 1:
                        self.ledger.ghosts[self.plan.rooms[room]] = m.count - 1
                        self.ledger.error("ghost members in a room after every client left",
                                   f"{self.plan.rooms[room]}: a fresh join says totalUsers {m.count}")
                    t = now()
                    conn.leaving = True
                    await self.clients.send(conn, {"type": "message", "body": ""})
                    self.ledger.end_membership(m, t, t, "probe")
                    with trio.move_on_after(CLOSE_WAIT_S):
                        await conn.closed.wait()
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError,
                    trio_websocket.ConnectionClosed) as exc:
                self.ledger.error(f"probe failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                await self.clients.hang_up(conn)
                nursery.cancel_scope.cancel()

    async def _progress(self) -> None:
        while True:
            await trio.sleep(30)
            print(f"soak: {now() - self.plan.t0:5.0f}s  connections {sum(self.ledger.conns.values())} "
                  f"(open {self.ledger.open_conns}), sent {self.ledger.sent}, deliveries {self.ledger.deliveries}, "
                  f"errors {sum(self.ledger.errors.values())}", file=sys.stderr)
