//! Writing safetensors files and HF checkpoint directories: streaming, durable, never torn.
//!
//! Because every tensor's size is known before its bytes exist, the header can be written first
//! and the data streamed after it in fixed order, through a bounded buffer. Large files go to the
//! device with `O_DIRECT` through an aligned staging buffer, so disk writes overlap the work that
//! produces the data and the final `fdatasync` has almost nothing left to do. Where the
//! filesystem refuses `O_DIRECT`, the writer goes through the page cache and asks the kernel to
//! start write-back as it goes (`sync_file_range`), to the same effect.
//!
//! Outputs are built in a staging path beside the target ([`StagedOutput`]), fsync'd, and renamed
//! into place, so a reader sees either the old output or the complete new one, never a mix.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::checkpoint::{ShardIndex, INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::dtype::{dtype_bits, dtype_name};
use crate::error::{Error, Result};

/// One tensor to be written: name, dtype, shape. Its byte size follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn n_bytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * dtype_bits(self.dtype) / 8
    }
}

/// The serialized header (with its 8-byte length prefix) for tensors written in the given order.
pub fn encode_header(
    tensors: &[TensorSpec],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Vec<u8> {
    // Written by hand rather than through serde_json::Map so the key order is the data order.
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("a string map always serializes"));
    }
    let mut offset = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            json.push(',');
        }
        let end = offset + t.n_bytes();
        json.push_str(&serde_json::to_string(&t.name).expect("a string always serializes"));
        json.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{},{}]}}",
            dtype_name(t.dtype),
            t.shape,
            offset,
            end
        ));
        offset = end;
    }
    json.push('}');
    // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

/// Bytes after which the buffered writer kicks off write-back of what it has written so far.
const WRITEBACK_WINDOW_BYTES: u64 = 32 << 20;
/// Files at least this large are written with `O_DIRECT` where the filesystem allows it.
const DIRECT_MIN_BYTES: u64 = 16 << 20;
/// Size and alignment of the direct-I/O staging buffer.
const DIRECT_BUF_BYTES: usize = 8 << 20;
const DIRECT_ALIGN: usize = 4096;

/// A heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN)
            .expect("constant layout is valid");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes, initialised (zeroed) and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, DIRECT_ALIGN)
            .expect("constant layout is valid");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// The `O_DIRECT` side of a writer: bytes gather in an aligned buffer and go to the device in
/// large aligned writes, bypassing the page cache. That saves the copy into the cache and the
/// dirty-page bookkeeping, and the final fsync has almost nothing left to flush.
#[derive(Debug)]
struct DirectSink {
    file: File,
    buf: AlignedBuf,
    filled: usize,
}

/// Streams one safetensors file: header first, then every tensor's bytes in header order.
#[derive(Debug)]
pub struct StreamWriter {
    path: PathBuf,
    file: File,
    direct: Option<DirectSink>,
    /// File offset of the next byte not yet handed to the kernel.
    pos: u64,
    data_start: u64,
    expected: u64,
    written: u64,
    flushed_to: u64,
}

impl StreamWriter {
    /// Creates `path` (which must not exist) and writes the header. Large files bypass the page
    /// cache (`O_DIRECT`) where the filesystem allows it.
    pub fn create(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<StreamWriter> {
        StreamWriter::create_with(path, tensors, metadata, direct_io_enabled())
    }

    /// Like [`StreamWriter::create`], but always writes through the page cache: for files that
    /// are read back soon (such as `pma watch`'s running state), where a cached copy saves a read.
    pub fn create_cached(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<StreamWriter> {
        StreamWriter::create_with(path, tensors, metadata, false)
    }

    fn create_with(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &std::collections::BTreeMap<String, String>,
        try_direct: bool,
    ) -> Result<StreamWriter> {
        let header = encode_header(tensors, metadata);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, "creating", e))?;
        let expected = tensors.iter().map(TensorSpec::n_bytes).sum();
        let mut w = StreamWriter {
            path: path.into(),
            file,
            direct: None,
            pos: 0,
            data_start: header.len() as u64,
            expected,
            written: 0,
            flushed_to: 0,
        };
        if expected >= DIRECT_MIN_BYTES && try_direct {
            w.direct = open_direct(path).map(|file| DirectSink {
                file,
                buf: AlignedBuf::new(DIRECT_BUF_BYTES),
                filled: 0,
            });
        }
        w.push(&header)?;
        Ok(w)
    }

