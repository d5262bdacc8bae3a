"""Binding the TCP ports garin listens on, before anything is started, so
that a port in use is one clear line (not a child that dies and restarts)."""

from __future__ import annotations

import errno
import socket

from garin.config import Config, ConfigError


def bind_tcp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A socket bound to `host`:`port`, not listening yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_metrics(config: Config) -> socket.socket:
    """The metrics and health port, bound as every router binds it (with
    SO_REUSEPORT, so that several routers share it); a failure is a
    ConfigError naming GARIN_METRICS_HOST or GARIN_METRICS_PORT."""
    host, port = config.metrics_host, config.metrics_port
    try:
        return bind_tcp(host, port, reuse_port=True)
    except OSError as exc:
        # A name that does not resolve, or an address not on this host, is
        # the host's fault; a port in use (or privileged), the port's.
        host_fault = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
        variable = "GARIN_METRICS_HOST" if host_fault else "GARIN_METRICS_PORT"
        same = " (it is the public port too)" if not host_fault and port == config.port else ""
        raise ConfigError(f"{variable}: cannot listen on {host}:{port}: {exc.strerror}{same}") from None
