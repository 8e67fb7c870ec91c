//! One object read by ranged GETs, with a bounded prefetch.
//!
//! The merge pipeline calls `prefetch` on the jobs a few batches ahead of the one it computes,
//! `read` when it computes a job, and `release` when it is done with it. For a local file those
//! are madvise hints on a mapping; here they drive downloads of **blocks**: the object cut at
//! multiples of [`PREFETCH_BLOCK_BYTES`], each fetched by one ranged GET on the layer's runtime
//! and shared by every job inside it. Aligned blocks never overlap, so every byte is fetched
//! once and the number of requests is the object's size over the block size, as for a plain
//! sequential read (per-request cost dominates on a store).
//!
//! A block lives while some prefetched job that touches it has not been released: `prefetch`
//! counts the job in, `release` counts it out, and the last one out drops the block. Jobs of a
//! batch run in parallel and finish in any order, so this (rather than "the job reading the
//! block's end") is what keeps a block until its slowest job has read it.
//!
//! Started blocks hold at most [`PREFETCH_BUDGET_BYTES`] in all objects together. A prefetch
//! past the budget queues its block (first in, first out, over all objects) and each release
//! starts queued blocks as the budget frees, so the downloads keep running ahead of the
//! computation without a gap; a `read` that finds its block still queued starts it at once.
//! That budget plus the jobs being computed is the layer's whole memory, whatever the model
//! size. A read that no prefetch announced (a header, a sidecar) is one ranged GET of exactly
//! its bytes.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use futures::FutureExt;
use object_store::{GetOptions, GetRange};

use super::{block_on, spawn, store_error, Location, ObjectStoreExt};
use crate::error::Result;

/// The most bytes of started blocks (downloading, or downloaded and not yet released) in all
/// objects together: 8 blocks, enough for some in flight per member of a merge of a few
/// checkpoints while the compute holds the current ones.
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

/// A block's download, shared by every read inside it (`None` if it failed).
type Pending = futures::future::Shared<futures::future::BoxFuture<'static, Option<Bytes>>>;

/// The block size: the pipeline's jobs are a few MB each, and one larger GET serves several of
/// them (fewer requests: per-request latency dominates on a store).
pub const PREFETCH_BLOCK_BYTES: u64 = 8 << 20;

/// Blocks waiting for budget, oldest first, over all objects.
static QUEUE: Mutex<VecDeque<(Weak<Shared>, u64)>> = Mutex::new(VecDeque::new());

/// One block of an object (see the module docs).
struct Block {
    /// The download, once started; `None` while queued.
    download: Option<Pending>,
    /// Prefetched jobs touching the block, not yet released.
    users: u32,
}

/// What an object's handle and the queue share.
struct Shared {
    location: Location,
    n_bytes: u64,
    /// Blocks announced by a prefetch and not yet dropped, by index.
    blocks: Mutex<HashMap<u64, Block>>,
}

impl Shared {
    fn block_range(&self, k: u64) -> Range<u64> {
        k * PREFETCH_BLOCK_BYTES..((k + 1) * PREFETCH_BLOCK_BYTES).min(self.n_bytes)
    }

    fn block_len(&self, k: u64) -> u64 {
        let r = self.block_range(k);
        r.end - r.start
    }

    fn lock_blocks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Block>> {
        self.blocks
            .lock()
            .expect("block table lock is never poisoned")
    }

    /// Whether `range` is one that blocks serve (non-empty, inside the object).
    fn in_blocks(&self, range: &Range<u64>) -> bool {
        !range.is_empty() && range.end <= self.n_bytes
    }

    /// Spawns block `k`'s download (its bytes already counted in the budget).
    fn start(&self, k: u64) -> Pending {
        // Spawned, so the download runs whether or not anyone waits on it yet.
        let handle = spawn(get_range(self.location.clone(), self.block_range(k)));
        let block: futures::future::BoxFuture<'static, Option<Bytes>> =
            Box::pin(async move { handle.await.ok().and_then(|r| r.ok()) });
        block.shared()
    }
}

