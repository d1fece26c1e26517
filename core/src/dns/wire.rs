//! DNS messages (RFC 1035 §4): the A / AAAA query Keel sends and the parts of an answer it
//! reads. Everything from the wire is bounded: names by RFC 1035's limits, compression pointers
//! by a jump budget (so a pointer loop ends), records by the message's length.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Why an answer was not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Cut short, a bad name, a pointer loop, a count that does not fit.
    Malformed(&'static str),
    /// Not the answer to our question (another id, not a response, another question).
    NotOurs,
    /// The server says it failed (SERVFAIL, REFUSED, ...): its RCODE.
    Server(u8),
    /// The answer was truncated (TC): ask again over TCP.
    Truncated,
}

/// An A or AAAA query for `name` with recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    encode_name(name, &mut out)?;
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

fn encode_name(name: &str, out: &mut Vec<u8>) -> Result<(), WireError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(WireError::Malformed("name length"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(WireError::Malformed("label length"));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, WireError> {
    msg.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(WireError::Malformed("cut short"))
}

/// Reads a (possibly compressed) name at `at`: the name, lower-cased, and where it ends in the
/// message (after the first pointer, if any).
fn read_name(msg: &[u8], mut at: usize) -> Result<(String, usize), WireError> {
    let mut name = String::new();
    let mut end = None;
    // Enough for any legal name; a pointer loop exhausts it.
    let mut jumps = 0;
    loop {
        let len = *msg.get(at).ok_or(WireError::Malformed("cut short"))?;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    return Ok((name, end.unwrap_or(at + 1)));
                }
                let label = msg
                    .get(at + 1..at + 1 + usize::from(len))
                    .ok_or(WireError::Malformed("cut short"))?;
                if !name.is_empty() {
                    name.push('.');
                }
                for b in label {
                    name.push(char::from(b.to_ascii_lowercase()));
                }
                if name.len() > 253 {
                    return Err(WireError::Malformed("name too long"));
                }
                at += 1 + usize::from(len);
            }
            0xc0 => {
                let target = usize::from(u16_at(msg, at)? & 0x3fff);
                end.get_or_insert(at + 2);
                jumps += 1;
                if jumps > 64 || target >= msg.len() {
                    return Err(WireError::Malformed("bad compression pointer"));
                }
                at = target;
            }
            _ => return Err(WireError::Malformed("label type")),
        }
    }
}

/// What an answer says about the name asked: its addresses (following CNAMEs within the
/// answer) and the smallest TTL among the records used. NXDOMAIN is an empty answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    pub addresses: Vec<IpAddr>,
    pub ttl: u32,
}

