//! Shared helpers for CLI tests: building checkpoints and reading outputs back.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use pma_format::{Checkpoint, Dtype, TensorSpec};

/// The `pma` binary under test.
pub fn pma() -> Command {
    Command::cargo_bin("pma").expect("pma binary is built for tests")
}

/// The committed merge fixtures (copied from shared/fixtures).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// name → (dtype, shape, bytes) of every tensor of a checkpoint.
pub type Tensors = BTreeMap<String, (Dtype, Vec<u64>, Vec<u8>)>;

pub fn read_tensors(path: &Path) -> Tensors {
    let ckpt = Checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ckpt.tensors()
        .iter()
        .map(|t| {
            (
                t.info.name.clone(),
                (t.info.dtype, t.info.shape.clone(), ckpt.bytes(t).to_vec()),
            )
        })
        .collect()
}

/// Writes a single-file HF checkpoint dir with a config.json.
pub fn write_ckpt(dir: &Path, tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    write_file(&dir.join("model.safetensors"), tensors);
    std::fs::write(dir.join("config.json"), br#"{"model_type":"llama"}"#).unwrap();
}

/// Writes one safetensors file.
pub fn write_file(path: &Path, tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) {
    let specs: Vec<(TensorSpec, &[u8])> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                TensorSpec {
                    name: n.to_string(),
                    dtype: *d,
                    shape: s.clone(),
                },
                b.as_slice(),
            )
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    pma_format::write_safetensors(path, &specs, &meta).unwrap();
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A raw safetensors file from a header JSON string and `data_len` zero bytes.
pub fn raw_file(path: &Path, header: &str, data_len: usize) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, b).unwrap();
}

/// A small run of `n` f32 checkpoints `step-{100*(i+1)}` with tensors `a` [2,3] and `b` [4].
pub fn small_run(root: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let dir = root.join(format!("step-{:07}", 100 * (i + 1)));
            let a: Vec<f32> = (0..6).map(|j| (i * 10 + j) as f32 * 0.5).collect();
            let b: Vec<f32> = (0..4).map(|j| -(j as f32) - i as f32).collect();
            write_ckpt(
                &dir,
                &[
                    ("a", Dtype::F32, vec![2, 3], f32_bytes(&a)),
                    ("b", Dtype::F32, vec![4], f32_bytes(&b)),
                ],
            );
            dir
        })
        .collect()
}

/// The event log. Tests that poll it while the watcher appends may catch a line half-written;
/// only complete lines (ending in a newline) are parsed.
pub fn events(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join(".pma-watch/events.jsonl")).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls `done` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The events of one kind (`merged`, `waiting`, ...) in the event log.
pub fn events_of(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    events(out)
        .into_iter()
        .filter(|e| e["event"] == kind)
        .collect()
}

/// The `step-*` outputs in a watch output dir, sorted.
pub fn output_steps(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    v.sort();
    v
}

/// `pma merge` of explicit checkpoints into an HF output at `out`.
pub fn merge(members: &[PathBuf], method: &[&str], out: &Path) {
    pma()
        .arg("merge")
        .args(members)
        .args(method)
        // HF whatever the members' format, to compare with watch's HF outputs.
        .args(["--format", "hf", "--quiet", "--out"])
        .arg(out)
        .assert()
        .success();
}

/// Relative paths of every file and folder (`name/`, a symlink counted as a file) under
/// `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if p.symlink_metadata().unwrap().is_dir() {
                out.push(rel + "/");
                stack.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[path = "../../../pma-format/tests/support/torch.rs"]
mod torch;
#[allow(unused_imports)] // each test binary uses its own subset of these helpers
pub use torch::{python, torch_python};

/// Whether [`python`] has torch, for the test running on this thread ([`torch_python`] says
/// SKIPPED, or panics under `PMA_REQUIRE_TORCH=1`).
pub fn torch_available() -> bool {
    torch_python(std::thread::current().name().unwrap_or("this test")).is_some()
}

/// Copies a directory tree (files and folders only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}
