"""The router's trio shell: accept sockets, run sessions, stop gracefully."""

from __future__ import annotations

import logging
import math
import signal
import socket as stdlib_socket
import time
from functools import partial

import trio
from wsproto.events import Request

from garin import closes
from garin.auth import TokenVerifier
from garin.closes import Close
from garin.config import Config
from garin.lifeline import watch_lifeline
from garin.session import Action, CloseClient, JoinRoom, LeaveRoom, Publish, Session
from router.router import Client, Router
from router.websocket import BinaryMessage, ClientWebSocket, PeerClosed

log = logging.getLogger("garin.router")


def origin_allowed(request: Request, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return True
    for name, value in request.extra_headers:
        if name.lower() == b"origin":
            return value.decode("latin-1").rstrip("/") in allowed
    return False


async def handle_client(router: Router, verifier: TokenVerifier, stream: trio.SocketStream) -> None:
    """Run one connection; nothing it does can raise into the accept loop."""
    try:
        peer = "%s:%s" % stream.socket.getpeername()[:2]
    except OSError:
        peer = "?"
    client = router.new_client(peer)
    try:
        # A connection's drain task (only while its outbox is non-empty) runs
        # in the router-wide nursery: no nursery (cancel scope, status, task
        # list) per connection.
        sock = ClientWebSocket(
            stream, router.background, router.config.max_message_bytes, router.config.max_outbox_bytes
        )
        client.socket = sock
        try:
            await _serve(router, verifier, client, sock)
        finally:
            await sock.aclose()
    except Exception:
        log.exception("conn %d (%s): internal error", client.id, peer)
    finally:
        router.forget(client)
        await _close_quietly(stream)


async def _close_quietly(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except Exception:
            pass


async def _serve(router: Router, verifier: TokenVerifier, client: Client, sock: ClientWebSocket) -> None:
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
    sock.accept()
    del request  # its headers would otherwise live as long as the session

    def check_token(token: str) -> Close | None:
        return verifier.verify(token, time.time())

    session = Session(config.session_rules, check_token, trio.current_time())
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
            deadline = session.deadline if session.deadline is not None else math.inf
            item: str | BinaryMessage | PeerClosed | Close | None = None
            pending: list[Action] | None = None
            with trio.CancelScope(deadline=deadline) as scope:
                sock.receive_scope = scope
                # One cancel scope for as long as its deadline holds: a
                # chatting member's messages (whose actions never wait) are
                # applied in here, without a new scope per message. Anything
                # else leaves the loop and is handled below, as before.
                while True:
                    item = await sock.receive()
                    if not isinstance(item, str) or sock.dead or sock.kicked is not None:
                        break
                    actions = session.receive_text(item, trio.current_time())
                    if any(isinstance(action, CloseClient) for action in actions):
                        pending = actions
                        break
                    _apply(router, client, actions)
                    item = None
                    if (session.deadline if session.deadline is not None else math.inf) != deadline:
                        break
            sock.receive_scope = None
            now = trio.current_time()
            if sock.dead:
                return  # the peer is gone; the caller's forget() leaves the room
            if scope.cancelled_caught:
                if sock.kicked is not None:
                    continue
                actions = session.timeout(now)
            elif item is None:
                continue  # applied in the loop; the deadline changed
            elif pending is not None:
                actions = pending
            elif isinstance(item, str):
                actions = session.receive_text(item, now)
            elif isinstance(item, PeerClosed):
                log.debug("conn %d: peer closed %d", client.id, item.code)
                if client.room is not None:
                    router.leave(client)
                await sock.close(closes.BYE)
                return
            elif isinstance(item, BinaryMessage):
                actions = session.receive_binary(now)
            else:
                actions = session.end(item)
        close = _apply(router, client, actions)
        if close is not None:
            if client.room is not None:
                router.leave(client)
            log.info("conn %d (%s): closing %d %s", client.id, client.peer, close.code, close.reason)
            await sock.close(close)
            return


def _apply(router: Router, client: Client, actions: list[Action]) -> Close | None:
    """Apply a session's actions in order; the close to send, if one came."""
    for action in actions:
        if isinstance(action, Publish):
            router.publish(client, action.body)
        elif isinstance(action, JoinRoom):
            router.join(client, action.room, action.username)
        elif isinstance(action, LeaveRoom):
            router.leave(client)
        elif isinstance(action, CloseClient):
            return action.close
    return None


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
    router = Router(config, router_id)
    verifier = TokenVerifier(config.jwt_secret, config.jwt_algorithm, config.jwt_leeway_s)
    if listen_fd is not None:
        listeners = _listeners_from_fd(listen_fd)
    else:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as links:
        for link in router.links:
            links.start_soon(link.run)
        links.start_soon(_stop_on_signal, router)
        if lifeline_fd is not None:
            links.start_soon(watch_lifeline, lifeline_fd, router.stopping.set)
        with trio.CancelScope() as grace:
            async with trio.open_nursery() as handlers:
                router.background = handlers
                accepting = trio.CancelScope()

                async def accept() -> None:
                    with accepting:
                        await trio.serve_listeners(partial(handle_client, router, verifier), listeners, handler_nursery=handlers)

                handlers.start_soon(accept)
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


async def _stop_on_signal(router: Router) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            router.stopping.set()
            return
