//! The zip container of torch.save archives (torch ≥ 1.6), read in place.
//!
//! A torch.save file is a zip of stored (uncompressed) entries: `<prefix>/data.pkl` (the pickled
//! structure), `<prefix>/data/<key>` (one raw little-endian storage per key), `<prefix>/version`
//! and a few small records. A DCP `.distcp` file is many such archives back to back, each item a
//! complete zip at `[offset, offset + length)`, so this reader works on any byte slice and
//! reports every offset relative to that slice. It copies nothing: it returns where each entry's
//! bytes are, and callers map them.
//!
//! Layout facts it relies on (`tests/fixtures/dcp/FORMAT.md` §3): torch's writer puts zero sizes
//! in the local headers (flag 0x08, sizes in a trailing data descriptor) and pads each entry's
//! data to 64 bytes with a local-only extra field, so the sizes come from the central directory
//! and the data offset from the local header (`hdr + 30 + name_len + local_extra_len`). Archives
//! over 4 GiB, and torch's own writer always, use the ZIP64 end records. Only method 0 (stored)
//! can be mapped; reading a compressed entry is [`ZipError::Compressed`]. Every offset and size
//! is checked against the slice before use.

use std::ops::Range;

/// One entry of an archive. Offsets are relative to the start of the archive's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipEntry {
    /// The full entry name (`archive/data/0`).
    pub name: String,
    /// Compression method (0 = stored).
    pub method: u16,
    /// Where the entry's data starts.
    pub data_offset: u64,
    /// Uncompressed size (from the central directory).
    pub size: u64,
    /// Compressed size (from the central directory); equals `size` when stored.
    pub compressed_size: u64,
}

impl ZipEntry {
    /// The byte range of the entry's (stored) data within the archive.
    pub fn range(&self) -> Range<u64> {
        self.data_offset..self.data_offset + self.compressed_size
    }
}

/// A parsed torch.save archive: its entries and the record prefix (`archive/`, or whatever
/// directory holds `data.pkl`).
#[derive(Debug, Clone)]
pub struct TorchArchive {
    /// Entries in central-directory order.
    pub entries: Vec<ZipEntry>,
    /// The directory of `data.pkl`, with its trailing `/` (empty if at the top).
    pub prefix: String,
}

/// Why an archive was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ZipError {
    /// No end-of-central-directory record: not a zip, or truncated.
    #[error("no zip end-of-central-directory record (not a zip, or truncated)")]
    NoEndRecord,
    /// A structure of the zip is inconsistent or runs past the end of the bytes.
    #[error("malformed zip: {0}")]
    Malformed(&'static str),
    /// An entry's data runs past the end of the archive.
    #[error("entry '{entry}' runs past the end of the archive ({end} > {len} bytes)")]
    EntryPastEnd {
        /// The entry.
        entry: String,
        /// Its end offset.
        end: u64,
        /// The archive length.
        len: u64,
    },
    /// An entry we must read is compressed, so it cannot be mapped.
    #[error(
        "entry '{entry}' is compressed (method {method}); torch.save writes stored entries only"
    )]
    Compressed {
        /// The entry.
        entry: String,
        /// Its compression method.
        method: u16,
    },
    /// A record torch.save always writes is absent.
    #[error("no entry '{0}' in the archive")]
    Missing(String),
}

