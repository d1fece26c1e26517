//! HPACK (RFC 7541): header blocks decoded into field lists and encoded from them.
//!
//! The decoder keeps the dynamic table within the size Keel advertised, refuses integers that
//! overflow, and bounds the decoded header list (an "HPACK bomb" — a small block referencing a big
//! table entry many times — is cut off at the limit while the table stays in step with the peer).
//! The encoder uses the static table and Huffman coding; it never inserts into its dynamic table, which
//! every peer must accept (§2.3.2) and which keeps the encoder stateless per connection.

use super::huffman;

/// RFC 7541 Appendix A.
pub const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Per-entry overhead counted in table sizes (§4.1).
const ENTRY_OVERHEAD: usize = 32;

/// Why a header block was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// The block is malformed (a connection error, COMPRESSION_ERROR).
    Compression(&'static str),
    /// The decoded list exceeds the limit; the block was decoded whole (the table is in step), so
    /// only the stream is refused (431).
    TooLarge,
}

/// A table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The dynamic table, newest entry first.
#[derive(Debug, Default)]
struct DynamicTable {
    entries: std::collections::VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl DynamicTable {
    fn get(&self, i: usize) -> Option<(&[u8], &[u8])> {
        self.entries.get(i).map(|(n, v)| (&n[..], &v[..]))
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        // An entry larger than the table empties it and is not added (§4.4).
        while self.size + size > self.max {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => return,
            }
        }
        self.entries.push_front((name.into(), value.into()));
        self.size += size;
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        while self.size > self.max {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// Decodes header blocks of one connection (the table lives across blocks).
#[derive(Debug)]
pub struct Decoder {
    table: DynamicTable,
    /// The SETTINGS_HEADER_TABLE_SIZE Keel advertised: the most a size update may ask for.
    settings_max: usize,
    /// Scratch space for Huffman-decoded strings.
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    /// A decoder for a peer told `table_size` (SETTINGS_HEADER_TABLE_SIZE).
    pub fn new(table_size: usize) -> Decoder {
        Decoder {
            table: DynamicTable {
                max: table_size,
                ..Default::default()
            },
            settings_max: table_size,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Decodes `block`, handing each field to `emit` in order while the decoded list (names,
    /// values and 32 bytes per field, as SETTINGS_MAX_HEADER_LIST_SIZE counts) stays within
    /// `max_list`; beyond it, decoding goes on (the table must stay in step) without emitting,
    /// and the result is [`HpackError::TooLarge`].
    pub fn decode(
        &mut self,
        block: &[u8],
        max_list: usize,
        mut emit: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut at = 0;
        let mut list = 0usize;
        let mut fields_seen = false;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = integer(block, &mut at, 7)?;
                fields_seen = true;
                let (n, v) = lookup(&self.table, index)?;
                list += n.len() + v.len() + ENTRY_OVERHEAD;
                if list <= max_list {
                    emit(n, v);
                }
                continue;
            }
            if b & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only before the first field.
                if fields_seen {
                    return Err(HpackError::Compression("table size update after a field"));
                }
                let size = integer(block, &mut at, 5)?;
                if size > self.settings_max {
                    return Err(HpackError::Compression("table size update above the limit"));
                }
                self.table.resize(size);
                continue;
            }
            fields_seen = true;
            // Literal (§6.2): with incremental indexing (01), without (0000), never indexed (0001).
            let (prefix, index_it) = if b & 0xc0 == 0x40 {
                (6, true)
            } else {
                (4, false)
            };
            let name_index = integer(block, &mut at, prefix)?;
            self.name_buf.clear();
            self.value_buf.clear();
            if name_index == 0 {
                string(block, &mut at, &mut self.name_buf)?;
            } else {
                let (n, _) = lookup(&self.table, name_index)?;
                self.name_buf.extend_from_slice(n);
            }
            string(block, &mut at, &mut self.value_buf)?;
            list += self.name_buf.len() + self.value_buf.len() + ENTRY_OVERHEAD;
            if list <= max_list {
                emit(&self.name_buf, &self.value_buf);
            }
            if index_it {
                self.table.insert(&self.name_buf, &self.value_buf);
            }
        }
        if list > max_list {
            return Err(HpackError::TooLarge);
        }
        Ok(())
    }
}

/// The entry at HPACK `index`: static first, then the dynamic table.
fn lookup(table: &DynamicTable, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
    match index {
        0 => Err(HpackError::Compression("index 0")),
        1..=61 => {
            let (n, v) = STATIC_TABLE[index - 1];
            Ok((n.as_bytes(), v.as_bytes()))
        }
        _ => table
            .get(index - 62)
            .ok_or(HpackError::Compression("index beyond the table")),
    }
}

/// Reads an integer with an `n`-bit prefix (§5.1) at `*at`; values past 2^28 are refused (no
/// index, length or size that large is acceptable).
fn integer(block: &[u8], at: &mut usize, n: u32) -> Result<usize, HpackError> {
    let max_prefix = (1usize << n) - 1;
    let Some(&first) = block.get(*at) else {
        return Err(HpackError::Compression("truncated integer"));
    };
    *at += 1;
    let mut value = first as usize & max_prefix;
    if value < max_prefix {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let Some(&b) = block.get(*at) else {
            return Err(HpackError::Compression("truncated integer"));
        };
        *at += 1;
        value += ((b & 0x7f) as usize) << shift;
        if value > 1 << 28 || shift > 21 {
            return Err(HpackError::Compression("integer overflow"));
        }
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

/// Appends the string literal (§5.2) at `*at` to `buf`, Huffman-decoded if it is coded.
fn string(block: &[u8], at: &mut usize, buf: &mut Vec<u8>) -> Result<(), HpackError> {
    let Some(&first) = block.get(*at) else {
        return Err(HpackError::Compression("truncated string"));
    };
    let huffman = first & 0x80 != 0;
    let len = integer(block, at, 7)?;
    let Some(raw) = block.get(*at..*at + len) else {
        return Err(HpackError::Compression("string longer than the block"));
    };
    *at += len;
    if huffman {
        huffman::decode(raw, buf).map_err(|_| HpackError::Compression("bad Huffman string"))?;
    } else {
        buf.extend_from_slice(raw);
    }
    Ok(())
}

/// Bytes to set aside for the names and values a `block_len`-byte header block decodes to. A
/// block that indexes the dynamic table decodes to many times its size (a repeated request's
/// ~20 bytes to ~150), so a multiple of the block alone would regrow the list per request.
pub fn decoded_capacity(block_len: usize) -> usize {
    block_len * 2 + 256
}

/// Appends an integer with an `n`-bit prefix; `flags` holds the bits above the prefix.
pub fn encode_integer(value: usize, n: u32, flags: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << n) - 1;
    if value < max_prefix {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// Appends a string literal, Huffman-coded when that is shorter.
pub fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    let coded = huffman::encoded_len(s);
    if coded < s.len() {
        encode_integer(coded, 7, 0x80, out);
        huffman::encode(s, out);
    } else {
        encode_integer(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}

/// Static-table index of `name` with `value` (exact), or of `name` alone.
fn static_index(name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
    let Some((first, count)) = static_name(name) else {
        return (None, None);
    };
    // Entries of one name are adjacent; few carry a value (pseudo-headers, accept-encoding).
    let exact = (first..first + count).find(|&i| STATIC_TABLE[i - 1].1.as_bytes() == value);
    (exact, Some(first))
}

/// The first static-table index (1-based) of `name` and how many entries carry it: one match on
/// the name instead of a scan of the 61 entries, for every field of every block encoded.
fn static_name(name: &[u8]) -> Option<(usize, usize)> {
    let found = match name {
        b":authority" => (1, 1),
        b":method" => (2, 2),
        b":path" => (4, 2),
        b":scheme" => (6, 2),
        b":status" => (8, 7),
        b"accept-charset" => (15, 1),
        b"accept-encoding" => (16, 1),
        b"accept-language" => (17, 1),
        b"accept-ranges" => (18, 1),
        b"accept" => (19, 1),
        b"access-control-allow-origin" => (20, 1),
        b"age" => (21, 1),
        b"allow" => (22, 1),
        b"authorization" => (23, 1),
        b"cache-control" => (24, 1),
        b"content-disposition" => (25, 1),
        b"content-encoding" => (26, 1),
        b"content-language" => (27, 1),
        b"content-length" => (28, 1),
        b"content-location" => (29, 1),
        b"content-range" => (30, 1),
        b"content-type" => (31, 1),
        b"cookie" => (32, 1),
        b"date" => (33, 1),
        b"etag" => (34, 1),
        b"expect" => (35, 1),
        b"expires" => (36, 1),
        b"from" => (37, 1),
        b"host" => (38, 1),
        b"if-match" => (39, 1),
        b"if-modified-since" => (40, 1),
        b"if-none-match" => (41, 1),
        b"if-range" => (42, 1),
        b"if-unmodified-since" => (43, 1),
        b"last-modified" => (44, 1),
        b"link" => (45, 1),
        b"location" => (46, 1),
        b"max-forwards" => (47, 1),
        b"proxy-authenticate" => (48, 1),
        b"proxy-authorization" => (49, 1),
        b"range" => (50, 1),
        b"referer" => (51, 1),
        b"refresh" => (52, 1),
        b"retry-after" => (53, 1),
        b"server" => (54, 1),
        b"set-cookie" => (55, 1),
        b"strict-transport-security" => (56, 1),
        b"transfer-encoding" => (57, 1),
        b"user-agent" => (58, 1),
        b"vary" => (59, 1),
        b"via" => (60, 1),
        b"www-authenticate" => (61, 1),
        _ => return None,
    };
    Some(found)
}

/// Credentials: never indexed, by us or by any intermediary (§7.1.3).
fn is_sensitive(name: &[u8]) -> bool {
    matches!(
        name,
        b"authorization" | b"proxy-authorization" | b"cookie" | b"set-cookie"
    )
}

/// Appends one field without touching any dynamic table: an indexed static entry when one
/// matches exactly, else a literal without indexing (never indexed for credentials) naming a
/// static entry when it can. For blocks outside a connection's sequence (tests, probes).
pub fn encode_field(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let (exact, by_name) = static_index(name, value);
    if let Some(i) = exact {
        encode_integer(i, 7, 0x80, out);
        return;
    }
    literal(name, by_name, value, false, out);
}

/// A literal field (§6.2): with incremental indexing, or without (never indexed for
/// credentials); the name by `name_index` when it has one.
fn literal(name: &[u8], name_index: Option<usize>, value: &[u8], index: bool, out: &mut Vec<u8>) {
    let (prefix, flags) = match (index, is_sensitive(name)) {
        (true, _) => (6, 0x40),
        (false, true) => (4, 0x10),
        (false, false) => (4, 0x00),
    };
    match name_index {
        Some(i) => encode_integer(i, prefix, flags, out),
        None => {
            out.push(flags);
            encode_string(name, out);
        }
    }
    encode_string(value, out);
}

/// The largest dynamic table Keel's encoders keep, whatever a peer allows (the default 4096:
/// what the common fields of a request or response need, and no more memory per connection).
const ENCODER_TABLE_MAX: usize = 4096;

/// Encodes the header blocks of one connection's direction, indexing repeated fields in a
/// dynamic table that mirrors the peer's decoder, so that a field sent before costs one byte.
/// Blocks must go on the wire in the order they were encoded.
///
/// Indexed: everything but credentials (never indexed), fields whose value changes with every
/// message (`x-request-id`, trace context) and values too large to be worth a table slot.
#[derive(Debug)]
pub struct Encoder {
    table: DynamicTable,
    /// A size change to announce at the start of the next block (§4.2, §6.3).
    pending_size: Option<usize>,
    /// The last literal sent for each field that is never indexed but often repeats.
    memo: Vec<LiteralMemo>,
}

/// A literal field's encoding, kept to be copied the next time the same value goes out: a
/// response's `date` within its second, a resource's `etag` and `last-modified`. Only for
/// fields named by the static table, whose encoding does not depend on the dynamic table.
#[derive(Debug)]
struct LiteralMemo {
    name_index: usize,
    value: Vec<u8>,
    encoded: Vec<u8>,
}

/// How many field names an encoder remembers a literal for.
const LITERAL_MEMOS: usize = 8;

/// Values longer than this are encoded each time rather than remembered.
const LITERAL_MEMO_MAX: usize = 128;

impl Default for Encoder {
    fn default() -> Encoder {
        Encoder {
            table: DynamicTable {
                max: ENCODER_TABLE_MAX,
                ..Default::default()
            },
            pending_size: None,
            memo: Vec::new(),
        }
    }
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE: the table is kept at most that large.
    pub fn set_peer_max(&mut self, peer_max: usize) {
        let size = peer_max.min(ENCODER_TABLE_MAX);
        if size != self.table.max {
            self.table.resize(size);
            // Several changes before the next block: the smallest and the last must both be
            // seen (§4.2); announcing the last after a resize to it covers the evictions.
            self.pending_size = Some(size);
        }
    }

    /// Starts a header block: announces a pending table size change.
    pub fn begin(&mut self, out: &mut Vec<u8>) {
        if let Some(size) = self.pending_size.take() {
            encode_integer(size, 5, 0x20, out);
        }
    }

    /// Appends one field of the block begun with [`Encoder::begin`].
    pub fn field(&mut self, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        let (exact, static_name) = static_index(name, value);
        if let Some(i) = exact {
            encode_integer(i, 7, 0x80, out);
            return;
        }
        let sensitive = is_sensitive(name);
        let mut dynamic_name = None;
        if !sensitive {
            for (i, (n, v)) in self.table.entries.iter().enumerate() {
                if &n[..] == name {
                    if &v[..] == value {
                        encode_integer(62 + i, 7, 0x80, out);
                        return;
                    }
                    dynamic_name.get_or_insert(62 + i);
                }
            }
        }
        let index = !sensitive
            && !is_volatile(name)
            && name.len() + value.len() + ENTRY_OVERHEAD <= self.table.max / 4;
        if index {
            literal(name, static_name.or(dynamic_name), value, true, out);
            self.table.insert(name, value);
            return;
        }
        match static_name {
            Some(name_index) if !sensitive && value.len() <= LITERAL_MEMO_MAX => {
                self.memo_literal(name, name_index, value, out)
            }
            _ => literal(name, static_name.or(dynamic_name), value, false, out),
        }
    }

    /// A literal without indexing named by the static table, copied from the last one sent
    /// for that name when the value is the same, else encoded and remembered.
    fn memo_literal(&mut self, name: &[u8], name_index: usize, value: &[u8], out: &mut Vec<u8>) {
        let slot = self.memo.iter().position(|m| m.name_index == name_index);
        if let Some(m) = slot.map(|i| &self.memo[i]) {
            if m.value == value {
                out.extend_from_slice(&m.encoded);
                return;
            }
        }
        let start = out.len();
        literal(name, Some(name_index), value, false, out);
        let m = match slot {
            Some(i) => &mut self.memo[i],
            None if self.memo.len() < LITERAL_MEMOS => {
                self.memo.push(LiteralMemo {
                    name_index,
                    value: Vec::new(),
                    encoded: Vec::new(),
                });
                let last = self.memo.len() - 1;
                &mut self.memo[last]
            }
            None => return,
        };
        m.value.clear();
        m.value.extend_from_slice(value);
        m.encoded.clear();
        m.encoded.extend_from_slice(&out[start..]);
    }
}

/// Fields whose values are new in every message: indexing them would only churn the table.
fn is_volatile(name: &[u8]) -> bool {
    matches!(
        name,
        b"x-request-id"
            | b"traceparent"
            | b"tracestate"
            | b"b3"
            | b"x-b3-traceid"
            | b"x-b3-spanid"
            | b"x-b3-parentspanid"
            | b"content-length"
            | b"date"
            | b"etag"
            | b"last-modified"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name match agrees with the table itself, entry by entry, and knows no other name.
    #[test]
    fn static_lookup_agrees_with_the_table() {
        for (i, (name, value)) in STATIC_TABLE.iter().enumerate() {
            let first = STATIC_TABLE
                .iter()
                .position(|(n, _)| n == name)
                .map(|p| p + 1);
            let count = STATIC_TABLE.iter().filter(|(n, _)| n == name).count();
            assert_eq!(
                static_name(name.as_bytes()),
                first.map(|f| (f, count)),
                "{name}"
            );
            let exact = static_index(name.as_bytes(), value.as_bytes()).0;
            assert_eq!(exact, Some(i + 1), "{name}: {value}");
            assert_eq!(static_index(name.as_bytes(), b"\x01other"), (None, first));
        }
        for unknown in [&b""[..], b"x-request-id", b":statu", b"dates", b"Server"] {
            assert_eq!(static_name(unknown), None);
        }
    }

    /// RFC 7541 C.4: three requests on one connection, with Huffman coding and the dynamic table.
    #[test]
    fn encoder_reproduces_rfc_7541_c4() {
        let mut enc = Encoder::default();
        let block = |enc: &mut Encoder, fields: &[(&str, &str)]| {
            let mut out = Vec::new();
            enc.begin(&mut out);
            for (n, v) in fields {
                enc.field(n.as_bytes(), v.as_bytes(), &mut out);
            }
            out
        };
        let first = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        assert_eq!(
            block(&mut enc, &first),
            hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")
        );
        let mut second = first.to_vec();
        second.push(("cache-control", "no-cache"));
        assert_eq!(
            block(&mut enc, &second),
            hex("8286 84be 5886 a8eb 1064 9cbf")
        );
        let third = [
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ];
        assert_eq!(
            block(&mut enc, &third),
            hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")
        );
        // The table holds what the RFC's decoder table holds after C.4.3.
        assert_eq!(enc.table.size, 164);
    }

    /// Whatever the encoder sends, a decoder following the same blocks reads back: across a
    /// table that fills and evicts, a peer's smaller table size, credentials and volatile fields.
    #[test]
    fn encoder_and_decoder_stay_in_step() {
        let mut enc = Encoder::default();
        let mut dec = Decoder::new(4096);
        for round in 0..200u32 {
            if round == 100 {
                enc.set_peer_max(256);
            }
            let fields: Vec<(String, String)> = vec![
                (":status".into(), "200".into()),
                ("content-type".into(), "application/grpc".into()),
                ("x-request-id".into(), format!("id-{round}")),
                ("cookie".into(), "secret=1".into()),
                (
                    format!("x-custom-{}", round % 7),
                    format!("value-{}", round % 13),
                ),
                ("server".into(), "keel".into()),
                // Literals remembered between blocks: the same, then a new value.
                (
                    "date".into(),
                    format!("Sun, 06 Dec 2026 17:{:02}:00 GMT", round / 10),
                ),
                ("etag".into(), "\"6b159cdd-400\"".into()),
                ("content-length".into(), format!("{}", 1000 + round % 3)),
                // Too large to index, under more names than an encoder remembers.
                (
                    STATIC_TABLE[14 + (round % 12) as usize].0.into(),
                    "v".repeat(100 + (round % 2) as usize),
                ),
            ];
            let mut out = Vec::new();
            enc.begin(&mut out);
            for (n, v) in &fields {
                enc.field(n.as_bytes(), v.as_bytes(), &mut out);
            }
            let mut got = Vec::new();
            dec.decode(&out, 1 << 20, |n, v| got.push((n.to_vec(), v.to_vec())))
                .unwrap();
            let want: Vec<(Vec<u8>, Vec<u8>)> = fields
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
            assert_eq!(got, want, "round {round}");
            assert!(enc.table.size <= enc.table.max);
            // A remembered literal is byte for byte what encoding it again gives.
            for (n, v) in &fields[6..] {
                let (mut fresh, mut again) = (Vec::new(), Vec::new());
                literal(
                    n.as_bytes(),
                    static_name(n.as_bytes()).map(|f| f.0),
                    v.as_bytes(),
                    false,
                    &mut fresh,
                );
                enc.memo_literal(
                    n.as_bytes(),
                    static_name(n.as_bytes()).unwrap().0,
                    v.as_bytes(),
                    &mut again,
                );
                assert_eq!(fresh, again, "round {round}: {n}");
            }
        }
        // A repeated response costs a byte a field once indexed.
        let mut enc = Encoder::default();
        for len in [0, 2] {
            let mut out = Vec::new();
            enc.begin(&mut out);
            enc.field(b"content-type", b"application/grpc", &mut out);
            enc.field(b"server", b"keel", &mut out);
            if len > 0 {
                assert_eq!(out.len(), len, "{out:?}");
            }
        }
        // Credentials are never indexed (§7.1.3): the 0001 prefix.
        let mut out = Vec::new();
        enc.field(b"authorization", b"Bearer x", &mut out);
        assert_eq!(out[0] & 0xf0, 0x10);
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        d.decode(block, 1 << 20, |n, v| {
            out.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ))
        })
        .unwrap();
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rfc_c1_integers() {
        let mut out = Vec::new();
        encode_integer(10, 5, 0, &mut out);
        assert_eq!(out, [0x0a]);
        out.clear();
        encode_integer(1337, 5, 0, &mut out);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        let mut at = 0;
        assert_eq!(integer(&out, &mut at, 5), Ok(1337));
        out.clear();
        encode_integer(42, 8, 0, &mut out);
        assert_eq!(out, [42]);
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        let mut d = Decoder::new(4096);
        let first = decode_all(&mut d, &hex("828684410f7777772e6578616d706c652e636f6d"));
        assert_eq!(
            first,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.table.size, 57);
        let second = decode_all(&mut d, &hex("828684be58086e6f2d6361636865"));
        assert_eq!(second[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(second[4], ("cache-control".into(), "no-cache".into()));
        assert_eq!(d.table.size, 110);
        let third = decode_all(
            &mut d,
            &hex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
        );
        assert_eq!(
            third,
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.table.size, 164);
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        let first = decode_all(&mut d, &hex("828684418cf1e3c2e5f23a6ba0ab90f4ff"));
        assert_eq!(first[3], (":authority".into(), "www.example.com".into()));
        let second = decode_all(&mut d, &hex("828684be5886a8eb10649cbf"));
        assert_eq!(second[4], ("cache-control".into(), "no-cache".into()));
        let third = decode_all(
            &mut d,
            &hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
        );
        assert_eq!(third[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.table.size, 164);
    }

    #[test]
    fn rfc_c5_responses_with_eviction() {
        // Table size 256: the third response evicts.
        let mut d = Decoder::new(256);
        let first = decode_all(
            &mut d,
            &hex(
                "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
            ),
        );
        assert_eq!(first[0], (":status".into(), "302".into()));
        assert_eq!(d.table.size, 222);
        let second = decode_all(&mut d, &hex("4803333037c1c0bf"));
        assert_eq!(second[0], (":status".into(), "307".into()));
        assert_eq!(
            second[3],
            ("location".into(), "https://www.example.com".into())
        );
        assert_eq!(d.table.size, 222);
        let third = decode_all(
            &mut d,
            &hex(
                "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076657273696f6e3d31",
            ),
        );
        assert_eq!(third[0], (":status".into(), "200".into()));
        assert_eq!(third[4], ("content-encoding".into(), "gzip".into()));
        assert_eq!(d.table.size, 215);
    }

    #[test]
    fn malformed_blocks_are_compression_errors() {
        let mut d = Decoder::new(4096);
        let bad: [&[u8]; 6] = [
            &[0x80],                               // index 0
            &[0xff, 0x80],                         // truncated integer
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // integer overflow
            &[0xc0],                               // index 65: beyond an empty dynamic table
            &[0x40, 0x05, b'a'],                   // string longer than the block
            &[0x3f, 0xe2, 0x1f],                   // size update above 4096
        ];
        for block in bad {
            assert!(
                matches!(
                    d.decode(block, 1 << 20, |_, _| {}),
                    Err(HpackError::Compression(_))
                ),
                "{block:?}"
            );
        }
        // A size update after a field.
        assert!(d.decode(&[0x82, 0x20], 1 << 20, |_, _| {}).is_err());
    }

    #[test]
    fn a_bomb_is_cut_off_at_the_list_limit() {
        let mut d = Decoder::new(4096);
        // One 4000-byte entry, then 1000 references to it in a 1000-byte block.
        let mut block = vec![0x40, 0x01, b'x'];
        encode_integer(4000, 7, 0, &mut block);
        block.extend(std::iter::repeat_n(b'v', 4000));
        block.extend(std::iter::repeat_n(0xbe, 1000));
        let mut emitted = 0usize;
        let r = d.decode(&block, 64 * 1024, |n, v| emitted += n.len() + v.len());
        assert_eq!(r, Err(HpackError::TooLarge));
        assert!(emitted <= 64 * 1024);
    }

    #[test]
    fn encoded_fields_round_trip() {
        let fields = [
            (":status", "200"),
            (":status", "503"),
            ("content-type", "application/grpc"),
            ("set-cookie", "a=b"),
            ("x-custom", "Value With Spaces"),
            ("grpc-status", "0"),
            ("empty", ""),
        ];
        let mut block = Vec::new();
        for (n, v) in fields {
            encode_field(n.as_bytes(), v.as_bytes(), &mut block);
        }
        let mut d = Decoder::new(4096);
        assert_eq!(decode_all(&mut d, &block), pairs(&fields));
        assert_eq!(&block[..1], &[0x88], ":status 200 is static index 8");
    }

    /// Property: any field list (names from the static table or random, values of any bytes)
    /// round-trips through the encoder and a decoder; random blocks never panic the decoder.
    #[test]
    fn round_trip_property() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let n = (next() % 12) as usize;
            let fields: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
                .map(|_| {
                    let name = if next() % 2 == 0 {
                        STATIC_TABLE[(next() % 61) as usize].0.as_bytes().to_vec()
                    } else {
                        (0..1 + next() % 20)
                            .map(|_| b'a' + (next() % 26) as u8)
                            .collect()
                    };
                    let value = (0..next() % 300).map(|_| next() as u8).collect();
                    (name, value)
                })
                .collect();
            let mut block = Vec::new();
            for (n, v) in &fields {
                encode_field(n, v, &mut block);
            }
            let mut back = Vec::new();
            Decoder::new(4096)
                .decode(&block, usize::MAX, |n, v| {
                    back.push((n.to_vec(), v.to_vec()))
                })
                .unwrap();
            assert_eq!(back, fields);
            let junk: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let _ = Decoder::new(4096).decode(&junk, 4096, |_, _| {});
        }
    }
}