/// Parses the response to query `id` for `name`.
pub fn parse_response(msg: &[u8], id: u16, name: &str) -> Result<Answer, WireError> {
    if msg.len() < 12 {
        return Err(WireError::Malformed("shorter than a header"));
    }
    let flags = u16_at(msg, 2)?;
    if u16_at(msg, 0)? != id || flags & 0x8000 == 0 {
        return Err(WireError::NotOurs);
    }
    if flags & 0x0200 != 0 {
        return Err(WireError::Truncated);
    }
    let rcode = (flags & 0x000f) as u8;
    let (qd, an) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut at = 12;
    let want = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    for _ in 0..qd {
        let (q, end) = read_name(msg, at)?;
        if q != want {
            return Err(WireError::NotOurs);
        }
        at = end + 4;
    }
    match rcode {
        0 => {}
        3 => return Ok(Answer::default()), // NXDOMAIN
        other => return Err(WireError::Server(other)),
    }
    let mut names = vec![want];
    let mut answer = Answer {
        addresses: Vec::new(),
        ttl: u32::MAX,
    };
    for _ in 0..an {
        let (owner, end) = read_name(msg, at)?;
        let rtype = u16_at(msg, end)?;
        let class = u16_at(msg, end + 2)?;
        let ttl = msg
            .get(end + 4..end + 8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(WireError::Malformed("cut short"))?;
        let len = usize::from(u16_at(msg, end + 8)?);
        let data_at = end + 10;
        let data = msg
            .get(data_at..data_at + len)
            .ok_or(WireError::Malformed("record data cut short"))?;
        at = data_at + len;
        if class != CLASS_IN || !names.contains(&owner) {
            continue;
        }
        match (rtype, len) {
            (TYPE_A, 4) => {
                answer.addresses.push(IpAddr::V4(Ipv4Addr::new(
                    data[0], data[1], data[2], data[3],
                )));
                answer.ttl = answer.ttl.min(ttl);
            }
            (TYPE_AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                answer.addresses.push(IpAddr::V6(Ipv6Addr::from(b)));
                answer.ttl = answer.ttl.min(ttl);
            }
            (TYPE_CNAME, _) => {
                let (target, _) = read_name(msg, data_at)?;
                if names.len() < 16 {
                    names.push(target);
                }
                answer.ttl = answer.ttl.min(ttl);
            }
            (TYPE_A | TYPE_AAAA, _) => return Err(WireError::Malformed("address length")),
            _ => {}
        }
    }
    if answer.ttl == u32::MAX {
        answer.ttl = 0;
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_rfc_1035_shaped() {
        let q = query(0xbeef, "www.example.com.", TYPE_A).unwrap();
        assert_eq!(
            q,
            [
                0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'w', b'w', 7, b'e', b'x',
                b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1
            ]
        );
        assert!(query(1, "", TYPE_A).is_err());
        assert!(query(1, "a..b", TYPE_A).is_err());
        assert!(query(1, &"a".repeat(64), TYPE_A).is_err());
    }

    /// A response to `q` with answers appended (each: owner pointer to the question, type, data).
    fn response(q: &[u8], rcode: u8, answers: &[(u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut m = q.to_vec();
        m[2] = 0x81;
        m[3] = 0x80 | rcode;
        m[7] = answers.len() as u8;
        for (t, ttl, data) in answers {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&[0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(data);
        }
        m
    }

    #[test]
    fn answers_with_compression_and_cname() {
        let q = query(7, "api.example.com", TYPE_A).unwrap();
        let r = response(
            &q,
            0,
            &[
                (TYPE_A, 30, vec![10, 0, 0, 1]),
                (TYPE_A, 10, vec![10, 0, 0, 2]),
            ],
        );
        let a = parse_response(&r, 7, "API.example.com").unwrap();
        assert_eq!(
            a.addresses,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
        assert_eq!(a.ttl, 10);
        // A CNAME to a name written out in the record, then that name's address (its owner a
        // pointer to the CNAME's data).
        let mut r = response(&q, 0, &[(TYPE_CNAME, 60, vec![2, b'l', b'b', 0xc0, 16])]);
        let cname_data = r.len() - 5;
        r[7] = 2;
        r.extend_from_slice(&[0xc0, cname_data as u8]);
        r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 192, 0, 2, 1]);
        let a = parse_response(&r, 7, "api.example.com").unwrap();
        assert_eq!(a.addresses, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.ttl, 5);
        // An address for a name not in the chain is ignored.
        let mut other = response(&q, 0, &[]);
        other[7] = 1;
        other.extend_from_slice(&[1, b'x', 0, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
        assert!(parse_response(&other, 7, "api.example.com")
            .unwrap()
            .addresses
            .is_empty());
    }

    #[test]
    fn errors() {
        let q = query(9, "a.test", TYPE_AAAA).unwrap();
        assert_eq!(
            parse_response(&response(&q, 3, &[]), 9, "a.test").unwrap(),
            Answer::default()
        );
        assert_eq!(
            parse_response(&response(&q, 2, &[]), 9, "a.test"),
            Err(WireError::Server(2))
        );
        assert_eq!(
            parse_response(&response(&q, 0, &[]), 8, "a.test"),
            Err(WireError::NotOurs)
        );
        assert_eq!(
            parse_response(&response(&q, 0, &[]), 9, "b.test"),
            Err(WireError::NotOurs)
        );
        assert_eq!(
            parse_response(&q, 9, "a.test"),
            Err(WireError::NotOurs),
            "a query is no answer"
        );
        let mut tc = response(&q, 0, &[]);
        tc[2] |= 0x02;
        assert_eq!(parse_response(&tc, 9, "a.test"), Err(WireError::Truncated));
        // A pointer to itself.
        let mut looped = response(&q, 0, &[]);
        looped[7] = 1;
        let at = looped.len();
        looped.extend_from_slice(&[0xc0, at as u8]);
        assert!(matches!(
            parse_response(&looped, 9, "a.test"),
            Err(WireError::Malformed(_))
        ));
        // Cut anywhere: an error, never a panic.
        let full = response(&q, 0, &[(TYPE_AAAA, 1, vec![0; 16])]);
        for n in 0..full.len() {
            let _ = parse_response(&full[..n], 9, "a.test");
        }
        assert_eq!(
            parse_response(&full, 9, "a.test").unwrap().addresses.len(),
            1
        );
    }
}
