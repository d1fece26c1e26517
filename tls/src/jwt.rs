//! JSON Web Tokens (RFC 7519, JWS compact form RFC 7515): parsing, signature verification with
//! `ring`, and the registered-claim checks RequestAuthentication asks for.
//!
//! Parsing trusts nothing: every part is bounded, decoded and type-checked before use, and a token
//! that is not exactly `header.payload.signature` is refused. `alg: none` is never accepted, and
//! a key is only used with the algorithm family it belongs to (an RSA key never verifies an HMAC
//! token), which closes the classic algorithm-confusion attacks.

use keel_config::authz::JwtIdentity;
use keel_config::jwt::{base64url_decode, EcCurve, JwkKey, Jwks, JwtProvider};
use ring::signature::{self, UnparsedPublicKey};
use serde_json::{Map, Value};

/// The longest token looked at (Envoy has no limit below the header limit; tokens beyond this
/// are almost certainly abuse).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was refused; [`JwtError::message`] is Envoy's wording, sent in the 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    Malformed,
    BadHeader,
    BadPayload,
    UnsupportedAlgorithm,
    UnknownIssuer,
    Expired,
    NotYetValid,
    AudienceNotAllowed,
    NoMatchingKey,
    BadSignature,
    /// The provider's remote JWKS has never been fetched successfully.
    KeysUnavailable,
}

impl JwtError {
    pub fn message(self) -> &'static str {
        match self {
            JwtError::Malformed => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            JwtError::BadHeader => "Jwt header is an invalid JSON",
            JwtError::BadPayload => "Jwt payload is an invalid JSON",
            JwtError::UnsupportedAlgorithm => "Jwt algorithm is not supported",
            JwtError::UnknownIssuer => "Jwt issuer is not configured",
            JwtError::Expired => "Jwt is expired",
            JwtError::NotYetValid => "Jwt not yet valid",
            JwtError::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            JwtError::NoMatchingKey => "Jwks doesn't have key to match kid or alg from Jwt",
            JwtError::BadSignature => "Jwt verification fails",
            JwtError::KeysUnavailable => "Jwks remote fetch is failed",
        }
    }
}

/// The signing algorithms Keel verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
    Hs256,
    Hs384,
    Hs512,
}

impl Algorithm {
    fn from_name(name: &str) -> Option<Algorithm> {
        Some(match name {
            "RS256" => Algorithm::Rs256,
            "RS384" => Algorithm::Rs384,
            "RS512" => Algorithm::Rs512,
            "PS256" => Algorithm::Ps256,
            "PS384" => Algorithm::Ps384,
            "PS512" => Algorithm::Ps512,
            "ES256" => Algorithm::Es256,
            "ES384" => Algorithm::Es384,
            "EdDSA" => Algorithm::EdDsa,
            "HS256" => Algorithm::Hs256,
            "HS384" => Algorithm::Hs384,
            "HS512" => Algorithm::Hs512,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::EdDsa => "EdDSA",
            Algorithm::Hs256 => "HS256",
            Algorithm::Hs384 => "HS384",
            Algorithm::Hs512 => "HS512",
        }
    }
}

/// A token split and decoded, its signature not yet checked.
#[derive(Debug, Clone)]
pub struct Parsed<'a> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// `header.payload` as sent: what the signature covers.
    pub signing_input: &'a str,
    /// The payload part as sent (base64url), for `outputPayloadToHeader`.
    pub payload_b64: &'a str,
    pub signature: Vec<u8>,
    pub claims: Map<String, Value>,
}

impl Parsed<'_> {
    /// The `iss` claim (which picks the provider).
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}

/// Splits and decodes a compact JWS. The signature is not checked here.
pub fn parse(token: &str) -> Result<Parsed<'_>, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(JwtError::Malformed);
    }
    let header = base64url_decode(h).ok_or(JwtError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| JwtError::BadHeader)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::BadHeader)?;
    let alg = Algorithm::from_name(alg).ok_or(JwtError::UnsupportedAlgorithm)?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::BadHeader),
    };
    // Critical extensions Keel does not understand must make the token invalid (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(JwtError::BadHeader);
    }
    let payload = base64url_decode(p).ok_or(JwtError::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload).map_err(|_| JwtError::BadPayload)?;
    let signature = base64url_decode(s).ok_or(JwtError::Malformed)?;
    Ok(Parsed {
        alg,
        kid,
        signing_input: &token[..h.len() + 1 + p.len()],
        payload_b64: p,
        signature,
        claims,
    })
}

/// A NumericDate claim in seconds; an `exp`/`nbf` that is present but not a number is invalid.
fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(JwtError::BadPayload),
    }
}

