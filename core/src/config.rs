//! Loading a config the way workers run it: compiled, and with its TLS contexts built, so that a
//! bad certificate is a config error found before anything is swapped in.

use std::path::Path;

use keel_config::{ConfigErrors, Snapshot};
use keel_tls::TlsContexts;

/// Reads, validates and compiles the config at `path`, then builds its TLS contexts. DNS
/// ServiceEntries are not resolved (`keel validate`): see [`load_resolving`].
pub fn load(path: &Path) -> Result<(Snapshot, TlsContexts), ConfigErrors> {
    let snapshot = keel_config::load(path)?;
    let tls = keel_tls::build(&snapshot).map_err(ConfigErrors)?;
    Ok((snapshot, tls))
}

/// [`load`] for a config that is going to run: DNS ServiceEntries resolved by the process's
/// resolver (which then keeps just the names this config uses).
pub fn load_resolving(path: &Path) -> Result<(Snapshot, TlsContexts), ConfigErrors> {
    let resolver = crate::dns::resolver();
    let snapshot = keel_config::load_with(path, resolver.clone())?;
    let tls = keel_tls::build(&snapshot).map_err(ConfigErrors)?;
    Ok((snapshot, tls))
}
