//! Fuzzes the protocol detection of captured connections: any first bytes are HTTP, TLS, TCP or
//! "need more", never a panic; the verdict on a prefix never contradicts the verdict on more bytes
//! (HTTP and TLS, once seen, stay so; TCP stays TCP), so a connection is never misrouted for how
//! its first segment happened to be cut.
#![no_main]

use keel_core::capture::{classify, Sniffed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = classify(data);
    for cut in 0..data.len() {
        match (classify(&data[..cut]), full) {
            (Sniffed::NeedMore, _) => {}
            (Sniffed::Tcp, Sniffed::Http) => {}
            (a, b) => assert_eq!(a, b, "prefix of {} bytes: {a:?}, whole: {b:?}", cut),
        }
    }
});
