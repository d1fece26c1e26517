//! What both sides of an HTTP/2 connection check the same way (RFC 9113): header blocks split
//! over CONTINUATION frames and their flood limit, trailers, `content-length` values, and windows
//! that may not pass 2^31-1.

use std::cell::Cell;

use super::frame::{self, ErrorCode, FrameError};
use crate::http::headers::Headers;

/// A header block arriving in pieces (HEADERS, then CONTINUATION frames).
pub(super) struct PendingBlock {
    pub stream: u32,
    pub end_stream: bool,
    pub block: Vec<u8>,
    frames: u32,
}

impl PendingBlock {
    pub fn new(stream: u32, end_stream: bool, first: &[u8]) -> PendingBlock {
        PendingBlock {
            stream,
            end_stream,
            block: first.to_vec(),
            frames: 0,
        }
    }

    /// Adds a CONTINUATION frame's fragment: a connection error (`ENHANCE_YOUR_CALM`) past
    /// `max_frames` frames or `max_bytes` bytes, the CVE-2024-27316 class of flood.
    pub fn push(
        &mut self,
        fragment: &[u8],
        max_frames: u32,
        max_bytes: usize,
    ) -> Result<(), FrameError> {
        self.frames += 1;
        self.block.extend_from_slice(fragment);
        if self.frames > max_frames || self.block.len() > max_bytes {
            return Err(FrameError::Connection(
                ErrorCode::EnhanceYourCalm,
                "CONTINUATION flood",
            ));
        }
        Ok(())
    }
}

/// A trailer block (§8.1): it must end the stream and carry no pseudo-header.
pub(super) fn check_trailers(
    id: u32,
    end_stream: bool,
    fields: &Headers,
) -> Result<(), FrameError> {
    if !end_stream {
        return Err(FrameError::Stream(
            id,
            ErrorCode::Protocol,
            "trailers without END_STREAM",
        ));
    }
    if fields.iter().any(|(n, _)| n.starts_with(b":")) {
        return Err(FrameError::Stream(
            id,
            ErrorCode::Protocol,
            "pseudo-header in trailers",
        ));
    }
    Ok(())
}

/// A `content-length` value: digits only.
pub(super) fn parse_content_length(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
}

/// Grows a send window by `delta` (a WINDOW_UPDATE, or a change of SETTINGS_INITIAL_WINDOW_SIZE);
/// false, and the window unchanged, when it would pass 2^31-1 (§6.9.1).
pub(super) fn grow_window(window: &Cell<i64>, delta: i64) -> bool {
    let w = window.get() + delta;
    if w > frame::MAX_WINDOW {
        return false;
    }
    window.set(w);
    true
}
