//! A whole safetensors file as bytes: length prefix, header JSON, data. Must return a valid
//! `Header` or an error, never panic, hang or allocate what the header claims.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    let mut reader = std::io::Cursor::new(data);
    if let Ok(header) = pma_format::Header::read_from(path, &mut reader, data.len() as u64) {
        // A header that validates describes exactly this file.
        assert_eq!(header.file_len(), data.len() as u64);
        for t in &header.tensors {
            assert!(t.begin <= t.end && t.end <= header.data_bytes());
        }
    }
});