// Record signatures, shared with the writer (`dcp_out::zip_emit`).
/// End of central directory record.
pub(crate) const EOCD_SIG: u32 = 0x0605_4b50;
/// ZIP64 end of central directory locator.
pub(crate) const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
/// ZIP64 end of central directory record.
pub(crate) const EOCD64_SIG: u32 = 0x0606_4b50;
/// Central directory file header.
pub(crate) const CENTRAL_SIG: u32 = 0x0201_4b50;
/// Local file header.
pub(crate) const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_FIXED: usize = 46;
const LOCAL_FIXED: usize = 30;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Reads the central directory of the zip in `bytes` and locates every entry's data.
pub fn parse(bytes: &[u8]) -> Result<Vec<ZipEntry>, ZipError> {
    let bad = ZipError::Malformed;
    let len = bytes.len();
    if len < 22 {
        return Err(ZipError::NoEndRecord);
    }
    // The EOCD is the last 22 bytes plus a comment of at most 65535 bytes.
    let lowest = len.saturating_sub(22 + 0xffff);
    let eocd = (lowest..=len - 22)
        .rev()
        .find(|&at| u32_at(bytes, at) == Some(EOCD_SIG))
        .ok_or(ZipError::NoEndRecord)?;
    let n16 = u16_at(bytes, eocd + 10).ok_or(bad("short end record"))?;
    let cd_size32 = u32_at(bytes, eocd + 12).ok_or(bad("short end record"))?;
    let cd_off32 = u32_at(bytes, eocd + 16).ok_or(bad("short end record"))?;
    let (count, cd_size, cd_off) = if n16 == 0xffff || cd_size32 == u32::MAX || cd_off32 == u32::MAX
    {
        let loc = eocd.checked_sub(20).ok_or(bad("no ZIP64 locator"))?;
        if u32_at(bytes, loc) != Some(EOCD64_LOCATOR_SIG) {
            return Err(bad("no ZIP64 locator"));
        }
        let rec = u64_at(bytes, loc + 8).ok_or(bad("short ZIP64 locator"))?;
        let rec = usize::try_from(rec).map_err(|_| bad("ZIP64 record offset too large"))?;
        if u32_at(bytes, rec) != Some(EOCD64_SIG) {
            return Err(bad("ZIP64 end record not where the locator says"));
        }
        (
            u64_at(bytes, rec + 32).ok_or(bad("short ZIP64 end record"))?,
            u64_at(bytes, rec + 40).ok_or(bad("short ZIP64 end record"))?,
            u64_at(bytes, rec + 48).ok_or(bad("short ZIP64 end record"))?,
        )
    } else {
        (n16 as u64, cd_size32 as u64, cd_off32 as u64)
    };
    let cd_end = cd_off
        .checked_add(cd_size)
        .filter(|&e| e <= len as u64)
        .ok_or(bad("central directory runs past the end"))?;
    // Each central record is at least 46 bytes, so a hostile count cannot make us allocate.
    if count
        .checked_mul(CENTRAL_FIXED as u64)
        .is_none_or(|b| b > cd_size)
    {
        return Err(bad("entry count does not fit in the central directory"));
    }
    let cd = &bytes[cd_off as usize..cd_end as usize];
    let mut entries = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for _ in 0..count {
        if u32_at(cd, at) != Some(CENTRAL_SIG) {
            return Err(bad("bad central directory record signature"));
        }
        let field16 = |o: usize| u16_at(cd, at + o).ok_or(bad("short central record"));
        let field32 = |o: usize| u32_at(cd, at + o).ok_or(bad("short central record"));
        let method = field16(10)?;
        let mut compressed_size = field32(20)? as u64;
        let mut size = field32(24)? as u64;
        let name_len = field16(28)? as usize;
        let extra_len = field16(30)? as usize;
        let comment_len = field16(32)? as usize;
        let mut local = field32(42)? as u64;
        let name_at = at + CENTRAL_FIXED;
        let name = cd
            .get(name_at..name_at + name_len)
            .ok_or(bad("central record name runs past the directory"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| bad("entry name is not UTF-8"))?
            .to_string();
        let extra = cd
            .get(name_at + name_len..name_at + name_len + extra_len)
            .ok_or(bad("central record extra field runs past the directory"))?;
        // ZIP64 extended information: the 64-bit values of exactly the fields set to all ones.
        let mut x = 0usize;
        while x + 4 <= extra.len() {
            let id = u16_at(extra, x).unwrap_or(0);
            let n = u16_at(extra, x + 2).unwrap_or(0) as usize;
            let body = extra
                .get(x + 4..x + 4 + n)
                .ok_or(bad("extra field runs past its record"))?;
            if id == 0x0001 {
                let mut b = 0usize;
                let mut next = || -> Result<u64, ZipError> {
                    let v = u64_at(body, b).ok_or(bad("short ZIP64 extra field"))?;
                    b += 8;
                    Ok(v)
                };
                if size == u32::MAX as u64 {
                    size = next()?;
                }
                if compressed_size == u32::MAX as u64 {
                    compressed_size = next()?;
                }
                if local == u32::MAX as u64 {
                    local = next()?;
                }
            }
            x += 4 + n;
        }
        at = name_at + name_len + extra_len + comment_len;
        let local = usize::try_from(local).map_err(|_| bad("local header offset too large"))?;
        if u32_at(bytes, local) != Some(LOCAL_SIG) {
            return Err(bad("central directory points at no local header"));
        }
        let lname = u16_at(bytes, local + 26).ok_or(bad("short local header"))? as u64;
        let lextra = u16_at(bytes, local + 28).ok_or(bad("short local header"))? as u64;
        let data_offset = local as u64 + LOCAL_FIXED as u64 + lname + lextra;
        let end = data_offset + compressed_size;
        if end > len as u64 {
            return Err(ZipError::EntryPastEnd {
                entry: name,
                end,
                len: len as u64,
            });
        }
        if method == 0 && size != compressed_size {
            return Err(bad(
                "stored entry with different compressed and plain sizes",
            ));
        }
        entries.push(ZipEntry {
            name,
            method,
            data_offset,
            size,
            compressed_size,
        });
    }
    Ok(entries)
}

impl TorchArchive {
    /// Parses the zip in `bytes` and finds the record prefix (the directory of `data.pkl`).
    pub fn parse(bytes: &[u8]) -> Result<TorchArchive, ZipError> {
        let entries = parse(bytes)?;
        let pkl = entries
            .iter()
            .find(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"))
            .ok_or_else(|| ZipError::Missing("data.pkl".into()))?;
        let prefix = pkl.name[..pkl.name.len() - "data.pkl".len()].to_string();
        Ok(TorchArchive { entries, prefix })
    }

    /// The stored record `<prefix><record>` (`data.pkl`, `data/0`, `byteorder`), or
    /// [`ZipError::Missing`] / [`ZipError::Compressed`].
    pub fn record(&self, record: &str) -> Result<&ZipEntry, ZipError> {
        let name_len = self.prefix.len() + record.len();
        let entry = self
            .entries
            .iter()
            .find(|e| {
                e.name.len() == name_len
                    && e.name.starts_with(&self.prefix)
                    && e.name.ends_with(record)
            })
            .ok_or_else(|| ZipError::Missing(format!("{}{record}", self.prefix)))?;
        if entry.method != 0 {
            return Err(ZipError::Compressed {
                entry: entry.name.clone(),
                method: entry.method,
            });
        }
        Ok(entry)
    }

    /// Whether the optional record `<prefix><record>` exists.
    pub fn has_record(&self, record: &str) -> bool {
        self.record(record).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal stored zip the way Python's zipfile writes it (sizes in the local header).
    fn tiny_zip(files: &[(&str, &[u8])], method: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in files {
            let off = out.len() as u32;
            out.extend(LOCAL_SIG.to_le_bytes());
            out.extend([20, 0, 0, 0]);
            out.extend(method.to_le_bytes());
            out.extend([0u8; 8]); // time, date, crc
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(3u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend([0u8; 3]);
            out.extend(*data);
            central.extend(CENTRAL_SIG.to_le_bytes());
            central.extend([20, 0, 20, 0, 0, 0]);
            central.extend(method.to_le_bytes());
            central.extend([0u8; 8]);
            central.extend((data.len() as u32).to_le_bytes());
            central.extend((data.len() as u32).to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend([0u8; 12]);
            central.extend(off.to_le_bytes());
            central.extend(name.as_bytes());
        }
        let cd_off = out.len() as u32;
        out.extend(&central);
        out.extend(EOCD_SIG.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(cd_off.to_le_bytes());
        out.extend([0u8; 2]);
        out
    }

    #[test]
    fn finds_entries_prefix_and_data() {
        let z = tiny_zip(&[("x/data.pkl", b"PKL"), ("x/data/0", b"abcd")], 0);
        let a = TorchArchive::parse(&z).unwrap();
        assert_eq!(a.prefix, "x/");
        let e = a.record("data/0").unwrap();
        let r = e.range();
        assert_eq!(&z[r.start as usize..r.end as usize], b"abcd");
        assert!(matches!(a.record("version"), Err(ZipError::Missing(_))));
    }

    #[test]
    fn compressed_entry_is_refused_by_name() {
        let z = tiny_zip(&[("a/data.pkl", b"PKL")], 8);
        let a = TorchArchive::parse(&z).unwrap();
        assert_eq!(
            a.record("data.pkl").unwrap_err(),
            ZipError::Compressed {
                entry: "a/data.pkl".into(),
                method: 8
            }
        );
    }

    #[test]
    fn truncation_is_an_error() {
        let z = tiny_zip(&[("a/data.pkl", b"PKL")], 0);
        for cut in 0..z.len() {
            assert!(parse(&z[..cut]).is_err(), "cut {cut}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn mutated_zip_never_panics(at in 0usize..200, val in any::<u8>()) {
            let mut z = tiny_zip(&[("a/data.pkl", b"PKL"), ("a/data/0", b"0123456789")], 0);
            let n = z.len();
            z[at % n] = val;
            if let Ok(a) = TorchArchive::parse(&z) {
                for e in &a.entries {
                    assert!(e.range().end <= n as u64);
                }
            }
        }
    }
}
