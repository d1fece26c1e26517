//! Keel's configuration: Istio resources and Keel's `Proxy` read from YAML, validated, and compiled
//! into one immutable [`Snapshot`].
//!
//! This crate owns the schema, every config error (always with file, line, column and field path),
//! and the compilation into listeners and clusters. It knows nothing of sockets or runtimes: the
//! proxy engine reads a snapshot; it never reads YAML.

pub mod access_log;
pub mod authz;
pub mod compile;
pub mod duration;
pub mod error;
pub mod fast_yaml;
pub mod host;
pub mod http_routes;
pub mod jwt;
pub mod load;
pub mod locate;
pub mod model;
pub mod snapshot;
pub mod watch;

pub use error::{ConfigError, ConfigErrors};
pub use snapshot::*;

use std::path::Path;

/// Reads, validates and compiles the config at `path` (a file or a directory); all errors at once.
pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let raw = load::read(path).map_err(ConfigErrors)?;
    compile::compile(raw).map_err(ConfigErrors)
}

/// [`load`], resolving DNS ServiceEntries with `dns` (the running proxy's resolver).
pub fn load_with(
    path: &Path,
    dns: std::sync::Arc<dyn compile::Dns>,
) -> Result<Snapshot, ConfigErrors> {
    let raw = load::read(path).map_err(ConfigErrors)?;
    compile::compile_with(raw, dns).map_err(ConfigErrors)
}

/// Parses, validates and compiles config given as text, as if read from a file named `name`.
///
/// Used by the fuzz target and tests; `load` is the same pipeline over files.
pub fn load_str(name: &str, text: &str) -> Result<Snapshot, ConfigErrors> {
    let mut raw = load::RawConfig::default();
    let mut errors = Vec::new();
    load::parse_file(Path::new(name), text, &mut raw, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    raw.files = vec![name.into()];
    compile::compile(raw).map_err(ConfigErrors)
}
