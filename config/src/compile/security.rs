//! AuthorizationPolicy and RequestAuthentication: which apply to this workload, compiled.
//!
//! Both follow Istio's scoping: a resource with a selector applies to the workloads it selects in
//! its own namespace (in the root namespace, in every namespace); one without applies to its whole
//! namespace, or, in the root namespace, to the mesh. All that apply are enforced together.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{closest, not_supported, Compiler, ROOT_NAMESPACE};
use crate::authz::{compile_policy, Authz};
use crate::jwt::{Jwks, JwtProvider, KeySource, TokenLocation};
use crate::load::{Located, RawConfig};
use crate::model::*;
use crate::snapshot::{ProxySettings, Security};

/// Prefix of RequestAuthentication annotations.
const JWT_PREFIX: &str = "jwt.keel.dev/";
const JWT_KEYS: [&str; 3] = ["allow-hmac", "clock-skew", "jwks-refresh-interval"];

/// Whether a security resource (namespace, selector) applies to this workload.
fn applies(ns: &str, selector: Option<&LabelSelector>, proxy: &ProxySettings) -> bool {
    match selector.filter(|s| !s.match_labels.is_empty()) {
        Some(sel) => {
            (ns == proxy.namespace || ns == ROOT_NAMESPACE)
                && sel
                    .match_labels
                    .iter()
                    .all(|(k, v)| proxy.labels.get(k) == Some(v))
        }
        None => ns == proxy.namespace || ns == ROOT_NAMESPACE,
    }
}

