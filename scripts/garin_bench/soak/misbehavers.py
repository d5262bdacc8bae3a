"""Misbehavers: each connection breaks one rule (misbehaviours.py) and must
get exactly the close GarinChat documents for it; and a member that stops
reading in a room fed by a well-behaved sender must be closed 1013 too slow
once its outbox is full.
"""

from __future__ import annotations

import trio
import trio_websocket

from garin_bench.soak.clients import CLOSE_WAIT_S, JOIN_WAIT_S, Clients
from garin_bench.soak.misbehaviours import Behaviour, Misbehaviours
from garin_bench.soak.records import Conn, Expect, Ledger, Membership, SoakPlan, now

FEED_BODY_CHARS = 4000  # a stopped reader's room is fed bodies this long (at most)


class Misbehavers:
    def __init__(self, plan: SoakPlan, ledger: Ledger, clients: Clients) -> None:
        self.plan = plan
        self.ledger = ledger
        self.clients = clients
        self.misbehaviours = Misbehaviours(plan, ledger, clients)
        self.stop_reader_busy = False
        self.slow_episodes = 0

    async def misbehave(self, name: str, behaviour: Behaviour) -> None:
        conn = self.clients.new_conn("misbehaver")
        self.ledger.mis_runs[name] += 1
        expect: Expect | None = None
        offence = now()
        async with trio.open_nursery() as nursery:
            try:
                await self.clients.open(conn, nursery)
                self.clients.start_reader(conn, nursery)
                try:
                    offence = now()
                    expect = await behaviour(conn)
                except trio_websocket.ConnectionClosed:
                    pass  # the server closed first; judged below
                if expect is not None and expect.code == 0:
                    return  # could not even get into a room: already an error
                with trio.move_on_after(CLOSE_WAIT_S + (expect.after_s[1] if expect and expect.after_s else 0)):
                    await conn.closed.wait()
                m = conn.view
                if m is not None:
                    # The offence came after the own join broadcast: a safe lower bound.
                    self.ledger.end_membership(m, m.t_join_seen or offence, conn.closed_at or now(), f"misbehaved: {name}")
                self._judge(name, conn, expect)
            except trio.Cancelled:  # the deadline: not judged
                self.ledger.mis_runs[name] -= 1
                self.ledger.mis_cut += 1
                raise
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                self.ledger.error(f"misbehaver connect failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                await self.clients.hang_up(conn)
                nursery.cancel_scope.cancel()

    def _judge(self, name: str, conn: Conn, expect: Expect | None) -> None:
        if expect is None:
            self.ledger.error(f"{name}: closed before the offence, {conn.close_text()}", conn.username)
            return
        want = f"{expect.code} {expect.reason or '*'}"
        if conn.close is None:
            self.ledger.error(f"{name}: expected {want}, got no close within {CLOSE_WAIT_S:g}s", conn.username)
            return
        code, reason = conn.close
        if code != expect.code or (expect.reason is not None and reason != expect.reason):
            self.ledger.error(f"{name}: expected {want}, got {conn.close_text()}", conn.username)
            return
        if expect.after_s is not None and expect.since is not None and conn.closed_at is not None:
            took = conn.closed_at - expect.since
            if not expect.after_s[0] <= took <= expect.after_s[1]:
                self.ledger.error(f"{name}: closed after {took:.2f}s, expected {expect.after_s[0]:.2f}-"
                           f"{expect.after_s[1]:.2f}s", conn.username)
                return
        self.ledger.mis_ok[name] += 1

    def feed(self) -> tuple[int, float]:
        """Body length and gap of the sender that feeds a stopped reader (under the rate limit)."""
        chars = max(100, min(self.plan.args.max_body_chars or FEED_BODY_CHARS, FEED_BODY_CHARS) - 40)
        return chars, self.plan.args.rate_limit_window / self.plan.args.rate_limit_count * 1.5

    @property
    def slow_expected(self) -> float:
        """Seconds a stopped reader should take to be closed: its outbox plus some kernel buffers, fed."""
        chars, gap = self.feed()
        return float(self.plan.args.max_outbox_bytes + 100 * 1024) / (chars / gap)

    @property
    def slow_timeout(self) -> float:
        return 20.0 + 3 * self.slow_expected

    async def stop_reader(self) -> None:
        """A member stops reading in a room fed by a well-behaved sender: 1013 too slow."""
        name = "stops reading"
        self.ledger.mis_runs[name] += 1
        self.slow_episodes += 1
        room = len(self.plan.rooms)
        self.plan.rooms.append(f"soak-{self.plan.run_id}-slow{self.slow_episodes}")
        feeder = self.clients.new_conn("feeder")
        slow = self.clients.new_conn("slow")
        async with trio.open_nursery() as nursery:
            try:
                fm = await self.clients.enter(feeder, nursery, room)
                if fm is None:
                    return
                # A small receive buffer and queue, so the server's outbox fills soon.
                await self.clients.open(slow, nursery, rcvbuf=4096, queue=1, buffer=4096)
                await self.clients.auth(slow)
                sm = Membership(slow.cid, slow.username, room, slow.kind, now(), tracked=False)
                self.ledger.memberships.append(sm)
                slow.pending = sm
                await self.clients.send(slow, {"type": "join", "username": slow.username, "room": self.plan.rooms[room]})
                assert slow.ws is not None
                with trio.move_on_after(JOIN_WAIT_S):
                    while not sm.joined.is_set():  # read only until the own join broadcast
                        self.clients.on_frame(slow, await slow.ws.get_message(), now())
                if not sm.joined.is_set():
                    self.ledger.error(f"{name}: join not confirmed within {JOIN_WAIT_S:g}s", slow.username)
                    return
                # Now it reads nothing; the feeder sends until the room hears it leave.
                stopped = now()
                big, gap = self.feed()
                k = 0
                with trio.move_on_after(self.slow_timeout):
                    while slow.username not in fm.leaves_seen:
                        if feeder.closed.is_set():
                            self.ledger.error(f"feeder closed by the server: {feeder.close_text()}", feeder.username)
                            return
                        k += 1
                        body = f"{self.plan.run_id}|n|{feeder.cid}|{k}|" + "w" * big
                        await self.clients.send(feeder, {"type": "message", "body": body})
                        self.ledger.noise_sent += 1
                        await trio.sleep(gap)
                kicked = now()
                if slow.username not in fm.leaves_seen:
                    self.ledger.error(f"{name}: expected 1013 too slow, still in the room after {self.slow_timeout:.0f}s",
                               slow.username)
                    return
                self.ledger.slow_close_s.append(kicked - stopped)
                # Read again: everything queued, then the close frame.
                self.clients.start_reader(slow, nursery)
                with trio.move_on_after(CLOSE_WAIT_S):
                    await slow.closed.wait()
                self.ledger.end_membership(sm, sm.t_join_seen or stopped, slow.closed_at or now(), "too slow")
                self._judge(name, slow, Expect(1013, "too slow"))
                feeder.leaving = True
                t = now()
                await self.clients.send(feeder, {"type": "message", "body": ""})
                self.ledger.end_membership(fm, t, t, "bye")
                with trio.move_on_after(CLOSE_WAIT_S):
                    await feeder.closed.wait()
            except trio.Cancelled:
                if not slow.closed.is_set():
                    self.ledger.mis_runs[name] -= 1
                    self.ledger.mis_cut += 1
                raise
            except trio_websocket.ConnectionClosed:
                if not feeder.leaving:
                    self.ledger.error(f"{name}: feeder closed: {feeder.close_text()}", feeder.username)
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                self.ledger.error(f"{name}: connect failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                self.stop_reader_busy = False
                await self.clients.hang_up(slow)
                await self.clients.hang_up(feeder)
                nursery.cancel_scope.cancel()

    async def loop(self, delay: float) -> None:
        await trio.sleep(delay)
        table = self.misbehaviours.behaviours()
        names = [*table, "stops reading"]
        while now() < self.plan.t_quiet - 4:
            name = self.plan.rng.choice(names)
            try:
                if name == "stops reading":
                    if self.stop_reader_busy or now() > self.plan.t_quiet - 10 - 1.5 * self.slow_expected:
                        continue
                    self.stop_reader_busy = True
                    await self.stop_reader()
                else:
                    await self.misbehave(name, table[name])
            except Exception as exc:
                self.ledger.error(f"misbehaver client error: {type(exc).__name__}", str(exc)[:200])
            await trio.sleep(self.plan.rng.uniform(0.1, 0.6))
