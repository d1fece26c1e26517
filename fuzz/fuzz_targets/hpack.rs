//! Fuzzes the HPACK decoder, and round-trips what it decodes through both encoders.
//!
//! Properties: never panics; the decoded list never exceeds the limit handed to it; fields
//! decoded from any block, encoded again — field by field, and by a connection's `Encoder` with
//! its dynamic table (whose size the input also changes) — decode to the same fields, and the
//! `Encoder`'s peer decoder stays in step across blocks.
#![no_main]

use keel_core::http::h2::hpack::{encode_field, Decoder, Encoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, block)) = data.split_first() else {
        return;
    };
    let limit = 64 + size as usize * 64;
    let mut d = Decoder::new(4096);
    // A connection's encoder and the peer decoder that mirrors it, across both blocks.
    let mut enc = Encoder::default();
    let mut peer = Decoder::new(4096);
    // Two blocks from one input exercise the dynamic table across blocks.
    let (a, b) = block.split_at(block.len() / 2);
    for part in [a, b] {
        let mut fields = Vec::new();
        let mut total = 0;
        let result = d.decode(part, limit, |n, v| {
            total += n.len() + v.len() + 32;
            fields.push((n.to_vec(), v.to_vec()));
        });
        assert!(total <= limit);
        if result.is_ok() {
            let mut again = Vec::new();
            for (n, v) in &fields {
                encode_field(n, v, &mut again);
            }
            let mut back = Vec::new();
            Decoder::new(4096)
                .decode(&again, usize::MAX, |n, v| back.push((n.to_vec(), v.to_vec())))
                .expect("our encoding decodes");
            assert_eq!(back, fields);
            enc.set_peer_max(size as usize * 32);
            let mut block = Vec::new();
            enc.begin(&mut block);
            for (n, v) in &fields {
                enc.field(n, v, &mut block);
            }
            let mut back = Vec::new();
            peer.decode(&block, usize::MAX, |n, v| back.push((n.to_vec(), v.to_vec())))
                .expect("the Encoder's block decodes");
            assert_eq!(back, fields);
        }
    }
});
