//! DCP out: merges of the torch-written DCP fixture runs into DCP, checked bit for bit by pma's
//! own DCP reader against `expected/`, and loaded back by torch's stock `dcp.load`
//! (`tools/dcp_reference.py verify`, also into DTensors on 2 and 4 ranks).
//!
//! Torch comes from `PMA_PYTHON` (default `python3`). Without it the torch halves print SKIPPED
//! and pass, unless `PMA_REQUIRE_TORCH=1` (as CI sets), when they fail.
//!
//! The library-level merges here plan as `pma merge` does by default (model weights merged,
//! training state left out, or kept with `keep_state_newest`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use pma_format::dcp::{DcpCheckpoint, DcpEntry};
use pma_format::{classify_key, Checkpoint, EntryRole, Region, TensorSource};
use pma_merge::{
    execute, CheckpointSeries, ExecOptions, MergeConfig, MergePlan, MergeReport, NoProgress,
    OutputFormat, Selection, WeightSpec,
};

use common::{pma, torch_python};

const RUNS: [&str; 5] = [
    "run-single",
    "run-fsdp2",
    "run-resharded",
    "run-safetensors",
    "run-megatron",
];

fn dcp_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pma-format/tests/fixtures/dcp")
}

fn tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools")
}

/// The DCP directories of a run's checkpoints, oldest first (`stepN/model_and_optim` for
/// OLMo-core, `checkpoint-N/pytorch_model_fsdp_0` for accelerate).
fn members(run: &Path) -> Vec<PathBuf> {
    CheckpointSeries::discover(run)
        .unwrap()
        .entries
        .iter()
        .map(|e| pma_format::find_dcp_dir(&e.path).unwrap_or_else(|| e.path.clone()))
        .collect()
}

/// `dcp_reference.py verify METHOD OUT MEMBERS... [--ranks N]`: torch's plain `dcp.load` of
/// `out` must give the reference merge of the members bit for bit (and so must a Shard(0)
/// DTensor load on N ranks).
fn torch_verify(py: &str, method: &str, out: &Path, run: &Path, ranks: Option<usize>) {
    torch_verify_with(py, method, out, run, ranks, &[]);
}

/// [`torch_verify`] with extra `dcp_reference.py` options (`--prefix model.`).
fn torch_verify_with(
    py: &str,
    method: &str,
    out: &Path,
    run: &Path,
    ranks: Option<usize>,
    extra: &[&str],
) {
    let mut cmd = Command::new(py);
    cmd.arg(tools().join("dcp_reference.py"))
        .args(["verify", method])
        .arg(out)
        .args(members(run))
        .args(extra);
    if let Some(n) = ranks {
        cmd.args(["--ranks", &n.to_string()]);
    }
    let o = cmd.output().expect("running dcp_reference.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "verify {method} {}:\n{text}",
        out.display()
    );
    assert!(text.contains("OK:"), "{text}");
}

/// Merges every checkpoint of `run` into a DCP directory at `out` through the library.
fn merge_dcp(run: &Path, spec: WeightSpec, keep_state: bool, out: &Path) -> MergeReport {
    let series = CheckpointSeries::discover(run).unwrap();
    let (inputs, _) = Selection::default()
        .select(&series, true)
        .unwrap()
        .into_inputs();
    let weights = spec.weights(inputs.len()).unwrap();
    let config = MergeConfig {
        format: Some(OutputFormat::Dcp),
        keys: pma_merge::KeySelectionConfig {
            keep_state_newest: keep_state,
            ..Default::default()
        },
        ..MergeConfig::default()
    };
    let plan = MergePlan::build(inputs, weights, config).unwrap();
    execute(&plan, out, &ExecOptions::default(), &NoProgress)
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
}

