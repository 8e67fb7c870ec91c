//! One streaming state update: new checkpoint + old state → new state + merged output.
//!
//! Two rules share this pipeline:
//! - streaming EMA: `E_1 = x_1`, `E_t = (1−α)·E_{t−1} + α·x_t` (DeepSeek-V3 style), with `E`
//!   kept in f32 or f64;
//! - incremental SMA: a running f64 sum `S_t = S_{t−1} + x_t − x_{t−N}` over the window, and the
//!   output `S_t / n`.
//!
//! Each reads only the new checkpoint, the state (and for SMA the checkpoint leaving the window),
//! so an update costs about one pass over the state. As in the merge executor, tensors are cut
//! into jobs computed in parallel while a writer thread writes the previous batch in a fixed
//! order, and input pages are dropped from our address space as soon as a job is done, so memory
//! stays flat. Every element is computed with `weighted_sum` (`acc += w·x`, no fused multiply-add)
//! and rounded once, so results do not depend on the thread count. When the EMA output would be
//! the state byte for byte, the output is a hard link to the new state file rather than a copy.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

use pma_format::dtype::{classify, count_nonfinite, dtype_name, encode_f64, weighted_sum};
use pma_format::{
    Checkpoint, DtypeClass, FloatDtype, SafetensorsFile, StreamWriter, TensorInfo, TensorRef,
    TensorSpec,
};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::executor::{BLOCK_ELEMS, JOB_ELEMS};

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
    pub new: &'a Checkpoint,
    /// The checkpoint leaving an SMA window.
    pub leaving: Option<&'a Checkpoint>,
    /// The previous state file (`None` for the first update).
    pub prev: Option<&'a SafetensorsFile>,
    pub state_dtype: FloatDtype,
    pub out_dtype: Option<FloatDtype>,
    pub max_shard_bytes: u64,
    pub out_metadata: BTreeMap<String, String>,
    pub state_metadata: BTreeMap<String, String>,
    pub allow_nonfinite: bool,
    pub threads: usize,
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
        leaving: Option<(FloatDtype, &'a TensorRef)>,
        out: FloatDtype,
    },
    Copy,
}

struct Planned<'a> {
    src: &'a TensorRef,
    mode: Mode<'a>,
    out_spec: TensorSpec,
}

struct JobOut {
    tensor: usize,
    state: Vec<u8>,
    output: Vec<u8>,
    read_bytes: u64,
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
    let mut planned = Vec::with_capacity(u.new.tensors().len());
    for t in u.new.tensors() {
        planned.push(plan_tensor(u, t, &prev_by_name)?);
    }
    if let Some(prev) = u.prev {
        let n_float = planned
            .iter()
            .filter(|p| matches!(p.mode, Mode::Float { .. }))
            .count();
        if let Some(extra) = prev.tensors().iter().find(|s| u.new.get(&s.name).is_none()) {
            return Err(Error::MissingTensor {
                path: u.new.root().into(),
                tensor: extra.name.clone(),
                reference: prev.path().into(),
            });
        }
        debug_assert!(prev.tensors().len() <= n_float);
    }
    let state_specs: Vec<TensorSpec> = planned
        .iter()
        .filter(|p| matches!(p.mode, Mode::Float { .. }))
        .map(|p| TensorSpec {
            name: p.src.info.name.clone(),
            dtype: u.state_dtype.dtype(),
            shape: p.src.info.shape.clone(),
        })
        .collect();
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
    let n_shards = ranges.len();
    let shards: Vec<(PathBuf, Range<usize>)> = ranges
        .into_iter()
        .enumerate()
        .map(|(i, r)| (out_dir.join(pma_format::shard_file_name(i, n_shards)), r))
        .collect();

