//! Every bad input gets one clear error naming the file and tensor, a nonzero exit, and no output.

mod common;

use std::path::Path;

use common::{f32_bytes, pma, raw_file, small_run, write_ckpt, write_file};
use pma_format::Dtype;
use predicates::prelude::*;

/// Runs `pma merge --method sma` on `inputs`, expects failure mentioning every `needles`.
fn merge_fails(inputs: &[&Path], out: &Path, needles: &[&str]) {
    let mut cmd = pma();
    cmd.arg("merge")
        .args(inputs)
        .args(["--method", "sma", "--quiet", "--out"])
        .arg(out);
    let mut assert = cmd
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::starts_with("error: "));
    for n in needles {
        assert = assert.stderr(predicate::str::contains(*n));
    }
    let stderr = String::from_utf8(assert.get_output().stderr.clone()).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "output must not exist after a failed merge");
    // Nothing staged is left beside the output either.
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("pma-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

fn good(dir: &Path) -> std::path::PathBuf {
    small_run(dir, 1).remove(0)
}

#[test]
fn header_too_large() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&bad, b).unwrap();
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["bad.safetensors", "header claims"],
    );
}

#[test]
fn header_past_end_of_file() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    let mut b = 5000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&bad, b).unwrap();
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["bad.safetensors", "truncated"],
    );
}

#[test]
fn malformed_json() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    raw_file(&bad, r#"{"a": {"dtype": "F32", "#, 0);
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["bad.safetensors", "malformed header"],
    );
}

#[test]
fn offsets_out_of_bounds() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    // Header is consistent but the file holds only 16 of the 24 data bytes.
    raw_file(
        &bad,
        r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]}}"#,
        16,
    );
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["bad.safetensors", "truncated"],
    );
}

#[test]
fn overlapping_offsets() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    raw_file(
        &bad,
        r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["bad.safetensors", "tensor 'b'", "overlaps"],
    );
}

#[test]
fn size_not_numel_times_dtype() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    raw_file(
        &bad,
        r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]},"b":{"dtype":"F32","shape":[4],"data_offsets":[20,36]}}"#,
        36,
    );
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["bad.safetensors", "tensor 'a'", "needs 24 bytes"],
    );
}

#[test]
fn file_length_wrong() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    raw_file(
        &bad,
        r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]}}"#,
        48,
    );
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["bad.safetensors", "describes"],
    );
}

#[test]
fn unreadable_missing_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    merge_fails(
        &[&good(d.path()), &d.path().join("nope")],
        &d.path().join("out"),
        &["nope"],
    );
}

#[test]
fn missing_tensor_and_extra_tensor() {
    let d = tempfile::tempdir().unwrap();
    let g = good(d.path());
    let fewer = d.path().join("fewer");
    write_ckpt(
        &fewer,
        &[("a", Dtype::F32, vec![2, 3], f32_bytes(&[0.0; 6]))],
    );
    merge_fails(
        &[&g, &fewer],
        &d.path().join("out"),
        &["fewer", "tensor 'b' is missing"],
    );
    merge_fails(
        &[&fewer, &g],
        &d.path().join("out"),
        &["fewer", "tensor 'b' is missing"],
    );
}

#[test]
fn shape_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let g = good(d.path());
    let odd = d.path().join("odd");
    write_ckpt(
        &odd,
        &[
            ("a", Dtype::F32, vec![3, 2], f32_bytes(&[0.0; 6])),
            ("b", Dtype::F32, vec![4], f32_bytes(&[0.0; 4])),
        ],
    );
    merge_fails(
        &[&g, &odd],
        &d.path().join("out"),
        &["tensor 'a'", "shape [2, 3]", "odd has [3, 2]"],
    );
}

#[test]
fn unsupported_dtype() {
    let d = tempfile::tempdir().unwrap();
    let g = good(d.path());
    let f8 = d.path().join("f8");
    write_ckpt(
        &f8,
        &[
            ("a", Dtype::F8_E4M3, vec![2, 3], vec![0; 6]),
            ("b", Dtype::F32, vec![4], f32_bytes(&[0.0; 4])),
        ],
    );
    merge_fails(
        &[&g, &f8],
        &d.path().join("out"),
        &["tensor 'a'", "unsupported dtype F8_E4M3"],
    );
}

#[test]
fn unknown_dtype_in_header() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    raw_file(
        &bad,
        r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
        8,
    );
    merge_fails(
        &[&good(d.path()), &bad],
        &d.path().join("out"),
        &["tensor 'a'", "unknown dtype 'Q4'"],
    );
}