/// Every tensor of `out` (read with pma's DCP reader) equals `expected` in dtype, shape and
/// bytes; `out` holds no other tensor unless `extra_ok`.
fn assert_matches_expected(out: &Path, expected: &Path, extra_ok: bool) {
    let got = DcpCheckpoint::open(out).unwrap();
    let want = Checkpoint::open(expected).unwrap();
    let mut scratch = Vec::new();
    for t in want.tensors() {
        let name = &t.info.name;
        let g = got
            .tensor(name)
            .unwrap_or_else(|| panic!("{}: no '{name}'", out.display()));
        assert_eq!((g.dtype, &g.shape), (t.info.dtype, &t.info.shape), "{name}");
        let full = Region::full(&g.shape);
        let bytes = g.read(&full, 0..full.numel(), &mut scratch).unwrap();
        assert!(
            bytes == want.bytes(t),
            "{}: '{name}' differs from {}",
            out.display(),
            expected.display()
        );
    }
    if !extra_ok {
        assert_eq!(
            got.entries().len(),
            want.tensors().len(),
            "{}",
            out.display()
        );
    }
}

/// Each merged tensor of `out` has the newest member's chunks, in the newest member's files.
fn assert_newest_layout(out: &Path, run: &Path) {
    let newest = members(run).pop().unwrap();
    let newest = pma_format::AnyCheckpoint::open(&newest).unwrap();
    let newest = newest.as_dcp().unwrap();
    let got = DcpCheckpoint::open(out).unwrap();
    for t in got.tensors() {
        let n = newest.tensor(&t.fqn).unwrap();
        let layout = |t: &pma_format::DcpTensor| -> Vec<(Region, String)> {
            t.chunks
                .iter()
                .map(|c| (c.region.clone(), c.storage.relative_path.clone()))
                .collect()
        };
        assert_eq!(layout(t), layout(n), "{}", t.fqn);
    }
}

fn ema() -> WeightSpec {
    WeightSpec::Ema { alpha: 0.2 }
}

#[test]
fn fixture_runs_merge_to_dcp_bit_exact_with_the_newest_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for run in RUNS {
        let dir = dcp_fixtures().join(run);
        for (spec, label) in [(WeightSpec::Sma, "sma"), (ema(), "ema0.2")] {
            let out = tmp.path().join(format!("{run}-{label}"));
            let report = merge_dcp(&dir, spec, false, &out);
            assert_eq!(report.plan.format, OutputFormat::Dcp);
            assert!(report
                .plan
                .files
                .contains(&pma_format::dcp_out::METADATA_FILE_NAME.to_string()));
            let expected = dir.join(format!("expected/{label}-n4.safetensors"));
            assert_matches_expected(&out, &expected, false);
            assert_newest_layout(&out, &dir);
            // The report's byte count is what is on disk.
            let on_disk: u64 = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum();
            assert_eq!(report.plan.bytes_written, on_disk, "{run}");
        }
    }
}

#[test]
fn fixture_dcp_outputs_load_in_torch() {
    let Some(py) = torch_python("fixture_dcp_outputs_load_in_torch") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // run-safetensors' inputs cannot be read by torch (the reference falls back to its numpy
    // reader), but pma's output is TORCH_SAVE and must load.
    for run in RUNS {
        let dir = dcp_fixtures().join(run);
        for (spec, method) in [(WeightSpec::Sma, "sma"), (ema(), "ema:0.2")] {
            let out = tmp.path().join(format!("{run}-{method}"));
            merge_dcp(&dir, spec, false, &out);
            let ranks = match (run, method) {
                ("run-fsdp2", "sma") => Some(2),
                ("run-resharded", "sma") => Some(4),
                _ => None,
            };
            torch_verify(&py, method, &out, &dir, ranks);
        }
    }
}

