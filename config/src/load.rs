//! Reading config from disk: a file or a directory of YAML files, each holding several documents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::{closest, with_suggestion, ConfigError};
use crate::locate::{self, Document};
use crate::model::*;

/// Where a resource came from, so later validation can point back at its YAML.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<PathBuf>,
    pub doc: Arc<Document>,
}

impl Origin {
    /// An error at field `path` of this resource's document.
    pub fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.doc.position(path);
        ConfigError {
            file: (*self.file).clone(),
            line,
            column,
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// A parsed resource and where it was written.
#[derive(Debug, Clone)]
pub struct Located<T> {
    pub value: Resource<T>,
    pub origin: Origin,
}

/// Every resource read from the config path, before cross-resource validation.
#[derive(Debug, Default)]
pub struct RawConfig {
    pub proxies: Vec<Located<ProxySpec>>,
    pub sidecars: Vec<Located<SidecarSpec>>,
    pub service_entries: Vec<Located<ServiceEntrySpec>>,
    pub virtual_services: Vec<Located<VirtualServiceSpec>>,
    pub gateways: Vec<Located<GatewaySpec>>,
    pub destination_rules: Vec<Located<DestinationRuleSpec>>,
    pub peer_authentications: Vec<Located<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Located<AuthorizationPolicySpec>>,
    pub request_authentications: Vec<Located<RequestAuthenticationSpec>>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// FNV-1a of every file's name and content: the config version shown in `/config_dump`.
    pub content_hash: u64,
}

const NETWORKING: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
const SECURITY: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const KEEL: &[&str] = &["keel.dev/v1alpha1"];

/// Kinds Keel knows: (kind, accepted apiVersions, implemented).
const KINDS: &[(&str, &[&str], bool)] = &[
    ("Proxy", KEEL, true),
    ("Sidecar", NETWORKING, true),
    ("ServiceEntry", NETWORKING, true),
    ("VirtualService", NETWORKING, true),
    ("DestinationRule", NETWORKING, true),
    ("Gateway", NETWORKING, true),
    ("WorkloadEntry", NETWORKING, false),
    ("PeerAuthentication", SECURITY, true),
    ("AuthorizationPolicy", SECURITY, true),
    ("RequestAuthentication", SECURITY, true),
];

/// The YAML files a config path names: the file itself, or a directory's `*.yaml`/`*.yml` in name order.
///
/// Hidden entries are skipped, which leaves out a Kubernetes ConfigMap mount's `..data` and
/// timestamped directories while following its `name.yaml` symlinks.
pub fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ConfigError::global(path, format!("cannot read config: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| ConfigError::global(path, format!("cannot list config directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry
            .map_err(|e| ConfigError::global(path, format!("cannot list config directory: {e}")))?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if !yaml || name.starts_with('.') || !p.is_file() {
            continue;
        }
        files.push(p);
    }
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::global(
            path,
            "no *.yaml or *.yml files in config directory",
        ));
    }
    Ok(files)
}

/// FNV-1a, for the config version.
pub(crate) fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

/// Reads and parses every resource under `path`, collecting every error rather than stopping at the first.
pub fn read(path: &Path) -> Result<RawConfig, Vec<ConfigError>> {
    let files = config_files(path).map_err(|e| vec![e])?;
    let mut raw = RawConfig {
        content_hash: 0xcbf2_9ce4_8422_2325,
        ..Default::default()
    };
    let mut errors = Vec::new();
    for file in &files {
        match std::fs::read(file) {
            Ok(bytes) => {
                fnv1a(&mut raw.content_hash, file.to_string_lossy().as_bytes());
                fnv1a(&mut raw.content_hash, &bytes);
                match String::from_utf8(bytes) {
                    Ok(text) => parse_file(file, &text, &mut raw, &mut errors),
                    Err(_) => errors.push(ConfigError::global(file, "file is not valid UTF-8")),
                }
            }
            Err(e) => errors.push(ConfigError::global(file, format!("cannot read: {e}"))),
        }
    }
    raw.files = files;
    if errors.is_empty() {
        Ok(raw)
    } else {
        Err(errors)
    }
}

