"""JWT checking and minting, with the clock passed in.

PyJWT checks the signature and pins the algorithm (so `alg: none` and
algorithm-confusion tokens are refused); the time claims are checked here
against the `now` we are given, so the check is deterministic in tests.

Keys come from a `KeySource`: the shared HMAC secret (GarinChat's way), one
public key from a PEM file, or a JWKS document that the router fetches and
refreshes off the event loop (`garin/jwks.py`); this module never does I/O
beyond reading a key file at start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.types import Options
from jwt.warnings import InsecureKeyLengthWarning

from garin import closes
from garin.closes import Close

log = logging.getLogger("garin.auth")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
# RFC 7518 3.2: an HMAC key must be at least as long as the hash output; a
# shorter one can be brute-forced offline from a single token.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


@contextmanager
def _quiet_key_warning() -> Iterator[None]:
    """Short secrets are refused by the config unless the operator opted in
    (GARIN_ALLOW_WEAK_SECRET), and garin says so at start; PyJWT's own
    warning would repeat it on every token."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        yield


def _time_claim(claims: dict[str, Any], name: str) -> float | None | Close:
    """A NumericDate claim as a finite float; absent is None; anything else is invalid."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return closes.INVALID_TOKEN
    try:
        number = float(value)
    except OverflowError:
        return closes.INVALID_TOKEN
    if not math.isfinite(number):
        return closes.INVALID_TOKEN
    return number


class KeySource(Protocol):
    def key_for(self, kid: str | None) -> Any | None:
        """The verification key for a token's `kid` header, or None if unknown."""


@dataclass(frozen=True, slots=True)
class StaticKey:
    """One key for every token: the HMAC secret or a PEM public key."""

    key: Any

    def key_for(self, kid: str | None) -> Any:
        return self.key


def load_public_key(path: str, algorithm: str) -> Any:
    """Parse a PEM public key for `algorithm`; ValueError names what is wrong."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    # PyJWT would take a private key too, and then fail on every token
    # (a private key object has no `verify`): each client closed 1011.
    if b"PRIVATE KEY-----" in pem:
        raise ValueError(f"{path} is a private key; give the public key (openssl pkey -in {path} -pubout)")
    try:
        return jwt.get_algorithm_by_name(algorithm).prepare_key(pem)
    except Exception:  # cryptography and PyJWT raise several kinds, not all in plain words
        needed = _KEY_KINDS.get(algorithm) or _KEY_KINDS[algorithm[:2]]
        found = _key_kind(pem)
        if found:
            raise ValueError(f"{path} holds {found}; {algorithm} needs {needed}") from None
        raise ValueError(f"{path} is not a PEM public key ({algorithm} needs {needed})") from None


# The key each public-key algorithm verifies with, for error messages.
_KEY_KINDS = {
    "RS": "an RSA public key", "PS": "an RSA public key",
    "ES256": "an EC P-256 public key", "ES384": "an EC P-384 public key", "ES512": "an EC P-521 public key",
}
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _key_kind(pem: bytes) -> str:
    """What public key a PEM holds, in _KEY_KINDS' words; "" if none."""
    try:
        key = serialization.load_pem_public_key(pem)
    except Exception:
        return ""
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA public key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {_CURVES.get(key.curve.name, key.curve.name)} public key"
    return f"a {type(key).__name__}"


