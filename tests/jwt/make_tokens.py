#!/usr/bin/python3
"""Makes signing keys, their JWKS, and test tokens for tests/security.rs.

Usage: make_tokens.py ISSUER AUDIENCE  -> prints JSON {"jwks": ..., "tokens": {...}}
Keys are generated fresh on each run (cryptography), tokens signed with PyJWT.
"""
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

issuer, audience = sys.argv[1], sys.argv[2]
now = int(time.time())

rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
p256 = ec.generate_private_key(ec.SECP256R1())
p384 = ec.generate_private_key(ec.SECP384R1())
ed = ed25519.Ed25519PrivateKey.generate()
other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(alg_cls, key, kid):
    d = json.loads(alg_cls.to_jwk(key.public_key()))
    d["kid"] = kid
    d["use"] = "sig"
    return d


jwks = {
    "keys": [
        jwk(RSAAlgorithm, rsa_key, "rsa"),
        jwk(ECAlgorithm, p256, "p256"),
        jwk(ECAlgorithm, p384, "p384"),
        jwk(OKPAlgorithm, ed, "ed"),
    ]
}


def claims(**over):
    c = {
        "iss": issuer,
        "sub": "alice",
        "aud": audience,
        "iat": now,
        "exp": now + 3600,
        "groups": ["dev", "ops"],
        "team": "core",
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def sign(c, key, alg, kid):
    return jwt.encode(c, key, algorithm=alg, headers={"kid": kid})


valid = sign(claims(), rsa_key, "RS256", "rsa")
h, p, s = valid.split(".")
# Same signature, payload changed: sub alice -> mallory.
forged_payload = jwt.utils.base64url_encode(
    json.dumps(claims(sub="mallory"), separators=(",", ":")).encode()
).decode()

tokens = {
    "rs256": valid,
    "ps256": sign(claims(), rsa_key, "PS256", "rsa"),
    "rs384": sign(claims(), rsa_key, "RS384", "rsa"),
    "rs512": sign(claims(), rsa_key, "RS512", "rsa"),
    "ps512": sign(claims(), rsa_key, "PS512", "rsa"),
    "es256": sign(claims(), p256, "ES256", "p256"),
    "es384": sign(claims(), p384, "ES384", "p384"),
    "eddsa": sign(claims(), ed, "EdDSA", "ed"),
    "bob": sign(claims(sub="bob", groups=["dev"]), rsa_key, "RS256", "rsa"),
    "expired": sign(claims(iat=now - 7200, exp=now - 3600), rsa_key, "RS256", "rsa"),
    "not_yet": sign(claims(nbf=now + 3600), rsa_key, "RS256", "rsa"),
    "wrong_issuer": sign(claims(iss="https://evil.example"), rsa_key, "RS256", "rsa"),
    "wrong_audience": sign(claims(aud="someone-else"), rsa_key, "RS256", "rsa"),
    "tampered": f"{h}.{forged_payload}.{s}",
    "other_key": sign(claims(), other_rsa, "RS256", "rsa"),
    "garbage": "not-a-jwt",
}
print(json.dumps({"jwks": jwks, "tokens": tokens}))
