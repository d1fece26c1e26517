//! Fuzzes the chunked decoder.
//!
//! Properties: never panics; the outcome (error, or body and trailers) does not depend on how the
//! input is split into reads; a body we accept, re-encoded, decodes to the same body.
#![no_main]

use keel_core::http::h1::chunked::{chunk_header, Decoder, Step};
use libfuzzer_sys::fuzz_target;

fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, bool, Vec<(Vec<u8>, Vec<u8>)>), ()> {
    let mut d = Decoder::default();
    let mut body = Vec::new();
    for piece in input.chunks(step.max(1)) {
        let mut rest = piece;
        while !rest.is_empty() && !d.is_done() {
            match d.decode(rest).map_err(|_| ())? {
                Step::Framing { consumed } => rest = &rest[consumed..],
                Step::Data { range } => {
                    body.extend_from_slice(&rest[range.clone()]);
                    rest = &rest[range.end..];
                }
            }
        }
        if d.is_done() {
            break;
        }
    }
    let trailers = d.trailers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
    Ok((body, d.is_done(), trailers))
}

fuzz_target!(|data: &[u8]| {
    let whole = decode(data, data.len());
    let split = decode(data, 1 + data.first().copied().unwrap_or(0) as usize % 7);
    assert_eq!(whole.is_ok(), split.is_ok());
    if let (Ok(a), Ok(b)) = (&whole, &split) {
        assert_eq!(a, b);
    }
    if let Ok((body, true, _)) = whole {
        let mut encoded = Vec::new();
        for piece in body.chunks(1000) {
            chunk_header(piece.len(), &mut encoded);
            encoded.extend_from_slice(piece);
            encoded.extend_from_slice(b"\r\n");
        }
        encoded.extend_from_slice(b"0\r\n\r\n");
        let (again, done, _) = decode(&encoded, encoded.len()).expect("re-encoded body decodes");
        assert!(done);
        assert_eq!(again, body);
    }
});
