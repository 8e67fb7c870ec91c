//! One DCP tensor item: a self-contained torch.save zip whose storage bytes are streamed.
//!
//! `torch.load` (which DCP's `FileSystemReader` runs on each item's byte range) needs a zip with
//! `<prefix>/data.pkl`, `<prefix>/data/<key>` and `<prefix>/version`. Every entry is *stored*
//! (method 0), so the item's length is known before a byte of tensor data exists: the planner
//! can lay out every file and `.metadata` up front, and the data streams straight through.
//!
//! Only the CRC-32 of the streamed entry is unknown until its last byte has passed. The local
//! header is written with a zero CRC and patched in place afterwards (the writer seeks back four
//! bytes); the central directory, written after the data, carries the real value from the start.
//! Patching keeps sizes and CRC in the local header, which every zip reader accepts, where a
//! data descriptor would add a second ZIP64 encoding to get right.
//!
//! Sizes and offsets that do not fit 31 bits use ZIP64 extra fields, and the end of the central
//! directory is always written as ZIP64 record + locator + classic record, as torch does. The
//! threshold is 2^31 - 1, not 2^32 - 1, because some readers (Python's `zipfile` among them) treat
//! 32-bit fields as signed. The storage entry's data is padded to a multiple of 64 bytes from the
//! item start with an `FB` extra field, like torch's own writer, so a reader that maps the item
//! at an aligned address gets aligned elements.

// Record signatures: the reader's, so the two cannot disagree.
use crate::torchzip::{
    CENTRAL_SIG, EOCD64_LOCATOR_SIG as ZIP64_LOCATOR_SIG, EOCD64_SIG as ZIP64_EOCD_SIG, EOCD_SIG,
    LOCAL_SIG,
};
/// Header id of the ZIP64 extended information extra field.
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// Header id of torch's alignment padding extra field (`b"FB"` read little-endian).
const PAD_EXTRA_ID: u16 = 0x4246;
/// Version needed to extract: 2.0 for plain stored entries, 4.5 for ZIP64.
const VERSION_PLAIN: u16 = 20;
const VERSION_ZIP64: u16 = 45;
/// MS-DOS date of 1980-01-01 (the zip epoch); time 00:00. Items are reproducible byte for byte.
const DOS_DATE: u16 = (1 << 5) | 1;
/// Values above this go into ZIP64 fields (see the module docs for why 31 bits).
pub(crate) const ZIP64_THRESHOLD: u64 = 0x7fff_ffff;
/// Alignment of the storage entry's data within the item.
const DATA_ALIGN: u64 = 64;
/// The `version` record torch.load requires (serialization format 3).
const VERSION_PAYLOAD: &[u8] = b"3\n";
/// torch.save's archive directory; any prefix loads, this is the one torch writes to a stream.
const PREFIX: &str = "archive/";

/// One zip entry's place in the item.
#[derive(Debug, Clone)]
struct EntryPlan {
    name: String,
    /// Offset of the local header from the item start.
    header_offset: u64,
    size: u64,
    crc: u32,
    /// Length of the local extra field (ZIP64 sizes + padding).
    local_extra: Vec<u8>,
}

impl EntryPlan {
    fn sizes_zip64(&self, threshold: u64) -> bool {
        self.size > threshold
    }

    fn offset_zip64(&self, threshold: u64) -> bool {
        self.header_offset > threshold
    }

    fn local_header_len(&self) -> u64 {
        30 + self.name.len() as u64 + self.local_extra.len() as u64
    }

    fn data_offset(&self) -> u64 {
        self.header_offset + self.local_header_len()
    }
}

/// The byte plan of one tensor item: everything but the streamed storage bytes and their CRC.
#[derive(Debug)]
pub(crate) struct TensorItemZip {
    threshold: u64,
    entries: Vec<EntryPlan>,
    /// Index of the streamed storage entry in `entries`.
    data_entry: usize,
    /// Bytes from the item start up to the storage data (local headers and small entries).
    prefix: Vec<u8>,
    total_len: u64,
}

