"""`garin run`: start the shards and routers, keep them alive, stop them together.

Modelled on uvicorn's multiprocess supervisor, but children have roles
(shard i, router j) and each slot is restarted in place. The supervisor binds
the public port once and every router inherits the listening socket, so a
second `garin run` on the same port fails at once instead of silently sharing
it; so does one whose socket directory has live shards in it. Signals only
set an event; the stop sequence runs in the main task: SIGTERM to every
child, wait up to the shutdown timeout, SIGKILL what is left, remove the
socket directory.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from garin import banstore, metrics_setup
from garin.config import Config, ConfigError
from garin.ports import bind_metrics, bind_tcp
from garin.socketdir import prepare_socket_dir, remove_socket_dir

log = logging.getLogger("garin.supervisor")

# A child that dies sooner than this after starting counts as a failed start.
FAST_EXIT_S = 2.0
# After this many failed starts in a row, give up: it is a config or host error.
MAX_FAST_EXITS = 5
RESTART_DELAY_MAX_S = 5.0


@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    process: trio.Process | None = None


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = trio.Event()
        self.exit_code = 0

    def bind(self) -> socket.socket:
        try:
            sock = bind_tcp(self.config.host, self.config.port)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from None
        sock.listen(1024)
        sock.set_inheritable(True)
        return sock

    def children(self, listen_fd: int, lifeline_fd: int) -> list[Child]:
        # -P: not the current directory first on sys.path. Run from a clone
        # of the repository, `-m garin` would import the source folder
        # ./garin (no router/ or shard/ inside) instead of the installed package.
        base = [sys.executable, "-P", "-m", "garin"]
        watch = ["--lifeline-fd", str(lifeline_fd)]
        shards = [
            Child(f"shard {i}", [*base, "shard", "--index", str(i), *watch], (lifeline_fd,))
            for i in range(self.config.shards)
        ]
        routers = [
            Child(
                f"router {j}",
                [*base, "router", "--router-id", str(j), "--listen-fd", str(listen_fd), *watch],
                (listen_fd, lifeline_fd),
            )
            for j in range(self.config.routers)
        ]
        return shards + routers

    def check_socket_dir(self) -> None:
        """Refuse a socket directory whose shards are alive: another garin uses it.

        Its routers would otherwise link to the other server's shards, and
        when our own shards had failed to start, the clean-up at exit would
        remove the other server's sockets."""
        for index in range(self.config.shards):
            path = self.config.shard_socket(index)
            if _is_listening(path):
                raise OSError(f"{path} is in use by another garin: give each server its own GARIN_SOCKET_DIR")

    async def run(self) -> int:
        # The port first: a second server on the same port is told that,
        # not about the socket directory it would share by default.
        sock = self.bind()
        try:
            if self.config.metrics_port:
                # The routers bind it: found busy by them, it would be a
                # restart loop that names no setting.
                bind_metrics(self.config).close()
            # Likewise an unusable directory, found by the shards.
            prepare_socket_dir(Path(self.config.socket_dir))
            self.check_socket_dir()
            banstore.open_at_start(self.config)
            # Afresh, now that no other server is known to use it.
            metrics_setup.enable_for(self.config, fresh=True)
        except (OSError, ConfigError):
            sock.close()
            raise
        port = sock.getsockname()[1]
        env = {**os.environ, **self.config.to_env(), "PORT": str(port), "GARIN_PORT": str(port)}
        # Children watch the read end; it turns readable (EOF) when this
        # process dies, even by SIGKILL, so no orphan keeps serving the port.
        lifeline_read, lifeline_write = os.pipe()
        children = self.children(sock.fileno(), lifeline_read)
        log.info(
            "garin on %s:%d: %d shard%s, %d router%s (socket dir %s)",
            self.config.host, port, self.config.shards, "" if self.config.shards == 1 else "s",
            self.config.routers, "" if self.config.routers == 1 else "s", self.config.socket_dir,
        )
        log.info("%s", banstore.where(self.config))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals)
                for child in children:
                    nursery.start_soon(self._keep_alive, child, env)
                await self.stopping.wait()
                await self._stop_children(children)
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            os.close(lifeline_read)
            os.close(lifeline_write)
            remove_socket_dir(Path(self.config.socket_dir))
        log.info("garin stopped")
        return self.exit_code

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                self.stopping.set()

    async def _keep_alive(self, child: Child, env: dict[str, str]) -> None:
        fast_exits = 0
        while not self.stopping.is_set():
            started = trio.current_time()
            child.process = await trio.lowlevel.open_process(
                child.argv, env=env, pass_fds=child.pass_fds, stdin=subprocess.DEVNULL,
                # Own process group: a terminal's Ctrl-C reaches only the
                # supervisor, which then stops the children in order.
                start_new_session=True,
            )
            code = await child.process.wait()
            _metrics_child_died(child.process.pid)
            if self.stopping.is_set():
                return
            lived = trio.current_time() - started
            fast_exits = fast_exits + 1 if lived < FAST_EXIT_S else 0
            if fast_exits >= MAX_FAST_EXITS:
                log.error("%s exited with code %d %d times right after start; giving up", child.name, code, fast_exits)
                self.exit_code = 1
                self.stopping.set()
                return
            delay = min(0.1 * 2**fast_exits, RESTART_DELAY_MAX_S) if fast_exits else 0.1
            log.warning("%s exited with code %d after %.1fs; restarting in %.1fs", child.name, code, lived, delay)
            _metrics_restart(child.name)
            await trio.sleep(delay)

    async def _stop_children(self, children: list[Child]) -> None:
        # Routers first, so clients get 1001 and their leaves reach live shards.
        for group in (c for c in children if c.name.startswith("router")), (c for c in children if c.name.startswith("shard")):
            alive = [c.process for c in group if c.process is not None and c.process.returncode is None]
            for process in alive:
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(self.config.shutdown_timeout_s + 1):
                for process in alive:
                    await process.wait()
            for process in alive:
                if process.returncode is None:
                    log.warning("pid %d did not stop in time; killing it", process.pid)
                    process.kill()
                    await process.wait()


def _metrics_child_died(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from garin import metrics

        metrics.mark_dead(pid)


def _metrics_restart(name: str) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from garin import metrics

        metrics.RESTARTS.labels(child=name).inc()


def _is_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False  # no file, not a socket, or nobody listening (stale)
        return True


def run_supervisor(config: Config) -> int:
    return trio.run(Supervisor(config).run)
