"""The ways a misbehaver breaks GarinChat's rules, one per connection, and
the close each must get (code, reason, and for timeouts when). Each takes an
open connection, misbehaves, and returns its Expect; misbehavers.py judges.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from garin_bench.server import TokenMinter
from garin_bench.soak.clients import Clients
from garin_bench.soak.records import Conn, Expect, Ledger, Membership, SoakPlan, now
from garin_bench.wsframe import OP_TEXT, client_frame

Behaviour = Callable[[Conn], Awaitable[Expect]]


class Misbehaviours:
    def __init__(self, plan: SoakPlan, ledger: Ledger, clients: Clients) -> None:
        self.plan = plan
        self.ledger = ledger
        self.clients = clients
        self.foreign_minter = TokenMinter(secrets.token_urlsafe(48), 3600)

    async def _in_room(self, conn: Conn) -> Membership | None:
        await self.clients.auth(conn)
        return await self.clients.join(conn, self.plan.rng.randrange(self.plan.main_rooms))

    async def _phase(self, conn: Conn) -> str:
        """Get to a random phase: before auth, after auth, or in a room."""
        phase = self.plan.rng.choice(["new", "authed", "in room"])
        if phase != "new":
            await self.clients.auth(conn)
        if phase == "in room":
            await self.clients.join(conn, self.plan.rng.randrange(self.plan.main_rooms))
        return phase

    async def b_garbage_token(self, conn: Conn) -> Expect:
        await self.clients.send(conn, {"type": "auth", "body": "not-a-token." + secrets.token_urlsafe(8)})
        return Expect(1008, "invalid token")

    async def b_foreign_token(self, conn: Conn) -> Expect:
        await self.clients.send(conn, {"type": "auth", "body": self.foreign_minter(f"soak-{conn.cid}")})
        return Expect(1008, "invalid token")

    async def b_expired_token(self, conn: Conn) -> Expect:
        expired = TokenMinter(self.clients.minter.secret, -120)(f"soak-{self.plan.run_id}-{conn.cid}")
        await self.clients.send(conn, {"type": "auth", "body": expired})
        return Expect(1008, "token expired")

    async def b_no_auth(self, conn: Conn) -> Expect:
        t = self.plan.args.auth_timeout
        return Expect(1008, "auth timeout", conn.opened_at, (t - 0.25, t + 3.0))

    async def b_no_join(self, conn: Conn) -> Expect:
        await self.clients.auth(conn)
        sent = now()
        t = self.plan.args.join_timeout
        return Expect(1008, "join timeout", sent, (t - 0.25, t + 3.0))

    async def b_join_before_auth(self, conn: Conn) -> Expect:
        await self.clients.send(conn, {"type": "join", "username": conn.username, "room": self.plan.rooms[0]})
        return Expect(1008, "not authenticated")

    async def b_message_before_join(self, conn: Conn) -> Expect:
        await self.clients.auth(conn)
        await self.clients.send(conn, {"type": "message", "body": f"{self.plan.run_id}|n|{conn.cid}|0"})
        return Expect(1008, "not in a room")

    async def b_userleave_before_join(self, conn: Conn) -> Expect:
        await self.clients.auth(conn)
        await self.clients.send(conn, {"type": "userleave"})
        return Expect(1008, "not in a room")

    async def b_second_auth(self, conn: Conn) -> Expect:
        await self.clients.auth(conn)
        await self.clients.auth(conn)
        return Expect(1008, "already authenticated")

    async def b_second_join(self, conn: Conn) -> Expect:
        if await self._in_room(conn) is None:
            return Expect(0, "")  # already counted
        conn.leaving = True
        await self.clients.send(conn, {"type": "join", "username": conn.username, "room": self.plan.rooms[0]})
        return Expect(1008, "already joined")

    async def b_invalid_json(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.clients.send(conn, '{"type": "message", "body": ')
        return Expect(1008, "invalid json")

    async def b_not_an_object(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.clients.send(conn, '["auth", "message"]')
        return Expect(1008, "not a json object")

    async def b_unknown_type(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.clients.send(conn, {"type": "shout", "body": "hi"})
        return Expect(1008, "unknown type")

    async def b_bad_field(self, conn: Conn) -> Expect:
        await self.clients.auth(conn)
        which = self.plan.rng.choice(["short username", "long room", "body not a string"])
        if which == "short username":
            await self.clients.send(conn, {"type": "join", "username": "ab", "room": self.plan.rooms[0]})
            return Expect(1008, "username too short")
        if which == "long room":
            await self.clients.send(conn, {"type": "join", "username": conn.username, "room": "r" * 200})
            return Expect(1008, "room too long")
        if await self.clients.join(conn, self.plan.rng.randrange(self.plan.main_rooms)) is None:
            return Expect(0, "")
        await self.clients.send(conn, {"type": "message", "body": 42})
        return Expect(1008, "body must be a string")

    async def b_binary_frame(self, conn: Conn) -> Expect:
        await self._phase(conn)
        await self.clients.send(conn, b"\x00\x01binary")
        return Expect(1003, "binary frames not supported")

    async def b_invalid_utf8(self, conn: Conn) -> Expect:
        await self._phase(conn)
        assert conn.stream is not None
        # By hand: trio-websocket only sends valid UTF-8.
        await conn.stream.send_all(client_frame(OP_TEXT, b'{"type":"message","body":"\xff\xfe"}'))
        return Expect(1007, None)

    async def b_oversized_frame(self, conn: Conn) -> Expect:
        await self._phase(conn)
        filler = "z" * (self.plan.args.max_message_bytes + 1)
        await self.clients.send(conn, '{"type":"message","body":"' + filler + '"}')
        return Expect(1009, "message too big")

    async def b_body_too_long(self, conn: Conn) -> Expect:
        if await self._in_room(conn) is None:
            return Expect(0, "")
        await self.clients.send(conn, {"type": "message", "body": "y" * (self.plan.args.max_body_chars + 1)})
        return Expect(1008, "body too long")

    async def b_rate_limit(self, conn: Conn) -> Expect:
        if await self._in_room(conn) is None:
            return Expect(0, "")
        for k in range(self.plan.args.rate_limit_count + 1):
            await self.clients.send(conn, {"type": "message", "body": f"{self.plan.run_id}|n|{conn.cid}|{k}"})
            self.ledger.noise_sent += 1
        return Expect(1008, "rate limit exceeded")

    async def b_join_flood(self, conn: Conn) -> Expect:
        # userleave + join in a loop, each join confirmed, until the join
        # limit refuses one: after its burst, unless the soak ran that slowly.
        m = await self._in_room(conn)
        if m is None:
            return Expect(0, "")
        for _ in range(3 * self.plan.args.join_limit_count):
            t = now()
            await self.clients.send(conn, {"type": "userleave"})
            self.ledger.end_membership(m, t, t, "userleave")
            m = await self.clients.join(conn, m.room, refusal_ok=True)
            if m is None:
                break
        return Expect(1008, "join limit exceeded")

    def behaviours(self) -> dict[str, Behaviour]:
        table: dict[str, Behaviour] = {
            "garbage token": self.b_garbage_token,
            "foreign secret": self.b_foreign_token,
            "expired token": self.b_expired_token,
            "no auth": self.b_no_auth,
            "no join": self.b_no_join,
            "join before auth": self.b_join_before_auth,
            "message before join": self.b_message_before_join,
            "userleave before join": self.b_userleave_before_join,
            "second auth": self.b_second_auth,
            "second join": self.b_second_join,
            "invalid json": self.b_invalid_json,
            "not an object": self.b_not_an_object,
            "unknown type": self.b_unknown_type,
            "bad field": self.b_bad_field,
            "binary frame": self.b_binary_frame,
            "invalid utf-8": self.b_invalid_utf8,
            "oversized frame": self.b_oversized_frame,
            "rate limit": self.b_rate_limit,
        }
        if self.plan.args.max_body_chars > 0:
            table["body too long"] = self.b_body_too_long
        if self.plan.args.join_limit_count > 0:
            table["join flood"] = self.b_join_flood
        return table