impl TensorItemZip {
    /// Plans an item holding `data_pkl` (a complete pickle) and `data_len` streamed storage
    /// bytes. Values above `threshold` use ZIP64 (pass [`ZIP64_THRESHOLD`]; tests pass 0 to force
    /// ZIP64 on a small item).
    pub(crate) fn new(data_pkl: &[u8], data_len: u64, threshold: u64) -> TensorItemZip {
        let mut item = TensorItemZip {
            threshold,
            entries: Vec::with_capacity(4),
            data_entry: 2,
            prefix: Vec::new(),
            total_len: 0,
        };
        let mut pos = 0u64;
        for (name, payload) in [("data.pkl", data_pkl), ("byteorder", b"little".as_slice())] {
            let entry = item.plan_entry(name, pos, payload.len() as u64, crc32(payload), false);
            pos = entry.data_offset() + entry.size;
            item.prefix
                .extend_from_slice(&local_header(&entry, threshold));
            item.prefix.extend_from_slice(payload);
            item.entries.push(entry);
        }
        // The storage entry's CRC is patched in once the data has streamed past.
        let data = item.plan_entry("data/0", pos, data_len, 0, true);
        item.prefix
            .extend_from_slice(&local_header(&data, threshold));
        pos = data.data_offset() + data_len;
        item.entries.push(data);
        let version = item.plan_entry(
            "version",
            pos,
            VERSION_PAYLOAD.len() as u64,
            crc32(VERSION_PAYLOAD),
            false,
        );
        pos = version.data_offset() + version.size;
        item.entries.push(version);
        let cd_len = central_directory(&item.entries, pos, threshold).len() as u64;
        item.total_len = pos + cd_len;
        item
    }

    fn plan_entry(&self, name: &str, offset: u64, size: u64, crc: u32, align: bool) -> EntryPlan {
        let name = format!("{PREFIX}{name}");
        let mut entry = EntryPlan {
            name,
            header_offset: offset,
            size,
            crc,
            local_extra: Vec::new(),
        };
        if entry.sizes_zip64(self.threshold) {
            entry
                .local_extra
                .extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
            entry.local_extra.extend_from_slice(&16u16.to_le_bytes());
            entry.local_extra.extend_from_slice(&size.to_le_bytes());
            entry.local_extra.extend_from_slice(&size.to_le_bytes());
        }
        if align {
            // FB field: 4 header bytes + padding, so that the data lands on a multiple of 64.
            let unpadded = entry.data_offset() + 4;
            let pad = (DATA_ALIGN - unpadded % DATA_ALIGN) % DATA_ALIGN;
            entry
                .local_extra
                .extend_from_slice(&PAD_EXTRA_ID.to_le_bytes());
            entry
                .local_extra
                .extend_from_slice(&(pad as u16).to_le_bytes());
            entry
                .local_extra
                .resize(entry.local_extra.len() + pad as usize, 0);
        }
        entry
    }

    /// The item's bytes before the storage data.
    pub(crate) fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Offset, from the item start, of the storage entry's CRC field in its local header.
    pub(crate) fn crc_field_offset(&self) -> u64 {
        self.entries[self.data_entry].header_offset + 14
    }

    /// Offset of the storage data from the item start (a multiple of 64).
    pub(crate) fn data_offset(&self) -> u64 {
        self.entries[self.data_entry].data_offset()
    }

    /// The whole item's length: known before any data is written.
    pub(crate) fn total_len(&self) -> u64 {
        self.total_len
    }

