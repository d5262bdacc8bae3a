"""Public-key tokens: a PEM key file, a JWKS key set, audience and issuer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from garin import closes
from garin.auth import JwksKeys, StaticKey, TokenVerifier, load_public_key
from garin.config import ConfigError, load_config

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def token(private_key: Any, algorithm: str, kid: str | None = None, **claims: Any) -> str:
    body = {"sub": "alice", "exp": NOW + 60, **claims}
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, private_key, algorithm=algorithm, headers=headers)


def jwks(*entries: tuple[Any, str, str]) -> dict[str, Any]:
    keys = []
    for public_key, kid, alg in entries:
        maker = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
        jwk = maker.to_jwk(public_key, as_dict=True)
        keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    return {"keys": keys}


def test_rs256_with_a_pem_key_file(tmp_path, rsa_key) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem(rsa_key.public_key()))
    verifier = TokenVerifier(StaticKey(load_public_key(str(path), "RS256")), "RS256")
    assert verifier.verify(token(rsa_key, "RS256"), NOW) is None
    assert verifier.verify(token(rsa_key, "RS256", exp=NOW - 1), NOW) is closes.TOKEN_EXPIRED
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert verifier.verify(token(other, "RS256"), NOW) is closes.INVALID_TOKEN


def test_hmac_token_signed_with_the_public_key_is_refused(rsa_key) -> None:
    """Algorithm confusion: an HS256 token 'signed' with the public PEM."""
    public_pem = pem(rsa_key.public_key())
    verifier = TokenVerifier(StaticKey(rsa_key.public_key()), "RS256")
    # PyJWT refuses to HMAC-sign with a PEM key, so build the token by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(
        json.dumps({"sub": "mallory", "exp": NOW + 60}).encode()
    )
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + b64(signature)
    assert verifier.verify(forged, NOW) is closes.INVALID_TOKEN


@pytest.mark.parametrize("algorithm", ["ES256", "RS256", "PS256"])
def test_jwks_key_by_kid(algorithm, rsa_key, ec_key) -> None:
    private = ec_key if algorithm == "ES256" else rsa_key
    keys = JwksKeys(algorithm)
    assert keys.update(jwks((private.public_key(), "k1", algorithm))) == 1
    verifier = TokenVerifier(keys, algorithm)
    assert verifier.verify(token(private, algorithm, kid="k1"), NOW) is None
    assert verifier.verify(token(private, algorithm), NOW) is None  # one key: no kid needed


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_a_jwks_that_publishes_a_private_key_still_verifies(algorithm, rsa_key, ec_key) -> None:
    # A private key object cannot verify: every client was closed 1011.
    private = ec_key if algorithm == "ES256" else rsa_key
    keys = JwksKeys(algorithm)
    assert keys.update(jwks((private, "k1", algorithm))) == 1  # the JWK carries "d"
    verifier = TokenVerifier(keys, algorithm)
    assert verifier.verify(token(private, algorithm, kid="k1"), NOW) is None
    other = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else rsa.generate_private_key(
        public_exponent=65537, key_size=2048
    )
    assert verifier.verify(token(other, algorithm, kid="k1"), NOW) is closes.INVALID_TOKEN


def test_jwks_not_loaded_yet_is_try_again_later(ec_key) -> None:
    verifier = TokenVerifier(JwksKeys("ES256"), "ES256")
    assert verifier.verify(token(ec_key, "ES256", kid="k1"), NOW) is closes.AUTH_UNAVAILABLE


def test_unknown_kid_is_refused_and_asks_for_a_refresh(rsa_key, ec_key) -> None:
    asked: list[bool] = []
    keys = JwksKeys("ES256", on_unknown_kid=lambda: asked.append(True))
    keys.update(jwks((ec_key.public_key(), "old", "ES256")))
    verifier = TokenVerifier(keys, "ES256")
    rolled = ec.generate_private_key(ec.SECP256R1())
    assert verifier.verify(token(rolled, "ES256", kid="new"), NOW) is closes.INVALID_TOKEN
    assert asked == [True]
    keys.update(jwks((ec_key.public_key(), "old", "ES256"), (rolled.public_key(), "new", "ES256")))
    assert verifier.verify(token(rolled, "ES256", kid="new"), NOW) is None
    assert verifier.verify(token(ec_key, "ES256", kid="old"), NOW) is None


def test_jwks_skips_keys_for_other_algorithms_and_uses(rsa_key, ec_key) -> None:
    document = jwks((rsa_key.public_key(), "rsa", "RS256"), (ec_key.public_key(), "ec", "ES256"))
    document["keys"].append({**document["keys"][1], "kid": "enc", "use": "enc"})
    keys = JwksKeys("ES256")
    assert keys.update(document) == 1
    assert keys.key_for("rsa") is None and keys.key_for("enc") is None


@pytest.mark.parametrize("document", [None, [], {}, {"keys": "x"}, {"keys": [{"kty": "nope"}]}])
def test_unusable_jwks_documents_raise_and_keep_the_old_keys(document, ec_key) -> None:
    keys = JwksKeys("ES256")
    keys.update(jwks((ec_key.public_key(), "k", "ES256")))
    with pytest.raises(ValueError):
        keys.update(document)
    assert keys.key_for("k") is not None


def test_audience_and_issuer_when_required(ec_key) -> None:
    verifier = TokenVerifier(StaticKey(ec_key.public_key()), "ES256", audience="chat", issuer="https://auth.test/")
    good = token(ec_key, "ES256", aud="chat", iss="https://auth.test/")
    assert verifier.verify(good, NOW) is None
    assert verifier.verify(token(ec_key, "ES256", iss="https://auth.test/"), NOW) is closes.INVALID_TOKEN
    assert verifier.verify(token(ec_key, "ES256", aud="other", iss="https://auth.test/"), NOW) is closes.INVALID_TOKEN
    assert verifier.verify(token(ec_key, "ES256", aud="chat", iss="https://evil.test/"), NOW) is closes.INVALID_TOKEN


def test_aud_is_ignored_when_not_configured(ec_key) -> None:
    verifier = TokenVerifier(StaticKey(ec_key.public_key()), "ES256")
    assert verifier.verify(token(ec_key, "ES256", aud="anything"), NOW) is None


def test_load_public_key_errors(tmp_path, ec_key) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_public_key(str(tmp_path / "missing.pem"), "ES256")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(str(bad), "ES256")


BASE = {"ALLOWED_ORIGINS": "*"}


def test_config_public_key_algorithms(tmp_path, ec_key) -> None:
    with pytest.raises(ConfigError, match="needs exactly one of GARIN_JWT_PUBLIC_KEY_FILE or GARIN_JWKS_URL"):
        load_config({}, {**BASE, "GARIN_JWT_ALGORITHM": "ES256"})
    with pytest.raises(ConfigError, match="exactly one"):
        load_config({}, {**BASE, "GARIN_JWT_ALGORITHM": "ES256", "GARIN_JWKS_URL": "https://a/j",
                         "GARIN_JWT_PUBLIC_KEY_FILE": "/k.pem"})
    with pytest.raises(ConfigError, match="GARIN_JWKS_URL must be an http"):
        load_config({}, {**BASE, "GARIN_JWT_ALGORITHM": "ES256", "GARIN_JWKS_URL": "file:///etc/passwd"})
    with pytest.raises(ConfigError, match="GARIN_JWT_PUBLIC_KEY_FILE: "):
        load_config({}, {**BASE, "GARIN_JWT_ALGORITHM": "ES256", "GARIN_JWT_PUBLIC_KEY_FILE": str(tmp_path / "no")})
    path = tmp_path / "k.pem"
    path.write_bytes(pem(ec_key.public_key()))
    config = load_config({}, {**BASE, "GARIN_JWT_ALGORITHM": "ES256", "GARIN_JWT_PUBLIC_KEY_FILE": str(path)})
    assert config.jwt_secret is None
    assert load_config({}, config.to_env()) == config


def test_config_hmac_still_needs_the_secret() -> None:
    with pytest.raises(ConfigError, match="JWT_DECODE_SECRET is not set"):
        load_config({}, {**BASE, "GARIN_JWKS_URL": "https://a/j"})


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_a_private_key_as_the_public_key_file_is_refused_at_start(tmp_path, rsa_key, ec_key, algorithm) -> None:
    """PyJWT takes a private key too; every token then fails (1011) instead."""
    key = rsa_key if algorithm == "RS256" else ec_key
    path = tmp_path / "priv.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with pytest.raises(ConfigError) as info:
        load_config({}, {**BASE, "GARIN_JWT_ALGORITHM": algorithm, "GARIN_JWT_PUBLIC_KEY_FILE": str(path)})
    assert str(info.value) == (
        f"GARIN_JWT_PUBLIC_KEY_FILE: {path} is a private key; give the public key (openssl pkey -in {path} -pubout)"
    )


@pytest.mark.parametrize(("variable", "value"), [("GARIN_JWT_PUBLIC_KEY_FILE", "/etc/garin/auth.pem"),
                                                 ("GARIN_JWKS_URL", "https://a/j")])
@pytest.mark.parametrize("algorithm", [None, "HS512"])
def test_a_provider_key_with_an_hmac_algorithm_is_refused(variable, value, algorithm) -> None:
    """Else the key is ignored and every provider token is refused 1008, without a word."""
    environ = {**BASE, "JWT_DECODE_SECRET": "s" * 64, variable: value}
    if algorithm:
        environ["GARIN_JWT_ALGORITHM"] = algorithm
    with pytest.raises(ConfigError) as info:
        load_config({}, environ)
    assert str(info.value) == (
        f"{variable} is set but GARIN_JWT_ALGORITHM is {algorithm or 'HS256'}, which checks tokens with "
        "JWT_DECODE_SECRET: set GARIN_JWT_ALGORITHM to your provider's algorithm (e.g. RS256)"
    )
    # Commands that check no tokens (a shard, garin chat) do not care.
    assert load_config({}, environ, required=()).jwt_algorithm == (algorithm or "HS256")


def test_a_key_of_another_kind_is_named_in_plain_words(tmp_path, rsa_key) -> None:
    """Not PyJWT's 'Expected one of <generator object ...>'."""
    path = tmp_path / "auth.pem"
    path.write_bytes(pem(rsa_key.public_key()))
    with pytest.raises(ValueError) as info:
        load_public_key(str(path), "ES256")
    assert str(info.value) == f"{path} holds an RSA public key; ES256 needs an EC P-256 public key"
    path.write_bytes(pem(ec.generate_private_key(ec.SECP384R1()).public_key()))
    with pytest.raises(ValueError) as info:
        load_public_key(str(path), "ES256")
    assert str(info.value) == f"{path} holds an EC P-384 public key; ES256 needs an EC P-256 public key"
    with pytest.raises(ValueError) as info:
        load_public_key(str(path), "PS256")
    assert str(info.value) == f"{path} holds an EC P-384 public key; PS256 needs an RSA public key"
    path.write_text("not a key")
    with pytest.raises(ValueError) as info:
        load_public_key(str(path), "ES512")
    assert str(info.value) == f"{path} is not a PEM public key (ES512 needs an EC P-521 public key)"


def test_why_a_token_was_refused_is_logged_at_debug_without_the_token(ec_key, caplog) -> None:
    verifier = TokenVerifier(StaticKey(ec_key.public_key()), "ES256", audience="chat", issuer="https://auth.test/")
    wrong = token(ec_key, "ES256", aud="other", iss="https://auth.test/")
    with caplog.at_level(logging.DEBUG, logger="garin.auth"):
        assert verifier.verify(wrong, NOW) is closes.INVALID_TOKEN
    assert "InvalidAudienceError" in caplog.text
    assert wrong not in caplog.text and wrong.split(".")[1] not in caplog.text
