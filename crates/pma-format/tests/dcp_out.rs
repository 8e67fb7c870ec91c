//! The DCP writer against real torch: write checkpoints with `pma_format::dcp_out`, load them
//! with torch's stock `FileSystemReader` (`dcp.load`), and compare bit for bit.
//!
//! Python comes from `PMA_PYTHON` (default `python3`) and must import torch. Without it these
//! tests print SKIPPED and pass, unless `PMA_REQUIRE_TORCH=1` (as CI sets), when they fail.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use pma_format::dcp_out::{
    DcpChunk, DcpLayout, DcpTensor, DcpWriteSummary, DcpWriter, PlannerKey, VerbatimItem,
    VerbatimKind,
};
use pma_format::{Dtype, Region, SafetensorsFile};

mod support {
    pub mod torch;
}
use support::torch::torch_python;

const FIXTURES: [&str; 5] = [
    "run-single-sma-n4.safetensors",
    "run-fsdp2-sma-n4.safetensors",
    "run-resharded-sma-n4.safetensors",
    "run-safetensors-sma-n4.safetensors",
    "run-megatron-sma-n4.safetensors",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dcp_out")
        .join(name)
}

fn check_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dcp_out_check.py")
}

/// Runs the check script; panics with its output unless it exits 0.
fn check(py: &str, args: &[&OsStr]) -> String {
    let out = Command::new(py)
        .arg(check_script())
        .args(args)
        .output()
        .expect("running the python check script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "check script failed:\n{text}");
    text
}

/// torch.chunk's split of `n` into `w` pieces: sizes ceil(n/w), the last ones short or absent.
fn torch_split(n: u64, w: u64) -> Vec<(u64, u64)> {
    let step = n.div_ceil(w).max(1);
    (0..w)
        .map(|r| (r * step, (n.min((r + 1) * step)).saturating_sub(r * step)))
        .filter(|&(_, size)| size > 0)
        .collect()
}

#[derive(Clone, Copy)]
enum Sharding {
    /// One chunk per tensor, all in `__0_0.distcp`.
    Whole,
    /// `Shard(dim)` over `ranks` ranks where the tensor has that dim, else `Shard(0)`; chunk r
    /// goes to `__r_0.distcp`. 0-dim tensors are one chunk on rank 0.
    Shard { dim: usize, ranks: u64 },
}

fn chunks_for(shape: &[u64], sharding: Sharding) -> Vec<DcpChunk> {
    let whole = || {
        vec![DcpChunk {
            region: Region::full(shape),
            file: "__0_0.distcp".into(),
        }]
    };
    match sharding {
        Sharding::Whole => whole(),
        Sharding::Shard { .. } if shape.is_empty() => whole(),
        Sharding::Shard { dim, ranks } => {
            let d = if dim < shape.len() { dim } else { 0 };
            torch_split(shape[d], ranks)
                .into_iter()
                .enumerate()
                .map(|(r, (off, size))| {
                    let mut region = Region::full(shape);
                    region.offsets[d] = off;
                    region.sizes[d] = size;
                    DcpChunk {
                        region,
                        file: format!("__{r}_0.distcp"),
                    }
                })
                .collect()
        }
    }
}

/// Calls `f(first_element, n_elements)` for every contiguous run (along the last dim) of
/// `region` inside a row-major tensor of `shape`, in the region's row-major order.
fn for_each_run(shape: &[u64], region: &Region, mut f: impl FnMut(u64, u64)) {
    if shape.is_empty() {
        return f(0, 1);
    }
    if region.numel() == 0 {
        return;
    }
    let rank = shape.len();
    let mut strides = vec![1u64; rank];
    for d in (0..rank - 1).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let mut idx = vec![0u64; rank - 1];
    loop {
        let start: u64 = (0..rank)
            .map(|d| (region.offsets[d] + idx.get(d).copied().unwrap_or(0)) * strides[d])
            .sum();
        f(start, region.sizes[rank - 1]);
        // Odometer over the leading dims.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < region.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

fn item_bytes(dtype: Dtype) -> u64 {
    dtype.bitsize() as u64 / 8
}

/// The DCP tensors of every tensor in `src`, with `sharding`.
fn tensors_of(src: &SafetensorsFile, sharding: Sharding) -> Vec<DcpTensor> {
    src.tensors()
        .iter()
        .map(|t| DcpTensor {
            fqn: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            chunks: chunks_for(&t.shape, sharding),
        })
        .collect()
}

/// Streams every chunk the writer asks for from the full tensors in `src`, one contiguous run
/// per `write` call (so a chunk arrives in many pieces, as from the merge pipeline).
fn write_chunks(mut w: DcpWriter, src: &SafetensorsFile) -> DcpWriteSummary {
    while let Some((t, c)) = w.next_chunk() {
        let tensor = w.layout().tensors[t].clone();
        let region = tensor.chunks[c].region.clone();
        let info = src
            .tensors()
            .iter()
            .find(|i| i.name == tensor.fqn)
            .expect("layout tensors come from src");
        let bytes = src.tensor_bytes(info);
        let isz = item_bytes(tensor.dtype);
        w.begin_chunk(&tensor.fqn, &region).unwrap();
        let mut runs = Vec::new();
        for_each_run(&tensor.shape, &region, |start, n| runs.push((start, n)));
        for (start, n) in runs {
            w.write(&bytes[(start * isz) as usize..((start + n) * isz) as usize])
                .unwrap();
        }
        w.end_chunk().unwrap();
    }
    w.finish().unwrap()
}

/// Writes every fixture with `sharding` and checks all of them in one python call (importing
/// torch dominates). `dtensor_ranks`: also load the first fixture into DTensors on that many ranks.
fn round_trip(test: &str, sharding: Sharding, dtensor_ranks: Option<u64>) {
    let Some(py) = torch_python(test) else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = FIXTURES
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let sources: Vec<PathBuf> = FIXTURES.iter().map(|name| fixture(name)).collect();
    let mut args = vec![OsStr::new("load")];
    for (source, dir) in sources.iter().zip(&dirs) {
        let src = SafetensorsFile::open(source).unwrap();
        let layout = DcpLayout {
            tensors: tensors_of(&src, sharding),
            ..DcpLayout::default()
        };
        let w = DcpWriter::create(dir.path(), layout).unwrap();
        let summary = write_chunks(w, &src);
        assert!(summary.n_items >= src.tensors().len());
        args.push(dir.path().as_os_str());
        args.push(source.as_os_str());
    }
    let ranks = dtensor_ranks.map(|n| n.to_string());
    if let Some(ranks) = &ranks {
        args.extend([OsStr::new("--ranks"), OsStr::new(ranks)]);
    }
    let out = check(&py, &args);
    assert_eq!(out.matches("OK:").count(), FIXTURES.len(), "{out}");
}

#[test]
fn torch_loads_one_chunk_per_tensor() {
    round_trip("torch_loads_one_chunk_per_tensor", Sharding::Whole, Some(2));
}

#[test]
fn torch_loads_two_rank_row_shards() {
    round_trip(
        "torch_loads_two_rank_row_shards",
        Sharding::Shard { dim: 0, ranks: 2 },
        None,
    );
}

#[test]
fn torch_loads_four_rank_column_shards() {
    // Shard(1) chunks are column blocks: each is a strided, non-contiguous box of the tensor.
    round_trip(
        "torch_loads_four_rank_column_shards",
        Sharding::Shard { dim: 1, ranks: 4 },
        Some(4),
    );
}

#[test]
fn split_matches_torch_chunk() {
    assert_eq!(torch_split(50, 4), [(0, 13), (13, 13), (26, 13), (39, 11)]);
    assert_eq!(torch_split(1, 2), [(0, 1)]);
    let mut runs = Vec::new();
    let region = Region {
        offsets: vec![1, 2],
        sizes: vec![2, 2],
    };
    for_each_run(&[3, 5], &region, |s, n| runs.push((s, n)));
    assert_eq!(runs, [(7, 2), (12, 2)]);
}

/// The check itself can fail: a checkpoint compared with another run's values is reported.
#[test]
fn torch_check_detects_different_values() {
    let Some(py) = torch_python("torch_check_detects_different_values") else {
        return;
    };
    let src = SafetensorsFile::open(&fixture("run-single-sma-n4.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = DcpLayout {
        tensors: tensors_of(&src, Sharding::Whole),
        ..DcpLayout::default()
    };
    write_chunks(DcpWriter::create(dir.path(), layout).unwrap(), &src);
    let other = fixture("run-resharded-sma-n4.safetensors");
    let out = Command::new(&py)
        .arg(check_script())
        .args([
            OsStr::new("load"),
            dir.path().as_os_str(),
            other.as_os_str(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("DIFFER  tok_embeddings.weight"), "{text}");
}

/// `--keep-state newest`: the model tensors are streamed in the member's own chunk layout, and
/// every other entry (optimizer tensors, train state, bytes items) is copied byte for byte from
/// the member's `.distcp` files, into the same files. torch must load the whole state dict
/// (tensors and bytes objects) and find it equal to the member's.
#[test]
fn keep_state_copies_items_verbatim() {
    let Some(py) = torch_python("keep_state_copies_items_verbatim") else {
        return;
    };
    // A copy of shared/fixtures/dcp/run-fsdp2/step-0000400, written by torch on 2 gloo ranks.
    let member = fixture("run-fsdp2-step-0000400");
    let scratch = tempfile::tempdir().unwrap();
    let (layout, model) = keep_state_layout(&py, &member, scratch.path());
    assert!(
        layout.verbatim.len() > 40,
        "optimizer and train state are copied"
    );
    let verbatim = layout.verbatim.clone();
    let out = tempfile::tempdir().unwrap();
    let summary = write_chunks(DcpWriter::create(out.path(), layout).unwrap(), &model);
    assert_eq!(summary.files.len(), 2);

    // Byte for byte: each copied item appears whole in its output file (torch then checks that
    // the new .metadata points at it).
    for v in &verbatim {
        let src = std::fs::read(&v.source).unwrap();
        let item = &src[v.offset as usize..(v.offset + v.length) as usize];
        let dst = std::fs::read(out.path().join(&v.file)).unwrap();
        assert!(
            dst.windows(item.len()).any(|w| w == item),
            "{} is not copied verbatim",
            v.fqn
        );
    }
    let text = check(
        &py,
        &[
            OsStr::new("same"),
            out.path().as_os_str(),
            member.as_os_str(),
        ],
    );
    assert!(
        text.contains("OK: 62 entries (11 bytes objects), 62 nested paths"),
        "{text}"
    );
}

/// The layout that keeps `member`'s state: its model tensors (from `items`' JSON and model
/// safetensors) streamed in the member's chunk layout, every other item copied verbatim into a
/// file of the same name, and the member's planner paths.
/// torch describes the member (JSON and model tensors, written into `scratch`).
fn keep_state_layout(py: &str, member: &Path, scratch: &Path) -> (DcpLayout, SafetensorsFile) {
    let items_json = scratch.join("items.json");
    let model_st = scratch.join("model.safetensors");
    check(
        py,
        &[
            OsStr::new("items"),
            member.as_os_str(),
            items_json.as_os_str(),
            model_st.as_os_str(),
        ],
    );
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&items_json).unwrap()).unwrap();
    let model = SafetensorsFile::open(&model_st).unwrap();

    let u64s = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let mut layout = DcpLayout::default();
    for e in &entries {
        let fqn = e["fqn"].as_str().unwrap().to_string();
        let path: Vec<PlannerKey> = e["planner_path"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| match k.as_u64() {
                Some(i) => PlannerKey::Index(i),
                None => PlannerKey::Str(k.as_str().unwrap().into()),
            })
            .collect();
        layout.planner_paths.insert(fqn.clone(), path);
        let verbatim = |c: &serde_json::Value, kind: VerbatimKind| VerbatimItem {
            fqn: fqn.clone(),
            kind,
            source: member.join(c["file"].as_str().unwrap()),
            offset: c["offset"].as_u64().unwrap(),
            length: c["length"].as_u64().unwrap(),
            file: c["file"].as_str().unwrap().into(),
        };
        if e["kind"] == "bytes" {
            layout.verbatim.push(verbatim(e, VerbatimKind::Bytes));
            continue;
        }
        let dtype = model_dtype(e["dtype"].as_str().unwrap());
        let shape = u64s(&e["shape"]);
        let regions = e["chunks"].as_array().unwrap().iter().map(|c| {
            let region = Region {
                offsets: u64s(&c["offsets"]),
                sizes: u64s(&c["sizes"]),
            };
            (c, region)
        });
        if e["model"].as_bool().unwrap() {
            layout.tensors.push(DcpTensor {
                fqn: fqn.clone(),
                dtype,
                shape: shape.clone(),
                chunks: regions
                    .map(|(c, region)| DcpChunk {
                        region,
                        file: c["file"].as_str().unwrap().into(),
                    })
                    .collect(),
            });
        } else {
            for (c, region) in regions {
                let kind = VerbatimKind::Tensor {
                    dtype,
                    shape: shape.clone(),
                    region,
                };
                layout.verbatim.push(verbatim(c, kind));
            }
        }
    }
    (layout, model)
}

fn model_dtype(name: &str) -> Dtype {
    pma_format::dtype::parse_dtype(name).expect("a safetensors dtype name")
}

/// Streaming speed of the writer (CRC + zip framing + buffered writes + fsync), for the closing
/// note: `cargo test --release -p pma-format --test dcp_out -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn write_throughput() {
    let rows = 16384u64;
    let cols = 8192u64; // bf16: 256 MiB
    let layout = DcpLayout {
        tensors: vec![DcpTensor {
            fqn: "w".into(),
            dtype: Dtype::BF16,
            shape: vec![rows, cols],
            chunks: chunks_for(&[rows, cols], Sharding::Shard { dim: 1, ranks: 4 }),
        }],
        ..DcpLayout::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let piece = vec![0x3fu8; (cols / 4 * 2) as usize]; // one row of a column block
    let start = std::time::Instant::now();
    let mut w = DcpWriter::create(dir.path(), layout).unwrap();
    while let Some((t, c)) = w.next_chunk() {
        let region = w.layout().tensors[t].chunks[c].region.clone();
        w.begin_chunk("w", &region).unwrap();
        for _ in 0..rows {
            w.write(&piece).unwrap();
        }
        w.end_chunk().unwrap();
    }
    let summary = w.finish().unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} MiB in {:.3} s: {:.0} MiB/s (4 files, fsync'd)",
        summary.n_bytes >> 20,
        secs,
        (summary.n_bytes as f64 / (1 << 20) as f64) / secs
    );
}

/// Megatron writes some bytes items raw (`_extra_state` ShardedObjects), not as torch.save
/// payloads: stock `dcp.load` cannot read them, Megatron's own loader can. They are kept byte for
/// byte all the same, in a layout with two files per rank.
#[test]
fn keep_state_keeps_megatron_raw_bytes_items() {
    let Some(py) = torch_python("keep_state_keeps_megatron_raw_bytes_items") else {
        return;
    };
    // A copy of shared/fixtures/dcp/run-megatron/iter_0000400 (the DCP part).
    let member = fixture("run-megatron-iter_0000400");
    let scratch = tempfile::tempdir().unwrap();
    let (layout, model) = keep_state_layout(&py, &member, scratch.path());
    assert!(layout
        .verbatim
        .iter()
        .any(|v| v.fqn.contains("_extra_state")));
    let out = tempfile::tempdir().unwrap();
    let summary = write_chunks(DcpWriter::create(out.path(), layout).unwrap(), &model);
    assert_eq!(
        summary.files.len(),
        4,
        "two files per rank, as in the member"
    );
    let text = check(
        &py,
        &[
            OsStr::new("raw-same"),
            out.path().as_os_str(),
            member.as_os_str(),
        ],
    );
    assert!(text.contains("OK:"), "{text}");
}