class JwksKeys:
    """Keys by `kid` from a JWKS document; `update` swaps in a fresh document.

    A token whose `kid` is unknown calls `on_unknown_kid` (the shell then
    refreshes soon, for key rotation) and is refused this time.
    """

    def __init__(self, algorithm: str, on_unknown_kid: Callable[[], None] | None = None) -> None:
        self._algorithm = algorithm
        self._keys: dict[str | None, Any] = {}
        self.loaded = False
        self.on_unknown_kid = on_unknown_kid

    def update(self, document: Any) -> int:
        """Load a JWKS (parsed JSON); returns how many usable keys it had."""
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("JWKS document has no 'keys' list")
        keys: dict[str | None, Any] = {}
        for entry in document["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("alg", self._algorithm) != self._algorithm:
                continue
            try:
                jwk = jwt.PyJWK(entry, algorithm=self._algorithm)
            except Exception:
                continue  # a key of another type, or one we cannot use
            key = jwk.key
            # A provider that publishes a private key (its "d") by mistake:
            # verify with its public half (a private key object cannot verify).
            public = getattr(key, "public_key", None)
            keys[entry.get("kid")] = public() if callable(public) else key
        if not keys:
            raise ValueError(f"JWKS document has no usable {self._algorithm} signing key")
        self._keys = keys
        self.loaded = True
        return len(keys)

    def key_for(self, kid: str | None) -> Any | None:
        key = self._keys.get(kid)
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None and self.on_unknown_kid is not None:
            self.on_unknown_kid()
        return key


class TokenVerifier:
    def __init__(
        self,
        keys: KeySource | str,
        algorithm: str = "HS256",
        leeway_s: float = 0.0,
        audience: str | None = None,
        issuer: str | None = None,
    ):
        if algorithm not in HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS:
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}")
        if isinstance(keys, str):
            keys = StaticKey(keys.encode())
        self._keys = keys
        # A static key needs no `kid`: skip get_unverified_header, which
        # parses the whole token once more before jwt.decode does.
        self._static_key = keys.key if isinstance(keys, StaticKey) else None
        # PyJWT warns only about a short key; a long enough HMAC secret (the
        # usual case) skips the per-token warnings filter.
        self._quiet = not (
            algorithm in MIN_SECRET_BYTES
            and isinstance(self._static_key, bytes)
            and len(self._static_key) >= MIN_SECRET_BYTES[algorithm]
        )
        self._algorithms = [algorithm]
        self._leeway_s = leeway_s
        self._audience = audience or None
        self._issuer = issuer or None
        # GarinChat (golang-jwt) ignores `aud` unless configured; so do we.
        self._options: Options = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self._audience is not None,
        }

    def verify(self, token: str, now: float) -> Close | None:
        """None if the token is valid at wall-clock time `now`, else the close."""
        claims = self.claims(token, now)
        return claims if isinstance(claims, Close) else None

    def claims(self, token: str, now: float) -> Close | dict[str, Any]:
        """The token's claims if it is valid at wall-clock time `now`, else the close."""
        if isinstance(self._keys, JwksKeys) and not self._keys.loaded:
            return closes.AUTH_UNAVAILABLE
        key = self._static_key
        if key is None:
            try:
                header = jwt.get_unverified_header(token)
            except jwt.InvalidTokenError:
                return closes.INVALID_TOKEN
            kid = header.get("kid")
            key = self._keys.key_for(kid if isinstance(kid, str) else None)
            if key is None:
                return closes.INVALID_TOKEN
        try:
            with _quiet_key_warning() if self._quiet else contextlib.nullcontext():
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=self._algorithms,
                    audience=self._audience,
                    issuer=self._issuer,
                    options=self._options,
                )
        except jwt.InvalidTokenError as exc:
            # Why, for whoever sets up a provider (a wrong audience or
            # issuer): the error's class only, never the token.
            log.debug("token refused: %s", type(exc).__name__)
            return closes.INVALID_TOKEN
        exp = _time_claim(claims, "exp")
        nbf = _time_claim(claims, "nbf")
        if isinstance(exp, Close):
            return exp
        if isinstance(nbf, Close):
            return nbf
        if exp is not None and now >= exp + self._leeway_s:
            return closes.TOKEN_EXPIRED
        if nbf is not None and now < nbf - self._leeway_s:
            return closes.INVALID_TOKEN
        return claims


def make_token(
    secret: str, subject: str, now: float, ttl_s: float | None, algorithm: str = "HS256"
) -> str:
    claims: dict[str, Any] = {"sub": subject, "name": subject, "iat": int(now)}
    if ttl_s is not None:
        claims["exp"] = int(now + ttl_s)
    with _quiet_key_warning():
        return jwt.encode(claims, secret.encode(), algorithm=algorithm)
