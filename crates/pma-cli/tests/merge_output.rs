//! Output layout, provenance, dry-run, inspect, diff, and the Python cross-check.

mod common;

use std::path::Path;

use common::{bytes_f32, fixtures, pma, read_tensors, small_run};
use predicates::prelude::*;

fn hash_tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push((e.display().to_string(), std::fs::read(&e).unwrap()));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn sharded_output_matches_single_file_and_has_hf_index() {
    let d = tempfile::tempdir().unwrap();
    let run = fixtures().join("run-bf16");
    let before = hash_tree(&run);
    let single = d.path().join("single");
    let sharded = d.path().join("sharded");
    pma()
        .args(["merge", "--method", "ema", "--quiet", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&single)
        .assert()
        .success();
    pma()
        .args([
            "merge",
            "--method",
            "ema",
            "--quiet",
            "--max-shard-size",
            "20kB",
            "--run",
        ])
        .arg(&run)
        .arg("--out")
        .arg(&sharded)
        .assert()
        .success();
    assert_eq!(read_tensors(&single), read_tensors(&sharded));
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{:05}.safetensors", i + 1, n));
        assert!(std::fs::metadata(sharded.join(f)).unwrap().len() <= 20_000 + 4096);
    }
    let total: u64 = read_tensors(&single)
        .values()
        .map(|t| t.2.len() as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    // Sidecars of the newest checkpoint (step-0000400 has generation_config.json).
    assert!(
        sharded.join("config.json").exists() && sharded.join("generation_config.json").exists()
    );
    assert_eq!(before, hash_tree(&run), "inputs must never be modified");
}

#[test]
fn provenance_metadata_and_single_file_output() {
    let d = tempfile::tempdir().unwrap();
    let run = fixtures().join("run-f32");
    let out = d.path().join("merged.safetensors");
    pma()
        .args(["merge", "--method", "wma", "--quiet", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    assert!(out.is_file());
    let f = pma_format::SafetensorsFile::open(&out).unwrap();
    let meta = &f.header().metadata;
    assert_eq!(meta["format"], "pt");
    let pma: serde_json::Value = serde_json::from_str(&meta["pma"]).unwrap();
    assert_eq!(pma["method"]["name"], "wma");
    let steps: Vec<u64> = pma["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1000, 2000, 3000]);
    let w: Vec<f64> = pma["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(w, vec![1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
}

#[test]
fn dtype_override_updates_config_torch_dtype() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    pma()
        .args([
            "merge", "--method", "sma", "--dtype", "f32", "--quiet", "--run",
        ])
        .arg(fixtures().join("run-bf16"))
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
}

#[test]
fn dry_run_reads_no_data_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let assert = pma()
        .args([
            "merge",
            "--method",
            "ema",
            "--alpha",
            "0.5",
            "--last",
            "3",
            "--dry-run",
            "--json",
            "--run",
        ])
        .arg(fixtures().join("run-bf16"))
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    assert!(!out.exists());
    let v: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    let plan = &v["plan"];
    let weights: Vec<f64> = plan["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["weight"].as_f64().unwrap())
        .collect();
    assert_eq!(weights, vec![0.25, 0.25, 0.5]);
    assert_eq!(plan["inputs"][0]["step"], 200);
    assert!(
        plan["bytes_read"].as_u64().unwrap() > 0 && plan["bytes_written"].as_u64().unwrap() > 0
    );
    assert!(plan["memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(plan["files"][0], "model.safetensors");
    // Human form too.
    pma()
        .args(["merge", "--method", "sma", "--dry-run", "--run"])
        .arg(fixtures().join("run-bf16"))
        .arg("--out")
        .arg(&out)
        .assert()
        .success()
        .stdout(predicate::str::contains("step-0000300").and(predicate::str::contains("0.250000")));
}

#[test]
fn at_selects_window_ending_at_step() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 5);
    let assert = pma()
        .args([
            "merge",
            "--method",
            "sma",
            "--last",
            "2",
            "--at",
            "350",
            "--dry-run",
            "--json",
            "--run",
        ])
        .arg(&run)
        .arg("--out")
        .arg(d.path().join("o"))
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let steps: Vec<u64> = v["plan"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![200, 300]);
}

#[test]
fn inspect_lists_and_stats() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let dirs = small_run(&run, 1);
    let assert = pma()
        .args(["inspect", "--stats", "--json"])
        .arg(&dirs[0])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let r = &v["inspect"];
    assert_eq!(r["n_params"], 10);
    assert_eq!(r["n_bytes"], 40);
    let b = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "b")
        .unwrap();
    // b = [0, -1, -2, -3]
    assert_eq!(b["stats"]["mean"].as_f64(), Some(-1.5));
    assert_eq!(b["stats"]["min"].as_f64(), Some(-3.0));
    assert_eq!(b["stats"]["max"].as_f64(), Some(0.0));
    assert!((b["stats"]["norm"].as_f64().unwrap() - 14f64.sqrt()).abs() < 1e-12);
    assert!((b["stats"]["std"].as_f64().unwrap() - 1.25f64.sqrt()).abs() < 1e-12);
    pma()
        .arg("inspect")
        .arg(fixtures().join("run-bf16/step-0000300"))
        .assert()
        .success()
        .stdout(
            predicate::str::contains("sharded").and(predicate::str::contains("28832 parameters")),
        );
}

#[test]
fn diff_distances() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let dirs = small_run(&run, 2);
    let assert = pma()
        .args(["diff", "--json"])
        .arg(&dirs[0])
        .arg(&dirs[1])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let t = v["diff"]["tensors"].as_array().unwrap();
    let b = t.iter().find(|t| t["name"] == "b").unwrap();
    // b0 = [0,-1,-2,-3], b1 = [-1,-2,-3,-4]: |b0-b1| = 2, |b0| = sqrt(14).
    assert!((b["rel_l2"].as_f64().unwrap() - 2.0 / 14f64.sqrt()).abs() < 1e-12);
    let cos = 20.0 / (14f64.sqrt() * 30f64.sqrt());
    assert!((b["cosine"].as_f64().unwrap() - cos).abs() < 1e-12);
    let self_diff = pma()
        .args(["diff", "--json"])
        .arg(&dirs[0])
        .arg(&dirs[0])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&self_diff.get_output().stdout).unwrap();
    assert_eq!(v["diff"]["total"]["rel_l2"].as_f64(), Some(0.0));
}

