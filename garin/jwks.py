"""Building the token verifier from the config, and keeping a JWKS fresh.

The JWKS document is fetched with urllib in a worker thread
(`trio.to_thread`), never on the event loop, and swapped into the
`JwksKeys` the verifier reads. It is refetched every GARIN_JWKS_REFRESH
seconds, and sooner (at most once per MIN_REFETCH_S) when a token names a key
id we do not know, which is how providers roll keys over.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

import trio

from garin.auth import HMAC_ALGORITHMS, JwksKeys, StaticKey, TokenVerifier, load_public_key
from garin.config import Config

log = logging.getLogger("garin.jwks")

FETCH_TIMEOUT_S = 10.0
MAX_JWKS_BYTES = 1024 * 1024
MIN_REFETCH_S = 30.0
RETRY_S = 5.0


def verifier_for(config: Config) -> tuple[TokenVerifier, JwksKeys | None]:
    """The verifier the config asks for; the JwksKeys to keep fresh, if any."""
    algorithm = config.jwt_algorithm
    jwks: JwksKeys | None = None
    if algorithm in HMAC_ALGORITHMS:
        assert config.jwt_secret is not None
        keys: Any = StaticKey(config.jwt_secret.encode())
    elif config.jwt_public_key_file:
        keys = StaticKey(load_public_key(config.jwt_public_key_file, algorithm))
    else:
        keys = jwks = JwksKeys(algorithm)
    verifier = TokenVerifier(
        keys, algorithm, config.jwt_leeway_s, audience=config.jwt_audience or None, issuer=config.jwt_issuer or None
    )
    return verifier, jwks


def fetch_jwks(url: str) -> Any:
    """Blocking: GET the JWKS document. Run it in a thread."""
    request = urllib.request.Request(url, headers={"accept": "application/json", "user-agent": "garin"})
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
        data = response.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS document is larger than {MAX_JWKS_BYTES} bytes")
    return json.loads(data)


async def keep_jwks_fresh(url: str, keys: JwksKeys, refresh_s: float) -> None:
    wanted = trio.Event()

    def want_refresh() -> None:
        wanted.set()

    keys.on_unknown_kid = want_refresh
    last_fetch = -MIN_REFETCH_S
    while True:
        last_fetch = trio.current_time()
        try:
            document = await trio.to_thread.run_sync(fetch_jwks, url, abandon_on_cancel=True)
            count = keys.update(document)
            log.info("loaded %d signing key(s) from %s", count, url)
            wait_s = refresh_s
        except Exception as exc:  # network, HTTP, JSON or key errors: keep the old keys
            log.error("cannot load JWKS from %s: %s", url, exc)
            wait_s = RETRY_S
        wanted = trio.Event()
        with trio.move_on_after(wait_s):
            await wanted.wait()
            # A burst of unknown kids costs at most one fetch per MIN_REFETCH_S.
            await trio.sleep_until(last_fetch + min(MIN_REFETCH_S, refresh_s))
