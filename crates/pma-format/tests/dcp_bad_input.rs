//! Hostile and broken DCP checkpoints: each gets one specific error, never a panic. Every case
//! edits a copy of a torch-written fixture in a temp dir, the smallest edit that produces it.

use std::path::{Path, PathBuf};

use pma_format::dcp::DcpCheckpoint;
use pma_format::pickle::PickleErrorKind;
use pma_format::torchzip::ZipError;
use pma_format::Error;
use proptest::prelude::*;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dcp")
        .join(rel)
}

/// A writable copy of a fixture checkpoint directory.
fn copy(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("ckpt");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(fixture(rel)).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        std::fs::write(&to, std::fs::read(e.path()).unwrap()).unwrap();
    }
    (tmp, dst)
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern present in the fixture")
}

fn open_err(dir: &Path) -> Error {
    DcpCheckpoint::open(dir).expect_err("must be refused")
}

#[test]
fn truncated_metadata() {
    let (_t, d) = copy("run-single/step-0000100");
    edit(&d.join(".metadata"), |b| b.truncate(b.len() / 2));
    match open_err(&d) {
        Error::Pickle { source, .. } => assert_eq!(source.kind, PickleErrorKind::Truncated),
        e => panic!("{e}"),
    }
}

#[test]
fn altered_metadata_field_name() {
    let (_t, d) = copy("run-single/step-0000100");
    edit(&d.join(".metadata"), |b| {
        let at = find(b, b"state_dict_metadata");
        b[at] ^= 0x20; // 'State_dict_metadata'
    });
    match open_err(&d) {
        Error::DcpMetadata { reason, .. } => {
            assert!(reason.contains("state_dict_metadata"), "{reason}")
        }
        e => panic!("{e}"),
    }
}

#[test]
fn pickle_with_unknown_opcode() {
    let (_t, d) = copy("run-single/step-0000100");
    let at = {
        let b = std::fs::read(d.join(".metadata")).unwrap();
        find(&b, b"}\x94(") // the first EMPTY_DICT
    };
    edit(&d.join(".metadata"), |b| b[at] = 0x8f); // EMPTY_SET: valid pickle, not torch's
    match open_err(&d) {
        Error::Pickle { source, .. } => {
            assert_eq!(source.kind, PickleErrorKind::UnsupportedOpcode);
            assert_eq!((source.offset, source.opcode), (at as u64, Some(0x8f)));
        }
        e => panic!("{e}"),
    }
}

#[test]
fn unknown_global_where_a_dataclass_is_expected() {
    let (_t, d) = copy("run-single/step-0000100");
    edit(&d.join(".metadata"), |b| {
        // torch...metadata.BytesStorageMetadata -> torch...metadata.system, and fix the FRAME.
        let old: &[u8] = b"\x8c\x14BytesStorageMetadata";
        let new: &[u8] = b"\x8c\x06system";
        let at = find(b, old);
        b.splice(at..at + old.len(), new.iter().copied());
        let frame =
            u64::from_le_bytes(b[3..11].try_into().unwrap()) - (old.len() - new.len()) as u64;
        b[3..11].copy_from_slice(&frame.to_le_bytes());
    });
    match open_err(&d) {
        Error::DcpUnexpectedClass { found, .. } => {
            assert_eq!(found, "torch.distributed.checkpoint.metadata.system")
        }
        e => panic!("{e}"),
    }
}

#[test]
fn chunk_past_the_end_of_its_file() {
    let (_t, d) = copy("run-single/step-0000100");
    edit(&d.join("__0_0.distcp"), |b| b.truncate(b.len() - 100));
    assert!(matches!(open_err(&d), Error::DcpItemPastEnd { .. }));
}

/// Sets the first chunk's first size of the first tensor (run-fsdp2 tok_embeddings, [25, 8]).
fn first_chunk_rows(d: &Path, rows: u8) {
    edit(&d.join(".metadata"), |b| {
        let at = find(b, b"\x8c\x05sizes\x94h");
        assert_eq!(b[at + 10], b'K');
        assert_eq!(b[at + 11], 25);
        b[at + 11] = rows;
    });
}

#[test]
fn overlapping_chunks() {
    let (_t, d) = copy("run-fsdp2/step-0000100");
    first_chunk_rows(&d, 26);
    match open_err(&d) {
        Error::ChunkOverlap { tensor, .. } => assert_eq!(tensor, "tok_embeddings.weight"),
        e => panic!("{e}"),
    }
}

#[test]
fn chunks_leaving_a_hole() {
    let (_t, d) = copy("run-fsdp2/step-0000100");
    first_chunk_rows(&d, 24);
    match open_err(&d) {
        Error::ChunkHole {
            tensor,
            covered,
            numel,
            ..
        } => {
            assert_eq!(
                (tensor.as_str(), covered, numel),
                ("tok_embeddings.weight", 392, 400)
            )
        }
        e => panic!("{e}"),
    }
}