/// The `aud` claim as a list (a single string is a list of one).
fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    match claims.get("aud") {
        None => Ok(Vec::new()),
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or(JwtError::BadPayload))
            .collect(),
        Some(_) => Err(JwtError::BadPayload),
    }
}

/// Checks a parsed token against `provider` (whose issuer the caller matched) with `keys`, at
/// `now` (seconds since the Unix epoch): signature, `exp`, `nbf`, `aud`.
pub fn verify(
    token: &Parsed,
    provider: &JwtProvider,
    keys: &Jwks,
    now: u64,
) -> Result<JwtIdentity, JwtError> {
    if token.issuer() != Some(provider.issuer.as_str()) {
        return Err(JwtError::UnknownIssuer);
    }
    let skew = provider.clock_skew.as_secs();
    if let Some(exp) = numeric(&token.claims, "exp")? {
        if now > exp.saturating_add(skew) {
            return Err(JwtError::Expired);
        }
    }
    if let Some(nbf) = numeric(&token.claims, "nbf")? {
        if now.saturating_add(skew) < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    let aud = audiences(&token.claims)?;
    if !provider.audiences.is_empty() && !aud.iter().any(|a| provider.audiences.contains(a)) {
        return Err(JwtError::AudienceNotAllowed);
    }
    let mut candidates = keys
        .keys
        .iter()
        .filter(|k| token.kid.is_none() || k.kid == token.kid)
        .filter(|k| k.alg.as_deref().is_none_or(|a| a == token.alg.name()))
        .filter(|k| fits(&k.key, token.alg, provider.allow_hmac))
        .peekable();
    if candidates.peek().is_none() {
        return Err(JwtError::NoMatchingKey);
    }
    let msg = token.signing_input.as_bytes();
    if !candidates.any(|k| check(&k.key, token.alg, msg, &token.signature)) {
        return Err(JwtError::BadSignature);
    }
    let sub = token
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or("");
    Ok(JwtIdentity {
        principal: format!("{}/{}", provider.issuer, sub),
        audiences: aud,
        presenter: token
            .claims
            .get("azp")
            .and_then(Value::as_str)
            .map(str::to_string),
        claims: token.claims.clone(),
    })
}

/// Whether a key belongs to the algorithm's family.
fn fits(key: &JwkKey, alg: Algorithm, allow_hmac: bool) -> bool {
    use Algorithm::*;
    match (key, alg) {
        (JwkKey::Rsa { .. }, Rs256 | Rs384 | Rs512 | Ps256 | Ps384 | Ps512) => true,
        (JwkKey::Ec { curve, .. }, Es256) => *curve == EcCurve::P256,
        (JwkKey::Ec { curve, .. }, Es384) => *curve == EcCurve::P384,
        (JwkKey::Ed25519 { .. }, EdDsa) => true,
        (JwkKey::Oct { .. }, Hs256 | Hs384 | Hs512) => allow_hmac,
        _ => false,
    }
}

fn check(key: &JwkKey, alg: Algorithm, msg: &[u8], sig: &[u8]) -> bool {
    use Algorithm::*;
    match key {
        JwkKey::Rsa { n, e } => {
            let params: &signature::RsaParameters = match alg {
                Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                _ => return false,
            };
            signature::RsaPublicKeyComponents { n, e }
                .verify(params, msg, sig)
                .is_ok()
        }
        JwkKey::Ec { curve, point } => {
            let alg: &dyn signature::VerificationAlgorithm = match curve {
                EcCurve::P256 => &signature::ECDSA_P256_SHA256_FIXED,
                EcCurve::P384 => &signature::ECDSA_P384_SHA384_FIXED,
            };
            UnparsedPublicKey::new(alg, point).verify(msg, sig).is_ok()
        }
        JwkKey::Ed25519 { x } => UnparsedPublicKey::new(&signature::ED25519, x)
            .verify(msg, sig)
            .is_ok(),
        JwkKey::Oct { k } => {
            let h = match alg {
                Hs256 => ring::hmac::HMAC_SHA256,
                Hs384 => ring::hmac::HMAC_SHA384,
                Hs512 => ring::hmac::HMAC_SHA512,
                _ => return false,
            };
            ring::hmac::verify(&ring::hmac::Key::new(h, k), msg, sig).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_config::jwt::{base64url_encode, KeySource};
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};
    use std::sync::Arc;

    fn provider(keys: &Jwks, audiences: &[&str]) -> JwtProvider {
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        let mut p = JwtProvider::new(
            "https://issuer.test",
            audiences,
            KeySource::Inline(Arc::new(keys.clone())),
        );
        p.allow_hmac = true;
        p
    }

    fn token(header: &str, claims: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!(
            "{}.{}",
            base64url_encode(header.as_bytes()),
            base64url_encode(claims.as_bytes())
        );
        let sig = sign(input.as_bytes());
        format!("{input}.{}", base64url_encode(&sig))
    }

    fn es256() -> (EcdsaKeyPair, Jwks) {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let jwks = Jwks {
            keys: vec![keel_config::jwt::Jwk {
                kid: Some("k1".into()),
                alg: None,
                key: JwkKey::Ec {
                    curve: EcCurve::P256,
                    point,
                },
            }],
        };
        (pair, jwks)
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn es256_valid_expired_audience_tampered() {
        let (pair, jwks) = es256();
        let rng = SystemRandom::new();
        let sign = |m: &[u8]| pair.sign(&rng, m).unwrap().as_ref().to_vec();
        let claims = format!(
            r#"{{"iss":"https://issuer.test","sub":"alice","aud":["api"],"exp":{}}}"#,
            NOW + 100
        );
        let t = token(r#"{"alg":"ES256","kid":"k1"}"#, &claims, sign);
        let p = provider(&jwks, &["api"]);
        let id = verify(&parse(&t).unwrap(), &p, &jwks, NOW).unwrap();
        assert_eq!(id.principal, "https://issuer.test/alice");
        assert_eq!(id.audiences, ["api"]);
        // Expired, past the skew.
        assert_eq!(
            verify(&parse(&t).unwrap(), &p, &jwks, NOW + 161).unwrap_err(),
            JwtError::Expired
        );
        assert!(verify(&parse(&t).unwrap(), &p, &jwks, NOW + 159).is_ok());
        // Wrong audience.
        let p2 = provider(&jwks, &["other"]);
        assert_eq!(
            verify(&parse(&t).unwrap(), &p2, &jwks, NOW).unwrap_err(),
            JwtError::AudienceNotAllowed
        );
        // Tampered payload: same signature, other claims.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            base64url_encode(claims.replace("alice", "admin").as_bytes()),
            parts[2]
        );
        assert_eq!(
            verify(&parse(&forged).unwrap(), &p, &jwks, NOW).unwrap_err(),
            JwtError::BadSignature
        );
        // Unknown kid.
        let t = token(r#"{"alg":"ES256","kid":"k2"}"#, &claims, sign);
        assert_eq!(
            verify(&parse(&t).unwrap(), &p, &jwks, NOW).unwrap_err(),
            JwtError::NoMatchingKey
        );
    }

    #[test]
    fn ed25519_and_hmac() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwks = Jwks {
            keys: vec![
                keel_config::jwt::Jwk {
                    kid: None,
                    alg: None,
                    key: JwkKey::Ed25519 {
                        x: pair.public_key().as_ref().to_vec(),
                    },
                },
                keel_config::jwt::Jwk {
                    kid: None,
                    alg: None,
                    key: JwkKey::Oct {
                        k: b"secret".to_vec(),
                    },
                },
            ],
        };
        let claims = r#"{"iss":"https://issuer.test","sub":"bob"}"#;
        let t = token(r#"{"alg":"EdDSA"}"#, claims, |m| {
            pair.sign(m).as_ref().to_vec()
        });
        let mut p = provider(&jwks, &[]);
        assert!(verify(&parse(&t).unwrap(), &p, &jwks, NOW).is_ok());
        let hmac = |m: &[u8]| {
            ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret"), m)
                .as_ref()
                .to_vec()
        };
        let t = token(r#"{"alg":"HS256"}"#, claims, hmac);
        assert!(verify(&parse(&t).unwrap(), &p, &jwks, NOW).is_ok());
        p.allow_hmac = false;
        assert_eq!(
            verify(&parse(&t).unwrap(), &p, &jwks, NOW).unwrap_err(),
            JwtError::NoMatchingKey
        );
    }

    #[test]
    fn malformed_tokens() {
        for t in [
            "",
            "a.b",
            "a.b.c.d",
            "..",
            "e30.e30.",
            "!!.e30.AA",
            "e30.e30.AA",                         // no alg
            "eyJhbGciOiJub25lIn0.e30.AA",         // alg none
            "eyJhbGciOiJFUzI1NiJ9.bm90anNvbg.AA", // payload not JSON
        ] {
            assert!(parse(t).is_err(), "{t}");
        }
        let ok = parse("eyJhbGciOiJFUzI1NiJ9.e30.AA").unwrap();
        assert_eq!(ok.alg, Algorithm::Es256);
        assert_eq!(ok.issuer(), None);
        assert_eq!(
            parse("eyJhbGciOiJub25lIn0.e30.AA").unwrap_err(),
            JwtError::UnsupportedAlgorithm
        );
    }
}
