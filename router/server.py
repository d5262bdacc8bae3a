"""The router's trio shell: accept sockets, run sessions, stop gracefully."""

from __future__ import annotations

import errno
import gc
import logging
import math
import os
import resource
import signal
import socket as stdlib_socket
import time

import trio

from garin import closes
from garin.auth import TokenVerifier
from garin.closes import Close
from garin.config import Config
from garin import metrics
from garin.jwks import keep_jwks_fresh, verifier_for
from garin.lifeline import watch_lifeline
from garin.session import Action, CloseClient, JoinRoom, LeaveRoom, Publish, SendPing, Session
from router.status import serve_status
from router.router import Client, Router
from router.handshake import Upgrade
from router.websocket import BinaryMessage, ClientWebSocket, Heard, PeerClosed

log = logging.getLogger("garin.router")

METRICS_SAMPLE_S = 1.0
# As trio.serve_listeners does.
ACCEPT_CAPACITY_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
ACCEPT_RETRY_S = 0.1


def origin_allowed(request: Upgrade, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return True
    return request.origin is not None and request.origin.rstrip("/") in allowed


async def handle_client(router: Router, verifier: TokenVerifier, stream: trio.SocketStream) -> None:
    """Run one connection and close its socket (nobody else does); nothing it
    does can raise into the accept loop."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        stream.socket.close()  # gone before we could look at it
        return
    peer = f"{host}:{port}"
    # Counted from accept, so a handshake that never ends still holds a slot.
    refusal = router.limits.admit(host)
    client = router.new_client(peer)
    metrics.CONNECTIONS.inc()
    # A connection's drain task (only while its outbox is non-empty) runs in
    # the router-wide nursery: no nursery (cancel scope, status, task list)
    # per connection.
    sock = ClientWebSocket(stream, router.background, router.config.max_message_bytes, router.config.max_outbox_bytes)
    client.socket = sock
    try:
        await _serve(router, verifier, client, sock, refusal)
    except Exception:
        log.exception("conn %d (%s): internal error", client.id, peer)
    finally:
        sock.hang_up()
        metrics.CONNECTIONS.dec()
        router.forget(client)
        if refusal is None:
            router.limits.release(host)


async def _serve(
    router: Router, verifier: TokenVerifier, client: Client, sock: ClientWebSocket, refusal: Close | None
) -> None:
    config = router.config
    with trio.move_on_after(config.handshake_timeout_s):
        request = await sock.handshake()
    if request is None:
        return
    if request.target.split("?", 1)[0] != "/":
        await sock.reject(404, "not found: the chat WebSocket is at /")
        return
    if not origin_allowed(request, config.allowed_origins):
        log.info("conn %d (%s): refused, origin not allowed", client.id, client.peer)
        await sock.reject(403, "origin not allowed")
        return
    sock.accept(request)
    if refusal is not None:
        # Over a connection limit: a close frame, which (unlike an HTTP
        # status) a browser shows the page.
        log.info("conn %d (%s): closing %d %s", client.id, client.peer, refusal.code, refusal.reason)
        await sock.close(refusal)
        return
    del request  # its headers would otherwise live as long as the session

    def check_token(token: str) -> Close | None:
        claims = verifier.claims(token, time.time())
        if isinstance(claims, Close):
            return claims
        subject = claims.get("sub")
        client.subject = subject if isinstance(subject, str) else None
        if router.bans is not None and client.subject is not None and router.bans.is_banned(client.subject):
            return closes.BANNED
        if config.username_claim:
            name = claims.get(config.username_claim)
            limits = router.session_rules.names
            if not isinstance(name, str) or not limits.username_min <= len(name) <= limits.username_max:
                return closes.NO_USERNAME_CLAIM
            client.claimed_name = name
        return None

    session = Session(router.session_rules, check_token, trio.current_time())
    client.session = session
    try:
        await _chat(router, client, sock, session)
    except Exception:
        log.exception("conn %d (%s): internal error", client.id, client.peer)
        if client.room is not None:
            router.leave(client)
        await sock.close(closes.INTERNAL)


async def _chat(router: Router, client: Client, sock: ClientWebSocket, session: Session) -> None:
    while True:
        if sock.kicked is not None:
            actions = session.end(sock.kicked)
        else:
            deadline = session.deadline
            if deadline is None:
                deadline = math.inf
            item: str | BinaryMessage | Heard | PeerClosed | Close | None = None
            pending: list[Action] | None = None
            with trio.CancelScope(deadline=deadline) as scope:
                sock.receive_scope = scope
                # One cancel scope for all text frames (auth, join, chat: their
                # actions never wait) whose deadline moves with the session's,
                # not a new scope per message or state. Anything else leaves
                # the loop and is handled below.
                while True:
                    item = await sock.receive()
                    if not isinstance(item, str) or sock.dead or sock.kicked is not None:
                        break
                    actions = session.receive_text(item, trio.current_time())
                    # A session's close is always its last (and only) action.
                    if actions and isinstance(actions[-1], CloseClient):
                        pending = actions
                        break
                    _apply(router, client, sock, actions)
                    item = None
                    # Activity moves the idle and keepalive deadlines later:
                    # leave the scope's alone (firing early costs one no-op
                    # `timeout`), and only bring it forward when one came sooner.
                    sooner = session.deadline
                    if sooner is not None and sooner < deadline:
                        scope.deadline = deadline = sooner
            sock.receive_scope = None
            now = trio.current_time()
            if sock.dead:
                return  # the peer is gone; the caller's forget() leaves the room
            if scope.cancelled_caught:
                if sock.kicked is not None:
                    continue
                actions = session.timeout(now)
            elif pending is not None:
                actions = pending
            elif isinstance(item, str):
                actions = session.receive_text(item, now)
            elif isinstance(item, Heard):
                actions = session.heard(now)
            elif isinstance(item, PeerClosed):
                log.debug("conn %d: peer closed %d", client.id, item.code)
                if client.room is not None:
                    router.leave(client)
                await sock.close(closes.BYE)
                return
            elif isinstance(item, BinaryMessage):
                actions = session.receive_binary(now)
            else:
                assert item is not None  # only a timeout or a kick leaves the loop without one
                actions = session.end(item)
        close = _apply(router, client, sock, actions)
        if close is not None:
            if client.room is not None:
                router.leave(client)
            if close == closes.RATE_LIMITED and router.bans is not None and client.subject is not None:
                router.bans.rate_limited(client.subject)
            log.info("conn %d (%s): closing %d %s", client.id, client.peer, close.code, close.reason)
            _count_close(close)
            await sock.close(close)
            return


def _apply(router: Router, client: Client, sock: ClientWebSocket, actions: list[Action]) -> Close | None:
    """Apply a session's actions in order; the close to send, if one came."""
    for action in actions:
        if isinstance(action, Publish):
            metrics.MESSAGES_IN.inc()
            router.publish(client, action.body)
        elif isinstance(action, JoinRoom):
            # With GARIN_USERNAME_CLAIM the token names the user, not the join.
            router.join(client, action.room, client.claimed_name or action.username)
        elif isinstance(action, LeaveRoom):
            router.leave(client)
        elif isinstance(action, SendPing):
            sock.ping()
        elif isinstance(action, CloseClient):
            return action.close
    return None


_KNOWN_REASONS = {close.reason for close, _ in closes.ALL_CLOSES}


def _count_close(close: Close) -> None:
    # Reasons with a variable part (the frame parser's, a field name) share one label.
    reason = close.reason if close.reason in _KNOWN_REASONS else "other"
    metrics.CLOSES.labels(code=str(close.code), reason=reason).inc()
    if close == closes.TOO_SLOW:
        metrics.SLOW_CONSUMER_DROPS.inc()


def raise_file_limit(max_connections: int, shards: int) -> int:
    """Lift the soft open-files limit towards what `max_connections` needs, as
    the Go runtime does at start; warn if the hard limit is too low. Returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max_connections == 0 or soft == resource.RLIM_INFINITY:
        return soft
    # One socket per client, plus shard links, listeners, logs and slack.
    wanted = max_connections + shards + 64
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft < wanted:
        log.warning(
            "GARIN_MAX_CONNECTIONS is %d but this router may open only %d files (ulimit -n): "
            "accepting will fail before the limit is reached",
            max_connections, soft,
        )
    return soft


async def _accept_loop(
    router: Router, verifier: TokenVerifier, listener: trio.SocketListener, handlers: trio.Nursery
) -> None:
    """trio.serve_listeners' loop, without the aclose_forcefully it wraps
    around each handler (a raised Cancelled: ~30 us a connection, for a
    socket handle_client has always closed already)."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            # Out of file descriptors or memory: wait for some to be freed.
            log.error("accept failed (%s); retrying in %.1f s", os.strerror(exc.errno), ACCEPT_RETRY_S)
            await trio.sleep(ACCEPT_RETRY_S)
        else:
            handlers.start_soon(handle_client, router, verifier, stream)


def _tune_gc() -> None:
    """Each connection allocates a few hundred objects: at the default
    threshold (700) the collector ran ~90 times per 1,000 connects, ~8% of a
    router's CPU in a connect burst. 10,000 allocations between young
    collections is about a MiB. What start-up built is never garbage: frozen,
    no collection walks it again."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _listeners_from_fd(fd: int) -> list[trio.SocketListener]:
    sock = stdlib_socket.socket(fileno=fd)
    sock.setblocking(False)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]


async def serve_router(
    config: Config,
    router_id: str,
    listen_fd: int | None = None,
    lifeline_fd: int | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stopping` is set (by a signal), then close every client with 1001."""
    raise_file_limit(config.max_connections, config.shards)
    router = Router(config, router_id)
    verifier, jwks = verifier_for(config)
    if listen_fd is not None:
        listeners = _listeners_from_fd(listen_fd)
    else:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as links:
        for link in router.links:
            links.start_soon(link.run)
        links.start_soon(_stop_on_signal, router)
        if jwks is not None:
            links.start_soon(keep_jwks_fresh, config.jwks_url, jwks, config.jwks_refresh_s)
        if router.bans is not None:
            links.start_soon(router.bans.run)
        links.start_soon(_sample_links, router)
        if config.metrics_port:
            links.start_soon(serve_status, config.metrics_host, config.metrics_port, router.shard_health)
        if lifeline_fd is not None:
            links.start_soon(watch_lifeline, lifeline_fd, router.stopping.set)
        with trio.CancelScope() as grace:
            async with trio.open_nursery() as handlers:
                router.background = handlers
                accepting = trio.CancelScope()

                async def accept() -> None:
                    with accepting:
                        async with trio.open_nursery() as loops:
                            for listener in listeners:
                                loops.start_soon(_accept_loop, router, verifier, listener, handlers)

                handlers.start_soon(accept)
                _tune_gc()
                log.info("router %s listening on %s:%d, %d shards", router_id, config.host, port, config.shards)
                task_status.started(port)
                await router.stopping.wait()
                accepting.cancel()
                for listener in listeners:
                    await listener.aclose()
                log.info("router %s stopping: closing %d clients", router_id, len(router.clients))
                for client in list(router.clients.values()):
                    if client.socket is not None:
                        client.socket.kick(closes.SHUTDOWN)
                grace.deadline = trio.current_time() + config.shutdown_timeout_s
        # Let the last leaves reach the shards, briefly.
        with trio.move_on_after(0.2):
            while any(link.queued and link.connected for link in router.links):
                await trio.sleep(0.01)
        links.cancel_scope.cancel()


async def _sample_links(router: Router) -> None:
    """Gauges that describe state rather than events: sampled, not counted."""
    while True:
        for link in router.links:
            shard = str(link.index)
            metrics.LINK_QUEUE.labels(shard=shard).set(link.queued)
            metrics.SHARD_LINKS_UP.labels(shard=shard).set(1 if link.connected else 0)
        await trio.sleep(METRICS_SAMPLE_S)


async def _stop_on_signal(router: Router) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            router.stopping.set()
            return
