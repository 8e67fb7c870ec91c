//! One streaming state update: new checkpoint + old state → new state + merged output.
//!
//! Two rules share this kernel:
//! - streaming EMA: `E_1 = x_1`, `E_t = (1−α)·E_{t−1} + α·x_t` (DeepSeek-V3 style), with `E`
//!   kept in f32 or f64;
//! - incremental SMA: a running f64 sum `S_t = S_{t−1} + x_t − x_{t−N}` over the window, and the
//!   output `S_t / n`.
//!
//! Members are read through [`TensorStore`], so they may be HF safetensors, torch DCP (any chunk
//! layout, which may change from one member to the next) or torch.save; the output and the
//! state are safetensors. An update carries the tensors a default `pma merge` writes
//! ([`crate::keys::select_keys`]): float model weights are averaged, other model tensors copied
//! from the newest, and training state (optimizer moments, step counters, bytes items) is left
//! out.
//!
//! Each reads only the new checkpoint, the state (and for SMA the checkpoint leaving the window),
//! so an update costs about one pass over the state. It runs on the same [`crate::pipeline`] as
//! a merge: tensors are cut into jobs computed in parallel while the writer thread writes the
//! state file and the output shards in a fixed order, and input pages are dropped from our
//! address space as soon as a job is done, so memory stays flat. Every element is computed with
//! `weighted_sum` (`acc += w·x`, no fused multiply-add) and rounded once, so results do not
//! depend on the thread count. When the EMA output would be the state byte for byte, the output
//! is a hard link to the new state file rather than a copy.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use pma_format::dtype::{classify, count_nonfinite, dtype_name, encode_f64, weighted_sum};
use pma_format::source::SafetensorsTensor;
use pma_format::writer::DirectIo;
use pma_format::{
    AnyCheckpoint, DtypeClass, FloatDtype, LogicalTensor, Region, SafetensorsFile, TensorInfo,
    TensorSource, TensorSpec, TensorStore,
};

use crate::error::{Error, Result};
use crate::keys::{select_keys, Action, EntryKind, KeyEntry, KeySelectionConfig};
use crate::pipeline::{
    run_pipeline, Emitter, Job, Kernel, PipelineOptions, SafetensorsSink, Scratch, ShardFile,
    BLOCK_ELEMS,
};
use crate::progress::NoProgress;

/// How the state moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StreamRule {
    /// `E = (1−α)·E + α·x`; the first checkpoint initialises `E = x`.
    Ema {
        /// Weight of the new checkpoint.
        alpha: f64,
    },
    /// `S = S + x_new − x_leaving`; the output is `S / divisor`.
    Sum {
        /// Number of checkpoints in the sum after this update.
        divisor: f64,
    },
}

/// Everything one update needs.
pub(crate) struct StreamUpdate<'a> {
    pub rule: StreamRule,
    pub new: &'a AnyCheckpoint,
    /// The checkpoint leaving an SMA window.
    pub leaving: Option<&'a AnyCheckpoint>,
    /// The previous state file (`None` for the first update).
    pub prev: Option<&'a SafetensorsFile>,
    pub state_dtype: FloatDtype,
    pub out_dtype: Option<FloatDtype>,
    pub max_shard_bytes: u64,
    pub out_metadata: BTreeMap<String, String>,
    pub state_metadata: BTreeMap<String, String>,
    pub allow_nonfinite: bool,
    pub threads: usize,
    /// Which entries the state and the output carry.
    pub keys: &'a KeySelectionConfig,
}

/// Sizes of what an update read and wrote.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StreamStats {
    pub read_bytes: u64,
    pub state_bytes: u64,
    pub output_bytes: u64,
}

enum Mode<'a> {
    Float {
        x: FloatDtype,
        prev: Option<&'a TensorInfo>,
        leaving: Option<FloatDtype>,
        out: FloatDtype,
    },
    Copy,
}

struct Planned<'a> {
    src: LogicalTensor,
    mode: Mode<'a>,
    out_spec: TensorSpec,
}

