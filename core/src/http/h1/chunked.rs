//! The chunked transfer coding (RFC 9112 §7.1), decoded strictly and incrementally.
//!
//! Framing bytes are checked one by one (they are few); chunk data is handed out as ranges of the
//! input, so the bytes can be forwarded from the buffer they were read into. Sizes beyond 16 hex
//! digits, control characters in extensions, and a chunk not followed by exactly CRLF are errors.

use std::ops::Range;

use crate::http::headers::Headers;

/// Longest chunk-size line (size plus extensions) accepted.
const MAX_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

/// What one call to [`Decoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `consumed` framing bytes used; nothing for the application.
    Framing { consumed: usize },
    /// Body bytes at `range` of the input (consumed up to `range.end`).
    Data { range: Range<usize> },
}

/// Incremental chunked decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    size: u64,
    digits: usize,
    line: usize,
    trailer_bytes: usize,
    trailer_line: Vec<u8>,
    /// Trailer fields, once the body is complete.
    pub trailers: Headers,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
            trailer_bytes: 0,
            trailer_line: Vec::new(),
            trailers: Headers::default(),
        }
    }
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the start of `input`: either framing bytes, or one run of body bytes.
    /// Call again with the rest of the input until it is empty or the body is done.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        if self.state == State::Data {
            let n = (input.len() as u64).min(self.size) as usize;
            self.size -= n as u64;
            if self.size == 0 {
                self.state = State::DataCr;
            }
            return Ok(Step::Data { range: 0..n });
        }
        let mut i = 0;
        while i < input.len() && self.state != State::Data && self.state != State::Done {
            let b = input[i];
            i += 1;
            self.step(b)?;
        }
        Ok(Step::Framing { consumed: i })
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            State::Size | State::SizeWs | State::Ext => {
                self.line += 1;
                if self.line > MAX_LINE {
                    return Err(ChunkError("chunk-size line too long"));
                }
            }
            _ => {}
        }
        match self.state {
            State::Size => match (hex(b), b) {
                (Some(d), _) => {
                    self.digits += 1;
                    if self.digits > 16 {
                        return Err(ChunkError("chunk size too large"));
                    }
                    self.size = (self.size << 4) | d;
                }
                (None, _) if self.digits == 0 => return Err(ChunkError("invalid chunk size")),
                (None, b' ' | b'\t') => self.state = State::SizeWs,
                (None, b';') => self.state = State::Ext,
                (None, b'\r') => self.state = State::SizeLf,
                _ => return Err(ChunkError("invalid chunk size")),
            },
            State::SizeWs => match b {
                b' ' | b'\t' => {}
                b';' => self.state = State::Ext,
                b'\r' => self.state = State::SizeLf,
                _ => return Err(ChunkError("invalid chunk size")),
            },
            // Extensions are ignored, but must not hide line ends or control characters.
            State::Ext => match b {
                b'\r' => self.state = State::SizeLf,
                b'\t' | b' '..=b'~' | 0x80..=0xff => {}
                _ => return Err(ChunkError("invalid character in chunk extension")),
            },
            State::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError("chunk-size line not ended by CRLF"));
                }
                self.line = 0;
                self.digits = 0;
                self.state = if self.size == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                };
            }
            State::Data => unreachable_state()?,
            State::DataCr => {
                if b != b'\r' {
                    return Err(ChunkError("chunk data not followed by CRLF"));
                }
                self.state = State::DataLf;
            }
            State::DataLf => {
                if b != b'\n' {
                    return Err(ChunkError("chunk data not followed by CRLF"));
                }
                self.state = State::Size;
            }
            State::TrailerStart => match b {
                b'\r' => self.state = State::FinalLf,
                _ => {
                    self.state = State::TrailerLine;
                    self.trailer_byte(b)?;
                }
            },
            State::TrailerLine => match b {
                b'\r' => self.state = State::TrailerLf,
                _ => self.trailer_byte(b)?,
            },
            State::TrailerLf => {
                if b != b'\n' {
                    return Err(ChunkError("trailer line not ended by CRLF"));
                }
                self.finish_trailer_line()?;
                self.state = State::TrailerStart;
            }
            State::FinalLf => {
                if b != b'\n' {
                    return Err(ChunkError("chunked body not ended by CRLF"));
                }
                self.state = State::Done;
            }
            State::Done => {}
        }
        Ok(())
    }

    fn trailer_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILERS {
            return Err(ChunkError("trailers too large"));
        }
        if b == b'\n' || b == 0 || (b < b' ' && b != b'\t') || b == 0x7f {
            return Err(ChunkError("invalid character in trailer"));
        }
        self.trailer_line.push(b);
        Ok(())
    }

    fn finish_trailer_line(&mut self) -> Result<(), ChunkError> {
        let line = std::mem::take(&mut self.trailer_line);
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(ChunkError("trailer without a colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty()
            || !name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
        {
            return Err(ChunkError("invalid trailer name"));
        }
        self.trailers.push(name, value.trim_ascii());
        Ok(())
    }
}

fn unreachable_state() -> Result<(), ChunkError> {
    Err(ChunkError("decoder state error"))
}

/// The chunk-size line for `len` data bytes: `{len:x}\r\n`.
pub fn chunk_header(len: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

/// Appends the last chunk and the trailer section that ends a chunked body.
pub fn last_chunk(trailers: &Headers, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.iter() {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns the body and the decoder.
    pub(crate) fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, Decoder), ChunkError> {
        let mut d = Decoder::default();
        let mut body = Vec::new();
        for piece in input.chunks(step.max(1)) {
            let mut rest = piece;
            while !rest.is_empty() && !d.is_done() {
                match d.decode(rest)? {
                    Step::Framing { consumed } => rest = &rest[consumed..],
                    Step::Data { range } => {
                        body.extend_from_slice(&rest[range.clone()]);
                        rest = &rest[range.end..];
                    }
                }
            }
        }
        Ok((body, d))
    }

    #[test]
    fn rfc_example_with_trailers_any_split() {
        let input = b"7\r\nMozilla\r\n11\r\nDeveloper Network\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n";
        for step in 1..input.len() {
            let (body, d) = decode_all(input, step).unwrap();
            assert_eq!(body, b"MozillaDeveloper Network");
            assert!(d.is_done());
            assert_eq!(
                d.trailers.get(b"expires"),
                Some(&b"Wed, 21 Oct 2015 07:28:00 GMT"[..])
            );
        }
    }

    #[test]
    fn extensions_are_ignored() {
        let (body, d) = decode_all(b"4;name=value;q=\"x y\"\r\nRust\r\n0\r\n\r\n", 3).unwrap();
        assert_eq!(body, b"Rust");
        assert!(d.is_done());
    }

    #[test]
    fn incomplete_is_not_done() {
        let (_, d) = decode_all(b"4\r\nRu", 100).unwrap();
        assert!(!d.is_done());
    }

    #[test]
    fn smuggling_shaped_inputs_are_refused() {
        for bad in [
            &b"4\nRust\r\n0\r\n\r\n"[..],
            b"4\r\nRustX\r\n0\r\n\r\n",
            b"4\r\nRust\n0\r\n\r\n",
            b"0x4\r\nRust\r\n0\r\n\r\n",
            b"-4\r\nRust\r\n0\r\n\r\n",
            b"+4\r\nRust\r\n0\r\n\r\n",
            b"\r\n",
            b"4;a\nb\r\nRust\r\n0\r\n\r\n",
            b"4;\0\r\nRust\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"4\r\nRust\r\n0\r\nX\r\n\r\n",
            b"4\r\nRust\r\n0\r\n\n",
            b"4 4\r\nRust\r\n0\r\n\r\n",
        ] {
            assert!(
                decode_all(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_header_is_hex() {
        let mut v = Vec::new();
        chunk_header(255, &mut v);
        assert_eq!(v, b"ff\r\n");
    }
}