/// The Python `safetensors` package loads our output and numpy confirms the values against the
/// reference merger. Skips, saying so, where python3 with numpy and safetensors is absent.
#[test]
fn python_safetensors_cross_check() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED python_safetensors_cross_check: python3 with numpy and safetensors is not installed");
        if std::env::var_os("PMA_REQUIRE_PYTHON").is_some() {
            panic!("PMA_REQUIRE_PYTHON is set but python3/numpy/safetensors are missing");
        }
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // bf16 output checked through the package's own parser (numpy has no bfloat16), f32 output
    // loaded as numpy arrays.
    for dtype in ["bf16", "f32"] {
        check_against_reference(
            d.path(),
            &["--method", "ema", "--alpha", "0.3"],
            "ema:0.3",
            dtype,
        );
    }
    // The decay-emulating weights (WSM) go through the same exact path: the reference computes
    // them independently, in Python, from the shapes' formulas.
    for (method, reference) in [
        ("decay-linear", "decay:linear"),
        ("decay-cosine", "decay:cosine"),
        ("decay-1-sqrt", "decay:1-sqrt"),
    ] {
        check_against_reference(d.path(), &["--method", method], reference, "f32");
    }
}

/// Merges the bf16 fixture run with `method_args`, merges it again with
/// `tools/reference_merge.py METHOD`, and has Python compare the two byte for byte.
fn check_against_reference(dir: &Path, method_args: &[&str], method: &str, dtype: &str) {
    let run = fixtures().join("run-bf16");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let label = method.replace([':', '.'], "_");
    let out = dir.join(format!("out-{label}-{dtype}"));
    pma()
        .arg("merge")
        .args(method_args)
        .args(["--max-shard-size", "30kB", "--quiet", "--dtype", dtype])
        .arg("--run")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let reference = dir.join(format!("ref-{label}-{dtype}.safetensors"));
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(root.join("tools/reference_merge.py"))
        .arg(method)
        .arg(&reference);
    for s in [
        "step-0000100",
        "step-0000200",
        "step-0000300",
        "step-0000400",
    ] {
        cmd.arg(run.join(s));
    }
    cmd.args(["--dtype", dtype]);
    assert!(cmd.status().unwrap().success());
    let script = r#"
import json, os, sys
import numpy as np
import safetensors
from safetensors.numpy import load_file
out, ref, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
files = sorted(set(idx["weight_map"].values()))
def raw(path):
    return {k: v for k, v in safetensors.deserialize(open(path, "rb").read())}
got = {}
for f in files:
    got.update(raw(os.path.join(out, f)))
want = raw(ref)
assert set(got) == set(want), set(got) ^ set(want)
for k in want:
    assert got[k]["dtype"] == want[k]["dtype"] and got[k]["shape"] == want[k]["shape"], k
    assert bytes(got[k]["data"]) == bytes(want[k]["data"]), k
if dtype == "f32":
    arrays = {}
    for f in files:
        arrays.update(load_file(os.path.join(out, f)))
    ref_arrays = load_file(ref)
    for k, v in ref_arrays.items():
        assert arrays[k].dtype == np.float32 and np.array_equal(arrays[k], v), k
print("ok", len(want))
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&out)
        .arg(&reference)
        .arg(dtype)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{method}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok 21"));
}

#[test]
fn merged_values_are_weighted_sums() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 3);
    let out = d.path().join("out");
    pma()
        .args([
            "merge",
            "--weights",
            "1,1,2",
            "--normalize",
            "--quiet",
            "--run",
        ])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let b = bytes_f32(&read_tensors(&out)["b"].2);
    // b_i = -j - i for i = 0,1,2; weights .25 .25 .5 → -j - (0*.25 + 1*.25 + 2*.5) = -j - 1.25
    assert_eq!(b, vec![-1.25, -2.25, -3.25, -4.25]);
}
