//! AuthorizationPolicy, compiled: every matcher is built at load, so that a request or a
//! connection is judged without allocating or parsing anything.
//!
//! Istio's semantics: DENY policies are evaluated first (any match refuses), then ALLOW policies
//! (if there is at least one, a request must match one of them), and AUDIT policies only mark.
//! On a TCP listener the HTTP-only parts of a rule (hosts, methods, paths, request principals,
//! request headers and JWT claims) cannot be judged: an ALLOW rule that names any of them never
//! matches, and in a DENY or AUDIT rule they are left out, making it match more — a policy is
//! never weakened by being applied to TCP.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::model::{AuthorizationPolicySpec, AuthzAction, AuthzCondition, AuthzRule};

/// A string matcher in Istio's forms: `abc` exact, `abc*` prefix, `*abc` suffix, `*` present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StrMatch {
    /// Parses one value as written in a policy.
    pub fn parse(v: &str) -> Result<StrMatch, String> {
        if v == "*" {
            return Ok(StrMatch::Presence);
        }
        let m = if let Some(rest) = v.strip_suffix('*') {
            StrMatch::Prefix(rest.into())
        } else if let Some(rest) = v.strip_prefix('*') {
            StrMatch::Suffix(rest.into())
        } else {
            StrMatch::Exact(v.into())
        };
        match &m {
            StrMatch::Exact(s) | StrMatch::Prefix(s) | StrMatch::Suffix(s) if s.contains('*') => {
                Err(format!(
                    "`{v}`: `*` may only be the whole value, its first or its last character"
                ))
            }
            _ => Ok(m),
        }
    }

    /// Whether `v` matches (case-sensitive).
    pub fn matches(&self, v: &[u8]) -> bool {
        match self {
            StrMatch::Exact(s) => v == s.as_bytes(),
            StrMatch::Prefix(s) => v.starts_with(s.as_bytes()),
            StrMatch::Suffix(s) => v.ends_with(s.as_bytes()),
            StrMatch::Presence => !v.is_empty(),
        }
    }

    /// Whether `v` matches, ignoring ASCII case (hosts).
    fn matches_ignore_case(&self, v: &[u8]) -> bool {
        let eq = |a: &[u8], b: &[u8]| a.eq_ignore_ascii_case(b);
        match self {
            StrMatch::Exact(s) => eq(v, s.as_bytes()),
            StrMatch::Prefix(s) => v.len() >= s.len() && eq(&v[..s.len()], s.as_bytes()),
            StrMatch::Suffix(s) => v.len() >= s.len() && eq(&v[v.len() - s.len()..], s.as_bytes()),
            StrMatch::Presence => !v.is_empty(),
        }
    }
}

/// An address block: a single IP (`203.0.113.4`) or a CIDR (`203.0.113.0/24`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(v: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match v.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (v, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("`{v}` is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{v}`: the prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address counts as IPv4) is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// One field of a source or operation: the values it must match (any) and must not (none).
#[derive(Debug, Clone)]
struct Field<T> {
    any: Vec<T>,
    none: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            any: Vec::new(),
            none: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn is_set(&self) -> bool {
        !self.any.is_empty() || !self.none.is_empty()
    }

    /// `hit` says whether one value matches the attribute (false when the attribute is absent).
    fn check(&self, hit: impl Fn(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&hit)) && !self.none.iter().any(hit)
    }
}

/// Who is asking, as far as the connection tells (the same for every request on it).
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's address (`source.ip`, `ipBlocks`).
    pub source_ip: IpAddr,
    /// The original client (`remote.ip`, `remoteIpBlocks`): the peer itself, as Envoy with no
    /// trusted proxies in front takes it.
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The mTLS peer's identity without `spiffe://` (`cluster.local/ns/foo/sa/bar`).
    pub principal: Option<&'a str>,
    /// The namespace in the peer's identity.
    pub namespace: Option<&'a str>,
    /// The SNI the client sent.
    pub sni: Option<&'a str>,
}

