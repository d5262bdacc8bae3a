"""Every way garin closes a client: a WebSocket close code and a short reason.

The decision is made by the pure cores (session, protocol); the trio shell only
sends it. The README's close-code table is generated from ALL_CLOSES, so keep
the reasons short, lower case and stable: client code may match on them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


NORMAL = 1000
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
INVALID_DATA = 1007
POLICY = 1008
TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013

# The client asked to leave (empty message body).
BYE = Close(NORMAL, "bye")
SHUTDOWN = Close(GOING_AWAY, "server shutting down")

AUTH_TIMEOUT = Close(POLICY, "auth timeout")
JOIN_TIMEOUT = Close(POLICY, "join timeout")
INVALID_TOKEN = Close(POLICY, "invalid token")
TOKEN_EXPIRED = Close(POLICY, "token expired")
NOT_AUTHENTICATED = Close(POLICY, "not authenticated")
ALREADY_AUTHENTICATED = Close(POLICY, "already authenticated")
NOT_IN_ROOM = Close(POLICY, "not in a room")
ALREADY_JOINED = Close(POLICY, "already joined")
INVALID_JSON = Close(POLICY, "invalid json")
NOT_AN_OBJECT = Close(POLICY, "not a json object")
UNKNOWN_TYPE = Close(POLICY, "unknown type")
RATE_LIMITED = Close(POLICY, "rate limit exceeded")
JOIN_LIMITED = Close(POLICY, "join limit exceeded")
BODY_TOO_LONG = Close(POLICY, "body too long")
# A member that sent nothing for GARIN_IDLE_TIMEOUT. Not a fault, so not 1008:
# 1001 is what AWS API Gateway sends for its idle cut, and tells the client
# that reconnecting (when its user is back) is fine.
IDLE_TIMEOUT = Close(GOING_AWAY, "idle timeout")
# No frame at all within GARIN_PING_TIMEOUT of our ping. Code and reason are
# the websockets library's, which most Python and many JS stacks already know;
# the peer is probably gone and never reads it, but the log says why.
PING_TIMEOUT = Close(INTERNAL_ERROR, "keepalive ping timeout")
BINARY_FRAME = Close(UNSUPPORTED_DATA, "binary frames not supported")
TOO_BIG_FRAME = Close(TOO_BIG, "message too big")
TOO_FRAGMENTED = Close(POLICY, "message in too many fragments")
# Control frames and empty fragments cost a parser pass each and carry nothing.
TOO_MANY_FRAMES = Close(POLICY, "too many frames")
TOO_SLOW = Close(TRY_AGAIN_LATER, "too slow")
SHARD_UNAVAILABLE = Close(TRY_AGAIN_LATER, "room unavailable")
AUTH_UNAVAILABLE = Close(TRY_AGAIN_LATER, "auth unavailable")
# Our own code, so clients can tell "do not retry" from a plain policy close.
BANNED = Close(4003, "banned")
NO_USERNAME_CLAIM = Close(POLICY, "token has no usable username claim")
# Connection limits. The handshake is completed and then closed, rather than
# refused with HTTP 503/429: a browser hides a refused handshake's status from
# the page (it sees only 1006), but shows it a close code and reason.
SERVER_FULL = Close(TRY_AGAIN_LATER, "server full")
TOO_MANY_CONNECTIONS = Close(TRY_AGAIN_LATER, "too many connections")
INTERNAL = Close(INTERNAL_ERROR, "internal error")


def bad_field(field: str, problem: str) -> Close:
    """A join/auth/message field failed validation: `username too short`."""
    return Close(POLICY, f"{field} {problem}")


# For the README table and tests: (close, when it happens).
ALL_CLOSES: tuple[tuple[Close, str], ...] = (
    (BYE, "the client sent a message with an empty body (it leaves its room)"),
    (SHUTDOWN, "the server is stopping (SIGTERM / Ctrl-C)"),
    (BINARY_FRAME, "the client sent a binary frame"),
    (Close(INVALID_DATA, "(the UTF-8 decoder's message"), "a text frame (or a close reason) was not valid UTF-8"),
    (AUTH_TIMEOUT, "no auth message within the auth timeout of connecting"),
    (JOIN_TIMEOUT, "no join within the join timeout of auth (or of userleave)"),
    (INVALID_TOKEN, "bad signature, wrong or `none` alg, garbage, not yet valid"),
    (TOKEN_EXPIRED, "the token's `exp` has passed"),
    (NOT_AUTHENTICATED, "join, message or userleave before auth"),
    (ALREADY_AUTHENTICATED, "a second auth"),
    (NOT_IN_ROOM, "message or userleave while not in a room"),
    (ALREADY_JOINED, "join while already in a room"),
    (INVALID_JSON, "the frame is not JSON"),
    (NOT_AN_OBJECT, "the frame is JSON but not an object"),
    (UNKNOWN_TYPE, "`type` is missing, not a string, or not one of the four"),
    (bad_field("<field>", "must be a string"), "a field is missing or not a string"),
    (bad_field("<field>", "must be valid unicode"), "a field holds a lone surrogate"),
    (bad_field("username", "too short"), "username/room shorter or longer than allowed"),
    (RATE_LIMITED, "more messages than the rate limit allows in its window"),
    (JOIN_LIMITED, "joins faster than the join limit allows (after its burst)"),
    (BODY_TOO_LONG, "a message body longer than GARIN_MAX_BODY_CHARS characters"),
    (IDLE_TIMEOUT, "a member sent no frame for GARIN_IDLE_TIMEOUT seconds (pings and pongs do not count)"),
    (PING_TIMEOUT, "no frame at all within GARIN_PING_TIMEOUT of a keepalive ping"),
    (TOO_BIG_FRAME, "a message larger than GARIN_MAX_MESSAGE_BYTES (with GARIN_REDIS_URL, also one over 8 MiB)"),
    (TOO_FRAGMENTED, "a message split into more than 256 frames"),
    (TOO_MANY_FRAMES, "pings, pongs and message fragments faster than the frame budget allows"),
    (TOO_SLOW, "the client stopped reading and its outgoing buffer filled up"),
    (SHARD_UNAVAILABLE, "the shard that owns the room could not be reached"),
    (AUTH_UNAVAILABLE, "the JWKS keys have not been fetched yet (GARIN_JWKS_URL unreachable)"),
    (NO_USERNAME_CLAIM, "GARIN_USERNAME_CLAIM is set and the token's claim is missing or the wrong length"),
    (BANNED, "the token's subject is on the ban list (GARIN_BAN_*, `garin ban`)"),
    (SERVER_FULL, "the router already has GARIN_MAX_CONNECTIONS connections"),
    (TOO_MANY_CONNECTIONS, "the client's address already has GARIN_MAX_CONNECTIONS_PER_IP connections"),
    (INTERNAL, "a bug in garin; logged with the connection id"),
)