/// Counts `n` bytes into the budget, unless that would pass it.
fn reserve(n: u64) -> bool {
    PREFETCHED_BYTES
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            (used + n <= PREFETCH_BUDGET_BYTES).then_some(used + n)
        })
        .is_ok()
}

/// Starts queued blocks, oldest first, while the budget allows.
fn start_queued() {
    loop {
        let (object, k) = {
            let mut queue = QUEUE.lock().expect("prefetch queue lock is never poisoned");
            let Some((object, k)) = queue.front() else {
                return;
            };
            let Some(object) = object.upgrade() else {
                queue.pop_front();
                continue;
            };
            if !reserve(object.block_len(*k)) {
                return;
            }
            let k = *k;
            queue.pop_front();
            (object, k)
        };
        let mut blocks = object.lock_blocks();
        match blocks.get_mut(&k) {
            Some(block) if block.download.is_none() => block.download = Some(object.start(k)),
            // Dropped, or started by a read, meanwhile: give the reservation back.
            _ => {
                PREFETCHED_BYTES.fetch_sub(object.block_len(k), Ordering::AcqRel);
            }
        }
    }
}

/// An object opened for ranged reads: its URL and size, fixed at open.
pub struct RemoteObject {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteObject")
            .field("url", &self.shared.location.url)
            .field("n_bytes", &self.shared.n_bytes)
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
            shared: Arc::new(Shared {
                location,
                n_bytes: meta.size,
                blocks: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.shared.location.url
    }

    /// The object's size when it was opened.
    pub fn n_bytes(&self) -> u64 {
        self.shared.n_bytes
    }

    fn block_indices(range: &Range<u64>) -> Range<u64> {
        range.start / PREFETCH_BLOCK_BYTES..(range.end - 1) / PREFETCH_BLOCK_BYTES + 1
    }

    /// The bytes `range` of the object: from the blocks of a prefetch when one announced it
    /// (starting them now if still queued), else one ranged GET.
    pub fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let shared = &self.shared;
        let downloads: Option<Vec<(u64, Pending)>> = if shared.in_blocks(&range) {
            let mut blocks = shared.lock_blocks();
            Self::block_indices(&range)
                .map(|k| {
                    let block = blocks.get_mut(&k)?;
                    let download = block.download.get_or_insert_with(|| {
                        // Needed now: started past the budget (the queue skips it later).
                        PREFETCHED_BYTES.fetch_add(shared.block_len(k), Ordering::AcqRel);
                        shared.start(k)
                    });
                    Some((k * PREFETCH_BLOCK_BYTES, download.clone()))
                })
                .collect()
        } else {
            None
        };
        if let Some(downloads) = downloads {
            // A failed block is retried as one GET of the range below, so the error the user
            // sees is the one of the read that needed the bytes.
            let parts: Option<Vec<(u64, Bytes)>> = downloads
                .into_iter()
                .map(|(start, d)| block_on(d).map(|b| (start, b)))
                .collect();
            if let Some(parts) = parts {
                if let Some(bytes) = assemble(&parts, &range) {
                    return Ok(bytes);
                }
            }
        }
        block_on(get_range(shared.location.clone(), range.clone()))
            .map_err(|e| store_error(&shared.location.url, "reading", &e))
    }

    /// Announces that `range` will be read: counts a user into each of its blocks, starting
    /// their downloads now, or queueing them when the budget is spent.
    pub fn prefetch(&self, range: Range<u64>) {
        let shared = &self.shared;
        if !shared.in_blocks(&range) {
            return;
        }
        let mut blocks = shared.lock_blocks();
        for k in Self::block_indices(&range) {
            let block = blocks.entry(k).or_insert(Block {
                download: None,
                users: 0,
            });
            block.users += 1;
            if block.users > 1 {
                continue;
            }
            let mut queue = QUEUE.lock().expect("prefetch queue lock is never poisoned");
            // First in, first out: nothing starts ahead of a queued block.
            if queue.is_empty() && reserve(shared.block_len(k)) {
                block.download = Some(shared.start(k));
            } else {
                queue.push_back((Arc::downgrade(shared), k));
            }
        }
    }

