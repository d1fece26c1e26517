//! TLS for Keel: rustls (ring provider only) contexts built from the compiled config, mesh
//! identities (SPIFFE) and their verification, and our own monoio ⇄ rustls stream adapter over
//! Keel's readiness-driven sockets. Depends on `config` (what to build) and `io` (the socket).

pub mod client_hello;
pub mod contexts;
pub mod fetch;
pub mod jwt;
mod sni;
pub mod spiffe;
pub mod stream;
pub mod transport;
pub mod verify;

pub use rustls;

pub use contexts::{build, TlsContexts, UpstreamContext};
pub use spiffe::SpiffeId;
pub use stream::{Session, TlsStream};
pub use transport::Transport;
