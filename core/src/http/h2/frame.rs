//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte header, each type's payload checked as the RFC
//! says, and writers that append frames to an output buffer.
//!
//! Decoding borrows payloads from the read buffer; the caller has already checked the length
//! against the SETTINGS_MAX_FRAME_SIZE it advertised. Every violation maps to the error the RFC
//! names, as a connection error or a stream error.

/// The client connection preface (§3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length.
pub const HEADER_LEN: usize = 9;
/// The initial SETTINGS_MAX_FRAME_SIZE (and its minimum).
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The initial flow-control window (§6.9.2).
pub const DEFAULT_WINDOW: u32 = 65_535;
/// Largest flow-control window.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PUSH_PROMISE: u8 = 5;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// Error codes (§7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    NoError = 0x0,
    Protocol = 0x1,
    Internal = 0x2,
    FlowControl = 0x3,
    SettingsTimeout = 0x4,
    StreamClosed = 0x5,
    FrameSize = 0x6,
    RefusedStream = 0x7,
    Cancel = 0x8,
    Compression = 0x9,
    Connect = 0xa,
    EnhanceYourCalm = 0xb,
    InadequateSecurity = 0xc,
    Http11Required = 0xd,
}

impl ErrorCode {
    /// The RFC's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NoError => "NO_ERROR",
            ErrorCode::Protocol => "PROTOCOL_ERROR",
            ErrorCode::Internal => "INTERNAL_ERROR",
            ErrorCode::FlowControl => "FLOW_CONTROL_ERROR",
            ErrorCode::SettingsTimeout => "SETTINGS_TIMEOUT",
            ErrorCode::StreamClosed => "STREAM_CLOSED",
            ErrorCode::FrameSize => "FRAME_SIZE_ERROR",
            ErrorCode::RefusedStream => "REFUSED_STREAM",
            ErrorCode::Cancel => "CANCEL",
            ErrorCode::Compression => "COMPRESSION_ERROR",
            ErrorCode::Connect => "CONNECT_ERROR",
            ErrorCode::EnhanceYourCalm => "ENHANCE_YOUR_CALM",
            ErrorCode::InadequateSecurity => "INADEQUATE_SECURITY",
            ErrorCode::Http11Required => "HTTP_1_1_REQUIRED",
        }
    }
}

/// A violation: of the whole connection (GOAWAY) or of one stream (RST_STREAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    Connection(ErrorCode, &'static str),
    Stream(u32, ErrorCode, &'static str),
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Head {
        Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// A decoded frame; payloads borrow the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Data {
        stream: u32,
        end_stream: bool,
        data: &'a [u8],
        /// The whole payload length, padding included: what flow control counts.
        flow_len: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        block: &'a [u8],
    },
    Priority {
        stream: u32,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    Settings {
        ack: bool,
        payload: &'a [u8],
    },
    PushPromise,
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: u32,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        block: &'a [u8],
    },
    /// An unknown type: ignored (§5.5).
    Unknown,
}

fn conn(code: ErrorCode, why: &'static str) -> FrameError {
    FrameError::Connection(code, why)
}