#[test]
fn nonfinite_is_an_error_unless_allowed() {
    let d = tempfile::tempdir().unwrap();
    let g = good(d.path());
    let nan = d.path().join("nan");
    write_ckpt(
        &nan,
        &[
            (
                "a",
                Dtype::F32,
                vec![2, 3],
                f32_bytes(&[f32::NAN, 1.0, f32::INFINITY, 0.0, 0.0, 0.0]),
            ),
            ("b", Dtype::F32, vec![4], f32_bytes(&[0.0; 4])),
        ],
    );
    merge_fails(
        &[&g, &nan],
        &d.path().join("out"),
        &["nan", "tensor 'a'", "2 non-finite"],
    );
    let out = d.path().join("out2");
    pma()
        .arg("merge")
        .args([&g, &nan])
        .args(["--method", "sma", "--allow-nonfinite", "--out"])
        .arg(&out)
        .assert()
        .success()
        .stderr(predicate::str::contains("warning").and(predicate::str::contains("2 non-finite")));
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn integer_tensors_copied_when_identical_error_when_not() {
    let d = tempfile::tempdir().unwrap();
    let ids: Vec<u8> = [1i64, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let other: Vec<u8> = [1i64, 2, 4].iter().flat_map(|x| x.to_le_bytes()).collect();
    let x = d.path().join("x");
    let y = d.path().join("y");
    let z = d.path().join("z");
    write_ckpt(
        &x,
        &[
            ("w", Dtype::F32, vec![1], f32_bytes(&[1.0])),
            ("ids", Dtype::I64, vec![3], ids.clone()),
        ],
    );
    write_ckpt(
        &y,
        &[
            ("w", Dtype::F32, vec![1], f32_bytes(&[3.0])),
            ("ids", Dtype::I64, vec![3], ids.clone()),
        ],
    );
    write_ckpt(
        &z,
        &[
            ("w", Dtype::F32, vec![1], f32_bytes(&[3.0])),
            ("ids", Dtype::I64, vec![3], other),
        ],
    );
    let out = d.path().join("ok");
    pma()
        .arg("merge")
        .args([&x, &y])
        .args(["--method", "sma", "--quiet", "--out"])
        .arg(&out)
        .assert()
        .success();
    let t = common::read_tensors(&out);
    assert_eq!(t["ids"].2, ids);
    assert_eq!(common::bytes_f32(&t["w"].2), vec![2.0]);
    merge_fails(
        &[&x, &z],
        &d.path().join("out"),
        &["non-float tensor 'ids' differs"],
    );
}

#[test]
fn missing_shard() {
    let d = tempfile::tempdir().unwrap();
    let g = good(d.path());
    let sharded = d.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    write_file(
        &sharded.join("model-00001-of-00002.safetensors"),
        &[("a", Dtype::F32, vec![2, 3], f32_bytes(&[0.0; 6]))],
    );
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        r#"{"metadata":{"total_size":40},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    merge_fails(
        &[&g, &sharded],
        &d.path().join("out"),
        &[
            "model-00002-of-00002.safetensors",
            "tensor 'b'",
            "does not exist",
        ],
    );
}

#[test]
fn shard_name_escaping_directory_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let g = good(d.path());
    let sharded = d.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"../step-0000100/model.safetensors"}}"#,
    )
    .unwrap();
    merge_fails(
        &[&g, &sharded],
        &d.path().join("out"),
        &["not a plain file name"],
    );
}

#[test]
fn existing_output_needs_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 2);
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"precious").unwrap();
    pma()
        .args(["merge", "--method", "sma", "--quiet", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("already exists").and(predicate::str::contains("--overwrite")),
        );
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"precious");
    pma()
        .args([
            "merge",
            "--method",
            "sma",
            "--quiet",
            "--overwrite",
            "--run",
        ])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        2,
        "no staging left beside the output"
    );
}

#[test]
fn not_enough_checkpoints_and_min() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 3);
    let out = d.path().join("out");
    pma()
        .args(["merge", "--method", "sma", "--last", "5", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "asked for 5 checkpoints but only 3 qualify",
        ));
    pma()
        .args([
            "merge", "--method", "sma", "--last", "5", "--min", "3", "--quiet", "--run",
        ])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
}

#[test]
fn incomplete_checkpoint_in_run_is_skipped_with_warning() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let dirs = small_run(&run, 4);
    // The newest is being written: truncate its weights.
    let f = dirs[3].join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 3).unwrap();
    let out = d.path().join("out");
    let assert = pma()
        .args(["merge", "--method", "sma", "--last", "2", "--json", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .success()
        .stderr(
            predicate::str::contains("warning: skipping incomplete checkpoint")
                .and(predicate::str::contains("step-0000400")),
        );
    let v: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let steps: Vec<u64> = v["report"]["plan"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![200, 300]);
}

#[test]
fn weights_count_must_match() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 3);
    pma()
        .args(["merge", "--weights", "0.5,0.5", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(d.path().join("out"))
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "2 weights given for 3 checkpoints",
        ));
}
