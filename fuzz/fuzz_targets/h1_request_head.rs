//! Fuzzes the HTTP/1.1 request head parser.
//!
//! Properties: never panics; a head we accept is one httparse also parses completely, to the same
//! length, method and target (differential); and encoding an accepted head and parsing it again
//! gives the same head (round trip).
#![no_main]

use keel_core::http::h1::{encode, parse_request, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(Some((head, len, _body))) = parse_request(data, &limits) else { return };
    assert!(len <= data.len());

    let mut fields = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(&data[..len]) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, len),
        other => panic!("we accepted a head httparse does not: {other:?}"),
    }
    assert_eq!(req.method, Some(head.method.as_str()));
    if head.path.starts_with('/') && req.path.is_some_and(|p| p.starts_with('/')) {
        assert_eq!(req.path, Some(head.path.as_str()));
    }

    if head.method != "CONNECT" && !head.authority.is_empty() {
        let mut bytes = Vec::new();
        encode::request(&head, &mut bytes);
        let (again, again_len, _) = parse_request(&bytes, &limits).expect("re-encoded head parses").expect("complete");
        assert_eq!(again_len, bytes.len());
        assert_eq!((&again.method, &again.path, &again.authority), (&head.method, &head.path, &head.authority));
        assert_eq!(again.headers.iter().collect::<Vec<_>>(), head.headers.iter().collect::<Vec<_>>());
    }
});