    /// The item's bytes after the storage data, given the data's CRC-32.
    pub(crate) fn suffix(&self, data_crc: u32) -> Vec<u8> {
        let mut entries = self.entries.clone();
        entries[self.data_entry].crc = data_crc;
        let version = &entries[self.data_entry + 1];
        let mut out = local_header(version, self.threshold);
        out.extend_from_slice(VERSION_PAYLOAD);
        let cd_offset = version.data_offset() + version.size;
        out.extend_from_slice(&central_directory(&entries, cd_offset, self.threshold));
        debug_assert_eq!(
            self.data_offset() + entries[self.data_entry].size + out.len() as u64,
            self.total_len
        );
        out
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A 32-bit field: the value, or the 0xFFFFFFFF sentinel that sends readers to the ZIP64 field.
fn field32(v: u64, zip64: bool) -> u32 {
    if zip64 {
        u32::MAX
    } else {
        v as u32
    }
}

fn local_header(e: &EntryPlan, threshold: u64) -> Vec<u8> {
    let z = e.sizes_zip64(threshold);
    let mut out = Vec::with_capacity(e.local_header_len() as usize);
    put32(&mut out, LOCAL_SIG);
    put16(&mut out, if z { VERSION_ZIP64 } else { VERSION_PLAIN });
    put16(&mut out, 0); // flags: no data descriptor, ASCII names
    put16(&mut out, 0); // method: stored
    put16(&mut out, 0); // time
    put16(&mut out, DOS_DATE);
    put32(&mut out, e.crc);
    put32(&mut out, field32(e.size, z)); // compressed size
    put32(&mut out, field32(e.size, z)); // uncompressed size
    put16(&mut out, e.name.len() as u16);
    put16(&mut out, e.local_extra.len() as u16);
    out.extend_from_slice(e.name.as_bytes());
    out.extend_from_slice(&e.local_extra);
    out
}

/// Central directory, then the ZIP64 end record, its locator and the classic end record.
fn central_directory(entries: &[EntryPlan], cd_offset: u64, threshold: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let (zs, zo) = (e.sizes_zip64(threshold), e.offset_zip64(threshold));
        // ZIP64 extra: only the fields whose 32-bit slot holds the sentinel, in spec order.
        let mut extra = Vec::new();
        if zs || zo {
            let n = if zs { 16u16 } else { 0 } + if zo { 8 } else { 0 };
            put16(&mut extra, ZIP64_EXTRA_ID);
            put16(&mut extra, n);
            if zs {
                put64(&mut extra, e.size); // uncompressed
                put64(&mut extra, e.size); // compressed
            }
            if zo {
                put64(&mut extra, e.header_offset);
            }
        }
        let version = if zs || zo {
            VERSION_ZIP64
        } else {
            VERSION_PLAIN
        };
        put32(&mut out, CENTRAL_SIG);
        put16(&mut out, version); // made by (MS-DOS attributes)
        put16(&mut out, version); // needed
        put16(&mut out, 0); // flags
        put16(&mut out, 0); // method
        put16(&mut out, 0); // time
        put16(&mut out, DOS_DATE);
        put32(&mut out, e.crc);
        put32(&mut out, field32(e.size, zs));
        put32(&mut out, field32(e.size, zs));
        put16(&mut out, e.name.len() as u16);
        put16(&mut out, extra.len() as u16);
        put16(&mut out, 0); // comment length
        put16(&mut out, 0); // disk number start
        put16(&mut out, 0); // internal attributes
        put32(&mut out, 0); // external attributes
        put32(&mut out, field32(e.header_offset, zo));
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&extra);
    }
    let cd_len = out.len() as u64;
    let zip64_eocd_offset = cd_offset + cd_len;
    let n = entries.len() as u64;
    put32(&mut out, ZIP64_EOCD_SIG);
    put64(&mut out, 44); // size of the rest of this record
    put16(&mut out, VERSION_ZIP64);
    put16(&mut out, VERSION_ZIP64);
    put32(&mut out, 0); // this disk
    put32(&mut out, 0); // disk with the central directory
    put64(&mut out, n);
    put64(&mut out, n);
    put64(&mut out, cd_len);
    put64(&mut out, cd_offset);
    put32(&mut out, ZIP64_LOCATOR_SIG);
    put32(&mut out, 0);
    put64(&mut out, zip64_eocd_offset);
    put32(&mut out, 1); // total disks
    let big = cd_offset > threshold || cd_len > threshold;
    put32(&mut out, EOCD_SIG);
    put16(&mut out, 0);
    put16(&mut out, 0);
    put16(&mut out, n as u16);
    put16(&mut out, n as u16);
    put32(&mut out, field32(cd_len, big));
    put32(&mut out, field32(cd_offset, big));
    put16(&mut out, 0); // comment length
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// A whole item in memory, for inspection.
    fn build(pkl: &[u8], data: &[u8], threshold: u64) -> (TensorItemZip, Vec<u8>) {
        let item = TensorItemZip::new(pkl, data.len() as u64, threshold);
        let mut out = item.prefix().to_vec();
        out.extend_from_slice(data);
        out.extend_from_slice(&item.suffix(crc32(data)));
        let at = item.crc_field_offset() as usize;
        out[at..at + 4].copy_from_slice(&crc32(data).to_le_bytes());
        (item, out)
    }

