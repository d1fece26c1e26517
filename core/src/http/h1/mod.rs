//! HTTP/1.1 (RFC 9112): strict head parsing over httparse, body framing, the chunked codec and head
//! serialisation. Anything ambiguous is an error here, so nothing ambiguous is ever forwarded.

pub mod chunked;
pub mod encode;
pub mod parse;

pub use parse::{parse_request, parse_response, BodyKind, HeadError, Limits};
