//! Fuzzes the JWT parser and verifier, and the JWKS parser: any bytes yield a token or an error,
//! never a panic or a hang; a token whose signature is arbitrary is never accepted (the key set
//! here is fixed and the fuzzer holds no private key); base64url decoding round-trips; and the
//! path normalization AuthorizationPolicy matches on is idempotent and leaves no dot segment.
#![no_main]

use std::sync::{Arc, OnceLock};

use keel_config::jwt::{base64url_decode, base64url_encode, Jwks, JwtProvider, KeySource};
use libfuzzer_sys::fuzz_target;

/// Public keys from RFC 7517 appendix A.1 and RFC 8037 appendix A, and a shared secret.
const JWKS: &str = r#"{"keys":[
  {"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"1"},
  {"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","kid":"2011-04-29"},
  {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
]}"#;

fn provider() -> &'static (JwtProvider, Jwks) {
    static P: OnceLock<(JwtProvider, Jwks)> = OnceLock::new();
    P.get_or_init(|| {
        let jwks = Jwks::parse(JWKS, false).expect("the fixed JWKS parses");
        let keys = KeySource::Inline(Arc::new(jwks.clone()));
        let p = JwtProvider::new("https://issuer.test", vec!["api".into()], keys);
        (p, jwks)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 4 {
        0 => {
            let _ = Jwks::parse(text, mode & 0x80 != 0);
        }
        1 => {
            if let Some(bytes) = base64url_decode(text) {
                assert_eq!(base64url_decode(&base64url_encode(&bytes)), Some(bytes));
            }
        }
        2 => {
            let once = keel_config::authz::normalize_path(text);
            assert_eq!(keel_config::authz::normalize_path(&once), once);
            if text.starts_with('/') {
                assert!(once.starts_with('/'), "{once}");
                assert!(!once.split('/').any(|s| s == "." || s == ".."), "{once}");
            }
        }
        _ => {
            let Ok(token) = keel_tls::jwt::parse(text) else {
                return;
            };
            let (p, jwks) = provider();
            assert!(
                keel_tls::jwt::verify(&token, p, jwks, 1_800_000_000).is_err(),
                "a token no one could sign was accepted"
            );
        }
    }
});