/// Runs the update: writes the new state to `state_path` (which must not exist) and the merged
/// output's shards and index into `out_dir` (a staging directory). Both are fsync'd.
pub(crate) fn run_update(
    u: &StreamUpdate<'_>,
    state_path: &Path,
    out_dir: &Path,
) -> Result<StreamStats> {
    let prev_by_name: HashMap<&str, &TensorInfo> = u
        .prev
        .map(|p| p.tensors().iter().map(|t| (t.name.as_str(), t)).collect())
        .unwrap_or_default();
    let selected = selected_tensors(u.new, u.keys)?;
    let mut planned = Vec::with_capacity(selected.len());
    for t in selected {
        planned.push(plan_tensor(u, t, &prev_by_name)?);
    }
    if let Some(prev) = u.prev {
        let n_float = planned
            .iter()
            .filter(|p| matches!(p.mode, Mode::Float { .. }))
            .count();
        let planned_names: std::collections::HashSet<&str> =
            planned.iter().map(|p| p.src.name.as_str()).collect();
        if let Some(extra) = prev
            .tensors()
            .iter()
            .find(|s| !planned_names.contains(s.name.as_str()))
        {
            return Err(Error::MissingTensor {
                path: u.new.root().into(),
                tensor: extra.name.clone(),
                reference: prev.path().into(),
            });
        }
        debug_assert!(prev.tensors().len() <= n_float);
    }
    let state_tensors: Vec<(usize, TensorSpec)> = planned
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p.mode, Mode::Float { .. }))
        .map(|(i, p)| {
            let spec = TensorSpec {
                name: p.src.name.clone(),
                dtype: u.state_dtype.dtype(),
                shape: p.src.shape.clone(),
            };
            (i, spec)
        })
        .collect();
    let state_bytes = state_tensors.iter().map(|(_, s)| s.n_bytes()).sum();
    let sizes: Vec<u64> = planned.iter().map(|p| p.out_spec.n_bytes()).collect();
    let ranges = pma_format::plan_shards(&sizes, u.max_shard_bytes);
    // When the output would be the state byte for byte (EMA, output dtype = state dtype, one
    // shard, no integer tensors), the output is a hard link to the state file instead of a
    // second copy: the state file is never modified after it is written (each generation has
    // its own name, and it is made read-only), so sharing the inode is safe and halves the
    // bytes an update writes.
    let share = matches!(u.rule, StreamRule::Ema { .. })
        && ranges.len() == 1
        && planned.iter().all(|p| match p.mode {
            Mode::Float { out, .. } => out == u.state_dtype,
            Mode::Copy => false,
        });
    let state_metadata = if share {
        let mut m = u.out_metadata.clone();
        m.extend(u.state_metadata.clone());
        m
    } else {
        u.state_metadata.clone()
    };
    // The next update reads the state back: keep it in the page cache.
    let state_sink = SafetensorsSink::new(
        vec![ShardFile {
            path: state_path.to_path_buf(),
            tensors: state_tensors,
        }],
        state_metadata,
        DirectIo::Off,
        0,
    );
    let n_shards = ranges.len();
    let out_sink = (!share).then(|| {
        let files = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| ShardFile {
                path: out_dir.join(pma_format::shard_file_name(i, n_shards)),
                tensors: r
                    .clone()
                    .map(|t| (t, planned[t].out_spec.clone()))
                    .collect(),
            })
            .collect();
        SafetensorsSink::new(files, u.out_metadata.clone(), DirectIo::Auto, 1)
    });
    let regions: Vec<Vec<Region>> = planned
        .iter()
        .map(|p| vec![Region::full(&p.src.shape)])
        .collect();
    let kernel = StreamKernel::new(u, &planned, !share)?;
    let report = run_pipeline(
        &regions,
        &kernel,
        (state_sink, out_sink),
        &PipelineOptions {
            threads: u.threads,
            cancel: None,
            allow_nonfinite: u.allow_nonfinite,
            progress: &NoProgress,
        },
    )?;
    make_read_only(state_path)?;
    if share {
        let target = out_dir.join(pma_format::shard_file_name(0, 1));
        if std::fs::hard_link(state_path, &target).is_err() {
            pma_format::copy_file_synced(state_path, &target)?;
        }
    }
    Ok(StreamStats {
        read_bytes: report.read_bytes,
        state_bytes,
        output_bytes: if share { 0 } else { sizes.iter().sum() },
    })
}

