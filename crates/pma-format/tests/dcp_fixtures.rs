//! The DCP reader against checkpoints written by real torch (`tests/fixtures/dcp`, see its
//! README): every model tensor of every member is read through `TensorSource` in whole, in odd
//! element ranges and in sub-boxes, and an exact f64 SMA / EMA merge of the four members must
//! equal the committed `expected/*.safetensors` bit for bit. The expected files come from torch's
//! own `dcp.load` (or the independent numpy reader for run-safetensors), so this proves the
//! reader end to end, including re-sharded chunk layouts and a column-major chunk.

use std::path::{Path, PathBuf};

use pma_format::dcp::{DcpCheckpoint, EntryRole};
use pma_format::dtype::{classify, encode_f64, weighted_sum, DtypeClass};
use pma_format::{Region, SafetensorsFile, TensorSource};

const RUNS: [&str; 5] = [
    "run-single",
    "run-fsdp2",
    "run-resharded",
    "run-safetensors",
    "run-megatron",
];

fn run_dir(run: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dcp")
        .join(run)
}

fn members(run: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run_dir(run))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("step-") || n.starts_with("iter_")
        })
        .collect();
    v.sort();
    assert_eq!(v.len(), 4, "{run}");
    v
}

/// The whole tensor, read in ranges of `step` elements (so runs straddle chunk boundaries).
fn read_all(t: &dyn TensorSource, step: u64) -> Vec<u8> {
    let whole = Region::full(t.shape());
    let n = whole.numel();
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    let mut at = 0;
    while at < n {
        let end = (at + step).min(n);
        out.extend_from_slice(t.read(&whole, at..end, &mut scratch).unwrap());
        at = end;
    }
    out
}

/// Row-major gather of `region` out of a whole tensor's bytes: the slow, obvious reference.
fn gather(full: &[u8], shape: &[u64], item: usize, region: &Region) -> Vec<u8> {
    let n = region.numel();
    let mut out = Vec::with_capacity(n as usize * item);
    for lin in 0..n {
        let mut rem = lin;
        let mut g = vec![0u64; shape.len()];
        for d in (0..shape.len()).rev() {
            g[d] = region.offsets[d] + rem % region.sizes[d];
            rem /= region.sizes[d];
        }
        let mut idx = 0u64;
        for d in 0..shape.len() {
            idx = idx * shape[d] + g[d];
        }
        let at = idx as usize * item;
        out.extend_from_slice(&full[at..at + item]);
    }
    out
}

#[test]
fn every_read_agrees_with_the_whole_tensor() {
    for run in RUNS {
        for m in members(run) {
            let ckpt = DcpCheckpoint::open(&m).unwrap();
            for t in ckpt.tensors() {
                let item = t.dtype.bitsize() / 8;
                let whole = read_all(t, u64::MAX);
                assert_eq!(
                    whole.len() as u64,
                    Region::full(&t.shape).numel() * item as u64
                );
                for step in [1, 7, 37, 128] {
                    assert_eq!(
                        read_all(t, step),
                        whole,
                        "{} {} step {step}",
                        m.display(),
                        t.fqn
                    );
                }
                if t.shape.is_empty() {
                    continue;
                }
                // Sub-boxes: the middle third-ish of every dim, and a single-row slab.
                let mid = Region {
                    offsets: t.shape.iter().map(|&d| d / 3).collect(),
                    sizes: t
                        .shape
                        .iter()
                        .map(|&d| (d - d / 3).div_ceil(2).max(1).min(d - d / 3))
                        .collect(),
                };
                let mut slab = Region::full(&t.shape);
                slab.offsets[0] = t.shape[0] - 1;
                slab.sizes[0] = 1;
                for region in [mid, slab] {
                    let want = gather(&whole, &t.shape, item, &region);
                    let n = region.numel();
                    let mut scratch = Vec::new();
                    let got = t.read(&region, 0..n, &mut scratch).unwrap().to_vec();
                    assert_eq!(got, want, "{} {} {region:?}", m.display(), t.fqn);
                    // An odd element range inside the region.
                    let (a, b) = (n / 5, n - n / 7);
                    let got = t.read(&region, a..b, &mut scratch).unwrap().to_vec();
                    assert_eq!(
                        got,
                        want[a as usize * item..b as usize * item],
                        "{} {}",
                        m.display(),
                        t.fqn
                    );
                }
            }
        }
    }
}

