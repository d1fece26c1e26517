//! TLS for Keel: rustls (ring provider) setup, certificates, SPIFFE identities, and the monoio ⇄ rustls
//! stream adapter. Nothing is implemented here yet; TLS arrives with its own issue, and until then
//! every TLS-related config field is refused at load ("not supported yet").
