//! Fuzzes the HPACK decoder, and round-trips what it decodes through the encoder.
//!
//! Properties: never panics; the decoded list never exceeds the limit handed to it; fields
//! decoded from any block, encoded again, decode to the same fields.
#![no_main]

use keel_core::http::h2::hpack::{encode_field, Decoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, block)) = data.split_first() else {
        return;
    };
    let limit = 64 + size as usize * 64;
    let mut d = Decoder::new(4096);
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
        }
    }
});