    /// Counts a prefetched `range`'s job out of its blocks, dropping each block it was the last
    /// user of, then starts queued blocks the freed budget allows.
    pub fn release(&self, range: Range<u64>) {
        let shared = &self.shared;
        if !shared.in_blocks(&range) {
            return;
        }
        {
            let mut blocks = shared.lock_blocks();
            for k in Self::block_indices(&range) {
                let Some(block) = blocks.get_mut(&k) else {
                    continue;
                };
                block.users = block.users.saturating_sub(1);
                if block.users == 0 {
                    let block = blocks.remove(&k).expect("found above");
                    if block.download.is_some() {
                        PREFETCHED_BYTES.fetch_sub(shared.block_len(k), Ordering::AcqRel);
                    }
                }
            }
        }
        start_queued();
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

/// `range` cut from consecutive blocks `parts` ((start, bytes) in order), copied only when it
/// spans more than one; `None` when a block came back short.
fn assemble(parts: &[(u64, Bytes)], range: &Range<u64>) -> Option<Bytes> {
    if let [(start, bytes)] = parts {
        let (a, b) = ((range.start - start) as usize, (range.end - start) as usize);
        return (b <= bytes.len()).then(|| bytes.slice(a..b));
    }
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    for (start, bytes) in parts {
        let end = start + bytes.len() as u64;
        let (a, b) = (range.start.max(*start), range.end.min(end));
        if a >= b {
            return None;
        }
        out.extend_from_slice(&bytes[(a - start) as usize..(b - start) as usize]);
    }
    (out.len() as u64 == range.end - range.start).then(|| Bytes::from(out))
}

impl Drop for RemoteObject {
    fn drop(&mut self) {
        let shared = &self.shared;
        let blocks = std::mem::take(&mut *shared.lock_blocks());
        for (k, block) in blocks {
            if block.download.is_some() {
                PREFETCHED_BYTES.fetch_sub(shared.block_len(k), Ordering::AcqRel);
            }
        }
        start_queued();
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
        let end = (self.pos + buf.len() as u64).min(self.object.n_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = PREFETCH_BLOCK_BYTES;

    #[test]
    fn ranges_map_to_the_aligned_blocks_they_touch() {
        assert_eq!(RemoteObject::block_indices(&(0..1)), 0..1);
        assert_eq!(RemoteObject::block_indices(&(0..B)), 0..1);
        assert_eq!(RemoteObject::block_indices(&(B - 1..B + 1)), 0..2);
        assert_eq!(RemoteObject::block_indices(&(3 * B..3 * B + 5)), 3..4);
        assert_eq!(RemoteObject::block_indices(&(B + 7..4 * B)), 1..4);
    }

    #[test]
    fn reads_are_cut_from_one_block_or_joined_across_two() {
        let block = |k: u64, n: u64| {
            (
                k * B,
                Bytes::from((0..n).map(|i| (k * B + i) as u8).collect::<Vec<u8>>()),
            )
        };
        let want = |r: Range<u64>| r.map(|i| i as u8).collect::<Vec<u8>>();
        let one = [block(2, B)];
        let r = 2 * B + 10..2 * B + 100;
        assert_eq!(assemble(&one, &r).unwrap(), want(r));
        let two = [block(0, B), block(1, B)];
        let r = B - 3..B + 5;
        assert_eq!(assemble(&two, &r).unwrap(), want(r));
        // A block that came back short is not trusted: the caller refetches the range.
        let short = [block(0, B), block(1, 2)];
        assert!(assemble(&short, &(B - 3..B + 5)).is_none());
        assert!(assemble(&[block(0, 10)], &(5..20)).is_none());
    }
}
