"""garin.auth: JWT verification with the clock passed in, and token minting."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garin import closes
from garin.auth import HMAC_ALGORITHMS, MIN_SECRET_BYTES, TokenVerifier, make_token
from garin.closes import Close

# PyJWT warns (an error here: filterwarnings=error) on keys shorter than the
# hash, so every secret is at least as long as its algorithm's output.
SECRET = "s3cret-" + "x" * 57  # 64 bytes: fine for HS256/384/512
OTHER = "other-" + "y" * 58
NOW = 1_700_000_000.0


def sign(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256",
         headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)


def verify(token: str, now: float = NOW, *, algorithm: str = "HS256", leeway: float = 0.0,
           secret: str = SECRET) -> Close | None:
    return TokenVerifier(secret, algorithm, leeway).verify(token, now)


def claim_id(value: object) -> str:
    if isinstance(value, dict):
        text = json.dumps(value)
        return text if len(text) < 40 else text[:30] + "..." + text[-8:]
    if isinstance(value, tuple):
        return "|".join(claim_id(v) for v in value)
    if isinstance(value, Close):
        return value.reason
    if value is None:
        return "ok"
    return str(value)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_constants() -> None:
    assert HMAC_ALGORITHMS == ("HS256", "HS384", "HS512")
    assert MIN_SECRET_BYTES == {"HS256": 32, "HS384": 48, "HS512": 64}


# --- accepted tokens -------------------------------------------------------------


@pytest.mark.parametrize("algorithm", HMAC_ALGORITHMS)
@pytest.mark.parametrize("ttl", [None, 1, 60, 86400 * 365])
def test_make_token_verifies(algorithm: str, ttl: float | None) -> None:
    token = make_token(SECRET, "alice", NOW, ttl, algorithm)
    assert verify(token, NOW, algorithm=algorithm) is None


@pytest.mark.parametrize("ttl", [None, 60, 0.5])
def test_make_token_claims(ttl: float | None) -> None:
    token = make_token(SECRET, "alice", NOW + 0.75, ttl)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    expected: dict[str, Any] = {"sub": "alice", "name": "alice", "iat": int(NOW)}
    if ttl is not None:
        expected["exp"] = int(NOW + 0.75 + ttl)
    assert claims == expected


def test_make_token_ttl_expires() -> None:
    token = make_token(SECRET, "alice", NOW, 60)
    assert verify(token, NOW + 59) is None
    assert verify(token, NOW + 60) is closes.TOKEN_EXPIRED
    assert verify(token, NOW + 10**6) is closes.TOKEN_EXPIRED


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"sub": "alice"},
        {"sub": "alice", "name": "Alice", "iat": NOW - 10, "exp": NOW + 10, "nbf": NOW - 10},
        {"exp": NOW + 0.001},
        {"exp": int(NOW) + 1},
        {"nbf": NOW},
        {"nbf": int(NOW)},
        {"nbf": NOW - 10**9},
        {"iat": "not checked"},  # iat is informational; garin does not check it
        {"iat": NOW + 10**6},
        {"role": "admin", "nested": {"a": [1, 2]}},
        {"exp": 2**53},
    ],
    ids=claim_id,
)
def test_valid_claims(claims: dict[str, Any]) -> None:
    assert verify(sign(claims)) is None


def test_no_exp_never_expires() -> None:
    token = sign({"sub": "alice"})
    assert verify(token, 0) is None
    assert verify(token, 1e15) is None


# --- time claims -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "leeway", "expected"),
    [
        ({"exp": NOW + 1}, 0, None),
        ({"exp": NOW}, 0, closes.TOKEN_EXPIRED),
        ({"exp": NOW - 1}, 0, closes.TOKEN_EXPIRED),
        ({"exp": NOW - 0.5}, 0, closes.TOKEN_EXPIRED),
        ({"exp": 0}, 0, closes.TOKEN_EXPIRED),
        ({"exp": -1}, 0, closes.TOKEN_EXPIRED),
        ({"exp": NOW - 5}, 10, None),
        ({"exp": NOW - 10}, 10, closes.TOKEN_EXPIRED),
        ({"exp": NOW - 11}, 10, closes.TOKEN_EXPIRED),
        ({"nbf": NOW + 1}, 0, closes.INVALID_TOKEN),
        ({"nbf": NOW + 0.001}, 0, closes.INVALID_TOKEN),
        ({"nbf": NOW + 10**6}, 0, closes.INVALID_TOKEN),
        ({"nbf": NOW}, 0, None),
        ({"nbf": NOW + 5}, 10, None),
        ({"nbf": NOW + 10}, 10, None),
        ({"nbf": NOW + 11}, 10, closes.INVALID_TOKEN),
        ({"nbf": NOW - 1, "exp": NOW + 1}, 0, None),
        ({"nbf": NOW + 1, "exp": NOW + 2}, 0, closes.INVALID_TOKEN),
        ({"nbf": NOW - 2, "exp": NOW - 1}, 0, closes.TOKEN_EXPIRED),
        # Both wrong: an expired token says so.
        ({"nbf": NOW + 1, "exp": NOW - 1}, 0, closes.TOKEN_EXPIRED),
    ],
    ids=claim_id,
)
def test_time_claims(claims: dict[str, Any], leeway: float, expected: Close | None) -> None:
    assert verify(sign(claims), NOW, leeway=leeway) == expected


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "soon"},
        {"exp": str(int(NOW) + 100)},
        {"exp": True},
        {"exp": False},
        {"exp": [NOW + 100]},
        {"exp": {"at": NOW + 100}},
        {"exp": None},
        {"exp": float("nan")},
        {"nbf": "now"},
        {"nbf": str(int(NOW) - 100)},
        {"nbf": True},
        {"nbf": [NOW - 100]},
        {"nbf": None},
        {"nbf": float("nan")},
    ],
    ids=claim_id,
)
def test_non_numeric_time_claims_are_invalid(claims: dict[str, Any]) -> None:
    # RFC 7519 4.1.4/4.1.5: exp and nbf MUST be numbers (NumericDate). JSON null
    # and NaN (which json.loads accepts) are not: a token carrying them must
    # not be treated as one that never expires / is always valid.
    assert verify(sign(claims)) is closes.INVALID_TOKEN


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        ({"exp": 10**400}, (None, closes.INVALID_TOKEN)),
        ({"exp": -(10**400)}, (closes.TOKEN_EXPIRED, closes.INVALID_TOKEN)),
        ({"nbf": 10**400}, (closes.INVALID_TOKEN,)),
        ({"nbf": -(10**400)}, (None, closes.INVALID_TOKEN)),
        ({"exp": float("inf")}, (None, closes.INVALID_TOKEN)),
        ({"exp": float("-inf")}, (closes.TOKEN_EXPIRED, closes.INVALID_TOKEN)),
        ({"nbf": float("inf")}, (closes.INVALID_TOKEN,)),
    ],
    ids=claim_id,
)
def test_extreme_time_claims_do_not_raise(
    claims: dict[str, Any], allowed: tuple[Close | None, ...]
) -> None:
    # verify() returns a decision, it never raises: an integer too large for a
    # float must not escape as OverflowError.
    assert verify(sign(claims), NOW, leeway=1.0) in allowed


# --- forged and malformed tokens ----------------------------------------------------


def _none_alg_token(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, None, algorithm="none")


def _tamper_payload(token: str) -> str:
    header, _, signature = token.split(".")
    return ".".join([header, b64(json.dumps({"sub": "mallory"}).encode()), signature])


def _tamper_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    flipped = "A" if signature[0] != "A" else "B"
    return ".".join([header, payload, flipped + signature[1:]])


GOOD_CLAIMS = {"sub": "alice", "exp": NOW + 60}
GOOD = sign(GOOD_CLAIMS)

FORGED = {
    "wrong secret": sign(GOOD_CLAIMS, OTHER),
    "alg none": _none_alg_token(GOOD_CLAIMS),
    "alg none, no dot": _none_alg_token(GOOD_CLAIMS).rstrip("."),
    "alg none with signature": _none_alg_token(GOOD_CLAIMS) + GOOD.split(".")[2],
    "HS512 for HS256": sign(GOOD_CLAIMS, algorithm="HS512"),
    "HS384 for HS256": sign(GOOD_CLAIMS, algorithm="HS384"),
    "header claims HS512, HS256 signature": ".".join(
        [b64(b'{"alg":"HS512","typ":"JWT"}'), *GOOD.split(".")[1:]]
    ),
    "tampered payload": _tamper_payload(GOOD),
    "tampered signature": _tamper_signature(GOOD),
    "no signature": GOOD.rsplit(".", 1)[0] + ".",
    "truncated": GOOD[:-5],
    "two parts": GOOD.rsplit(".", 1)[0],
    "four parts": GOOD + ".abc",
    "empty": "",
    "spaces": "   ",
    "garbage": "garbage",
    "dots": "...",
    "a.b.c": "a.b.c",
    "bad base64": "!!!.@@@.###",
    "not json header": ".".join([b64(b"not json"), b64(b"{}"), "sig"]),
    "header not an object": ".".join([b64(b"[1]"), b64(b"{}"), "sig"]),
    "unicode": "日本.語.😀",
    "bearer prefix": "Bearer " + GOOD,
    "trailing newline": GOOD + "\n",
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_and_garbage_tokens(name: str) -> None:
    assert GOOD != FORGED[name]
    assert verify(FORGED[name]) is closes.INVALID_TOKEN


def test_good_token_is_good() -> None:
    assert verify(GOOD) is None


@pytest.mark.parametrize("payload", [b"[1,2]", b'"alice"', b"42", b"null", b"not json"])
def test_payload_not_an_object(payload: bytes) -> None:
    token = jwt.api_jws.encode(payload, SECRET, algorithm="HS256")
    assert verify(token) is closes.INVALID_TOKEN


@pytest.mark.parametrize(("signed_with", "configured"), [
    ("HS256", "HS512"), ("HS512", "HS256"), ("HS384", "HS512"), ("HS256", "HS384"),
])
def test_algorithm_is_pinned(signed_with: str, configured: str) -> None:
    token = sign(GOOD_CLAIMS, algorithm=signed_with)
    assert verify(token, algorithm=configured) is closes.INVALID_TOKEN
    assert verify(token, algorithm=signed_with) is None


@pytest.mark.parametrize("algorithm", ["none", "hs256", "rs256", "", "HS1", "EdDSA"])
def test_unsupported_algorithm_refused(algorithm: str) -> None:
    with pytest.raises(ValueError, match="unsupported JWT algorithm"):
        TokenVerifier(SECRET, algorithm)


@pytest.mark.parametrize("secret", ["é" * 32, "日本語" * 11, "x" * 1000])
def test_non_ascii_and_long_secrets(secret: str) -> None:
    token = make_token(secret, "alice", NOW, 60)
    assert TokenVerifier(secret).verify(token, NOW) is None
    assert TokenVerifier(secret + "!").verify(token, NOW) is closes.INVALID_TOKEN


def test_verifier_is_reusable_and_deterministic() -> None:
    verifier = TokenVerifier(SECRET)
    token = make_token(SECRET, "alice", NOW, 60)
    for _ in range(3):
        assert verifier.verify(token, NOW) is None
        assert verifier.verify(token, NOW + 60) is closes.TOKEN_EXPIRED
        assert verifier.verify("garbage", NOW) is closes.INVALID_TOKEN


@settings(max_examples=200, deadline=None)
@given(token=st.text(max_size=200))
def test_verify_never_raises_on_text(token: str) -> None:
    assert verify(token) in (None, closes.INVALID_TOKEN, closes.TOKEN_EXPIRED)


CLAIM_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    claims=st.dictionaries(
        st.sampled_from(["exp", "nbf", "iat", "name", "foo"]), CLAIM_VALUES, max_size=4
    ),
    now=st.floats(-1e12, 1e12),
)
def test_verify_never_raises_on_signed_claims(claims: dict[str, Any], now: float) -> None:
    result = verify(sign(claims), now)
    assert result in (None, closes.INVALID_TOKEN, closes.TOKEN_EXPIRED)
    if result is None:
        for key in ("exp", "nbf"):
            value = claims.get(key)
            assert value is None or (
                isinstance(value, (int, float)) and not isinstance(value, bool)
            )
