"""The router's trio shell: accept sockets, run sessions, stop gracefully."""

from __future__ import annotations

import errno
import logging
import math
import os
import socket as stdlib_socket
import time
from dataclasses import dataclass, replace

import trio

from garin import banstore, closes
from garin.auth import TokenVerifier
from garin.bans import subject_of
from garin.closes import Close
from garin.config import Config, ConfigError
from garin import metrics
from garin.jwks import keep_jwks_fresh, verifier_for
from garin.fdlimit import connections_that_fit, raise_file_limit
from garin.limits import MAX_REFUSING
from garin.ports import bind_metrics
from garin.proxies import client_address, peer_name
from garin.lifeline import stop_on_signal, watch_lifeline
from garin.profiling import tune_gc
from garin.connection import MOVED, Connection, Moved, count_close, serve_connection
from garin.session import Session
from garin.router.status import serve_status
from garin.router.router import Router
from garin.handshake import Upgrade
from garin.websocket import ClientWebSocket

log = logging.getLogger("garin.router")

METRICS_SAMPLE_S = 1.0
# As trio.serve_listeners does.
ACCEPT_CAPACITY_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
ACCEPT_RETRY_S = 0.1
# Before its join a client sends a token and a join: far less than this.
PRE_JOIN_MAX_BYTES = 32 * 1024
# A connection over a limit gets this long to finish its handshake and read
# our close frame, not GARIN_HANDSHAKE_TIMEOUT: it holds a descriptor uncounted.
REFUSAL_TIMEOUT_S = 2.0