    /// A tiny zip reader: walks the central directory from the end records and checks every
    /// entry against its local header. Returns (name, data offset, size, crc) per entry.
    fn parse(b: &[u8]) -> Vec<(String, u64, u64, u32)> {
        let eocd = b.len() - 22;
        assert_eq!(u32_at(b, eocd), EOCD_SIG);
        let loc = eocd - 20;
        assert_eq!(u32_at(b, loc), ZIP64_LOCATOR_SIG);
        let z64 = u64_at(b, loc + 8) as usize;
        assert_eq!(u32_at(b, z64), ZIP64_EOCD_SIG);
        let n = u64_at(b, z64 + 32) as usize;
        let cd_len = u64_at(b, z64 + 40) as usize;
        let mut p = u64_at(b, z64 + 48) as usize;
        assert_eq!(p + cd_len, z64);
        let mut out = Vec::new();
        for _ in 0..n {
            assert_eq!(u32_at(b, p), CENTRAL_SIG);
            let crc = u32_at(b, p + 16);
            let mut size = u64::from(u32_at(b, p + 24));
            let name_len = u16_at(b, p + 28) as usize;
            let extra_len = u16_at(b, p + 30) as usize;
            let mut hdr = u64::from(u32_at(b, p + 42));
            let name = String::from_utf8(b[p + 46..p + 46 + name_len].to_vec()).unwrap();
            let mut x = p + 46 + name_len;
            let x_end = x + extra_len;
            while x < x_end {
                let (id, len) = (u16_at(b, x), u16_at(b, x + 2) as usize);
                if id == ZIP64_EXTRA_ID {
                    let mut f = x + 4;
                    if size == u64::from(u32::MAX) {
                        size = u64_at(b, f);
                        assert_eq!(u64_at(b, f + 8), size);
                        f += 16;
                    }
                    if hdr == u64::from(u32::MAX) {
                        hdr = u64_at(b, f);
                    }
                }
                x += 4 + len;
            }
            let h = hdr as usize;
            assert_eq!(u32_at(b, h), LOCAL_SIG);
            assert_eq!(u16_at(b, h + 8), 0, "stored");
            assert_eq!(u32_at(b, h + 14), crc, "local and central CRC agree");
            assert_eq!(u16_at(b, h + 26) as usize, name_len);
            let data = h + 30 + name_len + u16_at(b, h + 28) as usize;
            assert_eq!(crc32(&b[data..data + size as usize]), crc, "{name}");
            out.push((name, data as u64, size, crc));
            p = x_end;
        }
        out
    }

