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
