//! Fuzzes the whole config pipeline (YAML split, position index, typed parse, validation, compile):
//! any input must yield a snapshot or located errors, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(errors) = keel_config::load_str("fuzz.yaml", text) {
            for e in &errors.0 {
                // Every error is renderable and names the file.
                assert!(e.to_string().starts_with("fuzz.yaml") || e.file.as_os_str().is_empty());
            }
        }
    }
});
