//! One object read by ranged GETs, with a bounded prefetch.
//!
//! The merge pipeline calls `prefetch` on the jobs a few batches ahead of the one it computes,
//! `read` when it computes a job, and `release` when it is done with it. For a local file those
//! are madvise hints on a mapping; here `prefetch` starts a ranged GET on the layer's runtime
//! and keeps the pending download in a per-object table, `read` takes it (or issues the GET
//! itself when nothing was prefetched), and `release` drops whatever is left. Many GETs are in
//! flight at once (one per prefetched job and member), but never more than
//! [`PREFETCH_BUDGET_BYTES`] of them in all objects together: past the budget a prefetch is
//! ignored and the read fetches on demand. That budget plus the jobs being computed is the
//! layer's whole memory, whatever the model size.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use futures::FutureExt;
use object_store::{GetOptions, GetRange};

use super::{block_on, spawn, store_error, Location, ObjectStoreExt};
use crate::error::Result;

/// The most bytes of prefetched (downloading or downloaded, not yet read) ranges in all
/// objects together.
pub const PREFETCH_BUDGET_BYTES: u64 = 64 << 20;

static PREFETCHED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Counters of what this process fetched, for tests and benchmarks that prove reads are ranged.
static GET_REQUESTS: AtomicU64 = AtomicU64::new(0);
static GET_BYTES: AtomicU64 = AtomicU64::new(0);

/// `(requests, bytes)` of every ranged GET this process issued so far.
pub fn get_counters() -> (u64, u64) {
    (
        GET_REQUESTS.load(Ordering::Relaxed),
        GET_BYTES.load(Ordering::Relaxed),
    )
}

/// A prefetched block: a download shared by every read inside it (`None` if it failed).
type Pending = futures::future::Shared<futures::future::BoxFuture<'static, Option<Bytes>>>;

/// Prefetches fetch at least this much: the pipeline's jobs are a few MB each, and one larger
/// GET serves several of them (fewer requests: per-request latency dominates on a store).
pub const PREFETCH_BLOCK_BYTES: u64 = 8 << 20;

/// An object opened for ranged reads: its URL and size, fixed at open.
pub struct RemoteObject {
    location: Location,
    n_bytes: u64,
    /// Prefetched ranges (absolute byte ranges of the object) and their downloads.
    pending: Mutex<HashMap<(u64, u64), Pending>>,
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteObject")
            .field("url", &self.location.url)
            .field("n_bytes", &self.n_bytes)
            .finish()
    }
}

impl RemoteObject {
    /// Opens the object at `url` (a HEAD request for its size).
    pub fn open(url: &Path) -> Result<RemoteObject> {
        let location = Location::parse(url)?;
        let meta = block_on(location.store.head(&location.key))
            .map_err(|e| store_error(&location.url, "opening", &e))?;
        Ok(RemoteObject {
            location,
            n_bytes: meta.size,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.location.url
    }

    /// The object's size when it was opened.
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }

    /// The bytes `range` of the object: the prefetched download when one covers it, else one
    /// ranged GET.
    pub fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        // A block stays in the table after a read: the next jobs' reads lie in it too. It
        // leaves when the job reading its end releases (see `release`).
        let covering = {
            let pending = self
                .pending
                .lock()
                .expect("prefetch table lock is never poisoned");
            pending
                .iter()
                .find(|((s, e), _)| *s <= range.start && range.end <= *e)
                .map(|(&(s, _), block)| (s, block.clone()))
        };
        if let Some((start, block)) = covering {
            // A prefetch that failed is retried on demand, so the error the user sees is the
            // one of the read that needed the bytes.
            if let Some(bytes) = block_on(block) {
                let (a, b) = ((range.start - start) as usize, (range.end - start) as usize);
                if b <= bytes.len() {
                    return Ok(bytes.slice(a..b));
                }
            }
        }
        block_on(get_range(self.location.clone(), range.clone()))
            .map_err(|e| store_error(&self.location.url, "reading", &e))
    }