/// What a validated JWT says about the request (`request.auth.*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JwtIdentity {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    /// The whole payload.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// The HTTP request being judged.
pub struct HttpRequest<'a> {
    /// `:authority` / `Host`.
    pub host: &'a str,
    pub method: &'a str,
    /// The path as [`normalize_path`] gives it: no query, dot segments resolved.
    pub path: &'a str,
    /// A request header's value by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<&'a [u8]>,
    /// The validated JWT, if the request carried one.
    pub jwt: Option<&'a JwtIdentity>,
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Field<StrMatch>,
    request_principals: Field<StrMatch>,
    namespaces: Field<StrMatch>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    hosts: Field<StrMatch>,
    ports: Field<u16>,
    methods: Field<StrMatch>,
    paths: Field<StrMatch>,
}

/// An attribute a `when` condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    RequestHeader(Box<str>),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestAuthPrincipal,
    RequestAuthAudiences,
    RequestAuthPresenter,
    RequestAuthClaims(Vec<Box<str>>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

impl Key {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Key::RequestHeader(_)
                | Key::RequestAuthPrincipal
                | Key::RequestAuthAudiences
                | Key::RequestAuthPresenter
                | Key::RequestAuthClaims(_)
        )
    }
}

#[derive(Debug, Clone)]
enum Values {
    Strings(Field<StrMatch>),
    Ips(Field<Cidr>),
    Ports(Field<u16>),
}

#[derive(Debug, Clone)]
struct Condition {
    key: Key,
    values: Values,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    /// Names an HTTP-only field or key somewhere (an ALLOW rule like that never matches TCP).
    http_only: bool,
}

/// One policy, compiled.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `<namespace>.<name>`, as Envoy's RBAC names Istio's policies in logs.
    pub name: String,
    pub action: AuthzAction,
    rules: Vec<Rule>,
}

/// Every policy that applies to this workload, by action.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
}

/// The outcome for one request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    /// The DENY policy that refused, or the first ALLOW policy that admitted.
    pub policy: Option<&'a str>,
    /// An AUDIT policy matched.
    pub audited: bool,
}

impl Authz {
    /// Adds a compiled policy.
    pub fn push(&mut self, policy: Policy) {
        match policy.action {
            AuthzAction::Deny => self.deny.push(policy),
            AuthzAction::Audit => self.audit.push(policy),
            // CUSTOM is refused at load.
            AuthzAction::Allow | AuthzAction::Custom => self.allow.push(policy),
        }
    }

    /// No policy applies: every request is allowed without looking at it.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Every policy, DENY first, for `/config_dump`.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.deny.iter().chain(&self.allow).chain(&self.audit)
    }

    /// Judges a request (`http` set) or a TCP connection (`http` None).
    pub fn evaluate<'s>(&'s self, conn: &Connection, http: Option<&HttpRequest>) -> Verdict<'s> {
        let audited = self.audit.iter().any(|p| p.matches(conn, http));
        if let Some(p) = self.deny.iter().find(|p| p.matches(conn, http)) {
            return Verdict {
                allowed: false,
                policy: Some(&p.name),
                audited,
            };
        }
        if self.allow.is_empty() {
            return Verdict {
                allowed: true,
                policy: None,
                audited,
            };
        }
        let admitted = self.allow.iter().find(|p| p.matches(conn, http));
        Verdict {
            allowed: admitted.is_some(),
            policy: admitted.map(|p| p.name.as_str()),
            audited,
        }
    }
}

impl Policy {
    fn matches(&self, conn: &Connection, http: Option<&HttpRequest>) -> bool {
        let tcp_allow = http.is_none() && self.action == AuthzAction::Allow;
        self.rules
            .iter()
            .any(|r| !(tcp_allow && r.http_only) && r.matches(conn, http))
    }
}

impl Rule {
    fn matches(&self, conn: &Connection, http: Option<&HttpRequest>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn, http)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn, http)))
            && self.when.iter().all(|c| c.matches(conn, http))
    }
}

/// Matches an optional attribute (absent matches no value, so only `not` fields pass).
fn opt(field: &Field<StrMatch>, v: Option<&str>) -> bool {
    field.check(|m| v.is_some_and(|v| m.matches(v.as_bytes())))
}