/// Makes a state file read-only, so nothing writes through a hard link to it by accident.
fn make_read_only(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).map_err(|e| {
        pma_format::Error::Io {
            path: path.into(),
            action: "making read-only",
            source: e,
        }
        .into()
    })
}

/// The tensors of `new` an update carries, in storage order: those a merge of it would write
/// with `keys` ([`select_keys`]: by default float model weights averaged, other model tensors
/// copied).
/// Training state (optimizer moments, step counters) is not averaged into a model, and bytes
/// items are not tensors.
fn selected_tensors(new: &AnyCheckpoint, keys: &KeySelectionConfig) -> Result<Vec<LogicalTensor>> {
    let entries: Vec<KeyEntry> = new
        .entries()
        .into_iter()
        .map(|e| KeyEntry {
            kind: e.dtype.map_or(EntryKind::Bytes, EntryKind::of_dtype),
            name: e.name,
            role: e.role,
        })
        .collect();
    let selection = select_keys(&entries, keys)?;
    Ok(new
        .logical_tensors()
        .into_iter()
        .filter(|t| {
            selection
                .decision(&t.name)
                .is_some_and(|d| matches!(d.action, Action::Merge | Action::Copy))
        })
        .collect())
}

fn plan_tensor<'a>(
    u: &StreamUpdate<'a>,
    t: LogicalTensor,
    prev_by_name: &HashMap<&str, &'a TensorInfo>,
) -> Result<Planned<'a>> {
    let name = &t.name;
    let x = match classify(t.dtype) {
        DtypeClass::Float(d) => d,
        DtypeClass::Exact => {
            return Ok(Planned {
                out_spec: TensorSpec {
                    name: name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                },
                src: t,
                mode: Mode::Copy,
            })
        }
        DtypeClass::Unsupported => {
            return Err(Error::UnsupportedDtype {
                path: u.new.file_of_tensor(name),
                tensor: name.clone(),
                dtype: dtype_name(t.dtype),
            })
        }
    };
    let prev =
        match u.prev {
            None => None,
            Some(file) => {
                let s = prev_by_name.get(name.as_str()).copied().ok_or_else(|| {
                    Error::MissingTensor {
                        path: file.path().into(),
                        tensor: name.clone(),
                        reference: u.new.root().into(),
                    }
                })?;
                if s.shape != t.shape {
                    return Err(Error::ShapeMismatch {
                        path: u.new.root().into(),
                        tensor: name.clone(),
                        expected: s.shape.clone(),
                        found: t.shape.clone(),
                        reference: file.path().into(),
                    });
                }
                if s.dtype != u.state_dtype.dtype() {
                    return Err(Error::DtypeMismatch {
                        path: file.path().into(),
                        tensor: name.clone(),
                        expected: dtype_name(u.state_dtype.dtype()),
                        found: dtype_name(s.dtype),
                        reference: file.path().into(),
                    });
                }
                Some(s)
            }
        };
    let leaving = match u.leaving {
        None => None,
        Some(old) => {
            let o = old
                .logical_tensor(name)
                .ok_or_else(|| Error::MissingTensor {
                    path: old.root().into(),
                    tensor: name.clone(),
                    reference: u.new.root().into(),
                })?;
            if o.shape != t.shape {
                return Err(Error::ShapeMismatch {
                    path: old.root().into(),
                    tensor: name.clone(),
                    expected: t.shape.clone(),
                    found: o.shape.clone(),
                    reference: u.new.root().into(),
                });
            }
            match classify(o.dtype) {
                DtypeClass::Float(d) => Some(d),
                _ => {
                    return Err(Error::DtypeMismatch {
                        path: old.root().into(),
                        tensor: name.clone(),
                        expected: dtype_name(t.dtype),
                        found: dtype_name(o.dtype),
                        reference: u.new.root().into(),
                    })
                }
            }
        }
    };
    let out = u.out_dtype.unwrap_or(x);
    Ok(Planned {
        out_spec: TensorSpec {
            name: name.clone(),
            dtype: out.dtype(),
            shape: t.shape.clone(),
        },
        src: t,
        mode: Mode::Float {
            x,
            prev,
            leaving,
            out,
        },
    })
}

