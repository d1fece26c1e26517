//! The ClientHello reader used for SNI routing: any bytes, never a panic; a parse of a prefix
//! of a complete hello asks for more rather than failing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(info)) = keel_tls::client_hello::parse(data) {
        if let Some(name) = &info.server_name {
            assert!(!name.is_empty() && name.len() <= 253);
        }
    }
});
