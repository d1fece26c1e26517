//! What both sides of an HTTP/2 connection check and apply the same way (RFC 9113): header blocks
//! split over CONTINUATION frames and their flood limit, trailers, `content-length` values,
//! windows that may not pass 2^31-1, and the peer's SETTINGS.

use std::cell::{Cell, RefCell};

use super::frame::{self, ErrorCode, FrameError};
use super::hpack::Encoder;
use super::output::{Output, RecvWindow};
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

/// Applies a peer's SETTINGS frame (not an ACK) to what our sending half obeys: the frame size and
/// stream limits, every open stream's send window moved by the change of INITIAL_WINDOW_SIZE
/// (§6.9.2), the HPACK table size; then queues the ACK.
pub(super) fn apply_peer_settings<'a>(
    io: &Output,
    encoder: &RefCell<Encoder>,
    payload: &[u8],
    stream_windows: impl Iterator<Item = &'a Cell<i64>>,
) -> Result<(), FrameError> {
    let mut settings = io.peer.get();
    let old_window = settings.initial_window_size as i64;
    settings.apply(payload)?;
    io.peer.set(settings);
    encoder
        .borrow_mut()
        .set_peer_max(settings.header_table_size as usize);
    let delta = settings.initial_window_size as i64 - old_window;
    if delta != 0 {
        for window in stream_windows {
            if !grow_window(window, delta) {
                return Err(FrameError::Connection(
                    ErrorCode::FlowControl,
                    "INITIAL_WINDOW_SIZE overflows a stream window",
                ));
            }
        }
    }
    io.wake_senders();
    io.push(frame::write_settings_ack);
    Ok(())
}

/// Takes a DATA frame's flow-controlled length (`flow_len`, padding included) from its stream's
/// receive window (§6.9): beyond it, a stream error (FLOW_CONTROL_ERROR), and the bytes, which
/// are discarded with the stream, go back to the connection's window through `credit_connection`.
/// Returns the padding, which the caller gives back to both windows at once.
pub(super) fn take_stream_data(
    window: &RecvWindow,
    id: u32,
    flow_len: u32,
    data_len: usize,
    credit_connection: impl Fn(usize),
) -> Result<usize, FrameError> {
    if !window.take(flow_len) {
        credit_connection(flow_len as usize);
        return Err(FrameError::Stream(
            id,
            ErrorCode::FlowControl,
            "DATA beyond the stream window",
        ));
    }
    Ok(flow_len as usize - data_len)
}
