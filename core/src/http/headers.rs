//! A header list stored in one buffer: names lower-cased, values as received, order kept.
//!
//! One allocation for the bytes and one for the index, whatever the number of headers, and the
//! lower-case names are what HTTP/2 requires on the wire.

/// Header field list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    data: Vec<u8>,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    name: (u32, u32),
    value: (u32, u32),
    removed: bool,
}

/// Room (bytes, fields) left in a request's header list for what the proxy adds
/// (x-forwarded-for, x-forwarded-proto, x-request-id, a content-length), so that the list grows
/// in place instead of reallocating both its vectors on every request.
pub const REQUEST_HEADROOM: (usize, usize) = (160, 6);

/// Room (bytes, fields) left in a response's header list for what the proxy adds
/// (connection: close, transfer-encoding: chunked).
pub const RESPONSE_HEADROOM: (usize, usize) = (48, 2);

impl Headers {
    pub fn with_capacity(bytes: usize, count: usize) -> Headers {
        Headers {
            data: Vec::with_capacity(bytes),
            entries: Vec::with_capacity(count),
        }
    }

    /// Makes room for `bytes` more bytes of names and values and `count` more fields, so that
    /// the fields about to be added (a span's propagation headers) cost one allocation at most.
    pub fn reserve(&mut self, bytes: usize, count: usize) {
        self.data.reserve(bytes);
        self.entries.reserve(count);
    }

    /// The fields among `names` (lower-case), in order: what an access log line needs of a
    /// header set, without copying the rest.
    pub fn only(&self, names: &[String]) -> Headers {
        let mut out = Headers::default();
        if names.is_empty() {
            return out;
        }
        for e in self.entries.iter().filter(|e| !e.removed) {
            let name = &self.data[e.name.0 as usize..e.name.1 as usize];
            if names.iter().any(|n| n.as_bytes() == name) {
                out.push_raw(name, &self.data[e.value.0 as usize..e.value.1 as usize]);
            }
        }
        out
    }

