//! HTTP/2 (RFC 9113), written for Keel: frames, HPACK, the sending half both sides share, the
//! server side of a connection (whose streams run the same proxy path as HTTP/1.1 requests) and
//! the client side (multiplexed upstream connections).

pub mod client;
pub mod frame;
pub mod hpack;
pub mod huffman;
mod output;
mod rules;
pub mod server;