    /// Appends data bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let new_total = self.written + bytes.len() as u64;
        if new_total > self.expected {
            return Err(Error::WriteLength {
                path: self.path.clone(),
                expected: self.expected,
                found: new_total,
            });
        }
        self.push(bytes)?;
        self.written = new_total;
        Ok(())
    }

    fn push(&mut self, mut bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        while let Some(sink) = self.direct.as_mut() {
            if bytes.is_empty() {
                return Ok(());
            }
            let room = sink.buf.len - sink.filled;
            let n = room.min(bytes.len());
            sink.buf.as_mut_slice()[sink.filled..sink.filled + n].copy_from_slice(&bytes[..n]);
            sink.filled += n;
            bytes = &bytes[n..];
            if sink.filled == sink.buf.len {
                let full = sink.filled;
                self.flush_direct(full)?;
            }
        }
        self.file
            .write_all_at(bytes, self.pos)
            .map_err(|e| Error::io(&self.path, "writing", e))?;
        self.pos += bytes.len() as u64;
        if self.pos - self.flushed_to >= WRITEBACK_WINDOW_BYTES {
            self.start_writeback();
        }
        Ok(())
    }

    /// Writes the first `n` (aligned) buffered bytes with O_DIRECT; on a filesystem that refuses
    /// them, writes them through the page cache instead and stays there.
    fn flush_direct(&mut self, n: usize) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(sink) = self.direct.as_mut() else {
            return Ok(());
        };
        let data = &sink.buf.as_mut_slice()[..n];
        if let Err(e) = sink.file.write_all_at(data, self.pos) {
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(Error::io(&self.path, "writing", e));
            }
            let filled = sink.filled;
            let sink = self.direct.take().expect("checked above");
            let rest = sink.buf_slice(filled).to_vec();
            self.file
                .write_all_at(&rest, self.pos)
                .map_err(|e| Error::io(&self.path, "writing", e))?;
            self.pos += rest.len() as u64;
            return Ok(());
        }
        self.pos += n as u64;
        sink.buf.as_mut_slice().copy_within(n..sink.filled, 0);
        sink.filled -= n;
        Ok(())
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&mut self) {
        let start = self.flushed_to;
        let len = self.pos - self.flushed_to;
        // SAFETY: plain syscall on an fd we own. A failure only loses the overlap; the final
        // fdatasync still makes everything durable.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.flushed_to = self.pos;
    }

    #[cfg(not(target_os = "linux"))]
    fn start_writeback(&mut self) {
        self.flushed_to = self.pos;
    }

    /// Checks that every promised byte was written and makes the file durable.
    pub fn finish(mut self) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        if self.written != self.expected {
            return Err(Error::WriteLength {
                path: self.path,
                expected: self.expected,
                found: self.written,
            });
        }
        if let Some(sink) = self.direct.as_ref() {
            let aligned = sink_len_aligned(sink.filled);
            self.flush_direct(aligned)?;
        }
        // The unaligned tail goes through the page cache.
        if let Some(sink) = self.direct.take() {
            let tail = sink.buf_slice(sink.filled).to_vec();
            self.file
                .write_all_at(&tail, self.pos)
                .map_err(|e| Error::io(&self.path, "writing", e))?;
            self.pos += tail.len() as u64;
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "syncing", e))?;
        debug_assert_eq!(self.pos, self.data_start + self.written);
        Ok(self.data_start + self.written)
    }
}

impl DirectSink {
    fn buf_slice(&self, n: usize) -> &[u8] {
        // SAFETY: ptr is valid for buf.len >= n initialised bytes.
        unsafe { std::slice::from_raw_parts(self.buf.ptr.as_ptr(), n) }
    }
}

/// Direct I/O is on unless `PMA_DIRECT_IO=0`. On an idle 2-core box it cut a 271M-parameter,
/// N=8 merge from 0.92 s to 0.81 s (bench/merge_bench.sh): no copy into the page cache and
/// almost nothing left for the final fsync. Both paths produce identical files, and a filesystem
/// that refuses O_DIRECT falls back to buffered writes.
fn direct_io_enabled() -> bool {
    std::env::var("PMA_DIRECT_IO").map_or(true, |v| v != "0")
}

