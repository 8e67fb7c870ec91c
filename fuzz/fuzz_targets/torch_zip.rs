//! A torch.save zip (a `.bin`/`.pt` file or one DCP item) as bytes: the zip reader must locate
//! entries only inside the input, and the `data.pkl` it finds must parse or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(archive) = pma_format::torchzip::TorchArchive::parse(data) {
        for e in &archive.entries {
            // Every entry the reader accepts lies inside the archive.
            assert!(e.range().end <= data.len() as u64, "entry {} past the end", e.name);
        }
        if let Ok(pkl) = archive.record("data.pkl") {
            let r = pkl.range();
            if let Ok(value) = pma_format::pickle::parse(&data[r.start as usize..r.end as usize]) {
                let _ = pma_format::torch_save::rebuild_tensor(&value);
            }
        }
    }
});
