"""JWT checking and minting, with the clock passed in.

PyJWT checks the signature and pins the algorithm (so `alg: none` and
algorithm-confusion tokens are refused); the time claims are checked here
against the `now` we are given, so the check is deterministic in tests.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from garin import closes
from garin.closes import Close

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
# RFC 7518 3.2: an HMAC key must be at least as long as the hash output; a
# shorter one can be brute-forced offline from a single token.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def _quiet_key_warning() -> warnings.catch_warnings:  # type: ignore[type-arg]
    """Short secrets are refused by the config unless the operator opted in
    (GARIN_ALLOW_WEAK_SECRET), and garin says so at start; PyJWT's own
    warning would repeat it on every token."""
    caught = warnings.catch_warnings()
    caught.__enter__()
    warnings.simplefilter("ignore", InsecureKeyLengthWarning)
    return caught


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


class TokenVerifier:
    def __init__(self, secret: str, algorithm: str = "HS256", leeway_s: float = 0.0):
        if algorithm not in HMAC_ALGORITHMS:
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}")
        self._key = secret.encode()
        self._algorithms = [algorithm]
        self._leeway_s = leeway_s

    def verify(self, token: str, now: float) -> Close | None:
        """None if the token is valid at wall-clock time `now`, else the close."""
        caught = _quiet_key_warning()
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                # GarinChat (golang-jwt) ignores `aud` unless configured; so do we.
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
            )
        except jwt.InvalidTokenError:
            return closes.INVALID_TOKEN
        finally:
            caught.__exit__(None, None, None)
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
        return None


def make_token(
    secret: str, subject: str, now: float, ttl_s: float | None, algorithm: str = "HS256"
) -> str:
    claims: dict[str, Any] = {"sub": subject, "name": subject, "iat": int(now)}
    if ttl_s is not None:
        claims["exp"] = int(now + ttl_s)
    caught = _quiet_key_warning()
    try:
        return jwt.encode(claims, secret.encode(), algorithm=algorithm)
    finally:
        caught.__exit__(None, None, None)