fn sink_len_aligned(n: usize) -> usize {
    n / DIRECT_ALIGN * DIRECT_ALIGN
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Writes a whole safetensors file from in-memory tensors (for small models, e.g. the lab).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(TensorSpec, &[u8])],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<u64> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = StreamWriter::create(path, &specs, metadata)?;
    for (_, bytes) in tensors {
        w.write(bytes)?;
    }
    w.finish()
}

/// Splits tensors (in write order) into shards of at most `max_shard_bytes`, as
/// `transformers`' `save_pretrained` does: a tensor larger than the limit gets a shard of its own.
pub fn plan_shards(tensor_bytes: &[u64], max_shard_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, &n) in tensor_bytes.iter().enumerate() {
        if i > start && size + n > max_shard_bytes {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < tensor_bytes.len() || shards.is_empty() {
        shards.push(start..tensor_bytes.len());
    }
    shards
}

/// File name of shard `i` (0-based) of `n` in HF style; `model.safetensors` when `n == 1`.
pub fn shard_file_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE_NAME.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Writes `model.safetensors.index.json` into `dir`.
pub fn write_index(dir: &Path, shards: &[(String, Vec<&TensorSpec>)]) -> Result<()> {
    let mut index = ShardIndex::default();
    let mut total = 0u64;
    for (file, tensors) in shards {
        for t in tensors {
            total += t.n_bytes();
            index.weight_map.insert(t.name.clone(), file.clone());
        }
    }
    index.metadata.insert("total_size".into(), total.into());
    let path = dir.join(INDEX_FILE_NAME);
    let text = serde_json::to_vec_pretty(&index).expect("index always serializes");
    write_file_synced(&path, &text)
}

/// Writes a small file and fsyncs it.
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, "creating", e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(path, "writing", e))?;
    f.sync_all().map_err(|e| Error::io(path, "syncing", e))
}

/// Copies `src` to `dst` and fsyncs the copy.
pub fn copy_file_synced(src: &Path, dst: &Path) -> Result<()> {
    // Copy the bytes, not the mode: inputs are often read-only, the output should not be.
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, "reading", e))?;
    write_file_synced(dst, &bytes)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, "syncing directory", e))
}

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            path,
            "checking free space on",
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io(
            path,
            "checking free space on",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Whether `path` exists as something other than an empty directory.
pub fn output_occupied(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => path.symlink_metadata().is_ok(),
    }
}

/// An output (a directory or a single file) under construction beside its final path.
///
/// Dropping it without [`StagedOutput::commit`] removes the staging path, so a failed run leaves
/// the target exactly as it was.
#[derive(Debug)]
pub struct StagedOutput {
    target: PathBuf,
    staging: PathBuf,
    is_dir: bool,
    committed: bool,
}

impl StagedOutput {
    /// Prepares to write `target`. Fails with [`Error::OutputExists`] if it is occupied and
    /// `overwrite` is false. `is_dir` chooses a directory or a single file.
    pub fn create(target: &Path, is_dir: bool, overwrite: bool) -> Result<StagedOutput> {
        if output_occupied(target) && !overwrite {
            return Err(Error::OutputExists {
                path: target.into(),
            });
        }
        let parent = parent_dir(target);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, "creating", e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let staging = parent.join(format!(".{name}.pma-tmp-{}-{nanos}", std::process::id()));
        if is_dir {
            std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, "creating", e))?;
        }
        Ok(StagedOutput {
            target: target.into(),
            staging,
            is_dir,
            committed: false,
        })
    }

    /// Where to write: the staging directory, or the staging file path.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Makes the staged output durable and moves it into place, replacing any old output.
    pub fn commit(mut self) -> Result<()> {
        if self.is_dir {
            sync_dir(&self.staging)?;
        } else {
            File::open(&self.staging)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&self.staging, "syncing", e))?;
        }
        let parent = parent_dir(&self.target);
        if self.target.symlink_metadata().is_ok() {
            // Swap atomically where the kernel can, so readers never see the target missing;
            // the old output then sits at the staging path and is removed.
            if exchange(&self.staging, &self.target).is_ok() {
                self.committed = true;
                sync_dir(&parent)?;
                remove_path(&self.staging);
                return Ok(());
            }
            let old = self.staging.with_extension("old");
            std::fs::rename(&self.target, &old)
                .map_err(|e| Error::io(&self.target, "moving aside", e))?;
            std::fs::rename(&self.staging, &self.target)
                .map_err(|e| Error::io(&self.target, "renaming into", e))?;
            self.committed = true;
            sync_dir(&parent)?;
            remove_path(&old);
            return Ok(());
        }
        std::fs::rename(&self.staging, &self.target)
            .map_err(|e| Error::io(&self.target, "renaming into", e))?;
        self.committed = true;
        sync_dir(&parent)
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            remove_path(&self.staging);
        }
    }
}

