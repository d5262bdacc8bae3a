"""What one router has queued for one shard, and what to tell it after a restart.

Theory of operation
-------------------
An `Outbox` is in one of three states:

- UP: the link is connected; the writer `take()`s everything queued as one
  batch and reports `sent()` once the batch is in the socket.
- DOWN: the shard is unreachable (not started yet, killed, restarting).
  Events keep queueing (they are "held") until `link_up()`; the hold is
  bounded by `max_hold_bytes` queued and `hold_timeout_s` since the link
  went down.
- UNAVAILABLE: a bound was passed. Everything held is dropped, and `add()`
  refuses new events until `link_up()`. The shell closes the clients in the
  shard's rooms (1013) and refuses joins there meanwhile.

A restarted shard has lost its rooms. To rebuild them, the outbox keeps a
mirror of the membership it has handed to the socket (`Join`, `Rejoin`,
`Leave`, and the `Joined` confirmations that came back). On `link_up()` it
queues, before anything held: a `Rejoin` for every confirmed member (the shard
adds it without announcing it), the `Replayed` marker (the shard waits for
every router's marker before it applies new events, so counts include all
routers' members), then a `Join` for members whose join was never confirmed
(they were in flight when the shard died: now they are announced). Because
the mirror is taken at the point the socket stopped, and the held events
follow in order, a member who left or moved rooms during the outage is
replayed where it was and then leaves or moves, and a message held from it
reaches the room it was sent to.

Losses: a batch the socket refused outright (the shard was already dead) is
put back and sent again after the restart. A batch that was partly written
counts as sent: what the dead shard had not applied yet is lost. There are
no acknowledgements.

Nothing here reads a clock or does I/O; `now` is passed in.
"""

from __future__ import annotations

from enum import Enum

from garin import wire

Membership = wire.Join | wire.Rejoin | wire.Leave
# member -> (room, username, confirmed by the shard)
Known = dict[int, tuple[str, str, bool]]


class LinkState(Enum):
    UP = "up"
    DOWN = "down"
    UNAVAILABLE = "unavailable"


class Verdict(Enum):
    QUEUED = "queued"
    # The event made the hold pass its byte bound: the outbox is now
    # UNAVAILABLE and the shell must close the shard's clients.
    OVERFLOW = "overflow"
    # The outbox is UNAVAILABLE: the event was dropped.
    REFUSED = "refused"


class Outbox:
    def __init__(self, max_hold_bytes: int, hold_timeout_s: float, now: float) -> None:
        self.max_hold_bytes = max_hold_bytes
        self.hold_timeout_s = hold_timeout_s
        # A new router has not reached the shard yet: that is a hold too.
        self.state = LinkState.DOWN
        self.down_since = now
        self._data = bytearray()
        self._marks: list[Membership] = []
        self._known: Known = {}
        # Publishes queued, per member (Router.in_flight needs them after a
        # link drop: only these can still come back from the shard).
        self._publishes: dict[int, int] = {}
        # The batch being written: (data, its membership, how to undo it, its
        # publishes).
        self._in_flight: tuple[
            bytearray, list[Membership], list[tuple[int, tuple[str, str, bool] | None]], dict[int, int]
        ] | None = None

    @property
    def queued_bytes(self) -> int:
        return len(self._data)

    @property
    def deadline(self) -> float | None:
        """When the hold runs out (only while DOWN)."""
        if self.state is LinkState.DOWN:
            return self.down_since + self.hold_timeout_s
        return None

    def add(self, message: wire.WireMessage) -> Verdict:
        if self.state is LinkState.UNAVAILABLE:
            return Verdict.REFUSED
        if isinstance(message, wire.Publish):
            self._publishes[message.member] = self._publishes.get(message.member, 0) + 1
        elif not isinstance(message, (wire.Released, wire.Accept)):
            assert isinstance(message, (wire.Join, wire.Rejoin, wire.Leave)), message
            self._marks.append(message)
        self._data += wire.encode(message)
        if self.state is LinkState.DOWN and len(self._data) > self.max_hold_bytes:
            self._give_up()
            return Verdict.OVERFLOW
        return Verdict.QUEUED

    # -- the writer -------------------------------------------------------------

    def take(self) -> bytearray | None:
        """Everything queued, to write as one batch; None if nothing (or not UP)."""
        if self.state is not LinkState.UP or not self._data or self._in_flight is not None:
            return None
        batch, self._data = self._data, bytearray()
        marks, self._marks = self._marks, []
        publishes, self._publishes = self._publishes, {}
        undo = []
        known = self._known
        for message in marks:
            undo.append((message.member, known.get(message.member)))
            _apply(known, message)
        self._in_flight = (batch, marks, undo, publishes)
        return batch

    def sent(self) -> None:
        """The batch taken last is in the socket (or partly: it counts as sent)."""
        self._in_flight = None

    def queued_publishes(self, member: int) -> int:
        """`member`'s Publishes not yet in the socket: queued, or in the batch
        being written. Once the link's writer has ended (a partly written
        batch is then marked sent), that batch is one the socket refused
        whole, which `link_down` queues again."""
        count = self._publishes.get(member, 0)
        if self._in_flight is not None:
            count += self._in_flight[3].get(member, 0)
        return count

    def confirm(self, member: int, room: str) -> None:
        """The shard announced `member`'s join of `room` (`Joined`)."""
        entry = self._known.get(member)
        if entry is not None and entry[0] == room:
            self._known[member] = (room, entry[1], True)

    # -- the link -----------------------------------------------------------------

    def link_down(self, now: float) -> bool:
        """The link broke. A batch still in flight was refused whole: queue it
        again. True if what is queued already passes the byte bound (the
        outbox is then UNAVAILABLE)."""
        if self._in_flight is not None:
            batch, marks, undo, publishes = self._in_flight
            self._in_flight = None
            for member, previous in reversed(undo):
                if previous is None:
                    self._known.pop(member, None)
                else:
                    self._known[member] = previous
            # A new buffer: the writer may still hold a view of `batch`.
            self._data = batch + self._data
            self._marks[:0] = marks
            for member, count in publishes.items():
                self._publishes[member] = self._publishes.get(member, 0) + count
        if self.state is not LinkState.UP:
            return False
        self.state = LinkState.DOWN
        self.down_since = now
        if len(self._data) > self.max_hold_bytes:
            self._give_up()
            return True
        return False

    def expire(self, now: float) -> bool:
        """True if the hold has just run out of time (the outbox is then UNAVAILABLE)."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return False
        self._give_up()
        return True

    def link_up(self) -> None:
        """The shard welcomed us: replay its members, then send what was held."""
        rejoins: list[Membership] = []
        joins: list[Membership] = []
        for member, (room, username, confirmed) in self._known.items():
            if confirmed:
                rejoins.append(wire.Rejoin(member, room, username))
            else:
                joins.append(wire.Join(member, room, username))
        self._known = {}
        replay = bytearray()
        for message in rejoins:
            replay += wire.encode(message)
        replay += wire.encode(wire.Replayed())
        for message in joins:
            replay += wire.encode(message)
        self._data[:0] = replay
        self._marks[:0] = rejoins + joins
        self.state = LinkState.UP

    def _give_up(self) -> None:
        self.state = LinkState.UNAVAILABLE
        self._data = bytearray()
        self._marks = []
        self._publishes = {}
        self._known = {}
        self._in_flight = None


def _apply(known: Known, message: Membership) -> None:
    if type(message) is wire.Leave:
        known.pop(message.member, None)
    else:
        assert isinstance(message, (wire.Join, wire.Rejoin))
        known[message.member] = (message.room, message.username, type(message) is wire.Rejoin)
