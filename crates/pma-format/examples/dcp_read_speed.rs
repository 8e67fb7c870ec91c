//! Measures DCP read throughput: every tensor of a checkpoint, in 1M-element ranges.
use std::time::Instant;

use pma_format::dcp::DcpCheckpoint;
use pma_format::{Region, TensorSource};

fn main() -> Result<(), pma_format::Error> {
    let dir = std::env::args().nth(1).expect("usage: dcp_read_speed DIR");
    let t0 = Instant::now();
    let ckpt = DcpCheckpoint::open(std::path::Path::new(&dir))?;
    let open_s = t0.elapsed().as_secs_f64();
    for pass in 0..3 {
        let t = Instant::now();
        let (mut bytes, mut copied) = (0u64, 0u64);
        let mut scratch = Vec::new();
        for x in ckpt.tensors() {
            let r = Region::full(&x.shape);
            let n = r.numel();
            let mut at = 0;
            while at < n {
                let end = (at + (1 << 20)).min(n);
                scratch.clear();
                let b = x.read(&r, at..end, &mut scratch)?;
                bytes += b.len() as u64;
                let xor = b.iter().step_by(64).fold(0u8, |a, &v| a ^ v);
                std::hint::black_box(xor);
                if !scratch.is_empty() {
                    copied += scratch.len() as u64;
                }
                at = end;
            }
        }
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "pass {pass}: {:.1} MB in {:.3}s = {:.2} GB/s ({:.1} MB gathered); open {:.3}s",
            bytes as f64 / 1e6,
            s,
            bytes as f64 / s / 1e9,
            copied as f64 / 1e6,
            open_s
        );
    }
    Ok(())
}