#[test]
fn compressed_zip_entry() {
    let (_t, d) = copy("run-single/step-0000100");
    edit(&d.join("__0_0.distcp"), |b| {
        // Mark every central-directory record of archive/data.pkl as deflated (method 8).
        let mut at = 0;
        while let Some(p) = b[at..].windows(4).position(|w| w == b"PK\x01\x02") {
            let rec = at + p;
            if b[rec + 46..].starts_with(b"archive/data.pkl") {
                b[rec + 10] = 8;
            }
            at = rec + 4;
        }
    });
    match open_err(&d) {
        Error::Zip {
            source: ZipError::Compressed { entry, method },
            ..
        } => assert_eq!((entry.as_str(), method), ("archive/data.pkl", 8)),
        e => panic!("{e}"),
    }
}

#[test]
fn missing_distcp_file() {
    let (_t, d) = copy("run-fsdp2/step-0000100");
    std::fs::remove_file(d.join("__1_0.distcp")).unwrap();
    match open_err(&d) {
        Error::DcpMissingFile { file, .. } => assert_eq!(file, "__1_0.distcp"),
        e => panic!("{e}"),
    }
    assert!(!pma_format::dcp::is_complete(&d).unwrap());
}

#[test]
fn missing_metadata_is_incomplete() {
    let (_t, d) = copy("run-single/step-0000100");
    std::fs::remove_file(d.join(".metadata")).unwrap();
    assert!(matches!(open_err(&d), Error::DcpNoMetadata { .. }));
    assert!(!pma_format::dcp::is_complete(&d).unwrap());
}

#[test]
fn relative_path_cannot_leave_the_checkpoint() {
    let (_t, d) = copy("run-single/step-0000100");
    edit(&d.join(".metadata"), |b| {
        let at = find(b, b"__0_0.distcp");
        b[at..at + 12].copy_from_slice(b"../0_0.distc");
    });
    assert!(matches!(open_err(&d), Error::DcpMetadata { .. }));
}

#[test]
fn safetensors_item_with_wrong_saved_offsets() {
    let (_t, d) = copy("run-safetensors/step-0000100");
    edit(&d.join("__1_0.distcp"), |b| {
        // The second rank's chunk claims to sit at row 0, like the first rank's.
        let at = find(b, b"saved_offsets\\\": [25");
        b[at + 18] = b' ';
        b[at + 19] = b'0';
    });
    assert!(matches!(
        open_err(&d),
        Error::DcpItemMismatch {
            what: "DCP_SHARDING_INFO saved_offsets",
            ..
        }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Random byte edits of real `.metadata` files: decoding and interpreting never panics.
    #[test]
    fn mutated_metadata_never_panics(
        run in 0usize..5,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let rel = ["run-single/step-0000100", "run-fsdp2/step-0000200", "run-resharded/step-0000300",
                   "run-safetensors/step-0000100", "run-megatron/iter_0000100"][run];
        let mut b = std::fs::read(fixture(rel).join(".metadata")).unwrap();
        for (i, v) in edits {
            let at = i.index(b.len());
            b[at] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        let _ = pma_format::pickle::parse(&b);
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for e in std::fs::read_dir(fixture(rel)).unwrap() {
            let e = e.unwrap();
            if e.file_name() != ".metadata" {
                std::os::unix::fs::symlink(e.path(), d.join(e.file_name())).unwrap();
            }
        }
        std::fs::write(d.join(".metadata"), &b).unwrap();
        let _ = DcpCheckpoint::open(d);
    }
}

/// Bytes a decoded tree occupies, counted the way `pickle::parse` charges its budget.
fn tree_bytes(v: &pma_format::pickle::Value) -> u64 {
    use pma_format::pickle::Value;
    let node = std::mem::size_of::<Value>() as u64;
    node + match v {
        Value::Str(s) => s.len() as u64,
        Value::Bytes(b) => b.len() as u64,
        Value::Global { module, name } => (module.len() + name.len()) as u64,
        Value::Tuple(x) | Value::List(x) => x.iter().map(tree_bytes).sum(),
        Value::Dict(x) => x.iter().map(|(k, v)| tree_bytes(k) + tree_bytes(v)).sum(),
        Value::Reduce { callable, args } => tree_bytes(callable) + tree_bytes(args),
        Value::Object { class, args, state } => {
            tree_bytes(class) + tree_bytes(args) + state.as_deref().map_or(0, tree_bytes)
        }
        Value::PersistentId(p) => tree_bytes(p),
        _ => 0,
    }
}

#[test]
fn real_metadata_stays_far_inside_the_expansion_budget() {
    // parse() refuses trees over BUDGET_BYTES_PER_INPUT_BYTE (+1 MiB); torch's files need far
    // less, and must keep needing less than a quarter of it.
    for rel in [
        "run-single/step-0000100",
        "run-fsdp2/step-0000400",
        "run-resharded/step-0000400",
        "run-safetensors/step-0000100",
        "run-megatron/iter_0000400",
    ] {
        let b = std::fs::read(fixture(rel).join(".metadata")).unwrap();
        let v = pma_format::pickle::parse(&b).unwrap();
        let ratio = tree_bytes(&v) as f64 / b.len() as f64;
        let limit = pma_format::pickle::BUDGET_BYTES_PER_INPUT_BYTE as f64 / 4.0;
        assert!(ratio < limit, "{rel}: tree is {ratio:.1}x the pickle");
    }
}
