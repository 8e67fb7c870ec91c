//! The object-store floor for `bench/s3_bench.sh`: `object_store` alone reading every object
//! under a prefix (ranged GETs of 8 MiB, 8 in flight) and writing one object of a given size
//! (multipart, 16 MiB parts, 4 in flight), timed separately. Nothing is merged or validated.
//!
//!     s3_raw_io READ_PREFIX_URL WRITE_URL WRITE_BYTES
//!
//! Prints `read_secs=.. read_bytes=.. write_secs=.. write_bytes=..`. Credentials and endpoint
//! come from the same `AWS_*` environment pma reads.

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};

const RANGE_BYTES: u64 = 8 << 20;
const PART_BYTES: usize = 16 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        return Err("usage: s3_raw_io READ_PREFIX_URL WRITE_URL WRITE_BYTES".into());
    }
    let (read_url, write_url) = (url::Url::parse(&args[1])?, url::Url::parse(&args[2])?);
    let write_bytes: usize = args[3].parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = AmazonS3Builder::from_env()
            .with_url(read_url.as_str())
            .build()?;
        let prefix = Path::from(read_url.path().trim_start_matches('/'));
        let t = Instant::now();
        let objects: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
        let ranges: Vec<(Path, std::ops::Range<u64>)> = objects
            .iter()
            .flat_map(|o| {
                (0..o.size.div_ceil(RANGE_BYTES)).map(move |i| {
                    let start = i * RANGE_BYTES;
                    (o.location.clone(), start..(start + RANGE_BYTES).min(o.size))
                })
            })
            .collect();
        let read_bytes: u64 = futures::stream::iter(ranges)
            .map(|(path, range)| {
                let store = &store;
                async move {
                    let opts = GetOptions {
                        range: Some(GetRange::Bounded(range)),
                        ..GetOptions::default()
                    };
                    let bytes = store.get_opts(&path, opts).await?.bytes().await?;
                    Ok::<u64, object_store::Error>(bytes.len() as u64)
                }
            })
            .buffer_unordered(8)
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await?;
        let read_secs = t.elapsed().as_secs_f64();

        let out = AmazonS3Builder::from_env()
            .with_url(write_url.as_str())
            .build()?;
        let key = Path::from(write_url.path().trim_start_matches('/'));
        let t = Instant::now();
        let upload = out.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let part = vec![7u8; PART_BYTES];
        let mut left = write_bytes;
        while left > 0 {
            let n = left.min(PART_BYTES);
            writer.wait_for_capacity(4).await?;
            writer.write(&part[..n]);
            left -= n;
        }
        writer.finish().await?;
        let write_secs = t.elapsed().as_secs_f64();
        println!(
            "read_secs={read_secs:.3} read_bytes={read_bytes} write_secs={write_secs:.3} write_bytes={write_bytes}"
        );
        Ok(())
    })
}
