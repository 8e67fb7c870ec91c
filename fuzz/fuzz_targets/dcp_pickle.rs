//! A DCP `.metadata` (or any pickle) as bytes: the safe reader must return a value or an error,
//! never panic, hang or allocate beyond its budget, whatever the opcodes and memo references.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = pma_format::pickle::parse(data) {
        // Interpreting a value as a tensor rebuild must also fail cleanly.
        let _ = pma_format::torch_save::rebuild_tensor(&value);
    }
});