    /// Appends a field; the name is lower-cased.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let n0 = self.data.len();
        self.data.extend_from_slice(name);
        self.data[n0..].make_ascii_lowercase();
        self.end_field(n0 as u32, value);
    }

    /// Appends a field as it came, name case included (HTTP/2 field blocks, whose names must
    /// already be lower-case and are checked, not folded).
    pub fn push_raw(&mut self, name: &[u8], value: &[u8]) {
        let n0 = self.data.len() as u32;
        self.data.extend_from_slice(name);
        self.end_field(n0, value);
    }

    /// Appends `value` after a name written from `n0` on, and indexes the field.
    fn end_field(&mut self, n0: u32, value: &[u8]) {
        let n1 = self.data.len() as u32;
        self.data.extend_from_slice(value);
        let v1 = self.data.len() as u32;
        self.entries.push(Entry {
            name: (n0, n1),
            value: (n1, v1),
            removed: false,
        });
    }

    /// Bytes of names and values held (removed fields included).
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Replaces every field named `name` with one holding `value`.
    pub fn set(&mut self, name: &[u8], value: &[u8]) {
        self.remove(name);
        self.push(name, value);
    }

    /// Removes every field named `name` (case-insensitive); returns whether any was there.
    pub fn remove(&mut self, name: &[u8]) -> bool {
        let mut found = false;
        for i in 0..self.entries.len() {
            let e = self.entries[i];
            if !e.removed
                && self.data[e.name.0 as usize..e.name.1 as usize].eq_ignore_ascii_case(name)
            {
                self.entries[i].removed = true;
                found = true;
            }
        }
        found
    }

    /// Removes the hop-by-hop fields (RFC 9110 §7.6.1): Connection, Keep-Alive,
    /// Proxy-Connection, TE, Transfer-Encoding, Trailer, HTTP2-Settings, Upgrade unless
    /// `keep_upgrade`, and every field a Connection header names (bar `upgrade` when kept). One
    /// pass over the fields and no allocation: it runs on every request and response.
    pub fn remove_hop_by_hop(&mut self, keep_upgrade: bool) {
        let (data, entries) = (&self.data, &mut self.entries);
        let name_of = |e: &Entry| &data[e.name.0 as usize..e.name.1 as usize];
        // First the fields Connection names. Connection fields themselves are never marked here
        // (the fixed list below takes them), so every one of them is read, however many there are.
        for c in 0..entries.len() {
            let conn = entries[c];
            if conn.removed || name_of(&conn) != b"connection" {
                continue;
            }
            let value = &data[conn.value.0 as usize..conn.value.1 as usize];
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.is_empty()
                    || token.eq_ignore_ascii_case(b"connection")
                    || (keep_upgrade && token.eq_ignore_ascii_case(b"upgrade"))
                {
                    continue;
                }
                for e in entries.iter_mut() {
                    if !e.removed && name_of(e).eq_ignore_ascii_case(token) {
                        e.removed = true;
                    }
                }
            }
        }
        // Names are stored lower-case, so the fixed ones compare exactly.
        for e in entries.iter_mut() {
            let name = name_of(e);
            if matches!(
                name,
                b"connection"
                    | b"keep-alive"
                    | b"proxy-connection"
                    | b"te"
                    | b"transfer-encoding"
                    | b"trailer"
                    | b"http2-settings"
            ) || (!keep_upgrade && name == b"upgrade")
            {
                e.removed = true;
            }
        }
    }

    /// The first value of `name`.
    pub fn get<'a>(&'a self, name: &[u8]) -> Option<&'a [u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn contains(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    /// (name, value) pairs in order, names lower-case.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries.iter().filter(|e| !e.removed).map(|e| {
            (
                &self.data[e.name.0 as usize..e.name.1 as usize],
                &self.data[e.value.0 as usize..e.value.1 as usize],
            )
        })
    }

    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| !e.removed).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a comma-separated header (e.g. `connection`) lists `token`, case-insensitively.
    pub fn has_token(&self, name: &[u8], token: &[u8]) -> bool {
        self.get_all(name).any(|v| {
            v.split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_remove_set() {
        let mut h = Headers::default();
        h.push(b"Host", b"a");
        h.push(b"X-A", b"1");
        h.push(b"x-a", b"2");
        assert_eq!(h.get(b"host"), Some(&b"a"[..]));
        assert_eq!(
            h.get_all(b"X-A").collect::<Vec<_>>(),
            vec![&b"1"[..], &b"2"[..]]
        );
        assert!(h.remove(b"x-a"));
        assert_eq!(h.len(), 1);
        h.set(b"host", b"b");
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            vec![(&b"host"[..], &b"b"[..])]
        );
    }

    #[test]
    fn tokens() {
        let mut h = Headers::default();
        h.push(b"Connection", b"keep-alive, Upgrade");
        assert!(h.has_token(b"connection", b"upgrade"));
        assert!(!h.has_token(b"connection", b"close"));
    }

    fn names(h: &Headers) -> Vec<String> {
        h.iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let mut h = Headers::default();
        for (n, v) in [
            ("Host", "a"),
            ("Connection", "Keep-Alive, X-Secret ,, upgrade"),
            ("Keep-Alive", "timeout=5"),
            ("X-Secret", "1"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Trailer", "x"),
            ("Proxy-Connection", "x"),
            ("HTTP2-Settings", "x"),
            ("Upgrade", "websocket"),
            ("connection", "x-other"),
            ("X-Other", "2"),
            ("X-Kept", "3"),
        ] {
            h.push(n.as_bytes(), v.as_bytes());
        }
        let mut plain = h.clone();
        plain.remove_hop_by_hop(false);
        assert_eq!(names(&plain), ["host", "x-kept"]);
        // An upgrade being proxied keeps Upgrade even though Connection names it.
        h.remove_hop_by_hop(true);
        assert_eq!(names(&h), ["host", "upgrade", "x-kept"]);
    }

    #[test]
    fn hop_by_hop_removal_reaches_past_128_fields() {
        let mut h = Headers::default();
        for i in 0..200 {
            h.push(format!("x-{i}").as_bytes(), b"v");
        }
        h.push(b"Connection", b"x-150, x-3");
        h.push(b"te", b"trailers");
        h.remove_hop_by_hop(false);
        assert_eq!(h.len(), 198);
        assert!(!h.contains(b"x-150") && !h.contains(b"x-3") && !h.contains(b"te"));
        assert!(h.contains(b"x-149") && h.contains(b"x-199"));
    }
}