/// The sources of one tensor: the new checkpoint's, the previous state's, the leaving one's.
struct Sources<'a> {
    x: Box<dyn TensorSource + 'a>,
    prev: Option<SafetensorsTensor<'a>>,
    leaving: Option<Box<dyn TensorSource + 'a>>,
}

/// The update's compute kernel. Each job emits two outputs: the state bytes (empty for copied
/// tensors) and, unless the output links to the state, the output bytes.
struct StreamKernel<'a, 'p> {
    u: &'p StreamUpdate<'a>,
    planned: &'p [Planned<'a>],
    sources: Vec<Sources<'a>>,
    with_output: bool,
}

impl<'a, 'p> StreamKernel<'a, 'p> {
    fn new(
        u: &'p StreamUpdate<'a>,
        planned: &'p [Planned<'a>],
        with_output: bool,
    ) -> Result<StreamKernel<'a, 'p>> {
        let new: &'a AnyCheckpoint = u.new;
        let sources = planned
            .iter()
            .map(|p| {
                let name = &p.src.name;
                let missing = |path: &Path| Error::MissingTensor {
                    path: path.into(),
                    tensor: name.clone(),
                    reference: new.root().into(),
                };
                let x = TensorStore::source(new, name).ok_or_else(|| missing(new.root()))?;
                let (prev, leaving) = match &p.mode {
                    Mode::Float { prev, leaving, .. } => (*prev, *leaving),
                    Mode::Copy => (None, None),
                };
                let prev = u
                    .prev
                    .zip(prev)
                    .map(|(file, info)| SafetensorsTensor::new(file, info));
                let leaving = match u.leaving.zip(leaving) {
                    Some((old, _)) => {
                        Some(TensorStore::source(old, name).ok_or_else(|| missing(old.root()))?)
                    }
                    None => None,
                };
                Ok(Sources { x, prev, leaving })
            })
            .collect::<Result<_>>()?;
        Ok(StreamKernel {
            u,
            planned,
            sources,
            with_output,
        })
    }
}

impl Kernel for StreamKernel<'_, '_> {
    fn prefetch(&self, job: &Job<'_>) {
        let s = &self.sources[job.tensor];
        s.x.prefetch(job.region, job.elems.clone());
        if let Some(p) = &s.prev {
            p.prefetch(job.region, job.elems.clone());
        }
        if let Some(o) = &s.leaving {
            o.prefetch(job.region, job.elems.clone());
        }
    }

    fn release(&self, job: &Job<'_>) {
        let s = &self.sources[job.tensor];
        s.x.release(job.region, job.elems.clone());
        if let Some(p) = &s.prev {
            p.release(job.region, job.elems.clone());
        }
        if let Some(o) = &s.leaving {
            o.release(job.region, job.elems.clone());
        }
    }

    fn member_path(&self, _member: usize) -> PathBuf {
        // Only the new checkpoint's NaN/Inf are counted: the state holds what earlier updates
        // accepted.
        self.u.new.root().into()
    }

    fn tensor_name(&self, tensor: usize) -> String {
        self.planned[tensor].src.name.clone()
    }