/// A valid HTTP field name (RFC 9110 token), for headers a policy names.
fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Compiler {
    /// Every AuthorizationPolicy and RequestAuthentication that applies to this workload.
    pub(super) fn security(&mut self, raw: &RawConfig, proxy: &ProxySettings) -> Security {
        let mut authz = Authz::default();
        for p in &raw.authorization_policies {
            let (o, spec) = (&p.origin, &p.value.spec);
            not_supported(&mut self.errors, o, &spec.target_ref, "spec.targetRef");
            not_supported(&mut self.errors, o, &spec.target_refs, "spec.targetRefs");
            not_supported(&mut self.errors, o, &spec.provider, "spec.provider");
            let name = format!("{}.{}", p.value.metadata.namespace(), p.value.metadata.name);
            // Compiled (and so checked) whether or not it applies here.
            match compile_policy(name, spec) {
                Ok(policy) => {
                    if applies(p.value.metadata.namespace(), spec.selector.as_ref(), proxy) {
                        authz.push(policy);
                    }
                }
                Err(errors) => {
                    for (path, message) in errors {
                        self.errors.push(o.error(&path, message));
                    }
                }
            }
        }
        let mut jwt = Vec::new();
        for ra in &raw.request_authentications {
            let (o, spec) = (&ra.origin, &ra.value.spec);
            not_supported(&mut self.errors, o, &spec.target_ref, "spec.targetRef");
            not_supported(&mut self.errors, o, &spec.target_refs, "spec.targetRefs");
            let providers = self.jwt_rules(ra);
            if applies(ra.value.metadata.namespace(), spec.selector.as_ref(), proxy) {
                for p in providers {
                    if jwt.iter().any(|q: &JwtProvider| q.issuer == p.issuer) {
                        self.errors.push(o.error(
                            "spec.jwtRules",
                            format!(
                                "issuer `{}` has rules in more than one RequestAuthentication for this workload; keep one",
                                p.issuer
                            ),
                        ));
                        continue;
                    }
                    jwt.push(p);
                }
            }
        }
        Security { authz, jwt }
    }

    /// One RequestAuthentication's `jwtRules`, compiled.
    fn jwt_rules(&mut self, ra: &Located<RequestAuthenticationSpec>) -> Vec<JwtProvider> {
        let o = &ra.origin;
        let annotations = jwt_annotations(&ra.value.metadata.annotations);
        let (allow_hmac, clock_skew, refresh) = match annotations {
            Ok(a) => a,
            Err((key, message)) => {
                self.errors
                    .push(o.error(&format!("metadata.annotations.{key}"), message));
                return Vec::new();
            }
        };
        let mut out: Vec<JwtProvider> = Vec::new();
        for (i, r) in ra.value.spec.jwt_rules.iter().enumerate() {
            let at = format!("spec.jwtRules[{i}]");
            let before = self.errors.len();
            if r.issuer.is_empty() {
                self.errors
                    .push(o.error(&format!("{at}.issuer"), "issuer is required"));
            }
            if out.iter().any(|p| p.issuer == r.issuer) {
                self.errors.push(o.error(
                    &format!("{at}.issuer"),
                    format!("issuer `{}` appears in two rules; keep one", r.issuer),
                ));
            }
            let keys = match (&r.jwks, &r.jwks_uri) {
                (Some(_), Some(_)) => {
                    self.errors.push(o.error(
                        &format!("{at}.jwksUri"),
                        "set one of jwks and jwksUri (Istio would ignore jwksUri)",
                    ));
                    None
                }
                (None, None) => {
                    self.errors.push(o.error(
                        &format!("{at}.jwks"),
                        "jwks or jwksUri is required (OpenID discovery from the issuer is not supported yet)",
                    ));
                    None
                }
                (Some(text), None) => match Jwks::parse(text, allow_hmac) {
                    Ok(jwks) => Some(KeySource::Inline(Arc::new(jwks))),
                    Err(e) => {
                        self.errors
                            .push(o.error(&format!("{at}.jwks"), format!("invalid JWKS: {e}")));
                        None
                    }
                },
                (None, Some(uri)) => {
                    if uri.starts_with("http://") || uri.starts_with("https://") {
                        Some(KeySource::Remote {
                            uri: uri.clone(),
                            timeout: r.timeout.map_or(Duration::from_secs(5), |d| d.0),
                            refresh,
                        })
                    } else {
                        self.errors.push(o.error(
                            &format!("{at}.jwksUri"),
                            format!("`{uri}` is not an http:// or https:// URL"),
                        ));
                        None
                    }
                }
            };
            let mut locations = Vec::new();
            for (j, h) in r.from_headers.iter().enumerate() {
                if !header_name_ok(&h.name) {
                    self.errors.push(o.error(
                        &format!("{at}.fromHeaders[{j}].name"),
                        format!("`{}` is not a valid header name", h.name),
                    ));
                }
                locations.push(TokenLocation::Header {
                    name: h.name.to_ascii_lowercase(),
                    prefix: h.prefix.clone().unwrap_or_default(),
                });
            }
            for p in &r.from_params {
                locations.push(TokenLocation::Param(p.clone()));
            }
            for c in &r.from_cookies {
                locations.push(TokenLocation::Cookie(c.clone()));
            }
            if locations.is_empty() {
                locations = JwtProvider::default_locations();
            }
            let mut claim_to_headers = Vec::new();
            for (j, c) in r.output_claim_to_headers.iter().enumerate() {
                if !header_name_ok(&c.header) {
                    self.errors.push(o.error(
                        &format!("{at}.outputClaimToHeaders[{j}].header"),
                        format!("`{}` is not a valid header name", c.header),
                    ));
                }
                if c.claim.is_empty() {
                    self.errors.push(o.error(
                        &format!("{at}.outputClaimToHeaders[{j}].claim"),
                        "claim is required",
                    ));
                }
                claim_to_headers.push((c.header.to_ascii_lowercase(), c.claim.clone()));
            }
            if let Some(h) = &r.output_payload_to_header {
                if !header_name_ok(h) {
                    self.errors.push(o.error(
                        &format!("{at}.outputPayloadToHeader"),
                        format!("`{h}` is not a valid header name"),
                    ));
                }
            }
            let Some(keys) = keys else { continue };
            if self.errors.len() > before {
                continue;
            }
            out.push(JwtProvider {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                keys,
                locations,
                forward_original_token: r.forward_original_token.unwrap_or(false),
                output_payload_to_header: r
                    .output_payload_to_header
                    .as_ref()
                    .map(|h| h.to_ascii_lowercase()),
                claim_to_headers,
                allow_hmac,
                clock_skew,
            });
        }
        out
    }
}

/// `jwt.keel.dev/*` annotations: (allow HMAC, clock skew, JWKS refresh interval).
fn jwt_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<(bool, Duration, Duration), (String, String)> {
    let mut allow_hmac = false;
    let mut clock_skew = Duration::from_secs(60);
    let mut refresh = Duration::from_secs(300);
    for (k, v) in annotations {
        let Some(key) = k.strip_prefix(JWT_PREFIX) else {
            continue;
        };
        let err = |m: String| (k.clone(), m);
        match key {
            "allow-hmac" => {
                allow_hmac = match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(err(format!("`{v}`: write \"true\" or \"false\""))),
                }
            }
            "clock-skew" => clock_skew = crate::duration::parse(v).map_err(err)?,
            "jwks-refresh-interval" => {
                refresh = crate::duration::parse(v).map_err(err)?;
                if refresh.is_zero() {
                    return Err(err("the refresh interval must be above zero".into()));
                }
            }
            other => {
                let hint = closest(other, JWT_KEYS.iter().copied())
                    .map(|h| format!(" (did you mean `{JWT_PREFIX}{h}`?)"))
                    .unwrap_or_default();
                return Err(err(format!("unknown JWT annotation{hint}")));
            }
        }
    }
    Ok((allow_hmac, clock_skew, refresh))
}
