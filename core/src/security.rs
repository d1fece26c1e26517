//! Inbound security, in Envoy's filter order as Istio configures it: JWT authentication
//! (RequestAuthentication) first, then authorization (AuthorizationPolicy) with the identities
//! found — the mTLS peer's and the token's.
//!
//! Each worker keeps, per config generation, the key sets of its providers and a small cache of
//! tokens it has verified, so a client repeating its token costs one map lookup and not a
//! signature check.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use keel_config::authz::{normalize_path, Connection, HttpRequest, JwtIdentity};
use keel_config::jwt::{Jwks, JwtProvider, KeySource, TokenLocation};
use keel_config::Security;
use keel_tls::jwt::{self, JwtError};
use keel_tls::Session;

use crate::http::head::RequestHead;
use crate::jwks::Slot;

/// Tokens remembered per worker and generation; the cache is emptied when full (a client that
/// sends a new token per request gains nothing from it anyway).
const CACHE_MAX: usize = 1024;

/// A worker's runtime state for one snapshot's security policies.
#[derive(Debug, Default)]
pub struct SecurityState {
    /// Per provider of [`Security::jwt`], in its order.
    keys: Vec<Keys>,
    cache: RefCell<HashMap<Box<str>, Cached>>,
}

#[derive(Debug)]
enum Keys {
    Inline(Arc<Jwks>),
    /// None when the slot is missing (a snapshot not loaded through `config::load`, in tests).
    Remote(Option<Arc<Slot>>),
}

#[derive(Debug, Clone)]
struct Cached {
    provider: usize,
    identity: Rc<JwtIdentity>,
    /// `exp` plus the clock skew: past it the token is checked again (and refused).
    valid_until: Option<u64>,
    /// The remote key set's version it was verified with (0 for inline keys).
    keys_version: u64,
}

/// A verified token and what to do to the request for it.
#[derive(Debug)]
pub struct Authenticated {
    pub provider: usize,
    pub identity: Rc<JwtIdentity>,
    /// Where it was found (removed before forwarding unless `forwardOriginalToken`).
    pub location: usize,
    /// The payload as sent, for `outputPayloadToHeader`.
    pub payload_b64: Option<String>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SecurityState {
    /// The state for `security`, taking remote key sets from the registry.
    pub fn new(security: &Security) -> SecurityState {
        SecurityState {
            keys: security
                .jwt
                .iter()
                .map(|p| match &p.keys {
                    KeySource::Inline(k) => Keys::Inline(k.clone()),
                    KeySource::Remote { uri, .. } => {
                        Keys::Remote(crate::jwks::slot(uri, p.allow_hmac))
                    }
                })
                .collect(),
            cache: RefCell::new(HashMap::new()),
        }
    }

    /// Finds and verifies the request's token. `Ok(None)`: no token (allowed, as Istio does,
    /// unless a policy requires a request principal). An invalid token is an error.
    pub fn authenticate(
        &self,
        providers: &[JwtProvider],
        head: &RequestHead,
    ) -> Result<Option<Authenticated>, JwtError> {
        for (pi, p) in providers.iter().enumerate() {
            for (li, loc) in p.locations.iter().enumerate() {
                let Some(token) = extract(head, loc) else {
                    continue;
                };
                return self.verify_token(providers, pi, li, token).map(Some);
            }
        }
        Ok(None)
    }

    fn verify_token(
        &self,
        providers: &[JwtProvider],
        found_by: usize,
        location: usize,
        token: &str,
    ) -> Result<Authenticated, JwtError> {
        let now = now_secs();
        let payload_b64 = |pi: usize| {
            providers[pi]
                .output_payload_to_header
                .as_ref()
                .and_then(|_| token.split('.').nth(1))
                .map(str::to_string)
        };
        if let Some(c) = self.cache.borrow().get(token) {
            let fresh = c.valid_until.is_none_or(|t| now <= t)
                && c.keys_version == self.keys_version(c.provider);
            if fresh {
                return Ok(Authenticated {
                    provider: c.provider,
                    identity: c.identity.clone(),
                    location,
                    payload_b64: payload_b64(c.provider),
                });
            }
        }
        let parsed = jwt::parse(token)?;
        // The token's issuer picks the provider; it must look for tokens where this one was
        // found (the same header, parameter or cookie).
        let where_found = &providers[found_by].locations[location];
        let pi = providers
            .iter()
            .position(|p| {
                Some(p.issuer.as_str()) == parsed.issuer() && p.locations.contains(where_found)
            })
            .ok_or(JwtError::UnknownIssuer)?;
        let provider = &providers[pi];
        let (keys, version) = match &self.keys[pi] {
            Keys::Inline(k) => (k.clone(), 0),
            Keys::Remote(slot) => {
                let slot = slot.as_ref().ok_or(JwtError::KeysUnavailable)?;
                let version = slot.version.load(std::sync::atomic::Ordering::Relaxed);
                (slot.keys().ok_or(JwtError::KeysUnavailable)?, version)
            }
        };
        let identity = Rc::new(jwt::verify(&parsed, provider, &keys, now)?);
        let valid_until = parsed
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .map(|exp| exp.saturating_add(provider.clock_skew.as_secs()));
        let location = provider
            .locations
            .iter()
            .position(|l| l == where_found)
            .unwrap_or(location);
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            token.into(),
            Cached {
                provider: pi,
                identity: identity.clone(),
                valid_until,
                keys_version: version,
            },
        );
        Ok(Authenticated {
            provider: pi,
            identity,
            location,
            payload_b64: payload_b64(pi),
        })
    }