    /// Starts downloading a block from `range.start` of at least [`PREFETCH_BLOCK_BYTES`] (and
    /// all of `range`) unless a pending block covers `range` or the budget is spent.
    pub fn prefetch(&self, range: Range<u64>) {
        if range.is_empty() || range.end > self.n_bytes {
            return;
        }
        let mut pending = self
            .pending
            .lock()
            .expect("prefetch table lock is never poisoned");
        if pending
            .keys()
            .any(|(s, e)| *s <= range.start && range.end <= *e)
        {
            return;
        }
        let block_end = (range.start + PREFETCH_BLOCK_BYTES).min(self.n_bytes);
        let range = range.start..range.end.max(block_end);
        let n = range.end - range.start;
        let reserved = PREFETCHED_BYTES.fetch_add(n, Ordering::Relaxed);
        if reserved + n > PREFETCH_BUDGET_BYTES {
            PREFETCHED_BYTES.fetch_sub(n, Ordering::Relaxed);
            return;
        }
        // Spawned, so the download runs whether or not anyone waits on it yet.
        let handle = spawn(get_range(self.location.clone(), range.clone()));
        let block: futures::future::BoxFuture<'static, Option<Bytes>> =
            Box::pin(async move { handle.await.ok().and_then(|r| r.ok()) });
        pending.insert((range.start, range.end), block.shared());
    }

    /// Drops the blocks whose end lies in `range`: the pipeline reads a tensor front to back,
    /// so the job that releases a block's end is the last to need it (a read that comes later
    /// after all fetches on demand: slower, never wrong).
    pub fn release(&self, range: Range<u64>) {
        let mut pending = self
            .pending
            .lock()
            .expect("prefetch table lock is never poisoned");
        pending.retain(|&(s, e), _| {
            let done = range.start < e && e <= range.end;
            if done {
                PREFETCHED_BYTES.fetch_sub(e - s, Ordering::Relaxed);
            }
            !done
        });
    }

    /// A reader from the start of the object whose every `read` is one ranged GET (the
    /// safetensors header: 8 bytes, then the JSON).
    pub fn reader(&self) -> RangedReader<'_> {
        RangedReader {
            object: self,
            pos: 0,
        }
    }
}

impl Drop for RemoteObject {
    fn drop(&mut self) {
        let all = 0..u64::MAX;
        self.release(all);
    }
}

/// Streams the object at `url` into `to` by ranged GETs of [`DOWNLOAD_RANGE_BYTES`] (memory
/// stays at one range), refusing an object whose size is not `expected_n_bytes` when given (it
/// changed since it was validated). Returns the bytes written.
pub fn download(
    url: &Path,
    expected_n_bytes: Option<u64>,
    to: &mut dyn std::io::Write,
) -> Result<u64> {
    let object = RemoteObject::open(url)?;
    let n_bytes = object.n_bytes();
    if expected_n_bytes.is_some_and(|n| n != n_bytes) {
        return Err(crate::error::Error::Remote {
            url: object.url().to_string(),
            action: "downloading",
            status: None,
            reason: format!(
                "the object is {n_bytes} bytes, not the {} it had when validated",
                expected_n_bytes.unwrap_or_default()
            ),
        });
    }
    let mut at = 0;
    while at < n_bytes {
        let end = (at + DOWNLOAD_RANGE_BYTES).min(n_bytes);
        let bytes = object.read_range(at..end)?;
        to.write_all(&bytes)
            .map_err(|e| crate::error::Error::io(url, "writing a download of", e))?;
        at = end;
    }
    Ok(n_bytes)
}

/// The range one [`download`] request fetches.
pub const DOWNLOAD_RANGE_BYTES: u64 = 8 << 20;

async fn get_range(location: Location, range: Range<u64>) -> object_store::Result<Bytes> {
    GET_REQUESTS.fetch_add(1, Ordering::Relaxed);
    GET_BYTES.fetch_add(range.end - range.start, Ordering::Relaxed);
    let options = GetOptions {
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    location
        .store
        .get_opts(&location.key, options)
        .await?
        .bytes()
        .await
}

/// A `Read` over ranged GETs (see [`RemoteObject::reader`]).
pub struct RangedReader<'a> {
    object: &'a RemoteObject,
    pos: u64,
}

impl Read for RangedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let end = (self.pos + buf.len() as u64).min(self.object.n_bytes);
        if end <= self.pos {
            return Ok(0);
        }
        let bytes = self
            .object
            .read_range(self.pos..end)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        buf[..bytes.len()].copy_from_slice(&bytes);
        self.pos += bytes.len() as u64;
        Ok(bytes.len())
    }
}
