//! Fuzzes the DNS answer parser: any datagram yields an answer or an error, never a panic or a
//! hang (compression pointer loops included); addresses come only from A/AAAA records of the
//! right length.
#![no_main]

use keel_core::dns::wire::{parse_response, query, TYPE_A};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As sent: the id and name of a real query, so that answers can get past the header checks.
    let id = u16::from_be_bytes([data.first().copied().unwrap_or(0), data.get(1).copied().unwrap_or(0)]);
    let q = query(id, "api.example.test", TYPE_A).expect("a valid query");
    if let Ok(a) = parse_response(data, id, "api.example.test") {
        assert!(a.addresses.len() <= data.len() / 4);
    }
    // And the fuzzer's bytes after our own question, the usual shape of an answer.
    let mut msg = q.clone();
    msg[2] = 0x81;
    msg[3] = 0x80;
    msg.extend_from_slice(data);
    if let Some(n) = data.first() {
        msg[7] = *n;
    }
    let _ = parse_response(&msg, id, "api.example.test");
});