/// `reference_merge.weights`: sma 1/N; ema:a gives w_1 = (1-a)^(N-1), w_i = a(1-a)^(N-i).
/// Python's `**` on floats is C `pow`, which `powf` is too, so the weights match bit for bit.
fn weights(method: &str, n: usize) -> Vec<f64> {
    if method == "sma" {
        return vec![1.0 / n as f64; n];
    }
    let a: f64 = method.strip_prefix("ema:").unwrap().parse().unwrap();
    let mut w = vec![(1.0 - a).powf((n - 1) as f64)];
    for i in 1..n {
        w.push(a * (1.0 - a).powf((n - 1 - i) as f64));
    }
    w
}

fn check_merge(run: &str, method: &str, expected: &str) {
    let exp = run_dir(run).join("expected").join(expected);
    check_merge_of(&members(run), method, &exp);
}

/// Merges the model tensors of `dirs` (oldest first) through the reader, compares with `exp`.
fn check_merge_of(dirs: &[PathBuf], method: &str, exp: &Path) {
    let run = exp.display();
    let ckpts: Vec<DcpCheckpoint> = dirs
        .iter()
        .map(|m| DcpCheckpoint::open(m).unwrap())
        .collect();
    let w = weights(method, ckpts.len());
    let exp = SafetensorsFile::open(exp).unwrap();
    let mut model: Vec<&str> = ckpts[ckpts.len() - 1]
        .tensors()
        .filter(|t| t.role == EntryRole::Model)
        .map(|t| t.fqn.as_str())
        .collect();
    model.sort_unstable();
    let mut names: Vec<&str> = exp.tensors().iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(model, names, "{run}: model tensors");
    for info in exp.tensors() {
        let srcs: Vec<_> = ckpts
            .iter()
            .map(|c| c.tensor(&info.name).unwrap())
            .collect();
        // Reads in ranges of 37 elements, so the gather path and chunk seams are exercised.
        let bytes: Vec<Vec<u8>> = srcs.iter().map(|t| read_all(*t, 37)).collect();
        let want = exp.tensor_bytes(info);
        match classify(info.dtype) {
            DtypeClass::Float(fd) => {
                let n = info.numel() as usize;
                let mut acc = vec![0.0; n];
                let inputs: Vec<_> = bytes.iter().map(|b| (fd, b.as_slice())).collect();
                weighted_sum(&inputs, &w, &mut acc);
                let mut out = vec![0u8; n * fd.size_bytes()];
                encode_f64(fd, &acc, &mut out);
                assert!(out == want, "{run} {method} {}: merge differs", info.name);
            }
            _ => {
                for b in &bytes {
                    assert!(
                        b.as_slice() == want,
                        "{run} {}: exact tensor differs",
                        info.name
                    );
                }
            }
        }
    }
}

#[test]
fn sma_merge_is_bit_identical_to_torch_reference() {
    for run in RUNS {
        check_merge(run, "sma", "sma-n4.safetensors");
    }
}

#[test]
fn ema_merge_is_bit_identical_to_torch_reference() {
    for run in RUNS {
        check_merge(run, "ema:0.2", "ema0.2-n4.safetensors");
    }
}

#[test]
fn layouts_and_entries_are_as_torch_wrote_them() {
    // run-resharded: 2 chunks per sharded tensor at steps 100-200, 4 at 300-400.
    let m = members("run-resharded");
    let a = DcpCheckpoint::open(&m[0]).unwrap();
    let b = DcpCheckpoint::open(&m[3]).unwrap();
    assert_eq!(a.tensor("tok_embeddings.weight").unwrap().chunks.len(), 2);
    let tb = b.tensor("tok_embeddings.weight").unwrap();
    let rows: Vec<u64> = tb.chunks.iter().map(|c| c.region.sizes[0]).collect();
    assert_eq!(rows, [13, 13, 13, 11]);
    // Bytes entries are listed, never model.
    assert!(b
        .bytes_entries()
        .any(|e| e.fqn == "lr_scheduler.last_epoch"));
    assert!(b
        .entries()
        .iter()
        .filter(|e| matches!(e, pma_format::DcpEntry::Bytes(_)))
        .all(|e| e.role() == EntryRole::TrainingState));
    assert_eq!(
        b.tensor("train_state.step").unwrap().role,
        EntryRole::TrainingState
    );
    for e in b.bytes_entries() {
        assert!(b.item_bytes(&e.storage).is_some());
    }
    // run-fsdp2 optimizer state is training state.
    let f = DcpCheckpoint::open(&members("run-fsdp2")[0]).unwrap();
    let opt = f
        .tensors()
        .filter(|t| t.fqn.starts_with("optimizer."))
        .count();
    assert!(opt > 0);
    assert!(f
        .tensors()
        .filter(|t| t.fqn.starts_with("optimizer."))
        .all(|t| t.role == EntryRole::TrainingState));
    // Megatron emulation: stacked layers as [1, ...] chunks, _extra_state bytes.
    let g = DcpCheckpoint::open(&members("run-megatron")[0]).unwrap();
    let qkv = g
        .tensor("decoder.layers.self_attention.linear_qkv.weight")
        .unwrap();
    assert_eq!(qkv.shape, [2, 16, 8]);
    assert!(qkv.chunks.iter().all(|c| c.region.sizes[0] == 1));
    assert!(g
        .bytes_entries()
        .any(|e| e.fqn.contains("_extra_state/shard_")));
    assert!(pma_format::dcp::is_complete(&members("run-single")[0]).unwrap());
}

