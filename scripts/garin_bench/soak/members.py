"""Well-behaved members: each life connects, authenticates, joins a room,
chats below the rate limit and then switches rooms, says bye, closes, or
drops the connection (FIN or RST); then a new life begins. Every message
sent is recorded for the loss analysis.
"""

from __future__ import annotations

import trio
import trio_websocket

from garin_bench.soak.clients import CLOSE_WAIT_S, Clients
from garin_bench.soak.records import Conn, Ledger, Membership, MsgRec, SoakPlan, now


QUIET_BEFORE_DROP_S = 1.0  # a member stops typing before it drops its connection
PAD_ALPHABET = 'abcdefghij klmnop ÄéΩж✓😀"\\/<>&{}'


class Members:
    def __init__(self, plan: SoakPlan, ledger: Ledger, clients: Clients) -> None:
        self.plan = plan
        self.ledger = ledger
        self.clients = clients

    def _body(self, room: int, cid: int, seq: int) -> str:
        head = f"{self.plan.run_id}|{room}|{cid}|{seq}|"
        r = self.plan.rng.random()
        if r < 0.8:
            n = self.plan.rng.randrange(0, 80)
        elif r < 0.95:
            n = self.plan.rng.randrange(200, 1000)
        else:
            n = self.plan.rng.randrange(1000, max(1001, self.plan.args.max_body_chars - len(head) - 1))
        if self.plan.args.max_body_chars:
            n = min(n, self.plan.args.max_body_chars - len(head))
        start = self.plan.rng.randrange(len(PAD_ALPHABET))
        pad = (PAD_ALPHABET * (n // len(PAD_ALPHABET) + 2))[start : start + n]
        return head + pad

    async def chat_once(self, conn: Conn, m: Membership) -> None:
        conn.seq += 1
        body = self._body(m.room, conn.cid, conn.seq)
        rec = MsgRec(m.room, conn.cid, conn.seq, now(), body)
        self.ledger.msgs[(conn.cid, conn.seq)] = rec
        self.ledger.room_msgs[m.room].append(rec)
        self.ledger.sender_msgs[conn.cid].append(rec)
        self.ledger.sent += 1
        try:
            await self.clients.send(conn, {"type": "message", "body": body})
        except trio_websocket.ConnectionClosed:
            rec.uncertain = True
            raise

    def _unexpected_close(self, conn: Conn, m: Membership | None) -> None:
        self.ledger.error(f"member closed by the server: {conn.close_text()}", conn.username)
        if m is not None:
            m.tracked = False
            self.ledger.end_membership(m, m.t_join_seen or now(), conn.closed_at or now(), "closed by server")

    async def chat(self, conn: Conn, m: Membership, stay: float) -> bool:
        """Chat in m's room for `stay` seconds (or until the quiet time); False if closed on us."""
        until = min(now() + stay, self.plan.t_quiet)
        lo = self.plan.args.rate_limit_window / self.plan.args.rate_limit_count * 2.5
        while True:
            t_next = now() + self.plan.rng.uniform(lo, 3 * lo)
            if t_next >= until:
                return not await self.clients.wait_closed_until(conn, until)
            if await self.clients.wait_closed_until(conn, t_next):
                return False
            await self.chat_once(conn, m)

    async def life(self) -> None:
        conn = self.clients.new_conn("member")
        m: Membership | None = None
        async with trio.open_nursery() as nursery:
            try:
                m = await self.clients.enter(conn, nursery, self.plan.rng.randrange(self.plan.main_rooms))
                while m is not None:
                    if not await self.chat(conn, m, self.plan.rng.uniform(*self.plan.args.stay)):
                        self._unexpected_close(conn, m)
                        return
                    if now() >= self.plan.t_quiet:
                        await conn.closed.wait()  # hold (and receive) until the deadline
                        self._unexpected_close(conn, m)
                        return
                    action = self.plan.rng.choices(
                        ["switch", "bye", "close", "drop", "reset"], weights=[35, 25, 15, 15, 10]
                    )[0]
                    self.ledger.leaves[action] += 1
                    if action == "switch" and self.plan.main_rooms > 1:
                        t = now()
                        await self.clients.send(conn, {"type": "userleave"})
                        self.ledger.end_membership(m, t, t, "userleave")
                        room = self.plan.rng.choice([r for r in range(self.plan.main_rooms) if r != m.room])
                        m = await self.clients.join(conn, room)
                        continue
                    conn.leaving = True
                    if action in ("drop", "reset"):
                        if await self.clients.wait_closed_until(conn, now() + QUIET_BEFORE_DROP_S):
                            self._unexpected_close(conn, m)
                            return
                        t = now()
                        self.ledger.end_membership(m, t, t, action)
                        await self.clients.hang_up(conn, reset=action == "reset")
                    elif action == "close":
                        t = now()
                        self.ledger.end_membership(m, t, t, "close")
                        with trio.move_on_after(CLOSE_WAIT_S):
                            assert conn.ws is not None
                            await conn.ws.aclose()
                    else:  # bye, or switch with a single room
                        t = now()
                        await self.clients.send(conn, {"type": "message", "body": ""})
                        self.ledger.end_membership(m, t, t, "bye")
                        if not await self.clients.wait_closed_until(conn, t + CLOSE_WAIT_S):
                            self.ledger.error("member bye: no close", conn.username)
                        elif conn.close != (1000, "bye"):
                            self.ledger.error(f"member bye: expected 1000 bye, got {conn.close_text()}", conn.username)
                    return
            except trio_websocket.ConnectionClosed:
                await self.clients.wait_closed_until(conn, now() + 1)
                if not conn.leaving:
                    self._unexpected_close(conn, m)
            except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
                self.ledger.error(f"member connect failed: {type(exc).__name__}", str(exc)[:100])
            finally:
                await self.clients.hang_up(conn)
                nursery.cancel_scope.cancel()

    async def loop(self, delay: float) -> None:
        await trio.sleep(delay)
        while now() < self.plan.t_quiet - 1:
            try:
                await self.life()
            except Exception as exc:  # a bug here, or a library error: count it, keep going
                self.ledger.error(f"member client error: {type(exc).__name__}", str(exc)[:200])
            await trio.sleep(self.plan.rng.uniform(0.1, 1.0))
