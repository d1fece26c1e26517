//! HPACK's static Huffman code (RFC 7541 §5.2, Appendix B), both ways.
//!
//! The code is canonical: codes of one length are consecutive and ordered by symbol, and each
//! length's first code follows on from the previous length's last. So the bit lengths alone (the
//! table below, from Appendix B) determine every code; both directions' tables are computed from
//! them at compile time, and a unit test checks the results against codes printed in the RFC.

/// Bit length of each symbol's code: bytes 0–255, then EOS (256).
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 16
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // 32
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // 48
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // 64
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 80
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // 96
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 112
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 128
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 144
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 160
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 176
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 192
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 208
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 224
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 240
    30, // EOS
];

const MAX_LEN: usize = 30;

/// Canonical code tables: for each length, the first code and where its symbols start in
/// `SYMBOLS` (symbols ordered by code).
struct Tables {
    /// Code of each symbol, right-aligned.
    codes: [u32; 257],
    /// Per length: first code of that length, and how many codes have it.
    first: [u32; MAX_LEN + 1],
    count: [u16; MAX_LEN + 1],
    /// Per length: index in `symbols` of the first symbol with it.
    offset: [u16; MAX_LEN + 1],
    symbols: [u16; 257],
}

const fn build() -> Tables {
    let mut t = Tables {
        codes: [0; 257],
        first: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        offset: [0; MAX_LEN + 1],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < 257 {
        t.count[LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut code = 0u32;
    let mut index = 0u16;
    let mut len = 1;
    while len <= MAX_LEN {
        code <<= 1;
        t.first[len] = code;
        t.offset[len] = index;
        let mut s = 0;
        while s < 257 {
            if LENGTHS[s] as usize == len {
                t.codes[s] = code;
                t.symbols[index as usize] = s as u16;
                code += 1;
                index += 1;
            }
            s += 1;
        }
        len += 1;
    }
    t
}

static TABLES: Tables = build();

/// Why a Huffman string was refused (RFC 7541 §5.2: a COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HuffmanError;

/// Bytes `input` takes once encoded.
pub fn encoded_len(input: &[u8]) -> usize {
    let bits: usize = input.iter().map(|&b| LENGTHS[b as usize] as usize).sum();
    bits.div_ceil(8)
}

/// Appends the Huffman encoding of `input` to `out`, padded with the EOS prefix (all ones).
pub fn encode(input: &[u8], out: &mut Vec<u8>) {
    // `acc` holds `bits` pending bits, right-aligned (fewer than 32 between symbols, and codes
    // are at most 30 bits, so they fit); they leave 32 at a time.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let codes = &TABLES.codes;
    for &b in input {
        let len = LENGTHS[b as usize] as u32;
        acc = (acc << len) | codes[b as usize] as u64;
        bits += len;
        if bits >= 32 {
            bits -= 32;
            out.extend_from_slice(&((acc >> bits) as u32).to_be_bytes());
        }
    }
    while bits >= 8 {
        bits -= 8;
        out.push((acc >> bits) as u8);
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1u64 << pad) - 1)) as u8);
    }
}

/// Appends the decoding of `input` to `out`. Padding longer than 7 bits, padding that is not a
/// prefix of EOS, and an EOS symbol in the data are errors, as the RFC requires.
pub fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    // `acc` holds `bits` undecoded bits, right-aligned.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in input {
        acc = (acc << 8) | b as u64;
        bits += 8;
        // Decode every symbol the window holds whole; the shortest code has 5 bits.
        while bits >= 5 {
            match next_symbol(acc, bits) {
                Some((sym, len)) => {
                    if sym == 256 {
                        return Err(HuffmanError);
                    }
                    out.push(sym as u8);
                    bits -= len;
                    acc &= (1u64 << bits) - 1;
                }
                None => break,
            }
        }
        if bits > MAX_LEN as u32 {
            return Err(HuffmanError);
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones.
    if bits > 7 || acc != (1u64 << bits) - 1 {
        return Err(HuffmanError);
    }
    Ok(())
}

/// The symbol the top of the `bits`-bit window starts with, and its length; `None` when the
/// window holds no whole code yet.
fn next_symbol(acc: u64, bits: u32) -> Option<(u16, u32)> {
    let t = &TABLES;
    let mut len = 5u32;
    while len <= bits.min(MAX_LEN as u32) {
        let l = len as usize;
        let code = (acc >> (bits - len)) as u32;
        let rel = code.wrapping_sub(t.first[l]);
        if code >= t.first[l] && rel < t.count[l] as u32 {
            return Some((t.symbols[t.offset[l] as usize + rel as usize], len));
        }
        len += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_rfc_table() {
        // A sample of Appendix B, as printed (right-aligned hex, length).
        let printed: [(usize, u32, u8); 10] = [
            (0, 0x1ff8, 13),
            (9, 0xffffea, 24),
            (10, 0x3ffffffc, 30),
            (32, 0x14, 6),
            (48, 0x0, 5),
            (97, 0x3, 5),
            (127, 0xffffffc, 28),
            (200, 0x3ffffe2, 26),
            (255, 0x3ffffee, 26),
            (256, 0x3fffffff, 30),
        ];
        for (sym, code, len) in printed {
            assert_eq!(
                (TABLES.codes[sym], LENGTHS[sym]),
                (code, len),
                "symbol {sym}"
            );
        }
    }

    #[test]
    fn rfc_7541_c4_strings() {
        let cases: [(&str, &str); 3] = [
            ("www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
            ("no-cache", "a8eb10649cbf"),
            ("custom-value", "25a849e95bb8e8b4bf"),
        ];
        for (text, hex) in cases {
            let mut out = Vec::new();
            encode(text.as_bytes(), &mut out);
            assert_eq!(to_hex(&out), hex);
            assert_eq!(encoded_len(text.as_bytes()), out.len());
            let mut back = Vec::new();
            decode(&out, &mut back).unwrap();
            assert_eq!(back, text.as_bytes());
        }
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let mut out = Vec::new();
        encode(&all, &mut out);
        let mut back = Vec::new();
        decode(&out, &mut back).unwrap();
        assert_eq!(back, all);
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        // 'a' (00011) padded with zeros instead of ones.
        assert!(decode(&[0b0001_1000], &mut Vec::new()).is_err());
        // A whole byte of padding.
        assert!(decode(&[0b0001_1111, 0xff], &mut Vec::new()).is_err());
        // EOS itself (30 ones) in the data.
        assert!(decode(&[0xff, 0xff, 0xff, 0xff], &mut Vec::new()).is_err());
        // Empty is fine.
        assert!(decode(&[], &mut Vec::new()).is_ok());
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