    fn keys_version(&self, provider: usize) -> u64 {
        match self.keys.get(provider) {
            Some(Keys::Remote(Some(slot))) => {
                slot.version.load(std::sync::atomic::Ordering::Relaxed)
            }
            _ => 0,
        }
    }
}

/// The token at `loc`, if the request has one there.
fn extract<'a>(head: &'a RequestHead, loc: &TokenLocation) -> Option<&'a str> {
    match loc {
        TokenLocation::Header { name, prefix } => {
            let v = std::str::from_utf8(head.headers.get(name.as_bytes())?).ok()?;
            let v = v.trim();
            let t = if prefix.is_empty() {
                v
            } else if v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix) {
                // `Bearer` is case-insensitive (RFC 6750 §2.1).
                v[prefix.len()..].trim_start()
            } else {
                return None;
            };
            (!t.is_empty()).then_some(t)
        }
        TokenLocation::Param(name) => head.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name && !v.is_empty()).then_some(v)
        }),
        TokenLocation::Cookie(name) => head.headers.get_all(b"cookie").find_map(|c| {
            std::str::from_utf8(c).ok()?.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name && !v.is_empty()).then_some(v)
            })
        }),
    }
}

/// Rewrites the request for a verified token: the token removed from its header unless
/// `forwardOriginalToken`, claims copied into headers, the payload into its header.
pub fn apply_outputs(head: &mut RequestHead, provider: &JwtProvider, auth: &Authenticated) {
    if !provider.forward_original_token {
        if let Some(TokenLocation::Header { name, .. }) = provider.locations.get(auth.location) {
            head.headers.remove(name.as_bytes());
        }
    }
    for (header, claim) in &provider.claim_to_headers {
        let value = match auth.identity.claims.get(claim) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(serde_json::Value::Bool(b)) => b.to_string(),
            _ => continue,
        };
        // A claim is the issuer's data: never let it split a header.
        if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
            continue;
        }
        head.headers.set(header.as_bytes(), value.as_bytes());
    }
    if let (Some(header), Some(payload)) = (&provider.output_payload_to_header, &auth.payload_b64) {
        head.headers.set(header.as_bytes(), payload.as_bytes());
    }
}

/// The connection-level attributes policies read.
pub fn connection<'a>(
    peer: SocketAddr,
    local: SocketAddr,
    session: Option<&'a Session>,
) -> Connection<'a> {
    let id = session.and_then(|s| s.peer_id.as_ref());
    Connection {
        source_ip: peer.ip().to_canonical(),
        remote_ip: peer.ip().to_canonical(),
        destination_ip: local.ip().to_canonical(),
        destination_port: local.port(),
        principal: id.map(|i| i.principal()),
        namespace: id.and_then(|i| i.namespace()),
        sni: session.and_then(|s| s.sni.as_deref()),
    }
}

/// Whether an inbound request may pass: the verdict of `security.authz`, with the request's
/// token identity. Counts nothing; the caller does.
pub fn authorize<'s>(
    security: &'s Security,
    conn: &Connection,
    head: &RequestHead,
    jwt: Option<&JwtIdentity>,
) -> keel_config::authz::Verdict<'s> {
    let path = normalize_path(&head.path);
    let header = |name: &str| head.headers.get(name.as_bytes());
    let host = if head.authority.is_empty() {
        head.headers
            .get(b"host")
            .and_then(|h| std::str::from_utf8(h).ok())
            .unwrap_or("")
    } else {
        head.authority.as_str()
    };
    let http = HttpRequest {
        host,
        method: &head.method,
        path: &path,
        header: &header,
        jwt,
    };
    security.authz.evaluate(conn, Some(&http))
}
