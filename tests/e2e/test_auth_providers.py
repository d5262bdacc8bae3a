"""Tokens from standard auth providers: a PEM public key, and JWKS over HTTP."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from conftest import GarinServer, auth_frame, expect_close, expect_join, join_frame, new_room, running_server
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.e2e


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose key list the test can change."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.hits = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner.hits += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def publish(self, *keys: tuple[ec.EllipticCurvePrivateKey, str]) -> None:
        self.document = {
            "keys": [
                {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "ES256", "use": "sig"}
                for key, kid in keys
            ]
        }


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def es256(key: Any, kid: str, subject: str, ttl_s: float | None = 600, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": subject, **claims}
    if ttl_s is not None:
        body["exp"] = int(time.time() + ttl_s)
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid})


def test_jwks_tokens_audience_and_key_rotation(jwks_server: JwksServer) -> None:
    first = ec.generate_private_key(ec.SECP256R1())
    jwks_server.publish((first, "k1"))
    env = {
        "GARIN_JWT_ALGORITHM": "ES256",
        "GARIN_JWKS_URL": jwks_server.url,
        "GARIN_JWKS_REFRESH": "1",
        "GARIN_JWT_AUDIENCE": "chat",
        "GARIN_JWT_ISSUER": "https://auth.test/",
    }

    def mint(subject: str, ttl_s: float | None) -> str:
        return es256(first, "k1", subject, ttl_s, aud="chat", iss="https://auth.test/")

    with running_server(minter=mint, **env) as server:
        room = new_room("jwks")
        with server.connect() as ws:
            ws.send(auth_frame(mint("alice", 600)))
            ws.send(join_frame("alice", room))
            expect_join(ws, "alice", 1)
        for bad in (
            es256(first, "k1", "mallory", aud="other", iss="https://auth.test/"),
            es256(first, "k1", "mallory", iss="https://auth.test/"),
            es256(ec.generate_private_key(ec.SECP256R1()), "k1", "mallory", aud="chat", iss="https://auth.test/"),
            jwt.encode({"sub": "mallory", "aud": "chat"}, "x" * 32, algorithm="HS256"),
        ):
            with server.connect() as ws:
                ws.send(auth_frame(bad))
                expect_close(ws, 1008, "invalid token")

        # The provider rolls its keys: a token with the new kid is accepted
        # once garin has refetched the JWKS (asked for by the unknown kid).
        second = ec.generate_private_key(ec.SECP256R1())
        jwks_server.publish((first, "k1"), (second, "k2"))
        deadline = time.monotonic() + 15
        while True:
            with server.connect() as ws:
                try:
                    ws.send(auth_frame(es256(second, "k2", "bobby", aud="chat", iss="https://auth.test/")))
                    # Refused (unknown kid) may already have closed us here.
                    ws.send(join_frame("bobby", room))
                    expect_join(ws, "bobby", 1)
                    break
                except (AssertionError, ConnectionClosed):
                    assert time.monotonic() < deadline, "the rolled key was never picked up"
            time.sleep(0.2)
        assert jwks_server.hits >= 2


def test_jwks_unreachable_closes_with_try_again_later() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    env = {"GARIN_JWT_ALGORITHM": "ES256", "GARIN_JWKS_URL": "http://127.0.0.1:9/jwks.json", "GARIN_SHARDS": "1"}
    # No probe can pass without keys, so start the server by hand.
    server = GarinServer(env_overrides=env, shards=1)
    with open(server.log_path, "wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "garin", "run", "--shards", "1"], env=server.env(), cwd=server.workdir,
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while "cannot load JWKS" not in server.log_tail(200):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        with server.connect() as ws:
            ws.send(auth_frame(es256(key, "k1", "alice")))
            expect_close(ws, 1013, "auth unavailable")
    finally:
        assert server.stop() == 0


def test_rs256_public_key_file(tmp_path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "public.pem"
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def mint(subject: str, ttl_s: float | None) -> str:
        return jwt.encode({"sub": subject, "exp": int(time.time() + 600)}, key, algorithm="RS256")

    env = {"GARIN_JWT_ALGORITHM": "RS256", "GARIN_JWT_PUBLIC_KEY_FILE": str(path)}
    with running_server(minter=mint, **env) as server:
        room = new_room("pem")
        with server.connect() as a, server.connect() as b:
            a.send(auth_frame(mint("alice", 600)))
            a.send(join_frame("alice", room))
            expect_join(a, "alice", 1)
            b.send(auth_frame(jwt.encode({"sub": "mallory"}, "y" * 32, algorithm="HS256")))
            expect_close(b, 1008, "invalid token")
