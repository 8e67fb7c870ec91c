//! The run-directory scanner's name parsing: step numbers from checkpoint names, and the
//! token-count and byte-size parsers of the selection flags.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(step) = pma_merge::series::parse_step(name) {
        // An accepted name ends in the digits of exactly that step.
        let stem = name.strip_suffix(".safetensors").unwrap_or(name);
        let digits = stem.trim_start_matches(|c: char| !c.is_ascii_digit());
        assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{name:?}");
        assert_eq!(digits.parse::<u64>().ok(), Some(step), "{name:?}");
    }
    let _ = pma_merge::series::parse_token_count(name);
    let _ = pma_merge::series::parse_byte_size(name);
});