/// Parses the documents of one file's text into `raw`; `file` only labels errors.
pub fn parse_file(file: &Path, text: &str, raw: &mut RawConfig, errors: &mut Vec<ConfigError>) {
    let file = Arc::new(file.to_path_buf());
    let source: Arc<str> = Arc::from(text);
    for doc in locate::split(&source) {
        if doc.empty {
            continue;
        }
        let origin = Origin {
            file: file.clone(),
            doc: Arc::new(doc),
        };
        let doc = origin.doc.clone();
        let body = doc.body(text);
        if parse_quickly(body, &origin, raw) {
            continue;
        }
        if let Some(e) = origin.doc.syntax_error() {
            errors.push(ConfigError {
                file: (*file).clone(),
                line: e.line,
                column: e.column,
                path: String::new(),
                message: format!("YAML syntax error: {}", e.message),
            });
            continue;
        }
        if let Err(e) = parse_document(body, origin, raw) {
            errors.push(e);
        }
    }
}

/// The common case in one pass: a document whose top-level `apiVersion` and `kind` lines name an
/// implemented kind, and which deserializes without error. False when anything is off; the caller
/// then takes the careful path, which finds and explains the problem.
fn parse_quickly(body: &str, origin: &Origin, raw: &mut RawConfig) -> bool {
    let top = |key: &str| {
        body.lines().find_map(|l| {
            let v = l.strip_prefix(key)?.strip_prefix(':')?;
            let v = v.split(" #").next().unwrap_or(v).trim();
            (!v.is_empty() && !v.starts_with(['"', '\'', '&', '*', '!', '{', '['])).then_some(v)
        })
    };
    let (Some(kind), Some(api_version)) = (top("kind"), top("apiVersion")) else {
        return false;
    };
    let Some((_, versions, true)) = KINDS.iter().find(|(k, ..)| *k == kind) else {
        return false;
    };
    if !versions.contains(&api_version) {
        return false;
    }
    fn typed<T: DeserializeOwned + std::fmt::Debug>(
        body: &str,
        origin: &Origin,
        kind: &str,
        api_version: &str,
    ) -> Option<Located<T>> {
        let value: Resource<T> = match crate::fast_yaml::from_str(body) {
            Ok(value) => {
                cross_check(body, &value);
                value
            }
            Err(_) => serde_saphyr::from_str_with_options(body, parse_options()).ok()?,
        };
        (value.kind == kind && value.api_version == api_version).then(|| Located {
            value,
            origin: origin.clone(),
        })
    }
    let pushed = match kind {
        "Proxy" => typed(body, origin, kind, api_version).map(|r| raw.proxies.push(r)),
        "Sidecar" => typed(body, origin, kind, api_version).map(|r| raw.sidecars.push(r)),
        "ServiceEntry" => {
            typed(body, origin, kind, api_version).map(|r| raw.service_entries.push(r))
        }
        "VirtualService" => {
            typed(body, origin, kind, api_version).map(|r| raw.virtual_services.push(r))
        }
        "DestinationRule" => {
            typed(body, origin, kind, api_version).map(|r| raw.destination_rules.push(r))
        }
        "Gateway" => typed(body, origin, kind, api_version).map(|r| raw.gateways.push(r)),
        "PeerAuthentication" => {
            typed(body, origin, kind, api_version).map(|r| raw.peer_authentications.push(r))
        }
        "AuthorizationPolicy" => {
            typed(body, origin, kind, api_version).map(|r| raw.authorization_policies.push(r))
        }
        "RequestAuthentication" => {
            typed(body, origin, kind, api_version).map(|r| raw.request_authentications.push(r))
        }
        _ => None,
    };
    pushed.is_some()
}

/// Debug builds (every test run) read each document the fast reader accepted with serde-saphyr too
/// and insist on the same value: the fast reader must never read a document differently.
fn cross_check<T: DeserializeOwned + std::fmt::Debug>(body: &str, fast: &T) {
    if cfg!(debug_assertions) {
        if let Err(e) = crate::fast_yaml::check_against_serde_saphyr(body, fast) {
            panic!("{e}");
        }
    }
}

