//! HTTP: a protocol-neutral request/response model, the HTTP/1.1 codec, routing and the proxy path.
//!
//! Codecs turn wire bytes into [`head::RequestHead`] / [`head::ResponseHead`] plus a streamed body;
//! routing and forwarding work on those alone, so HTTP/2 can plug in beside HTTP/1.1.

pub mod body;
pub mod conn;
pub mod connect;
pub mod downstream;
pub mod h1;
pub mod h2;
pub mod head;
pub mod headers;
pub mod mirror;
pub mod pool;
pub mod proxy;
pub mod replay;
