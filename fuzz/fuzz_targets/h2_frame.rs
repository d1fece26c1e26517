//! Fuzzes the HTTP/2 frame decoder and SETTINGS parsing over a stream of frames.
//!
//! Properties: never panics; a decoded DATA or HEADERS payload lies within the frame's payload;
//! SETTINGS that apply leave values in their legal ranges.
#![no_main]

use keel_core::http::h2::frame::{self, Frame, Head, Settings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut settings = Settings::default();
    while rest.len() >= frame::HEADER_LEN {
        let head = Head::parse(rest[..frame::HEADER_LEN].try_into().unwrap());
        let body = &rest[frame::HEADER_LEN..];
        let len = (head.len as usize).min(body.len());
        let head = Head { len: len as u32, ..head };
        let payload = &body[..len];
        match frame::decode(head, payload) {
            Ok(Frame::Data { data, flow_len, .. }) => {
                assert!(data.len() <= payload.len());
                assert_eq!(flow_len as usize, payload.len());
            }
            Ok(Frame::Headers { block, .. }) | Ok(Frame::Continuation { block, .. }) => {
                assert!(block.len() <= payload.len());
            }
            Ok(Frame::Settings { ack: false, payload }) => {
                if settings.apply(payload).is_ok() {
                    assert!(settings.initial_window_size as i64 <= frame::MAX_WINDOW);
                    assert!((16_384..1 << 24).contains(&settings.max_frame_size));
                }
            }
            _ => {}
        }
        rest = &body[len..];
    }
});
