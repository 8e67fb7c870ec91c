//! Streaming one safetensors file: the header first, then every tensor's bytes in header order.
//!
//! Because every tensor's size is known before its bytes exist, the header can be written first
//! and the data streamed after it in fixed order, through a bounded buffer. Large files go to the
//! device with `O_DIRECT` through an aligned staging buffer ([`super::direct`]), so disk writes
//! overlap the work that produces the data and the final `fdatasync` has almost nothing left to
//! do. Where the filesystem refuses `O_DIRECT`, the writer goes through the page cache and asks
//! the kernel to start write-back as it goes (`sync_file_range`), to the same effect.
//!
//! A path that is an object-store URL ([`crate::remote::is_url`]) is written the same way into
//! a streaming multipart upload ([`crate::remote::ObjectWriter`]): parts leave while the merge
//! goes on, memory stays at a few parts, and the object appears whole at `finish`.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::direct::{
    open_direct, sink_len_aligned, AlignedBuf, DirectSink, DIRECT_BUF_BYTES, DIRECT_MIN_BYTES,
};
use super::encode::{encode_header, TensorSpec};
use crate::error::{Error, Result};

/// Bytes after which the buffered writer kicks off write-back of what it has written so far.
const WRITEBACK_WINDOW_BYTES: u64 = 32 << 20;

/// Whether a writer may bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// Files of at least 16 MiB go to the device with `O_DIRECT` where the filesystem allows
    /// it (and through the page cache where it refuses). On an idle 2-core box it cut a
    /// 271M-parameter, N=8 merge from 0.92 s to 0.81 s (bench/merge_bench.sh): no copy into the
    /// page cache and almost nothing left for the final fsync. Both paths produce identical
    /// files.
    #[default]
    Auto,
    /// Always through the page cache: for files that are read back soon (such as `pma watch`'s
    /// running state), where a cached copy saves a read, or where the user asks for it.
    Off,
}

impl DirectIo {
    /// The user's choice as front ends (the CLI, the Python module) read it: `PMA_DIRECT_IO=0`
    /// means [`DirectIo::Off`]. The library itself never reads the environment; it takes the
    /// value as an option.
    pub fn from_env() -> DirectIo {
        if std::env::var_os("PMA_DIRECT_IO").is_some_and(|v| v == "0") {
            DirectIo::Off
        } else {
            DirectIo::Auto
        }
    }
}

/// Streams one safetensors file: header first, then every tensor's bytes in header order.
#[derive(Debug)]
pub struct StreamWriter {
    path: PathBuf,
    /// Set for an object-store URL: every byte goes there, and there is no `file`.
    remote: Option<crate::remote::ObjectWriter>,
    file: Option<File>,
    pub(crate) direct: Option<DirectSink>,
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
        StreamWriter::create_with(path, tensors, metadata, DirectIo::Auto)
    }

    /// Like [`StreamWriter::create`], but always writes through the page cache: for files that
    /// are read back soon (such as `pma watch`'s running state), where a cached copy saves a read.
    pub fn create_cached(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<StreamWriter> {
        StreamWriter::create_with(path, tensors, metadata, DirectIo::Off)
    }

    /// Like [`StreamWriter::create`], with the page-cache choice given.
    pub fn create_with(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: &std::collections::BTreeMap<String, String>,
        direct_io: DirectIo,
    ) -> Result<StreamWriter> {
        let header = encode_header(tensors, metadata);
        let expected = tensors.iter().map(TensorSpec::n_bytes).sum();
        if crate::remote::is_url(path) {
            let mut remote = crate::remote::ObjectWriter::create(path)?;
            remote.write(&header)?;
            return Ok(StreamWriter {
                path: path.into(),
                remote: Some(remote),
                file: None,
                direct: None,
                pos: header.len() as u64,
                data_start: header.len() as u64,
                expected,
                written: 0,
                flushed_to: 0,
            });
        }
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, "creating", e))?;
        let mut w = StreamWriter {
            path: path.into(),
            remote: None,
            file: Some(file),
            direct: None,
            pos: 0,
            data_start: header.len() as u64,
            expected,
            written: 0,
            flushed_to: 0,
        };
        if expected >= DIRECT_MIN_BYTES && direct_io == DirectIo::Auto {
            w.direct = open_direct(path).map(|file| DirectSink {
                file,
                buf: AlignedBuf::new(DIRECT_BUF_BYTES),
                filled: 0,
            });
        }
        w.push(&header)?;
        Ok(w)
    }

    fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("only a local writer reaches file I/O (a remote one returns before)")
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
        if let Some(remote) = self.remote.as_mut() {
            self.pos += bytes.len() as u64;
            return remote.write(bytes);
        }
        while let Some(sink) = self.direct.as_mut() {
            if bytes.is_empty() {
                return Ok(());
            }
            if sink.fill(&mut bytes) {
                let full = sink.filled;
                self.flush_direct(full)?;
            }
        }
        self.file()
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
            self.file()
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
                self.file().as_raw_fd(),
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
        if let Some(remote) = self.remote.take() {
            return remote.finish();
        }
        if let Some(sink) = self.direct.as_ref() {
            let aligned = sink_len_aligned(sink.filled);
            self.flush_direct(aligned)?;
        }
        // The unaligned tail goes through the page cache.
        if let Some(sink) = self.direct.take() {
            let tail = sink.buf_slice(sink.filled).to_vec();
            self.file()
                .write_all_at(&tail, self.pos)
                .map_err(|e| Error::io(&self.path, "writing", e))?;
            self.pos += tail.len() as u64;
        }
        self.file()
            .sync_data()
            .map_err(|e| Error::io(&self.path, "syncing", e))?;
        debug_assert_eq!(self.pos, self.data_start + self.written);
        Ok(self.data_start + self.written)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::SafetensorsFile;
    use safetensors::Dtype;
    use std::collections::BTreeMap;

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
        let mut w = StreamWriter::create_with(
            &path,
            std::slice::from_ref(&spec),
            &BTreeMap::new(),
            DirectIo::Auto,
        )
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
}
