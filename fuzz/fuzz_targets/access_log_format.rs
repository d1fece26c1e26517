//! Fuzzes the access log format parser: any string yields pieces or an error, never a panic or a
//! hang; an accepted format has no empty literal pieces.
#![no_main]

use keel_config::access_log::{parse, Piece};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pieces) = parse(text) else { return };
    for p in &pieces {
        if let Piece::Literal(l) = p {
            assert!(!l.is_empty());
        }
    }
});
