//! torch.save checkpoints written by real torch (`tests/scripts/make_torch_save.py`): every
//! tensor read through `TensorSource` must equal torch's own contiguous bytes. Covers HF
//! `pytorch_model.bin` (single and sharded), a DeepSpeed-style `{'module': sd}` with views that
//! share a storage (offsets, a transposed and a strided column view), a Megatron-legacy nested
//! `{'model': {'language_model': ...}}`, and the legacy non-zip format's error.
//!
//! Needs python with torch (`PMA_PYTHON`, default `python3`). Without it the test prints
//! SKIPPED and passes, unless `PMA_REQUIRE_TORCH=1` (as CI sets), where it fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use pma_format::{Error, Region, TensorSource, TorchSaveCheckpoint};

fn python() -> String {
    std::env::var("PMA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Writes the checkpoints into `dir`, or returns false when torch is unavailable and not required.
fn make_checkpoints(dir: &Path) -> bool {
    let has_torch = Command::new(python())
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        if std::env::var("PMA_REQUIRE_TORCH").as_deref() == Ok("1") {
            panic!(
                "PMA_REQUIRE_TORCH=1 but `{} -c 'import torch'` fails",
                python()
            );
        }
        eprintln!("SKIPPED: no torch in {} (set PMA_PYTHON)", python());
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/make_torch_save.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "make_torch_save.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

type Expected = BTreeMap<String, BTreeMap<String, (String, Vec<u64>, String)>>;

fn read_whole(t: &dyn TensorSource, step: u64) -> Vec<u8> {
    let r = Region::full(t.shape());
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    let mut at = 0;
    while at < r.numel() {
        let end = (at + step).min(r.numel());
        out.extend_from_slice(t.read(&r, at..end, &mut scratch).unwrap());
        at = end;
    }
    out
}

#[test]
fn torch_save_tensors_read_like_torch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    if !make_checkpoints(dir) {
        return;
    }
    let expected: Expected =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let cases = [
        ("bin", "bin/pytorch_model.bin"),
        ("bin/pytorch_model.bin", "bin/pytorch_model.bin"),
        ("sharded", "sharded"),
        (
            "deepspeed/mp_rank_00_model_states.pt",
            "deepspeed/mp_rank_00_model_states.pt",
        ),
        ("megatron/model_optim_rng.pt", "megatron/model_optim_rng.pt"),
    ];
    for (open, key) in cases {
        let ckpt = TorchSaveCheckpoint::open(&dir.join(open)).unwrap();
        let want = &expected[key];
        let mut names: Vec<&str> = ckpt.tensors().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        let want_names: Vec<&str> = want.keys().map(String::as_str).collect();
        assert_eq!(names, want_names, "{open}");
        for (name, (dtype, shape, raw)) in want {
            let t = ckpt.tensor(name).unwrap();
            let src = t.source.as_ref();
            assert_eq!(format!("{:?}", src.dtype()), *dtype, "{open} {name}");
            assert_eq!(src.shape(), shape.as_slice(), "{open} {name}");
            let bytes = std::fs::read(dir.join(raw)).unwrap();
            for step in [u64::MAX, 1, 3] {
                assert!(read_whole(src, step) == bytes, "{open} {name} step {step}");
            }
        }
    }
    // Non-tensor leaves beside the weights are skipped, not fatal.
    let ds = TorchSaveCheckpoint::open(&dir.join("deepspeed/mp_rank_00_model_states.pt")).unwrap();
    assert!(ds.files()[0].skipped().is_empty(), "only `module` is read");
    match TorchSaveCheckpoint::open(&dir.join("legacy.pt")) {
        Err(Error::TorchLegacyFormat { .. }) => {}
        other => panic!("legacy format: {other:?}"),
    }
}

/// Torch-free: every DCP TORCH_SAVE item is a complete torch.save archive of one tensor, so
/// each item of run-single, copied out to its own file, must read like the DCP tensor itself
/// (including the column-major `output.weight`).
#[test]
fn dcp_items_read_as_torch_save_files() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dcp/run-single/step-0000100");
    let dcp = pma_format::DcpCheckpoint::open(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for t in dcp.tensors() {
        assert_eq!(t.chunks.len(), 1);
        let item = dcp.item_bytes(&t.chunks[0].storage).unwrap();
        let p = tmp.path().join("item.pt");
        std::fs::write(&p, item).unwrap();
        let ts = TorchSaveCheckpoint::open(&p).unwrap();
        let only: Vec<_> = ts.tensors().collect();
        assert_eq!(only.len(), 1, "{}", t.fqn);
        assert_eq!(only[0].source.shape(), t.shape.as_slice());
        assert!(
            read_whole(only[0].source.as_ref(), 5) == read_whole(t, u64::MAX),
            "{}",
            t.fqn
        );
    }
}

#[test]
fn legacy_format_gets_a_conversion_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("old.pt");
    std::fs::write(&p, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46]).unwrap();
    let e = TorchSaveCheckpoint::open(&p).unwrap_err();
    assert!(matches!(e, Error::TorchLegacyFormat { .. }));
    assert!(e.to_string().contains("torch>=1.6"), "{e}");
}