/// Strips padding (§6.1): the pad length byte and that many trailing bytes.
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], FrameError> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let Some((&pad, rest)) = payload.split_first() else {
        return Err(conn(
            ErrorCode::FrameSize,
            "padded frame without a pad length",
        ));
    };
    if pad as usize > rest.len() {
        return Err(conn(ErrorCode::Protocol, "padding longer than the payload"));
    }
    Ok(&rest[..rest.len() - pad as usize])
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one frame's payload.
pub fn decode(h: Head, payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    let s = h.stream;
    let on_stream = |what: &'static str| {
        if s == 0 {
            Err(conn(ErrorCode::Protocol, what))
        } else {
            Ok(())
        }
    };
    let on_connection = |what: &'static str| {
        if s != 0 {
            Err(conn(ErrorCode::Protocol, what))
        } else {
            Ok(())
        }
    };
    Ok(match h.kind {
        DATA => {
            on_stream("DATA on stream 0")?;
            Frame::Data {
                stream: s,
                end_stream: h.flags & END_STREAM != 0,
                data: unpad(h.flags, payload)?,
                flow_len: h.len,
            }
        }
        HEADERS => {
            on_stream("HEADERS on stream 0")?;
            let mut block = unpad(h.flags, payload)?;
            if h.flags & PRIORITY_FLAG != 0 {
                if block.len() < 5 {
                    return Err(conn(ErrorCode::FrameSize, "HEADERS priority too short"));
                }
                if u32_at(block) & 0x7fff_ffff == s {
                    return Err(FrameError::Stream(
                        s,
                        ErrorCode::Protocol,
                        "stream depends on itself",
                    ));
                }
                block = &block[5..];
            }
            Frame::Headers {
                stream: s,
                end_stream: h.flags & END_STREAM != 0,
                end_headers: h.flags & END_HEADERS != 0,
                block,
            }
        }
        PRIORITY => {
            on_stream("PRIORITY on stream 0")?;
            if payload.len() != 5 {
                return Err(FrameError::Stream(
                    s,
                    ErrorCode::FrameSize,
                    "PRIORITY length",
                ));
            }
            if u32_at(payload) & 0x7fff_ffff == s {
                return Err(FrameError::Stream(
                    s,
                    ErrorCode::Protocol,
                    "stream depends on itself",
                ));
            }
            Frame::Priority { stream: s }
        }
        RST_STREAM => {
            on_stream("RST_STREAM on stream 0")?;
            if payload.len() != 4 {
                return Err(conn(ErrorCode::FrameSize, "RST_STREAM length"));
            }
            Frame::RstStream {
                stream: s,
                code: u32_at(payload),
            }
        }
        SETTINGS => {
            on_connection("SETTINGS on a stream")?;
            let ack = h.flags & ACK != 0;
            if ack && !payload.is_empty() {
                return Err(conn(ErrorCode::FrameSize, "SETTINGS ACK with a payload"));
            }
            if !payload.len().is_multiple_of(6) {
                return Err(conn(
                    ErrorCode::FrameSize,
                    "SETTINGS length not a multiple of 6",
                ));
            }
            Frame::Settings { ack, payload }
        }
        PUSH_PROMISE => Frame::PushPromise,
        PING => {
            on_connection("PING on a stream")?;
            let data: [u8; 8] = payload
                .try_into()
                .map_err(|_| conn(ErrorCode::FrameSize, "PING length"))?;
            Frame::Ping {
                ack: h.flags & ACK != 0,
                data,
            }
        }
        GOAWAY => {
            on_connection("GOAWAY on a stream")?;
            if payload.len() < 8 {
                return Err(conn(ErrorCode::FrameSize, "GOAWAY length"));
            }
            Frame::GoAway {
                last_stream: u32_at(payload) & 0x7fff_ffff,
                code: u32_at(&payload[4..]),
            }
        }
        WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(conn(ErrorCode::FrameSize, "WINDOW_UPDATE length"));
            }
            let increment = u32_at(payload) & 0x7fff_ffff;
            if increment == 0 {
                return Err(if s == 0 {
                    conn(ErrorCode::Protocol, "WINDOW_UPDATE of 0")
                } else {
                    FrameError::Stream(s, ErrorCode::Protocol, "WINDOW_UPDATE of 0")
                });
            }
            Frame::WindowUpdate {
                stream: s,
                increment,
            }
        }
        CONTINUATION => {
            on_stream("CONTINUATION on stream 0")?;
            Frame::Continuation {
                stream: s,
                end_headers: h.flags & END_HEADERS != 0,
                block: payload,
            }
        }
        _ => Frame::Unknown,
    })
}

/// SETTINGS parameters (§6.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub header_table_size: u32,
    pub enable_push: bool,
    pub max_concurrent_streams: Option<u32>,
    pub initial_window_size: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: Option<u32>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            header_table_size: 4096,
            enable_push: true,
            max_concurrent_streams: None,
            initial_window_size: DEFAULT_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME,
            max_header_list_size: None,
        }
    }
}

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