#[test]
fn megatron_run_merges_to_dcp_through_the_cli_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let run = dcp_fixtures().join("run-megatron");
    let out = tmp.path().join("merged");
    let o = pma()
        .args(["merge", "--method", "ema", "--alpha", "0.2", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("(dcp)"), "{stdout}");
    assert_matches_expected(&out, &run.join("expected/ema0.2-n4.safetensors"), false);
    assert_newest_layout(&out, &run);
    // Model-only entries, but Megatron's loader needs metadata.json and common.pt to open the
    // directory at all: they come from the newest member, unchanged.
    let newest = run.join("iter_0000400");
    for f in ["common.pt", "metadata.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(newest.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        DcpCheckpoint::open(&out).unwrap().entries().len(),
        9,
        "model tensors only"
    );

    // --format hf exports the same merge as safetensors.
    let hf = tmp.path().join("merged.safetensors");
    pma()
        .args(["merge", "--method", "sma", "--format", "hf", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&hf)
        .assert()
        .success();
    assert_eq!(
        common::read_tensors(&hf),
        common::read_tensors(&run.join("expected/sma-n4.safetensors"))
    );

    // A DCP output is a directory.
    let o = pma()
        .args(["merge", "--method", "sma", "--format", "dcp", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(tmp.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--format dcp writes a directory"));

    // --dry-run says what it would write.
    let o = pma()
        .args(["merge", "--method", "sma", "--dry-run", "--json", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(tmp.path().join("dry"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["plan"]["format"], "dcp");
    let files: Vec<&str> = v["plan"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    // Data files, then .metadata, then the files Megatron's loader needs.
    assert_eq!(files.len(), 7, "{files:?}");
    assert!(
        files[..4].iter().all(|f| f.ends_with(".distcp")),
        "{files:?}"
    );
    assert_eq!(files[4..], [".metadata", "common.pt", "metadata.json"]);
}

/// Every entry the output has beyond `model` is the newest member's entry, item for item,
/// byte for byte.
fn assert_kept_verbatim(out: &Path, newest: &DcpCheckpoint, model: &[String]) {
    let got = DcpCheckpoint::open(out).unwrap();
    let mut kept = 0;
    for e in newest.entries() {
        if model.iter().any(|m| m == e.fqn()) {
            continue;
        }
        let g = got
            .entry(e.fqn())
            .unwrap_or_else(|| panic!("kept output lacks '{}'", e.fqn()));
        let pairs: Vec<_> = match (e, g) {
            (DcpEntry::Bytes(a), DcpEntry::Bytes(b)) => vec![(&a.storage, &b.storage)],
            (DcpEntry::Tensor(a), DcpEntry::Tensor(b)) => {
                assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{}", a.fqn);
                a.chunks
                    .iter()
                    .zip(&b.chunks)
                    .map(|(x, y)| {
                        assert_eq!(x.region, y.region, "{}", a.fqn);
                        (&x.storage, &y.storage)
                    })
                    .collect()
            }
            _ => panic!("'{}' changed kind", e.fqn()),
        };
        for (a, b) in pairs {
            assert_eq!(a.relative_path, b.relative_path, "{}", e.fqn());
            assert!(
                newest.item_bytes(a).unwrap() == got.item_bytes(b).unwrap(),
                "'{}': item bytes differ",
                e.fqn()
            );
        }
        kept += 1;
    }
    assert!(kept > 0);
    assert_eq!(got.entries().len(), newest.entries().len());
}

#[test]
fn keep_state_newest_copies_every_other_entry_and_file_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    for run in ["run-fsdp2", "run-megatron"] {
        let dir = dcp_fixtures().join(run);
        let newest_path = members(&dir).pop().unwrap();
        let newest_any = pma_format::AnyCheckpoint::open(&newest_path).unwrap();
        let newest = newest_any.as_dcp().unwrap();
        let out = tmp.path().join(format!("{run}-kept"));
        let report = merge_dcp(&dir, WeightSpec::Sma, true, &out);
        let expected = dir.join("expected/sma-n4.safetensors");
        assert_matches_expected(&out, &expected, true);
        let model: Vec<String> = Checkpoint::open(&expected)
            .unwrap()
            .tensors()
            .iter()
            .map(|t| t.info.name.clone())
            .collect();
        assert_kept_verbatim(&out, newest, &model);
        // The newest directory's non-DCP files come along (Megatron's common.pt, metadata.json).
        let mut others: Vec<String> = std::fs::read_dir(newest.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && !n.ends_with(".distcp"))
            .collect();
        others.sort();
        assert_eq!(report.sidecars, others, "{run}");
        for f in &others {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(newest.dir().join(f)).unwrap(),
                "{f}"
            );
        }
        if run == "run-megatron" {
            assert_eq!(others, ["common.pt", "metadata.json"]);
        }
    }
    // Model-only without it.
    let dir = dcp_fixtures().join("run-fsdp2");
    let out = tmp.path().join("fsdp2-model-only");
    merge_dcp(&dir, WeightSpec::Sma, false, &out);
    let got = DcpCheckpoint::open(&out).unwrap();
    assert!(got
        .entries()
        .iter()
        .all(|e| classify_key(e.fqn()) == EntryRole::Model && matches!(e, DcpEntry::Tensor(_))));
}

#[test]
fn keep_state_output_loads_in_torch_with_its_state() {
    let Some(py) = torch_python("keep_state_output_loads_in_torch_with_its_state") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // run-fsdp2's kept items are torch.save payloads (optimizer tensors, scheduler and
    // dataloader bytes): stock dcp.load must read every one of them.
    let dir = dcp_fixtures().join("run-fsdp2");
    let out = tmp.path().join("kept");
    merge_dcp(&dir, WeightSpec::Sma, true, &out);
    let check = r#"
import sys, warnings, torch, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
warnings.filterwarnings("ignore")
def load(p):
    md = FileSystemReader(p).read_metadata()
    sd = {k: (torch.empty(tuple(m.size), dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None)
          for k, m in md.state_dict_metadata.items()}
    dcp.load(sd, checkpoint_id=p, no_dist=True)
    return sd
out, new = load(sys.argv[1]), load(sys.argv[2])
assert set(out) == set(new), set(out) ^ set(new)
n = 0
for k, v in new.items():
    if k.startswith(("optimizer", "lr_scheduler", "dataloader", "train_state")):
        a = out[k]
        same = torch.equal(a, v) if isinstance(v, torch.Tensor) else a == v
        assert same, k
        n += 1
assert n > 0
print("OK", n)
"#;
    let o = Command::new(&py)
        .args(["-c", check])
        .arg(&out)
        .arg(members(&dir).pop().unwrap())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    torch_verify(&py, "sma", &out, &dir, None);
}

#[test]
fn fresh_torch_run_resharded_2_to_4_round_trips() {
    let Some(py) = torch_python("fresh_torch_run_resharded_2_to_4_round_trips") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Column-sharded (Shard(1)) wo/w2 and uneven vocab chunks, re-sharded mid-run.
    let o = Command::new(&py)
        .arg(tools().join("make_dcp_run.py"))
        .arg(&run)
        .args([
            "--n",
            "3",
            "--world-sizes",
            "2,4,4",
            "--placements",
            "mixed",
        ])
        .args(["--layers", "1", "--seed", "11"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (spec, method) in [(WeightSpec::Sma, "sma"), (ema(), "ema:0.2")] {
        let out = tmp.path().join(format!("out-{method}"));
        merge_dcp(&run, spec, false, &out);
        assert_newest_layout(&out, &run);
        torch_verify(&py, method, &out, &run, Some(4));
    }
}

#[test]
fn olmo_and_accelerate_layouts_round_trip_through_torch() {
    let Some(py) = torch_python("olmo_and_accelerate_layouts_round_trip_through_torch") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // Keys under `model.`: OLMo-core's stepN/model_and_optim (its .metadata pickles OLMo-core's
    // own _StorageInfo; ours is torch's, which stock dcp.load reads without olmo_core) and
    // accelerate's checkpoint-N/pytorch_model_fsdp_0.
    for layout in ["olmo", "accelerate"] {
        let run = tmp.path().join(layout);
        let o = Command::new(&py)
            .arg(tools().join("make_dcp_run.py"))
            .arg(&run)
            .args(["--n", "2", "--layout", layout, "--world-size", "2"])
            .args(["--layers", "1", "--seed", "5"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = tmp.path().join(format!("{layout}-merged"));
        merge_dcp(&run, ema(), false, &out);
        assert_newest_layout(&out, &run);
        torch_verify_with(&py, "ema:0.2", &out, &run, None, &["--prefix", "model."]);
    }
}

#[test]
fn hf_run_writes_dcp_on_request_with_one_chunk_per_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("step-100");
    let b = tmp.path().join("step-200");
    let vals = |x: f32| -> Vec<u8> { (0..12).flat_map(|i| (x + i as f32).to_le_bytes()).collect() };
    common::write_ckpt(&a, &[("w", pma_format::Dtype::F32, vec![3, 4], vals(1.0))]);
    common::write_ckpt(&b, &[("w", pma_format::Dtype::F32, vec![3, 4], vals(3.0))]);
    let out = tmp.path().join("dcp");
    pma()
        .args(["merge", "--method", "sma", "--format", "dcp"])
        .arg(&a)
        .arg(&b)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let got = DcpCheckpoint::open(&out).unwrap();
    let w = got.tensor("w").unwrap();
    assert_eq!(w.chunks.len(), 1);
    assert_eq!(w.chunks[0].storage.relative_path, "__0_0.distcp");
    let mut scratch = Vec::new();
    let full = Region::full(&w.shape);
    assert_eq!(
        w.read(&full, 0..12, &mut scratch).unwrap(),
        vals(2.0).as_slice()
    );
    // Without --format, safetensors in gives HF out.
    let hf = tmp.path().join("hf");
    pma()
        .args(["merge", "--method", "sma"])
        .arg(&a)
        .arg(&b)
        .arg("--out")
        .arg(&hf)
        .assert()
        .success();
    assert!(hf.join("model.safetensors").is_file());
}

#[test]
fn failed_dcp_merge_leaves_nothing_and_overwrite_replaces_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("step-100");
    let b = tmp.path().join("step-200");
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    common::write_ckpt(
        &a,
        &[(
            "w",
            pma_format::Dtype::F32,
            vec![4],
            f32s(&[1.0, 2.0, 3.0, 4.0]),
        )],
    );
    common::write_ckpt(
        &b,
        &[(
            "w",
            pma_format::Dtype::F32,
            vec![4],
            f32s(&[1.0, f32::NAN, 3.0, 4.0]),
        )],
    );
    let merged = tmp.path().join("out");
    let listing = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // A NaN fails the merge after the DCP writer has started: no output, no staging left.
    let o = pma()
        .args(["merge", "--method", "sma", "--format", "dcp"])
        .arg(&a)
        .arg(&b)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("non-finite"));
    assert_eq!(listing(), ["step-100", "step-200"]);

    // An existing output is refused, then replaced whole with --overwrite.
    std::fs::create_dir(&merged).unwrap();
    std::fs::write(merged.join("stale.txt"), b"old").unwrap();
    let merge = |extra: &[&str]| {
        pma()
            .args([
                "merge",
                "--method",
                "sma",
                "--format",
                "dcp",
                "--allow-nonfinite",
            ])
            .args(extra)
            .arg(&a)
            .arg(&a)
            .arg("--out")
            .arg(&merged)
            .output()
            .unwrap()
    };
    assert!(!merge(&[]).status.success());
    assert!(merged.join("stale.txt").exists());
    assert!(merge(&["--overwrite"]).status.success());
    assert!(!merged.join("stale.txt").exists());
    let got = DcpCheckpoint::open(&merged).unwrap();
    let w = got.tensor("w").unwrap();
    let mut scratch = Vec::new();
    assert_eq!(
        w.read(&Region::full(&[4]), 0..4, &mut scratch).unwrap(),
        f32s(&[1.0, 2.0, 3.0, 4.0]).as_slice()
    );
    assert_eq!(listing(), ["out", "step-100", "step-200"]);
}