impl Source {
    fn matches(&self, conn: &Connection, http: Option<&HttpRequest>) -> bool {
        opt(&self.principals, conn.principal)
            && opt(&self.namespaces, conn.namespace)
            && self.ip_blocks.check(|c| c.contains(conn.source_ip))
            && self.remote_ip_blocks.check(|c| c.contains(conn.remote_ip))
            && match http {
                // Ignored on TCP (see the module doc).
                None => true,
                Some(h) => opt(
                    &self.request_principals,
                    h.jwt.map(|j| j.principal.as_str()),
                ),
            }
    }
}

impl Operation {
    fn matches(&self, conn: &Connection, http: Option<&HttpRequest>) -> bool {
        self.ports.check(|p| *p == conn.destination_port)
            && match http {
                None => true,
                Some(h) => {
                    self.hosts
                        .check(|m| m.matches_ignore_case(h.host.as_bytes()))
                        && self.methods.check(|m| m.matches(h.method.as_bytes()))
                        && self.paths.check(|m| m.matches(h.path.as_bytes()))
                }
            }
    }
}

impl Condition {
    fn matches(&self, conn: &Connection, http: Option<&HttpRequest>) -> bool {
        let http = match (http, self.key.http_only()) {
            (None, true) => return true,
            (h, _) => h,
        };
        let jwt = http.and_then(|h| h.jwt);
        match (&self.key, &self.values) {
            (Key::SourceIp, Values::Ips(f)) => f.check(|c| c.contains(conn.source_ip)),
            (Key::RemoteIp, Values::Ips(f)) => f.check(|c| c.contains(conn.remote_ip)),
            (Key::DestinationIp, Values::Ips(f)) => f.check(|c| c.contains(conn.destination_ip)),
            (Key::DestinationPort, Values::Ports(f)) => f.check(|p| *p == conn.destination_port),
            (Key::SourceNamespace, Values::Strings(f)) => opt(f, conn.namespace),
            (Key::SourcePrincipal, Values::Strings(f)) => opt(f, conn.principal),
            (Key::ConnectionSni, Values::Strings(f)) => opt(f, conn.sni),
            (Key::RequestHeader(name), Values::Strings(f)) => {
                let v = http.and_then(|h| (h.header)(name));
                f.check(|m| v.is_some_and(|v| m.matches(v)))
            }
            (Key::RequestAuthPrincipal, Values::Strings(f)) => {
                opt(f, jwt.map(|j| j.principal.as_str()))
            }
            (Key::RequestAuthPresenter, Values::Strings(f)) => {
                opt(f, jwt.and_then(|j| j.presenter.as_deref()))
            }
            (Key::RequestAuthAudiences, Values::Strings(f)) => f.check(|m| {
                jwt.is_some_and(|j| j.audiences.iter().any(|a| m.matches(a.as_bytes())))
            }),
            (Key::RequestAuthClaims(path), Values::Strings(f)) => {
                let claim = jwt.and_then(|j| claim(&j.claims, path));
                f.check(|m| claim.is_some_and(|c| claim_matches(c, m)))
            }
            _ => false,
        }
    }
}

/// A (possibly nested) claim: `[a][b]` is `claims.a.b`.
fn claim<'a>(
    claims: &'a serde_json::Map<String, serde_json::Value>,
    path: &[Box<str>],
) -> Option<&'a serde_json::Value> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(&**first)?;
    for key in rest {
        v = v.as_object()?.get(&**key)?;
    }
    Some(v)
}

/// A string claim matches as a string; a list of strings when any element does. Istio also
/// matches a space-separated `scope`-like string only as the whole string.
fn claim_matches(v: &serde_json::Value, m: &StrMatch) -> bool {
    match v {
        serde_json::Value::String(s) => m.matches(s.as_bytes()),
        serde_json::Value::Array(items) => items
            .iter()
            .any(|i| i.as_str().is_some_and(|s| m.matches(s.as_bytes()))),
        serde_json::Value::Bool(b) => m.matches(if *b { b"true" } else { b"false" }),
        _ => false,
    }
}