impl Settings {
    /// Applies a SETTINGS payload (already a multiple of 6 bytes); unknown ids are ignored.
    pub fn apply(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        for p in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([p[0], p[1]]);
            let v = u32_at(&p[2..]);
            match id {
                SETTINGS_HEADER_TABLE_SIZE => self.header_table_size = v,
                SETTINGS_ENABLE_PUSH => {
                    if v > 1 {
                        return Err(conn(ErrorCode::Protocol, "ENABLE_PUSH not 0 or 1"));
                    }
                    self.enable_push = v == 1;
                }
                SETTINGS_MAX_CONCURRENT_STREAMS => self.max_concurrent_streams = Some(v),
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    if v as i64 > MAX_WINDOW {
                        return Err(conn(
                            ErrorCode::FlowControl,
                            "INITIAL_WINDOW_SIZE too large",
                        ));
                    }
                    self.initial_window_size = v;
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME..=(1 << 24) - 1).contains(&v) {
                        return Err(conn(ErrorCode::Protocol, "MAX_FRAME_SIZE out of range"));
                    }
                    self.max_frame_size = v;
                }
                SETTINGS_MAX_HEADER_LIST_SIZE => self.max_header_list_size = Some(v),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Appends a frame header.
pub fn write_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Appends a SETTINGS frame with `params`.
pub fn write_settings(out: &mut Vec<u8>, params: &[(u16, u32)]) {
    write_head(out, params.len() * 6, SETTINGS, 0, 0);
    for (id, v) in params {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn write_settings_ack(out: &mut Vec<u8>) {
    write_head(out, 0, SETTINGS, ACK, 0);
}

pub fn write_ping(out: &mut Vec<u8>, ack: bool, data: [u8; 8]) {
    write_head(out, 8, PING, if ack { ACK } else { 0 }, 0);
    out.extend_from_slice(&data);
}

pub fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    write_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

pub fn write_rst(out: &mut Vec<u8>, stream: u32, code: ErrorCode) {
    write_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&(code as u32).to_be_bytes());
}

pub fn write_goaway(out: &mut Vec<u8>, last_stream: u32, code: ErrorCode, debug: &[u8]) {
    write_head(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.extend_from_slice(&last_stream.to_be_bytes());
    out.extend_from_slice(&(code as u32).to_be_bytes());
    out.extend_from_slice(debug);
}

/// Appends a header block as HEADERS plus as many CONTINUATION frames as `max_frame` requires.
pub fn write_headers(
    out: &mut Vec<u8>,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let mut parts = block.chunks(max_frame.max(1)).peekable();
    let mut first = true;
    if block.is_empty() {
        write_head(
            out,
            0,
            HEADERS,
            END_HEADERS | if end_stream { END_STREAM } else { 0 },
            stream,
        );
        return;
    }
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        let mut flags = if last { END_HEADERS } else { 0 };
        let kind = if first {
            if end_stream {
                flags |= END_STREAM;
            }
            HEADERS
        } else {
            CONTINUATION
        };
        write_head(out, part.len(), kind, flags, stream);
        out.extend_from_slice(part);
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(len: u32, kind: u8, flags: u8, stream: u32) -> Head {
        Head {
            len,
            kind,
            flags,
            stream,
        }
    }

    #[test]
    fn header_round_trip_ignores_the_reserved_bit() {
        let mut out = Vec::new();
        write_head(&mut out, 0x123456, HEADERS, END_HEADERS, 7);
        out[5] |= 0x80;
        let h = Head::parse(out[..9].try_into().unwrap());
        assert_eq!(h, head(0x123456, HEADERS, END_HEADERS, 7));
    }

    #[test]
    fn padding_is_removed_and_checked() {
        let payload = [3u8, b'a', b'b', 0, 0, 0];
        let f = decode(head(6, DATA, PADDED | END_STREAM, 1), &payload).unwrap();
        assert_eq!(
            f,
            Frame::Data {
                stream: 1,
                end_stream: true,
                data: b"ab",
                flow_len: 6
            }
        );
        let bad = [9u8, b'a'];
        assert!(matches!(
            decode(head(2, DATA, PADDED, 1), &bad),
            Err(FrameError::Connection(ErrorCode::Protocol, _))
        ));
    }

    #[test]
    fn rfc_9113_errors_by_frame_type() {
        use ErrorCode::*;
        let conn_err = |r: Result<Frame, FrameError>, code| matches!(r, Err(FrameError::Connection(c, _)) if c == code);
        assert!(conn_err(decode(head(1, DATA, 0, 0), b"x"), Protocol));
        assert!(conn_err(decode(head(0, HEADERS, 0, 0), b""), Protocol));
        assert!(matches!(
            decode(head(4, PRIORITY, 0, 1), &[0; 4]),
            Err(FrameError::Stream(1, FrameSize, _))
        ));
        assert!(matches!(
            decode(head(5, PRIORITY, 0, 3), &[0, 0, 0, 3, 0]),
            Err(FrameError::Stream(3, Protocol, _))
        ));
        assert!(conn_err(
            decode(head(3, RST_STREAM, 0, 1), &[0; 3]),
            FrameSize
        ));
        assert!(conn_err(
            decode(head(4, RST_STREAM, 0, 0), &[0; 4]),
            Protocol
        ));
        assert!(conn_err(decode(head(6, SETTINGS, 0, 1), &[0; 6]), Protocol));
        assert!(conn_err(
            decode(head(6, SETTINGS, ACK, 0), &[0; 6]),
            FrameSize
        ));
        assert!(conn_err(
            decode(head(5, SETTINGS, 0, 0), &[0; 5]),
            FrameSize
        ));
        assert!(conn_err(decode(head(7, PING, 0, 0), &[0; 7]), FrameSize));
        assert!(conn_err(decode(head(8, PING, 0, 1), &[0; 8]), Protocol));
        assert!(conn_err(decode(head(7, GOAWAY, 0, 0), &[0; 7]), FrameSize));
        assert!(conn_err(
            decode(head(3, WINDOW_UPDATE, 0, 0), &[0; 3]),
            FrameSize
        ));
        assert!(conn_err(
            decode(head(4, WINDOW_UPDATE, 0, 0), &[0; 4]),
            Protocol
        ));
        assert!(matches!(
            decode(head(4, WINDOW_UPDATE, 0, 5), &[0; 4]),
            Err(FrameError::Stream(5, Protocol, _))
        ));
        assert!(conn_err(decode(head(0, CONTINUATION, 0, 0), b""), Protocol));
        assert_eq!(decode(head(0, 0xfa, 0, 0), b""), Ok(Frame::Unknown));
    }

    #[test]
    fn settings_values_are_checked() {
        let mut s = Settings::default();
        let mut p = Vec::new();
        write_settings(
            &mut p,
            &[
                (SETTINGS_MAX_FRAME_SIZE, 1 << 20),
                (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 30),
                (0x99, 5),
            ],
        );
        s.apply(&p[9..]).unwrap();
        assert_eq!(
            (s.max_frame_size, s.initial_window_size),
            (1 << 20, 1 << 30)
        );
        for (id, v, code) in [
            (SETTINGS_ENABLE_PUSH, 2, ErrorCode::Protocol),
            (
                SETTINGS_INITIAL_WINDOW_SIZE,
                1 << 31,
                ErrorCode::FlowControl,
            ),
            (SETTINGS_MAX_FRAME_SIZE, 16_383, ErrorCode::Protocol),
            (SETTINGS_MAX_FRAME_SIZE, 1 << 24, ErrorCode::Protocol),
        ] {
            let mut p = Vec::new();
            write_settings(&mut p, &[(id, v)]);
            assert!(matches!(s.apply(&p[9..]), Err(FrameError::Connection(c, _)) if c == code));
        }
    }

    #[test]
    fn header_blocks_split_into_continuations() {
        let mut out = Vec::new();
        write_headers(&mut out, 3, &[7u8; 40], true, 16);
        let kinds: Vec<(u8, u8, u32)> = {
            let mut at = 0;
            let mut v = Vec::new();
            while at < out.len() {
                let h = Head::parse(out[at..at + 9].try_into().unwrap());
                v.push((h.kind, h.flags, h.len));
                at += 9 + h.len as usize;
            }
            v
        };
        assert_eq!(
            kinds,
            vec![
                (HEADERS, END_STREAM, 16),
                (CONTINUATION, 0, 16),
                (CONTINUATION, END_HEADERS, 8)
            ]
        );
    }
}
