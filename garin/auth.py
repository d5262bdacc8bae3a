"""JWT checking and minting, with the clock passed in.

PyJWT checks the signature and pins the algorithm (so `alg: none` and
algorithm-confusion tokens are refused); the time claims are checked here
against the `now` we are given, so the check is deterministic in tests.
"""

from __future__ import annotations

import warnings
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from garin import closes
from garin.closes import Close

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
# Below this, an HMAC secret can be brute-forced offline from one token.
MIN_SECRET_BYTES = 32

# Short secrets are refused by the config unless the operator opted in
# (GARIN_ALLOW_WEAK_SECRET), and garin logs that at start; PyJWT's own
# per-token warning would only repeat it on every connection.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)


class TokenVerifier:
    def __init__(self, secret: str, algorithm: str = "HS256", leeway_s: float = 0.0):
        if algorithm not in HMAC_ALGORITHMS:
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}")
        self._key = secret.encode()
        self._algorithms = [algorithm]
        self._leeway_s = leeway_s

    def verify(self, token: str, now: float) -> Close | None:
        """None if the token is valid at wall-clock time `now`, else the close."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError:
            return closes.INVALID_TOKEN
        exp = claims.get("exp")
        nbf = claims.get("nbf")
        for value in (exp, nbf):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                return closes.INVALID_TOKEN
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
    return jwt.encode(claims, secret.encode(), algorithm=algorithm)
