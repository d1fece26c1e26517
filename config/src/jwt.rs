//! RequestAuthentication, compiled: JWT providers (issuer, audiences, keys, where tokens are
//! found, what is passed on), and the JSON Web Key Set parser shared by inline `jwks` (checked at
//! load) and `jwksUri` documents (fetched at run time).
//!
//! Key material is decoded here into the bytes the verifier hands to `ring`; the verifier itself
//! lives in the TLS crate with the rest of the cryptography.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// A JSON Web Key Set (RFC 7517 §5): the keys a provider signs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One public (or, for HMAC, shared) key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    /// `alg` when the key names one: a token signed with another algorithm is not checked with it.
    pub alg: Option<String>,
    pub key: JwkKey,
}

/// Key material, decoded from base64url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwkKey {
    /// RSA modulus and exponent, big-endian (RS256/384/512, PS256/384/512).
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed EC point `04 || x || y` (ES256 on P-256, ES384 on P-384).
    Ec { curve: EcCurve, point: Vec<u8> },
    /// An Ed25519 public key (EdDSA).
    Ed25519 { x: Vec<u8> },
    /// A shared secret (HS256/384/512), only used when the provider allows HMAC.
    Oct { k: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcCurve {
    P256,
    P384,
}

/// Decodes base64url (RFC 4648 §5), with or without `=` padding; None on any other character.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character (6 bits) cannot end a valid encoding.
    if bits >= 6 {
        return None;
    }
    Some(out)
}

/// Encodes base64url without padding (for `outputPayloadToHeader`).
pub fn base64url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

impl Jwks {
    /// Parses a JWKS document. Keys of a type Keel cannot verify with (say `kty: oct` when HMAC
    /// is not allowed, or an unknown curve) are an error rather than silently skipped, so that a
    /// provider never ends up with fewer keys than its owner thinks; `allow_hmac` admits `oct`.
    pub fn parse(text: &str, allow_hmac: bool) -> Result<Jwks, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("a JWKS is an object with a `keys` array")?;
        let mut out = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            out.push(parse_key(k, allow_hmac).map_err(|e| format!("keys[{i}]: {e}"))?);
        }
        if out.is_empty() {
            return Err("the JWKS has no keys".into());
        }
        Ok(Jwks { keys: out })
    }
}