    let threads = u.threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::ThreadPool {
            threads,
            reason: e.to_string(),
        })?;
    let jobs: Vec<(usize, Range<u64>)> = planned
        .iter()
        .enumerate()
        .flat_map(|(ti, p)| {
            let n = p.src.info.numel();
            (0..n.div_ceil(JOB_ELEMS))
                .map(move |j| (ti, j * JOB_ELEMS..((j + 1) * JOB_ELEMS).min(n)))
        })
        .collect();
    let batch_len = threads * 2;
    let buffers = BufferPool::default();
    let read_bytes = std::thread::scope(|scope| -> Result<u64> {
        let (tx, rx) = mpsc::sync_channel::<Vec<JobOut>>(1);
        let out_shards: &[(PathBuf, Range<usize>)] = if share { &[] } else { &shards };
        let meta = &state_metadata;
        let writer = scope.spawn(|| {
            write_all(
                &planned,
                &state_specs,
                u,
                meta,
                state_path,
                out_shards,
                rx,
                &buffers,
            )
        });
        let computed = pool.install(|| -> Result<u64> {
            let mut read = 0;
            let batches: Vec<&[(usize, Range<u64>)]> = jobs.chunks(batch_len).collect();
            for (bi, batch) in batches.iter().enumerate() {
                if let Some(next) = batches.get(bi + 1) {
                    for (ti, r) in next.iter() {
                        prefetch(u, &planned[*ti], r);
                    }
                }
                let outs: Vec<JobOut> = batch
                    .par_iter()
                    .map(|(ti, r)| run_job(u, &planned, *ti, r.clone(), !share, &buffers))
                    .collect::<Result<_>>()?;
                read += outs.iter().map(|o| o.read_bytes).sum::<u64>();
                if tx.send(outs).is_err() {
                    break; // the writer failed; its error says why
                }
            }
            Ok(read)
        });
        drop(tx);
        let written = writer.join().expect("writer thread does not panic");
        let read = computed?;
        written?;
        Ok(read)
    })?;
    make_read_only(state_path)?;
    if share {
        let target = out_dir.join(pma_format::shard_file_name(0, 1));
        if std::fs::hard_link(state_path, &target).is_err() {
            pma_format::copy_file_synced(state_path, &target)?;
        }
    }
    if n_shards > 1 {
        let listing: Vec<(String, Vec<&TensorSpec>)> = shards
            .iter()
            .enumerate()
            .map(|(i, (_, r))| {
                (
                    pma_format::shard_file_name(i, n_shards),
                    planned[r.clone()].iter().map(|p| &p.out_spec).collect(),
                )
            })
            .collect();
        pma_format::write_index(out_dir, &listing)?;
    }
    Ok(StreamStats {
        read_bytes,
        state_bytes: state_specs.iter().map(TensorSpec::n_bytes).sum(),
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

fn plan_tensor<'a>(
    u: &StreamUpdate<'a>,
    t: &'a TensorRef,
    prev_by_name: &HashMap<&str, &'a TensorInfo>,
) -> Result<Planned<'a>> {
    let name = &t.info.name;
    let x = match classify(t.info.dtype) {
        DtypeClass::Float(d) => d,
        DtypeClass::Exact => {
            return Ok(Planned {
                src: t,
                mode: Mode::Copy,
                out_spec: TensorSpec {
                    name: name.clone(),
                    dtype: t.info.dtype,
                    shape: t.info.shape.clone(),
                },
            })
        }
        DtypeClass::Unsupported => {
            return Err(Error::UnsupportedDtype {
                path: u.new.file_of(t).path().into(),
                tensor: name.clone(),
                dtype: dtype_name(t.info.dtype),
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
                if s.shape != t.info.shape {
                    return Err(Error::ShapeMismatch {
                        path: u.new.root().into(),
                        tensor: name.clone(),
                        expected: s.shape.clone(),
                        found: t.info.shape.clone(),
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
            let o = old.get(name).ok_or_else(|| Error::MissingTensor {
                path: old.root().into(),
                tensor: name.clone(),
                reference: u.new.root().into(),
            })?;
            if o.info.shape != t.info.shape {
                return Err(Error::ShapeMismatch {
                    path: old.root().into(),
                    tensor: name.clone(),
                    expected: t.info.shape.clone(),
                    found: o.info.shape.clone(),
                    reference: u.new.root().into(),
                });
            }
            match classify(o.info.dtype) {
                DtypeClass::Float(d) => Some((d, o)),
                _ => {
                    return Err(Error::DtypeMismatch {
                        path: old.root().into(),
                        tensor: name.clone(),
                        expected: dtype_name(t.info.dtype),
                        found: dtype_name(o.info.dtype),
                        reference: u.new.root().into(),
                    })
                }
            }
        }
    };
    let out = u.out_dtype.unwrap_or(x);
    Ok(Planned {
        src: t,
        mode: Mode::Float {
            x,
            prev,
            leaving,
            out,
        },
        out_spec: TensorSpec {
            name: name.clone(),
            dtype: out.dtype(),
            shape: t.info.shape.clone(),
        },
    })
}

fn prefetch(u: &StreamUpdate<'_>, p: &Planned<'_>, elems: &Range<u64>) {
    let (x_size, prev, leaving) = match &p.mode {
        Mode::Float {
            x, prev, leaving, ..
        } => (x.size_bytes() as u64, *prev, *leaving),
        Mode::Copy => (p.src.info.n_bytes() / p.src.info.numel().max(1), None, None),
    };
    u.new
        .file_of(p.src)
        .prefetch(&p.src.info, elems.start * x_size..elems.end * x_size);
    if let (Some(file), Some(s)) = (u.prev, prev) {
        let sz = u.state_dtype.size_bytes() as u64;
        file.prefetch(s, elems.start * sz..elems.end * sz);
    }
    if let (Some(old), Some((d, o))) = (u.leaving, leaving) {
        let sz = d.size_bytes() as u64;
        old.file_of(o)
            .prefetch(&o.info, elems.start * sz..elems.end * sz);
    }
}

thread_local! {
    static ACC: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Output and state buffers handed back by the writer for reuse, so a job does not allocate and
/// zero megabytes afresh (the zeroing alone was about a tenth of an update's CPU time). At most
/// the buffers of the batches in flight exist at once.
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// A buffer of exactly `len` bytes whose contents are unspecified: the caller overwrites
    /// every byte.
    fn take(&self, len: usize) -> Vec<u8> {
        if len == 0 {
            return Vec::new();
        }
        let mut b = self
            .0
            .lock()
            .expect("no thread panics holding the pool lock")
            .pop()
            .unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() > 0 {
            self.0
                .lock()
                .expect("no thread panics holding the pool lock")
                .push(b);
        }
    }
}

fn run_job(
    u: &StreamUpdate<'_>,
    planned: &[Planned<'_>],
    ti: usize,
    elems: Range<u64>,
    with_output: bool,
    pool: &BufferPool,
) -> Result<JobOut> {
    let p = &planned[ti];
    let xfile = u.new.file_of(p.src);
    let (x, prev, leaving, out) = match &p.mode {
        Mode::Copy => {
            let all = u.new.bytes(p.src);
            let per = all.len() as u64 / p.src.info.numel().max(1);
            let r = (elems.start * per) as usize..(elems.end * per) as usize;
            return Ok(JobOut {
                tensor: ti,
                state: Vec::new(),
                output: all[r].to_vec(),
                read_bytes: elems.end * per - elems.start * per,
            });
        }
        Mode::Float {
            x,
            prev,
            leaving,
            out,
        } => (*x, *prev, *leaving, *out),
    };
    // This job's bytes within a tensor of `size`-byte elements.
    let span = |size: usize| elems.start as usize * size..elems.end as usize * size;
    let xb_all = u.new.bytes(p.src);
    let xb = &xb_all[span(x.size_bytes())];
    let sd = u.state_dtype;
    let pb: Option<&[u8]> = match (u.prev, prev) {
        (Some(file), Some(s)) => {
            let all = file.tensor_bytes(s);
            Some(&all[span(sd.size_bytes())])
        }
        _ => None,
    };
    let ob: Option<(FloatDtype, &[u8])> = match (u.leaving, leaving) {
        (Some(old), Some((d, o))) => {
            let all = old.bytes(o);
            Some((d, &all[span(d.size_bytes())]))
        }
        _ => None,
    };
    let n = (elems.end - elems.start) as usize;
    let mut state = pool.take(n * sd.size_bytes());
    let mut output = pool.take(if with_output { n * out.size_bytes() } else { 0 });
    // Reused per thread: a fresh 512 KiB accumulator per job is a page-faulting allocation.
    let mut acc = ACC.take();
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
        if !with_output {
            start = end;
            continue;
        }
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
        encode_f64(
            out,
            acc,
            &mut output[start * out.size_bytes()..end * out.size_bytes()],
        );
        start = end;
    }
    ACC.set(acc);
    if nonfinite > 0 && !u.allow_nonfinite {
        return Err(Error::NonFinite {
            path: u.new.root().into(),
            tensor: p.src.info.name.clone(),
            count: nonfinite,
        });
    }
    // A file truncated under us (SIGBUS, read as zeros) fails the update, naming the file.
    xfile.check_faults()?;
    if let Some(file) = u.prev {
        file.check_faults()?;
    }
    if let Some(old) = u.leaving {
        old.check_faults()?;
    }
    // Done with these pages: drop them from our RSS (they stay in the page cache).
    let xr = elems.start * x.size_bytes() as u64..elems.end * x.size_bytes() as u64;
    xfile.release(&p.src.info, xr);
    if let (Some(file), Some(s)) = (u.prev, prev) {
        let sz = sd.size_bytes() as u64;
        file.release(s, elems.start * sz..elems.end * sz);
    }
    if let (Some(old), Some((d, o))) = (u.leaving, leaving) {
        let sz = d.size_bytes() as u64;
        old.file_of(o)
            .release(&o.info, elems.start * sz..elems.end * sz);
    }
    let read_bytes = (xb.len() + pb.map_or(0, <[u8]>::len) + ob.map_or(0, |(_, b)| b.len())) as u64;
    Ok(JobOut {
        tensor: ti,
        state,
        output,
        read_bytes,
    })
}

/// Writer thread: the state file and the output shards, each in tensor order.
/// With no `shards`, only the state is written (the output will link to it). Written buffers go
/// back to `buffers`.
#[allow(clippy::too_many_arguments)]
fn write_all(
    planned: &[Planned<'_>],
    state_specs: &[TensorSpec],
    u: &StreamUpdate<'_>,
    state_metadata: &BTreeMap<String, String>,
    state_path: &Path,
    shards: &[(PathBuf, Range<usize>)],
    rx: mpsc::Receiver<Vec<JobOut>>,
    buffers: &BufferPool,
) -> Result<()> {
    // The next update reads the state back: keep it in the page cache.
    let mut state = StreamWriter::create_cached(state_path, state_specs, state_metadata)?;
    if shards.is_empty() {
        for batch in rx {
            for job in batch {
                state.write(&job.state)?;
                buffers.give(job.state);
                buffers.give(job.output);
            }
        }
        state.finish()?;
        return Ok(());
    }
    let open = |i: usize| {
        let specs: Vec<TensorSpec> = planned[shards[i].1.clone()]
            .iter()
            .map(|p| p.out_spec.clone())
            .collect();
        StreamWriter::create(&shards[i].0, &specs, &u.out_metadata)
    };
    let mut current = 0;
    let mut out = open(0)?;
    for batch in rx {
        for job in batch {
            while !shards[current].1.contains(&job.tensor) {
                out.finish()?;
                current += 1;
                out = open(current)?;
            }
            out.write(&job.output)?;
            if !job.state.is_empty() {
                state.write(&job.state)?;
            }
            buffers.give(job.state);
            buffers.give(job.output);
        }
    }
    while current + 1 < shards.len() {
        out.finish()?;
        current += 1;
        out = open(current)?;
    }
    out.finish()?;
    state.finish()?;
    Ok(())
}