    fn compute(&self, job: &Job<'_>, scratch: &mut Scratch, out: &mut Emitter<'_>) -> Result<()> {
        let u = self.u;
        let p = &self.planned[job.tensor];
        let s = &self.sources[job.tensor];
        if scratch.reads.len() < 3 {
            scratch.reads.resize_with(3, Vec::new);
        }
        let [xr, pr, or, ..] = scratch.reads.as_mut_slice() else {
            unreachable!("resized to at least 3 above")
        };
        let xb = s.x.read(job.region, job.elems.clone(), xr)?;
        let (x, out_dtype) = match &p.mode {
            Mode::Copy => {
                out.read(xb.len() as u64);
                out.emit(Vec::new());
                let mut bytes = out.buffer(xb.len());
                bytes.copy_from_slice(xb);
                s.x.verify()?;
                out.emit(bytes);
                return Ok(());
            }
            Mode::Float { x, out, .. } => (*x, *out),
        };
        let sd = u.state_dtype;
        let pb: Option<&[u8]> = match &s.prev {
            Some(src) => Some(src.read(job.region, job.elems.clone(), pr)?),
            None => None,
        };
        let ob: Option<(FloatDtype, &[u8])> = match (&s.leaving, &p.mode) {
            (
                Some(src),
                Mode::Float {
                    leaving: Some(d), ..
                },
            ) => Some((*d, src.read(job.region, job.elems.clone(), or)?)),
            _ => None,
        };
        out.read((xb.len() + pb.map_or(0, <[u8]>::len) + ob.map_or(0, |(_, b)| b.len())) as u64);
        let n = (job.elems.end - job.elems.start) as usize;
        let mut state = out.buffer(n * sd.size_bytes());
        let mut output = out.buffer(if self.with_output {
            n * out_dtype.size_bytes()
        } else {
            0
        });
        let acc = &mut scratch.acc;
        acc.resize(BLOCK_ELEMS.min(n), 0.0); // every block's sum overwrites what it uses
        let mut nonfinite = 0u64;
        let mut start = 0;
        while start < n {
            let end = (start + BLOCK_ELEMS).min(n);
            let acc = &mut acc[..end - start];
            let xs = &xb[start * x.size_bytes()..end * x.size_bytes()];
            let ps = pb.map(|b| &b[start * sd.size_bytes()..end * sd.size_bytes()]);
            let os = ob.map(|(d, b)| (d, &b[start * d.size_bytes()..end * d.size_bytes()]));
            // One fused pass, `acc = ((0 + w_1·a) + w_2·b) + …` with separate multiply and add:
            // - EMA: 0 + (1−α)·E is exactly (1−α)·E, so this is (1−α)·E + α·x, two roundings
            //   (then one more into the state dtype); the first checkpoint gives E = x;
            // - SMA sum: (S + x_new) − x_leaving, in f64.
            let (srcs, weights): (Vec<(FloatDtype, &[u8])>, Vec<f64>) = match (u.rule, ps) {
                (StreamRule::Ema { alpha }, Some(ps)) => {
                    (vec![(sd, ps), (x, xs)], vec![1.0 - alpha, alpha])
                }
                (StreamRule::Ema { .. }, None) => (vec![(x, xs)], vec![1.0]),
                (StreamRule::Sum { .. }, ps) => {
                    let mut srcs = Vec::with_capacity(3);
                    let mut weights = Vec::with_capacity(3);
                    if let Some(ps) = ps {
                        srcs.push((sd, ps));
                        weights.push(1.0);
                    }
                    srcs.push((x, xs));
                    weights.push(1.0);
                    if let Some(os) = os {
                        srcs.push(os);
                        weights.push(-1.0);
                    }
                    (srcs, weights)
                }
            };
            weighted_sum(&srcs, &weights, acc);
            let st = &mut state[start * sd.size_bytes()..end * sd.size_bytes()];
            // A NaN/Inf input makes the sum non-finite, so inputs need counting only then.
            if !encode_f64(sd, acc, st) {
                nonfinite += count_nonfinite(x, xs);
            }
            if self.with_output {
                match u.rule {
                    StreamRule::Ema { .. } => {
                        // The output is the state as stored, so a restart from the state file
                        // reproduces it exactly.
                        if sd != FloatDtype::F64 {
                            pma_format::dtype::for_each_f64(sd, st, |i, v| acc[i] = v);
                        }
                    }
                    StreamRule::Sum { divisor } => acc.iter_mut().for_each(|v| *v /= divisor),
                }
                let osz = out_dtype.size_bytes();
                encode_f64(out_dtype, acc, &mut output[start * osz..end * osz]);
            }
            start = end;
        }
        // A file truncated under us (SIGBUS, turned into zeros): fail naming it, before its
        // bytes can reach the state or the output.
        s.x.verify()?;
        if let Some(src) = &s.prev {
            src.verify()?;
        }
        if let Some(src) = &s.leaving {
            src.verify()?;
        }
        out.nonfinite(0, nonfinite);
        out.emit(state);
        if self.with_output {
            out.emit(output);
        }
        Ok(())
    }
}