fn parse_key(k: &Value, allow_hmac: bool) -> Result<Jwk, String> {
    let field = |name: &str| k.get(name).and_then(Value::as_str);
    let bytes = |name: &str| -> Result<Vec<u8>, String> {
        let v = field(name).ok_or_else(|| format!("missing `{name}`"))?;
        base64url_decode(v)
            .filter(|b| !b.is_empty())
            .ok_or_else(|| format!("`{name}` is not base64url"))
    };
    if let Some(u) = field("use") {
        if u != "sig" {
            return Err(format!(
                "`use: {u}`: only signing keys (`sig`) verify tokens"
            ));
        }
    }
    let kty = field("kty").ok_or("missing `kty`")?;
    let key = match kty {
        // Leading zero bytes (an ASN.1-style sign byte some encoders add) are dropped: the
        // verifier takes the plain big-endian numbers.
        "RSA" => {
            let strip = |v: Vec<u8>| {
                let zeros = v.iter().take_while(|b| **b == 0).count();
                v[zeros.min(v.len().saturating_sub(1))..].to_vec()
            };
            JwkKey::Rsa {
                n: strip(bytes("n")?),
                e: strip(bytes("e")?),
            }
        }
        "EC" => {
            let (curve, len) = match field("crv") {
                Some("P-256") => (EcCurve::P256, 32),
                Some("P-384") => (EcCurve::P384, 48),
                Some(c) => return Err(format!("EC curve `{c}` is not supported (P-256, P-384)")),
                None => return Err("missing `crv`".into()),
            };
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() > len || y.len() > len {
                return Err(format!("`x` and `y` are at most {len} bytes on this curve"));
            }
            // RFC 7518 §6.2.1.2 wants full-length coordinates, but some issuers drop leading
            // zero bytes (as big-number encoders do): put them back, as Envoy's verifier does.
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.resize(1 + len - x.len(), 0);
            point.extend_from_slice(&x);
            point.resize(1 + 2 * len - y.len(), 0);
            point.extend_from_slice(&y);
            JwkKey::Ec { curve, point }
        }
        "OKP" => match field("crv") {
            Some("Ed25519") => {
                let x = bytes("x")?;
                if x.len() != 32 {
                    return Err("an Ed25519 `x` is 32 bytes".into());
                }
                JwkKey::Ed25519 { x }
            }
            c => {
                return Err(format!(
                    "OKP curve `{}` is not supported (Ed25519)",
                    c.unwrap_or("")
                ))
            }
        },
        "oct" if allow_hmac => JwkKey::Oct { k: bytes("k")? },
        "oct" => {
            return Err(
                "a shared-secret key (`kty: oct`, HS256) is only accepted with the annotation jwt.keel.dev/allow-hmac: \"true\""
                    .into(),
            )
        }
        other => return Err(format!("key type `{other}` is not supported (RSA, EC, OKP)")),
    };
    Ok(Jwk {
        kid: field("kid").map(str::to_string),
        alg: field("alg").map(str::to_string),
        key,
    })
}

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `jwks`, parsed at load.
    Inline(Arc<Jwks>),
    /// `jwksUri`: fetched off the workers, refreshed, the last good set kept on failure.
    Remote {
        uri: String,
        /// How long one fetch may take (`timeout`, Istio's default 5 s).
        timeout: Duration,
        /// How often the set is fetched again (`keel.dev/jwks-refresh-interval`, default 5 min).
        refresh: Duration,
    },
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header (lower-case name) and the prefix before the token (`Bearer `).
    Header { name: String, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// One `jwtRules[]` entry, compiled.
#[derive(Debug, Clone)]
pub struct JwtProvider {
    pub issuer: String,
    /// Empty: any audience.
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub locations: Vec<TokenLocation>,
    pub forward_original_token: bool,
    /// A header that receives the payload, base64url.
    pub output_payload_to_header: Option<String>,
    /// (header, claim): a claim's value copied into a request header.
    pub claim_to_headers: Vec<(String, String)>,
    pub allow_hmac: bool,
    /// Tolerance on `exp` and `nbf` (`keel.dev/jwt-clock-skew`, Envoy's default 60 s).
    pub clock_skew: Duration,
}

impl JwtProvider {
    /// A provider with Istio's defaults for everything but its issuer, audiences and keys: the
    /// default token locations, the token not forwarded, no outputs, no HMAC, 60 s of clock skew.
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>, keys: KeySource) -> JwtProvider {
        JwtProvider {
            issuer: issuer.into(),
            audiences,
            keys,
            locations: JwtProvider::default_locations(),
            forward_original_token: false,
            output_payload_to_header: None,
            claim_to_headers: Vec::new(),
            allow_hmac: false,
            clock_skew: Duration::from_secs(60),
        }
    }

    /// Istio's default locations: `Authorization: Bearer <token>`, then `?access_token=`.
    pub fn default_locations() -> Vec<TokenLocation> {
        vec![
            TokenLocation::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            },
            TokenLocation::Param("access_token".into()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trip() {
        // RFC 4648 §10 test vectors, in the URL-safe alphabet without padding.
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url_encode(plain.as_bytes()), enc);
            assert_eq!(base64url_decode(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64url_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64url_decode("_-8").unwrap(), [0xff, 0xef]);
        assert!(base64url_decode("Zm9v+").is_none());
        assert!(base64url_decode("Z").is_none());
    }

    #[test]
    fn jwks_keys() {
        // RFC 7517 appendix A.1's EC and RSA public keys (shortened modulus is fine for parsing).
        let doc = r#"{"keys":[
            {"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"sig","kid":"1"},
            {"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"2011-04-29"}
        ]}"#;
        let jwks = Jwks::parse(doc, false).unwrap();
        assert_eq!(jwks.keys.len(), 2);
        assert!(
            matches!(&jwks.keys[0].key, JwkKey::Ec { curve: EcCurve::P256, point } if point.len() == 65 && point[0] == 4)
        );
        assert!(
            matches!(&jwks.keys[1].key, JwkKey::Rsa { n, e } if n.len() == 256 && e == &[1, 0, 1])
        );
        assert_eq!(jwks.keys[1].alg.as_deref(), Some("RS256"));

        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
        assert!(Jwks::parse(oct, false).unwrap_err().contains("allow-hmac"));
        assert!(Jwks::parse(oct, true).is_ok());
        assert!(Jwks::parse("{}", false).is_err());
        assert!(Jwks::parse(r#"{"keys":[]}"#, false).is_err());
        assert!(Jwks::parse(
            r#"{"keys":[{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}]}"#,
            false
        )
        .unwrap_err()
        .contains("P-521"));
        assert!(Jwks::parse(r#"{"keys":[{"kty":"RSA","n":"!!","e":"AQAB"}]}"#, false).is_err());
        // A coordinate with its leading zero byte dropped is padded back.
        let short = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AQ","y":"Ag"}]}"#;
        let k = Jwks::parse(short, false).unwrap();
        let JwkKey::Ec { point, .. } = &k.keys[0].key else {
            panic!()
        };
        assert_eq!(point.len(), 65);
        assert_eq!((point[32], point[64]), (1, 2));
        assert!(point[1..32].iter().all(|b| *b == 0));
    }
}