#[test]
fn zero_copy_when_one_chunk_holds_the_run() {
    let ckpt = DcpCheckpoint::open(&members("run-fsdp2")[0]).unwrap();
    let t = ckpt.tensor("tok_embeddings.weight").unwrap();
    let first = t.chunks[0].region.clone();
    let mut scratch = Vec::new();
    let n = first.numel();
    let got = t.read(&first, 0..n, &mut scratch).unwrap();
    assert_eq!(got.len() as u64, n * 4);
    // Zero copy: the scratch buffer was not used.
    assert!(scratch.is_empty());
}

#[test]
fn find_dcp_dir_resolves_framework_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["model_and_optim", "pytorch_model_fsdp_0"] {
        let top = tmp.path().join(sub.replace('_', "-"));
        std::fs::create_dir_all(top.join(sub)).unwrap();
        std::fs::write(top.join(sub).join(".metadata"), b"").unwrap();
        assert_eq!(pma_format::find_dcp_dir(&top), Some(top.join(sub)));
    }
    let m = members("run-single");
    assert_eq!(pma_format::find_dcp_dir(&m[0]), Some(m[0].clone()));
    assert_eq!(pma_format::find_dcp_dir(tmp.path()), None);
}

fn extra(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dcp-extra")
        .join(rel)
}

#[test]
fn olmo_core_layout_reads_and_merges() {
    // `.metadata` pickles olmo_core's own _StorageInfo; the checkpoint dir holds model_and_optim/.
    let dirs: Vec<PathBuf> = ["step100", "step200"]
        .iter()
        .map(|s| pma_format::find_dcp_dir(&extra("run-olmo").join(s)).unwrap())
        .collect();
    assert!(dirs[0].ends_with("step100/model_and_optim"));
    let c = DcpCheckpoint::open(&dirs[0]).unwrap();
    assert!(c
        .tensors()
        .any(|t| t.fqn.starts_with("optim.") && t.role == EntryRole::TrainingState));
    check_merge_of(&dirs, "sma", &extra("run-olmo/expected/sma-n2.safetensors"));
}

#[test]
fn accelerate_layout_reads_and_merges() {
    let dirs: Vec<PathBuf> = ["checkpoint-100", "checkpoint-200"]
        .iter()
        .map(|s| pma_format::find_dcp_dir(&extra("run-accelerate").join(s)).unwrap())
        .collect();
    assert!(dirs[0].ends_with("pytorch_model_fsdp_0"));
    check_merge_of(
        &dirs,
        "sma",
        &extra("run-accelerate/expected/sma-n2.safetensors"),
    );
}

#[test]
fn minimal_writer_styles_read_back_exactly() {
    // Protocol-2 .metadata without memo or FRAME, NEWOBJ+BUILD and REDUCE styles, Python zipfile
    // items: what a torch-free writer produces. Each holds the tensors of this safetensors file.
    let src =
        SafetensorsFile::open(&run_dir("run-single").join("expected/sma-n4.safetensors")).unwrap();
    for style in ["minimal-newobj", "minimal-reduce"] {
        let c = DcpCheckpoint::open(&extra(style)).unwrap();
        assert_eq!(c.tensors().count(), src.tensors().len(), "{style}");
        for info in src.tensors() {
            let t = c.tensor(&info.name).unwrap();
            assert_eq!(
                (t.dtype, t.shape.as_slice()),
                (info.dtype, info.shape.as_slice())
            );
            assert!(
                read_all(t, 29) == src.tensor_bytes(info),
                "{style} {}",
                info.name
            );
        }
    }
}
