//! HTTP/2 (RFC 9113), written for Keel: frames, HPACK and the server side of a connection, whose
//! streams run the same proxy path as HTTP/1.1 requests.

pub mod frame;
pub mod hpack;
pub mod huffman;
pub mod server;