/// serde-saphyr as Keel reads config: YAML 1.2 booleans only, no source snippets in errors.
pub(crate) fn parse_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.with_snippet = false;
    options
}

fn parse_document(body: &str, origin: Origin, raw: &mut RawConfig) -> Result<(), ConfigError> {
    let meta: TypeMeta = deserialize(body, &origin)?;
    let kind = meta
        .kind
        .ok_or_else(|| origin.error("", "missing field `kind`"))?;
    let api_version = meta
        .api_version
        .ok_or_else(|| origin.error("", "missing field `apiVersion`"))?;
    let Some((_, versions, implemented)) = KINDS.iter().find(|(k, ..)| *k == kind) else {
        let hint = closest(&kind, KINDS.iter().map(|(k, ..)| *k))
            .map(|k| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        let known: Vec<&str> = KINDS.iter().filter(|k| k.2).map(|(k, ..)| *k).collect();
        return Err(origin.error(
            "kind",
            format!(
                "unknown kind `{kind}`{hint}; Keel reads {}",
                known.join(", ")
            ),
        ));
    };
    if !versions.contains(&api_version.as_str()) {
        return Err(origin.error(
            "apiVersion",
            format!(
                "apiVersion `{api_version}` is not valid for kind {kind}; expected one of {}",
                versions.join(", ")
            ),
        ));
    }
    if !implemented {
        return Err(origin.error("kind", format!("kind {kind} is not supported yet")));
    }
    match kind.as_str() {
        "Proxy" => raw.proxies.push(located(body, origin)?),
        "Sidecar" => raw.sidecars.push(located(body, origin)?),
        "ServiceEntry" => raw.service_entries.push(located(body, origin)?),
        "VirtualService" => raw.virtual_services.push(located(body, origin)?),
        "DestinationRule" => raw.destination_rules.push(located(body, origin)?),
        "Gateway" => raw.gateways.push(located(body, origin)?),
        "PeerAuthentication" => raw.peer_authentications.push(located(body, origin)?),
        "AuthorizationPolicy" => raw.authorization_policies.push(located(body, origin)?),
        "RequestAuthentication" => raw.request_authentications.push(located(body, origin)?),
        _ => return Err(origin.error("kind", format!("kind {kind} is not supported yet"))),
    }
    Ok(())
}

/// Deserializes one document as a resource that remembers where it was written.
fn located<T: DeserializeOwned>(body: &str, origin: Origin) -> Result<Located<T>, ConfigError> {
    Ok(Located {
        value: deserialize(body, &origin)?,
        origin,
    })
}

/// Deserializes one document, turning a failure into an error with file, line, column and field path.
fn deserialize<T: DeserializeOwned>(body: &str, origin: &Origin) -> Result<T, ConfigError> {
    let mut path = String::new();
    let result =
        serde_saphyr::with_deserializer_from_str_with_options(body, parse_options(), |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                path = e.path().to_string();
                e.into_inner()
            })
        });
    result.map_err(|e| {
        // serde_path_to_error writes `?` for a segment it could not name (e.g. a duplicate key).
        let path = path
            .trim_end_matches(".?")
            .trim_end_matches('?')
            .trim_end_matches('.')
            .to_string();
        let (line, column) = match e.location() {
            Some(l) if l.line() > 0 => (
                l.line() as usize + origin.doc.first_line - 1,
                l.column() as usize,
            ),
            _ => origin.doc.position(&path),
        };
        ConfigError {
            file: (*origin.file).clone(),
            line,
            column,
            path,
            message: with_suggestion(&error_message(&e)),
        }
    })
}

/// serde-saphyr's message without the position it appends (we print our own, in file coordinates).
fn error_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let text = text.lines().next().unwrap_or_default().trim().to_string();
    let text = match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    text.trim_end_matches(", set DuplicateKeyPolicy in Options if acceptable")
        .to_string()
}