    #[test]
    fn item_has_torch_entries_and_planned_length() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let (item, bytes) = build(b"\x80\x02K\x01.", &data, ZIP64_THRESHOLD);
        assert_eq!(bytes.len() as u64, item.total_len());
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "archive/data.pkl",
                "archive/byteorder",
                "archive/data/0",
                "archive/version"
            ]
        );
        let (_, off, size, _) = &entries[2];
        assert_eq!(*off, item.data_offset());
        assert_eq!(off % 64, 0, "storage data is 64-byte aligned in the item");
        assert_eq!(*size, 1000);
        assert_eq!(&bytes[*off as usize..*off as usize + 1000], &data[..]);
        let (_, voff, _, _) = &entries[3];
        assert_eq!(&bytes[*voff as usize..*voff as usize + 2], b"3\n");
        // No ZIP64 fields below the threshold: every central extra is empty.
        assert!(!bytes.windows(4).any(|w| w == [0x01, 0x00, 0x10, 0x00]));
    }

    #[test]
    fn zip64_fields_when_forced() {
        let data = vec![7u8; 100];
        let (item, bytes) = build(b"\x80\x02K\x01.", &data, 0);
        assert_eq!(bytes.len() as u64, item.total_len());
        let entries = parse(&bytes);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[2].2, 100);
        // The local header of data.pkl carries sentinel sizes and a ZIP64 extra field.
        assert_eq!(u32_at(&bytes, 18), u32::MAX);
        assert_eq!(u32_at(&bytes, 22), u32::MAX);
        assert_eq!(u16_at(&bytes, 4), VERSION_ZIP64);
        assert_eq!(u16_at(&bytes, 30 + 16), ZIP64_EXTRA_ID);
        assert_eq!(item.data_offset() % 64, 0);
    }

    #[test]
    fn zip64_encoding_of_a_5_gib_entry() {
        // The header encoders on their own: a 5 GiB storage entry at a 3 GiB offset.
        let size = 5u64 << 30;
        let item = TensorItemZip::new(b"\x80\x02K\x01.", size, ZIP64_THRESHOLD);
        let data = &item.entries[2];
        let local = local_header(data, ZIP64_THRESHOLD);
        assert_eq!(u16_at(&local, 4), VERSION_ZIP64);
        assert_eq!(u32_at(&local, 18), u32::MAX);
        assert_eq!(u32_at(&local, 22), u32::MAX);
        let name_len = u16_at(&local, 26) as usize;
        let x = 30 + name_len;
        assert_eq!(u16_at(&local, x), ZIP64_EXTRA_ID);
        assert_eq!(u64_at(&local, x + 4), size);
        assert_eq!(u64_at(&local, x + 12), size);
        assert_eq!(u16_at(&local, x + 20), PAD_EXTRA_ID);

        let mut far = data.clone();
        far.header_offset = 3 << 30;
        let cd = central_directory(
            std::slice::from_ref(&far),
            (3 << 30) + size,
            ZIP64_THRESHOLD,
        );
        assert_eq!(u32_at(&cd, 20), u32::MAX);
        assert_eq!(u32_at(&cd, 24), u32::MAX);
        assert_eq!(u32_at(&cd, 42), u32::MAX);
        let extra_len = u16_at(&cd, 30) as usize;
        assert_eq!(extra_len, 4 + 24);
        let x = 46 + name_len;
        assert_eq!(u64_at(&cd, x + 4), size);
        assert_eq!(u64_at(&cd, x + 20), 3 << 30);
        // The classic end record points readers to the ZIP64 one.
        let eocd = cd.len() - 22;
        assert_eq!(u32_at(&cd, eocd + 16), u32::MAX);
        let z64 = 46 + name_len + extra_len;
        assert_eq!(u64_at(&cd, z64 + 48), (3 << 30) + size);
        // The planned total covers the 5 GiB of data.
        assert!(item.total_len() > size);
        assert_eq!(
            item.total_len(),
            item.data_offset() + size + item.suffix(0).len() as u64
        );
    }
}