/// The path policies see: the query and fragment cut off, percent-encoded unreserved characters
/// decoded and `.`/`..` segments resolved (RFC 3986 §6.2.2), as Istio's default `BASE`
/// normalization does, so that `/public/../admin` is judged as `/admin`. Borrowed when there is
/// nothing to normalize.
pub fn normalize_path(target: &str) -> Cow<'_, str> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    // Only origin-form paths are normalized (`*` and the like are matched as sent).
    if !path.starts_with('/') || (!path.contains('%') && !path.contains("/.")) {
        return Cow::Borrowed(path);
    }
    // Decode %XX of unreserved characters only (a `%2F` stays a byte of a segment, not a `/`).
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c as char);
                } else {
                    decoded.push('%');
                    decoded.push(bytes[i + 1].to_ascii_uppercase() as char);
                    decoded.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        if bytes[i] == b'%' {
            // A stray `%` is a literal percent sign: written encoded, so that no `%XX` can be
            // formed by what follows it being decoded (`%%66` is `%25f`, not `%f`).
            decoded.push_str("%25");
            i += 1;
            continue;
        }
        // Copy one whole character (the path may hold UTF-8 that a client sent raw).
        let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
        decoded.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    // Remove dot segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate().skip(1) {
        match *seg {
            "." => trailing_slash = n == last,
            ".." => {
                out.pop();
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing_slash || result.is_empty() {
        result.push('/');
    }
    Cow::Owned(result)
}

/// Compiles one policy; errors are (field path under `spec`, message).
pub fn compile_policy(
    name: String,
    spec: &AuthorizationPolicySpec,
) -> Result<Policy, Vec<(String, String)>> {
    let mut errors = Vec::new();
    let action = spec.action.unwrap_or(AuthzAction::Allow);
    if action == AuthzAction::Custom {
        errors.push((
            "spec.action".to_string(),
            "action CUSTOM (an external authorizer) is not supported yet".to_string(),
        ));
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        rules.push(compile_rule(r, &format!("spec.rules[{i}]"), &mut errors));
    }
    if errors.is_empty() {
        Ok(Policy {
            name,
            action,
            rules,
        })
    } else {
        Err(errors)
    }
}

/// One field's values and `not` values, each parsed by `parse`; a bad one is an error at its index.
fn field<T>(
    any: &[String],
    none: &[String],
    at: &str,
    names: (&str, &str),
    errors: &mut Vec<(String, String)>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Field<T> {
    let mut one = |vs: &[String], name: &str| -> Vec<T> {
        vs.iter()
            .enumerate()
            .filter_map(|(i, v)| match parse(v) {
                Ok(m) => Some(m),
                Err(e) => {
                    errors.push((format!("{at}.{name}[{i}]"), e));
                    None
                }
            })
            .collect()
    };
    Field {
        any: one(any, names.0),
        none: one(none, names.1),
    }
}

fn strings(
    any: &[String],
    none: &[String],
    at: &str,
    names: (&str, &str),
    errors: &mut Vec<(String, String)>,
) -> Field<StrMatch> {
    field(any, none, at, names, errors, StrMatch::parse)
}

fn cidrs(
    any: &[String],
    none: &[String],
    at: &str,
    names: (&str, &str),
    errors: &mut Vec<(String, String)>,
) -> Field<Cidr> {
    field(any, none, at, names, errors, Cidr::parse)
}

fn ports(
    any: &[String],
    none: &[String],
    at: &str,
    names: (&str, &str),
    errors: &mut Vec<(String, String)>,
) -> Field<u16> {
    field(any, none, at, names, errors, |v| match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("`{v}` is not a port number (1 to 65535)")),
    })
}

fn compile_rule(r: &AuthzRule, at: &str, errors: &mut Vec<(String, String)>) -> Rule {
    let mut rule = Rule::default();
    for (i, f) in r.from.iter().enumerate() {
        let s = &f.source;
        let at = format!("{at}.from[{i}].source");
        let source = Source {
            principals: strings(
                &s.principals,
                &s.not_principals,
                &at,
                ("principals", "notPrincipals"),
                errors,
            ),
            request_principals: strings(
                &s.request_principals,
                &s.not_request_principals,
                &at,
                ("requestPrincipals", "notRequestPrincipals"),
                errors,
            ),
            namespaces: strings(
                &s.namespaces,
                &s.not_namespaces,
                &at,
                ("namespaces", "notNamespaces"),
                errors,
            ),
            ip_blocks: cidrs(
                &s.ip_blocks,
                &s.not_ip_blocks,
                &at,
                ("ipBlocks", "notIpBlocks"),
                errors,
            ),
            remote_ip_blocks: cidrs(
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
                &at,
                ("remoteIpBlocks", "notRemoteIpBlocks"),
                errors,
            ),
        };
        rule.http_only |= source.request_principals.is_set();
        rule.from.push(source);
    }
    for (i, t) in r.to.iter().enumerate() {
        let o = &t.operation;
        let at = format!("{at}.to[{i}].operation");
        let op = Operation {
            hosts: strings(&o.hosts, &o.not_hosts, &at, ("hosts", "notHosts"), errors),
            ports: ports(&o.ports, &o.not_ports, &at, ("ports", "notPorts"), errors),
            methods: strings(
                &o.methods,
                &o.not_methods,
                &at,
                ("methods", "notMethods"),
                errors,
            ),
            paths: strings(&o.paths, &o.not_paths, &at, ("paths", "notPaths"), errors),
        };
        rule.http_only |= op.hosts.is_set() || op.methods.is_set() || op.paths.is_set();
        rule.to.push(op);
    }
    for (i, c) in r.when.iter().enumerate() {
        let at = format!("{at}.when[{i}]");
        if let Some(c) = compile_condition(c, &at, errors) {
            rule.http_only |= c.key.http_only();
            rule.when.push(c);
        }
    }
    rule
}

/// The attributes `when` may name, for the error that lists them.
const KEYS: &[&str] = &[
    "request.headers[<name>]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[<claim>]",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

/// `name[a][b]` → ["a", "b"]; None when the brackets are not well formed or empty.
fn bracketed(rest: &str) -> Option<Vec<Box<str>>> {
    let mut out = Vec::new();
    let mut rest = rest;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        if end == 0 {
            return None;
        }
        out.push(inner[..end].into());
        rest = &inner[end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

fn compile_condition(
    c: &AuthzCondition,
    at: &str,
    errors: &mut Vec<(String, String)>,
) -> Option<Condition> {
    if c.values.is_empty() && c.not_values.is_empty() {
        errors.push((
            format!("{at}.values"),
            "a condition needs values or notValues".into(),
        ));
        return None;
    }
    let key = match c.key.as_str() {
        "source.ip" => Key::SourceIp,
        "remote.ip" => Key::RemoteIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "request.auth.principal" => Key::RequestAuthPrincipal,
        "request.auth.audiences" => Key::RequestAuthAudiences,
        "request.auth.presenter" => Key::RequestAuthPresenter,
        "destination.ip" => Key::DestinationIp,
        "destination.port" => Key::DestinationPort,
        "connection.sni" => Key::ConnectionSni,
        k => {
            if let Some(rest) = k.strip_prefix("request.headers") {
                match bracketed(rest) {
                    Some(names) if names.len() == 1 => {
                        Key::RequestHeader(names[0].to_ascii_lowercase().into())
                    }
                    _ => {
                        errors.push((
                            format!("{at}.key"),
                            format!("`{k}`: write request.headers[<header name>]"),
                        ));
                        return None;
                    }
                }
            } else if let Some(rest) = k.strip_prefix("request.auth.claims") {
                match bracketed(rest) {
                    Some(path) => Key::RequestAuthClaims(path),
                    None => {
                        errors.push((
                            format!("{at}.key"),
                            format!("`{k}`: write request.auth.claims[<claim>] (nested: [a][b])"),
                        ));
                        return None;
                    }
                }
            } else {
                // Compared without the bracketed part, where most of a typo's distance is not.
                let stem = |s: &'static str| s.split('[').next().unwrap_or(s);
                let hint = crate::error::closest(
                    k.split('[').next().unwrap_or(k),
                    KEYS.iter().map(|s| stem(s)),
                )
                .and_then(|s| KEYS.iter().find(|full| stem(full) == s))
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
                errors.push((
                    format!("{at}.key"),
                    format!(
                        "`{k}` is not an attribute Keel knows{hint}; one of {}",
                        KEYS.join(", ")
                    ),
                ));
                return None;
            }
        }
    };
    let names = ("values", "notValues");
    let values = match key {
        Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
            Values::Ips(cidrs(&c.values, &c.not_values, at, names, errors))
        }
        Key::DestinationPort => Values::Ports(ports(&c.values, &c.not_values, at, names, errors)),
        _ => Values::Strings(strings(&c.values, &c.not_values, at, names, errors)),
    };
    Some(Condition { key, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        let spec: AuthorizationPolicySpec = serde_saphyr::from_str(yaml).unwrap();
        compile_policy("foo.p".into(), &spec).unwrap()
    }

    fn authz(yamls: &[&str]) -> Authz {
        let mut a = Authz::default();
        for y in yamls {
            a.push(policy(y));
        }
        a
    }

    fn conn(principal: Option<&'static str>) -> Connection<'static> {
        Connection {
            source_ip: "10.0.0.7".parse().unwrap(),
            remote_ip: "10.0.0.7".parse().unwrap(),
            destination_ip: "127.0.0.1".parse().unwrap(),
            destination_port: 9080,
            principal,
            namespace: principal.and_then(|p| p.split('/').nth(2)),
            sni: None,
        }
    }

    fn no_headers<'a>(_: &str) -> Option<&'a [u8]> {
        None
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        header: &'a dyn Fn(&str) -> Option<&'a [u8]>,
        jwt: Option<&'a JwtIdentity>,
    ) -> HttpRequest<'a> {
        HttpRequest {
            host: "reviews.foo:9080",
            method,
            path,
            header,
            jwt,
        }
    }

    fn get<'a>(method: &'a str, path: &'a str) -> HttpRequest<'a> {
        req(method, path, &no_headers, None)
    }

    #[test]
    fn string_forms() {
        assert_eq!(StrMatch::parse("*").unwrap(), StrMatch::Presence);
        assert!(StrMatch::parse("/api/*").unwrap().matches(b"/api/x"));
        assert!(StrMatch::parse("*.svc").unwrap().matches(b"a.svc"));
        assert!(!StrMatch::parse("abc").unwrap().matches(b"abcd"));
        assert!(StrMatch::parse("a*b").is_err());
        assert!(!StrMatch::Presence.matches(b""));
    }

    #[test]
    fn cidrs_contain() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.9.8.7".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    #[test]
    fn deny_not_in_namespace() {
        // Istio's example: deny requests from sources outside namespace foo.
        let a = authz(&[
            "action: DENY\nrules:\n- from:\n  - source:\n      notNamespaces: [\"foo\"]\n",
        ]);
        let r = get("GET", "/");
        assert!(
            a.evaluate(&conn(Some("cluster.local/ns/foo/sa/a")), Some(&r))
                .allowed
        );
        let v = a.evaluate(&conn(Some("cluster.local/ns/bar/sa/a")), Some(&r));
        assert!(!v.allowed);
        assert_eq!(v.policy, Some("foo.p"));
        // No identity at all: not in foo either.
        assert!(!a.evaluate(&conn(None), Some(&r)).allowed);
    }

    #[test]
    fn allow_means_default_deny() {
        let a = authz(&["rules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n"]);
        assert!(a.evaluate(&conn(None), Some(&get("GET", "/x"))).allowed);
        assert!(!a.evaluate(&conn(None), Some(&get("POST", "/x"))).allowed);
        // No rules: allow nothing. `rules: [{}]`: allow everything.
        assert!(
            !authz(&["{}"])
                .evaluate(&conn(None), Some(&get("GET", "/")))
                .allowed
        );
        assert!(
            authz(&["rules: [{}]"])
                .evaluate(&conn(None), Some(&get("GET", "/")))
                .allowed
        );
        // DENY first, whatever ALLOW says.
        let a = authz(&[
            "rules: [{}]",
            "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/admin*\"]\n",
        ]);
        assert!(
            !a.evaluate(&conn(None), Some(&get("GET", "/admin/x")))
                .allowed
        );
        assert!(a.evaluate(&conn(None), Some(&get("GET", "/x"))).allowed);
    }

    #[test]
    fn audit_only_marks() {
        let a = authz(&["action: AUDIT\nrules:\n- to:\n  - operation:\n      paths: [\"/x\"]\n"]);
        let v = a.evaluate(&conn(None), Some(&get("GET", "/x")));
        assert!(v.allowed && v.audited);
        assert!(!a.evaluate(&conn(None), Some(&get("GET", "/y"))).audited);
    }

    #[test]
    fn tcp_ignores_http_fields_safely() {
        // ALLOW naming methods: never matches TCP, so the connection is refused.
        let a = authz(&["rules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n"]);
        assert!(!a.evaluate(&conn(None), None).allowed);
        // DENY naming methods and a port: the method is left out, the port still counts.
        let a = authz(&[
            "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n      ports: [\"9080\"]\n",
        ]);
        assert!(!a.evaluate(&conn(None), None).allowed);
        let a = authz(&[
            "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n      ports: [\"9081\"]\n",
        ]);
        assert!(a.evaluate(&conn(None), None).allowed);
        // ALLOW on principals alone applies to TCP.
        let a = authz(&[
            "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/foo/sa/*\"]\n",
        ]);
        assert!(
            a.evaluate(&conn(Some("cluster.local/ns/foo/sa/a")), None)
                .allowed
        );
        assert!(
            !a.evaluate(&conn(Some("cluster.local/ns/bar/sa/a")), None)
                .allowed
        );
    }

    #[test]
    fn conditions() {
        let a = authz(&["rules:\n- when:\n  - key: request.headers[X-Version]\n    values: [\"v1\", \"v2*\"]\n  - key: source.ip\n    notValues: [\"10.0.0.0/24\"]\n"]);
        let version = |n: &str| (n == "x-version").then_some(&b"v2beta"[..]);
        let r = req("GET", "/", &version, None);
        assert!(!a.evaluate(&conn(None), Some(&r)).allowed, "source.ip");
        let mut c = conn(None);
        c.source_ip = "192.168.1.1".parse().unwrap();
        assert!(a.evaluate(&c, Some(&r)).allowed);
        assert!(!a.evaluate(&c, Some(&get("GET", "/"))).allowed, "no header");

        let jwt = JwtIdentity {
            principal: "https://issuer/alice".into(),
            audiences: vec!["api".into()],
            presenter: None,
            claims: serde_json::from_str(r#"{"groups":["dev","ops"],"org":{"team":"core"}}"#)
                .unwrap(),
        };
        let a = authz(&["rules:\n- from:\n  - source:\n      requestPrincipals: [\"https://issuer/*\"]\n  when:\n  - key: request.auth.claims[groups]\n    values: [\"ops\"]\n  - key: request.auth.claims[org][team]\n    values: [\"core\"]\n  - key: request.auth.audiences\n    values: [\"api\"]\n"]);
        let r = req("GET", "/", &no_headers, Some(&jwt));
        assert!(a.evaluate(&conn(None), Some(&r)).allowed);
        assert!(!a.evaluate(&conn(None), Some(&get("GET", "/"))).allowed);
    }

    #[test]
    fn load_errors_name_the_field() {
        let spec: AuthorizationPolicySpec = serde_saphyr::from_str(
            "action: CUSTOM\nrules:\n- to:\n  - operation:\n      ports: [\"http\"]\n      paths: [\"/a*b\"]\n  when:\n  - key: request.header[x]\n    values: [a]\n  - key: source.ip\n    values: [\"300.1.1.1\"]\n",
        )
        .unwrap();
        let errors = compile_policy("p".into(), &spec).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.action",
                "spec.rules[0].to[0].operation.ports[0]",
                "spec.rules[0].to[0].operation.paths[0]",
                "spec.rules[0].when[0].key",
                "spec.rules[0].when[1].values[0]",
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn paths_are_normalized() {
        assert_eq!(normalize_path("/a/b?x=1"), "/a/b");
        assert!(matches!(normalize_path("/a/b"), Cow::Borrowed(_)));
        assert_eq!(normalize_path("/public/../admin"), "/admin");
        assert_eq!(normalize_path("/a/./b/."), "/a/b/");
        assert_eq!(normalize_path("/../../x"), "/x");
        assert_eq!(normalize_path("/%61dmin"), "/admin");
        assert_eq!(normalize_path("/a%2fb"), "/a%2Fb");
        assert_eq!(normalize_path("/%2E%2E/admin"), "/admin");
        assert_eq!(normalize_path("/x/.."), "/");
        assert_eq!(normalize_path("/%"), "/%25");
        assert_eq!(normalize_path("/%%66"), "/%25f");
        assert_eq!(normalize_path("*"), "*");
        assert_eq!(normalize_path("a/../b"), "a/../b");
    }
}