def origin_allowed(request: Upgrade, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return True
    return request.origin is not None and request.origin.rstrip("/") in allowed


async def handle_client(
    router: Router, verifier: TokenVerifier, tcp: trio.socket.SocketType, peer: tuple[str, int]
) -> None:
    """Run one connection (accepted from `peer`) up to its join and hand it
    over, or close it; close our socket either way. Nothing it does can
    raise into the accept loop."""
    host, port = peer[:2]
    # Counted from accept, so a handshake that never ends still holds a slot;
    # a trusted proxy's connections count per client once its headers say who.
    refusal = router.limits.admit(host, per_client=not router.trusts_proxy(host))
    if refusal is not None:
        if not router.limits.start_refusal():
            tcp.close()  # too many refusals under way: no answer
            return
        try:
            with trio.move_on_after(REFUSAL_TIMEOUT_S):
                await _refuse(router, host, port, tcp, refusal)
        finally:
            tcp.close()
            router.limits.end_refusal()
        return
    # A connection's drain task (only while its outbox is non-empty) runs in
    # the router-wide nursery: no nursery per connection.
    sock = ClientWebSocket(tcp, router.background, pre_join_limit(router.config), router.config.max_outbox_bytes)
    conn_id = router.new_id()
    metrics.CONNECTIONS.inc()
    outcome: Close | Moved | None = None
    # Who the connection is counted and named as: the peer, or the client a
    # trusted proxy forwards (set by _serve).
    client = Client(host, f"{host}:{port}")
    try:
        outcome = await _serve(router, verifier, conn_id, client, port, sock)
    except Exception:
        log.exception("conn %d (%s): internal error", conn_id, client.peer)
        with trio.move_on_after(1):
            await sock.close(closes.INTERNAL)
    finally:
        sock.hang_up()
        metrics.CONNECTIONS.dec()
        router.clients.pop(conn_id, None)
        # A connection handed over stays counted until its shard says it ended.
        if outcome is not MOVED:
            router.limits.release(client.address)


def pre_join_limit(config: Config) -> int:
    """The largest message a client may send a router: before its join it
    has only its token and its join to say. A message under way costs its
    size until it ends, and nobody is known yet (no token checked)."""
    return min(config.max_message_bytes, PRE_JOIN_MAX_BYTES)


@dataclass(slots=True)
class Client:
    address: str
    peer: str


async def _refuse(router: Router, host: str, port: int, tcp: trio.socket.SocketType, refusal: Close) -> None:
    """Over a connection limit: complete the handshake and send a close frame,
    which (unlike an HTTP status) a browser shows the page; bounded in time
    by the caller, and uncounted."""
    sock = ClientWebSocket(tcp, router.background, pre_join_limit(router.config), router.config.max_outbox_bytes)
    try:
        request = await _read_upgrade(router, sock, math.inf, "-", f"{host}:{port}")
        if request is None:
            return
        if request.target.split("?", 1)[0] != "/" or not origin_allowed(request, router.config.allowed_origins):
            await sock.reject(403 if request.target.split("?", 1)[0] == "/" else 404, "refused")
            return
        sock.accept(request)
        log.info("conn - (%s:%d): closing %d %s", host, port, refusal.code, refusal.reason)
        count_close(refusal)
        await sock.close(refusal)
    finally:
        sock.hang_up()


async def _read_upgrade(
    router: Router, sock: ClientWebSocket, deadline: float, conn_id: int | str, peer: str
) -> Upgrade | None:
    """The client's HTTP upgrade, read by `deadline` (trio time); None if it
    left, sent garbage (answered 400), took too long, or the router stopped
    first: until its upgrade is read, a stop answers it 503 (`close_all`)."""
    request = None
    router.handshaking.add(sock)
    try:
        if router.stopping.is_set():
            sock.kick(closes.SHUTDOWN)  # accepted just before the stop
        with sock.kickable(deadline):
            if sock.kicked is None:  # kicked: not even a request already read is answered
                request = await sock.handshake()
    finally:
        router.handshaking.discard(sock)
    if sock.kicked is not None:
        log.info("conn %s (%s): router stopping, answered 503", conn_id, peer)
        await sock.reject_unavailable("server shutting down")
        return None
    return request


async def _serve(
    router: Router, verifier: TokenVerifier, conn_id: int, client: Client, port: int, sock: ClientWebSocket
) -> Close | Moved | None:
    peer = client.peer
    config = router.config
    request = await _read_upgrade(router, sock, trio.current_time() + config.handshake_timeout_s, conn_id, peer)
    if request is None:
        return None
    if request.target.split("?", 1)[0] != "/":
        await sock.reject(404, "not found: the chat WebSocket is at /")
        return None
    if not origin_allowed(request, config.allowed_origins):
        log.info("conn %d (%s): refused, origin not allowed", conn_id, peer)
        await sock.reject(403, "origin not allowed")
        return None
    sock.accept(request)
    forwarded = client_address(client.address, router.trusted_proxies, request.x_forwarded_for, request.forwarded)
    del request  # its headers would otherwise live as long as the session
    if forwarded != client.address:
        refusal = router.limits.readdress(client.address, forwarded)
        if refusal is not None:
            log.info("conn %d (%s via %s): closing %d %s", conn_id, forwarded, client.address, refusal.code, refusal.reason)
            count_close(refusal)
            await sock.close(refusal)
            return refusal
        client.peer = peer = peer_name(forwarded, port, client.address)
        client.address = forwarded

    def check_token(token: str) -> Close | None:
        claims = verifier.claims(token, time.time())
        if isinstance(claims, Close):
            return claims
        conn.subject = subject_of(claims)
        if router.bans is not None and router.bans.is_banned(conn.subject):
            return closes.BANNED
        if config.username_claim:
            name = claims.get(config.username_claim)
            limits = router.session_rules.names
            if not isinstance(name, str) or not limits.username_min <= len(name) <= limits.username_max:
                return closes.NO_USERNAME_CLAIM
            conn.claimed_name = name
        return None

    session = Session(router.session_rules, check_token, trio.current_time())
    conn = Connection(conn_id, peer, sock, session, router.instance, address=client.address)
    router.clients[conn_id] = conn
    return await serve_connection(conn, router)


async def _accept_loop(
    router: Router, verifier: TokenVerifier, listener: trio.SocketListener, handlers: trio.Nursery
) -> None:
    """trio.serve_listeners' loop, without the aclose_forcefully it wraps
    around each handler (a raised Cancelled: ~30 us a connection, for a
    socket handle_client has always closed already), and on the bare
    socket: accept() gives the peer's address, and TCP_NODELAY comes from
    the listening socket (`_tune`), so no SocketStream (a setsockopt
    and a getpeername per connection)."""
    sock = listener.socket
    while True:
        try:
            tcp, peer = await sock.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            # Out of file descriptors or memory: wait for some to be freed.
            log.error("accept failed (%s); retrying in %.1f s", os.strerror(exc.errno), ACCEPT_RETRY_S)
            await trio.sleep(ACCEPT_RETRY_S)
        else:
            handlers.start_soon(handle_client, router, verifier, tcp, peer)


def _tune(listeners: list[trio.SocketListener], send_buffer_bytes: int) -> None:
    """Linux gives accepted sockets the listening socket's TCP_NODELAY and
    SO_SNDBUF: set once here, not once per connection. Frames must not wait
    for Nagle; and a fixed send buffer keeps a client that does not read
    from holding up to 4 MiB of kernel memory (autotuning's maximum) and
    from costing its shard that much copying before GARIN_MAX_OUTBOX_BYTES
    closes it: 200 such members of one room, sent 16 KiB each by all of
    them at once, held 536 MiB and stalled their shard 1.4 s; with 256 KiB,
    no memory is held (they are closed too slow) and the stall is 60 ms."""
    for listener in listeners:
        listener.socket.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        if send_buffer_bytes:
            listener.socket.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, send_buffer_bytes)


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
    config = replace(config, max_connections=connections_that_fit(config.max_connections, config.routers))
    # Counted connections, refusals under way (uncounted), shard links.
    raise_file_limit(config.max_connections and config.max_connections + MAX_REFUSING, config.shards)
    router = Router(config, router_id)
    verifier, jwks = verifier_for(config)
    if listen_fd is not None:
        listeners = _listeners_from_fd(listen_fd)
    else:
        try:
            listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        except OSError as exc:
            # As `garin run` says it; the port comes from GARIN_PORT or PORT.
            raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    # Before any client is accepted: a busy metrics port is one line (ConfigError).
    status_socket = bind_metrics(config) if config.metrics_port else None
    _tune(listeners, config.send_buffer_bytes)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as links:
        # Until the handlers' nursery opens: a shard may pass a member on
        # through us as soon as a link is up.
        router.background = links
        for link in router.links:
            links.start_soon(link.run)
        links.start_soon(stop_on_signal, router.stopping)
        if jwks is not None:
            links.start_soon(keep_jwks_fresh, config.jwks_url, jwks, config.jwks_refresh_s)
        if router.bans is not None:
            links.start_soon(router.bans.run)
        links.start_soon(_sample_links, router)
        if status_socket is not None:
            links.start_soon(serve_status, status_socket, router.health)
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
                tune_gc()
                log.info("router %s listening on %s:%d, %d shards", router_id, config.host, port, config.shards)
                if listen_fd is None:  # on its own (Procfile): no `garin run` said it
                    log.info("%s", banstore.where(config))
                task_status.started(port)
                await router.stopping.wait()
                accepting.cancel()
                for listener in listeners:
                    await listener.aclose()
                log.info("router %s stopping: closing %d clients", router_id, len(router.clients))
                router.close_all(closes.SHUTDOWN)
                grace.deadline = trio.current_time() + config.shutdown_timeout_s
                # A link send is shielded (half a message would corrupt the
                # link): bounded by the grace too, or a shard that stopped
                # reading would hold us up to SEND_TIMEOUT_S.
                for link in router.links:
                    link.limit_sends(grace.deadline)
        links.cancel_scope.cancel()
    if router.client_counts is not None:
        # Its row is free at once (a router that dies frees it by dying:
        # the others see its pid gone).
        router.client_counts.close()


async def _sample_links(router: Router) -> None:
    """Gauges that describe state rather than events: sampled, not counted."""
    while True:
        for link in router.links:
            metrics.SHARD_LINKS_UP.labels(shard=str(link.index)).set(1 if link.connected else 0)
        await trio.sleep(METRICS_SAMPLE_S)