fn remove_path(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated paths; renameat2 is a plain syscall.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::SafetensorsFile;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn shards_follow_hf_rule() {
        assert_eq!(plan_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&[10, 1, 1], 8), vec![0..1, 1..3]);
        assert_eq!(plan_shards(&[], 8), vec![0..0]);
        assert_eq!(shard_file_name(0, 3), "model-00001-of-00003.safetensors");
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
    }

    #[test]
    fn large_file_roundtrips_through_direct_io() {
        // Larger than DIRECT_MIN_BYTES and not a multiple of the buffer or alignment, written
        // in odd-sized pieces, so the buffer wraps and an unaligned tail remains.
        let n = (DIRECT_MIN_BYTES + 12_345) / 4 * 4;
        let spec = TensorSpec {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![n / 4],
        };
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.safetensors");
        let mut w =
            StreamWriter::create_with(&path, std::slice::from_ref(&spec), &BTreeMap::new(), true)
                .unwrap();
        assert!(
            w.direct.is_some(),
            "the test filesystem should accept O_DIRECT"
        );
        for piece in data.chunks(1_000_003) {
            w.write(piece).unwrap();
        }
        w.finish().unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert!(f.tensor_bytes(&f.tensors()[0]) == data.as_slice());
    }

    #[test]
    fn staged_output_refuses_existing_and_replaces_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"x").unwrap();
        let e = StagedOutput::create(&target, true, false).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }));
        let staged = StagedOutput::create(&target, true, true).unwrap();
        std::fs::write(staged.path().join("new"), b"y").unwrap();
        staged.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("old").exists());
        // Nothing left behind beside the target.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let staged = StagedOutput::create(&dir.path().join("out"), true, false).unwrap();
        std::fs::write(staged.path().join("a"), b"y").unwrap();
        drop(staged);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    proptest! {
        #[test]
        fn header_roundtrip(
            shapes in proptest::collection::vec(proptest::collection::vec(0u64..5, 0..3), 0..6),
            meta in proptest::collection::btree_map("[a-z\"\\\\]{1,5}", "[ -~]{0,8}", 0..3),
        ) {
            let specs: Vec<TensorSpec> = shapes.iter().enumerate().map(|(i, s)| TensorSpec {
                name: format!("t.{i}\"x"), dtype: if i % 2 == 0 { Dtype::BF16 } else { Dtype::F32 },
                shape: s.clone(),
            }).collect();
            let datas: Vec<Vec<u8>> = specs.iter().map(|s| (0..s.n_bytes()).map(|b| b as u8).collect()).collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.safetensors");
            let pairs: Vec<(TensorSpec, &[u8])> = specs.iter().cloned().zip(datas.iter().map(|d| d.as_slice())).collect();
            write_safetensors(&path, &pairs, &meta).unwrap();
            let f = SafetensorsFile::open(&path).unwrap();
            prop_assert_eq!(&f.header().metadata, &meta);
            prop_assert_eq!(f.header().data_start() % 8, 0);
            let by_name: BTreeMap<_, _> = f.tensors().iter().map(|t| (t.name.clone(), t.clone())).collect();
            for (s, d) in specs.iter().zip(&datas) {
                let t = &by_name[&s.name];
                prop_assert_eq!(&t.shape, &s.shape);
                prop_assert_eq!(f.tensor_bytes(t), d.as_slice());
            }
        }
    }
}
