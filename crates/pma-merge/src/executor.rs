//! The streaming merge executor: bounded memory, every core busy, disk writes overlapped.
//!
//! Output tensors are cut into jobs of at most [`JOB_ELEMS`] elements. A batch of jobs is
//! computed in parallel on a rayon pool while a dedicated writer thread writes the previous
//! batch, and the kernel is asked to prefetch the next batch's input pages; so reading, merging
//! and writing all overlap. Inside a job, elements are processed [`BLOCK_ELEMS`] at a time so the
//! f64 accumulator stays in L2 while all N inputs stream through it.
//!
//! Every element is computed independently, `acc = 0; acc += w_i · x_i` for i = 1..N (oldest
//! first, no fused multiply-add), then rounded once. Threads only decide *which* elements a core
//! computes, never how, so the output bytes are identical for any thread count.
//!
//! Memory stays flat: a job's input pages are released from our mapping as soon as the job is
//! done, and at most [`BATCHES_IN_FLIGHT`] batches of output exist at once. RSS does not grow
//! with N or with model size.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use pma_format::dtype::{classify, count_nonfinite, encode_f64, weighted_sum};
use pma_format::{DtypeClass, FloatDtype, StagedOutput, StreamWriter};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::plan::{MergePlan, PlanSummary, TensorMode};
use crate::progress::Progress;

/// Elements per job: the unit of parallel work and of page release.
pub const JOB_ELEMS: u64 = 1 << 20;
/// Elements per accumulation block (64K × 8 bytes = 512 KiB of f64, about L2).
pub const BLOCK_ELEMS: usize = 1 << 16;
/// Jobs per batch, per worker thread.
const JOBS_PER_THREAD: usize = 2;
/// Batches whose inputs are prefetched ahead of the one being computed.
const PREFETCH_BATCHES: usize = 4;
/// Output batches alive at once: one being computed, these queued for or inside the writer.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// Upper bound on the executor's working memory (accumulators and output buffers), in bytes.
/// It does not depend on the number of inputs: their pages are mapped and released per job.
pub fn working_memory_bytes(threads: usize) -> u64 {
    let threads = threads.max(1) as u64;
    let acc = threads * BLOCK_ELEMS as u64 * 8;
    let batch_out = threads * JOBS_PER_THREAD as u64 * JOB_ELEMS * 8;
    acc + (BATCHES_IN_FLIGHT as u64 + 1) * batch_out
}

/// Options of one execution.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions<'a> {
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Checked between batches; when set, the merge stops and nothing is written.
    pub cancel: Option<&'a AtomicBool>,
}

/// A non-fatal problem found while merging.
#[derive(Debug, Clone, Serialize)]
pub struct NonFiniteWarning {
    /// The checkpoint.
    pub path: PathBuf,
    /// The tensor.
    pub tensor: String,
    /// How many NaN/Inf values.
    pub count: u64,
}

/// What a finished merge reports.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// The plan that was executed.
    pub plan: PlanSummary,
    /// Where the output now is.
    pub output: PathBuf,
    /// Sidecar files copied from the newest checkpoint.
    pub sidecars: Vec<String>,
    /// NaN/Inf found with `allow_nonfinite`.
    pub warnings: Vec<NonFiniteWarning>,
    /// Wall time of the merge, in seconds.
    pub elapsed_secs: f64,
    /// Tensor bytes read per second.
    pub read_bytes_per_sec: f64,
}

/// One job: a range of elements of one output tensor.
#[derive(Debug, Clone)]
struct Job {
    tensor: usize,
    elems: Range<u64>,
}

struct JobOutput {
    tensor: usize,
    last_of_tensor: bool,
    bytes: Vec<u8>,
    /// (input index, NaN/Inf count) for inputs with any.
    nonfinite: Vec<(usize, u64)>,
    read_bytes: u64,
}

/// Executes `plan` into `out` (a directory, or a file when the plan is single-file), staged
/// beside it and renamed into place only when complete and durable.
pub fn execute(
    plan: &MergePlan,
    out: &Path,
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = std::time::Instant::now();
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        opts.threads
    };
    if !opts.overwrite && pma_format::writer::output_occupied(out) {
        return Err(pma_format::Error::OutputExists { path: out.into() }.into());
    }
    plan.check_space(out)?;
    let staged = StagedOutput::create(out, !plan.single_file, opts.overwrite)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::ThreadPool {
            threads,
            reason: e.to_string(),
        })?;

    let shard_paths: Vec<PathBuf> = if plan.single_file {
        vec![staged.path().to_path_buf()]
    } else {
        plan.shards
            .iter()
            .map(|(name, _)| staged.path().join(name))
            .collect()
    };
    let total_read: u64 = plan.bytes_read_per_input().iter().sum();
    progress.start(total_read);
    let result = std::thread::scope(|scope| -> Result<Vec<NonFiniteWarning>> {
        let (tx, rx) = mpsc::sync_channel::<Vec<JobOutput>>(BATCHES_IN_FLIGHT - 1);
        let writer = scope.spawn(|| write_shards(plan, &shard_paths, rx));
        let computed = pool.install(|| compute_batches(plan, threads, opts.cancel, progress, &tx));
        drop(tx);
        let written = writer.join().expect("writer thread does not panic");
        // A compute error closes the channel early, which the writer sees as a short file;
        // report the cause, not the symptom.
        let warnings = computed?;
        written?;
        Ok(warnings)
    });
    progress.finish();
    let warnings = result?;

    let mut sidecars = Vec::new();
    if !plan.single_file {
        if plan.shards.len() > 1 {
            let listing: Vec<(String, Vec<&pma_format::TensorSpec>)> = plan
                .shards
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        plan.tensors[r.clone()].iter().map(|t| &t.spec).collect(),
                    )
                })
                .collect();
            pma_format::write_index(staged.path(), &listing)?;
        }
        let newest = &plan.inputs[plan.inputs.len() - 1].checkpoint;
        sidecars = copy_sidecars(newest, plan.config.out_dtype, staged.path())?;
    }
    staged.commit()?;
    let elapsed_secs = started.elapsed().as_secs_f64();
    Ok(MergeReport {
        plan: plan.summary(threads),
        output: out.to_path_buf(),
        sidecars,
        warnings,
        elapsed_secs,
        read_bytes_per_sec: total_read as f64 / elapsed_secs.max(1e-9),
    })
}

/// Copies the newest checkpoint's config/tokenizer files into `dir`; `config.json`'s
/// `torch_dtype` follows an explicit output dtype so `from_pretrained` loads the weights as they
/// were written. Returns the names copied.
pub(crate) fn copy_sidecars(
    newest: &pma_format::Checkpoint,
    out_dtype: Option<FloatDtype>,
    dir: &Path,
) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for src in newest.sidecars() {
        let name = src
            .file_name()
            .expect("sidecar paths end in a file name")
            .to_owned();
        let dst = dir.join(&name);
        copied.push(name.to_string_lossy().into_owned());
        // Never follows a link out of the checkpoint (see pma_format::sidecar).
        let text = pma_format::read_sidecar(newest.root(), &src)?;
        if let (Some("config.json"), Some(dtype)) = (name.to_str(), out_dtype) {
            if let Ok(serde_json::Value::Object(mut cfg)) = serde_json::from_slice(&text) {
                cfg.insert("torch_dtype".into(), dtype.torch_name().into());
                let bytes = serde_json::to_vec_pretty(&cfg).expect("JSON value serializes");
                pma_format::write_file_synced(&dst, &bytes)?;
                continue;
            }
        }
        pma_format::write_file_synced(&dst, &text)?;
    }
    Ok(copied)
}

fn jobs(plan: &MergePlan) -> impl Iterator<Item = Job> + '_ {
    plan.tensors.iter().enumerate().flat_map(|(ti, t)| {
        let n = t.numel();
        (0..n.div_ceil(JOB_ELEMS)).map(move |j| Job {
            tensor: ti,
            elems: j * JOB_ELEMS..((j + 1) * JOB_ELEMS).min(n),
        })
    })
}

fn compute_batches(
    plan: &MergePlan,
    threads: usize,
    cancel: Option<&AtomicBool>,
    progress: &dyn Progress,
    tx: &mpsc::SyncSender<Vec<JobOutput>>,
) -> Result<Vec<NonFiniteWarning>> {
    let batch_len = threads * JOBS_PER_THREAD;
    let mut all = jobs(plan);
    // Batches whose input pages have been requested from the kernel but not yet merged. On a cold
    // cache this keeps several reads in flight per input while the current batch computes.
    let mut ahead: std::collections::VecDeque<Vec<Job>> = std::collections::VecDeque::new();
    let mut refill = |ahead: &mut std::collections::VecDeque<Vec<Job>>| {
        while ahead.len() < PREFETCH_BATCHES {
            let batch: Vec<Job> = all.by_ref().take(batch_len).collect();
            if batch.is_empty() {
                break;
            }
            for job in &batch {
                prefetch(plan, job);
            }
            ahead.push_back(batch);
        }
    };
    let mut counts: HashMap<(usize, usize), u64> = HashMap::new();
    let mut warnings = Vec::new();
    refill(&mut ahead);
    while let Some(batch) = ahead.pop_front() {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        refill(&mut ahead);
        let outputs: Vec<JobOutput> = batch
            .par_iter()
            .map(|job| run_job(plan, job))
            .collect::<Result<_>>()?;
        for out in &outputs {
            progress.advance(out.read_bytes);
            for &(input, count) in &out.nonfinite {
                *counts.entry((out.tensor, input)).or_insert(0) += count;
            }
            if out.last_of_tensor {
                for input in 0..plan.inputs.len() {
                    if let Some(count) = counts.remove(&(out.tensor, input)) {
                        let path = plan.inputs[input].checkpoint.root().to_path_buf();
                        let tensor = plan.tensors[out.tensor].spec.name.clone();
                        if !plan.config.allow_nonfinite {
                            return Err(Error::NonFinite {
                                path,
                                tensor,
                                count,
                            });
                        }
                        warnings.push(NonFiniteWarning {
                            path,
                            tensor,
                            count,
                        });
                    }
                }
            }
        }
        if tx.send(outputs).is_err() {
            // The writer stopped early; its own error says why.
            return Ok(warnings);
        }
    }
    Ok(warnings)
}

fn byte_range(elems: &Range<u64>, elem_bytes: usize) -> Range<u64> {
    elems.start * elem_bytes as u64..elems.end * elem_bytes as u64
}

fn elem_bytes(t: &pma_format::TensorRef) -> usize {
    (pma_format::dtype::dtype_bits(t.info.dtype) / 8) as usize
}

fn prefetch(plan: &MergePlan, job: &Job) {
    for (input, src) in plan.inputs.iter().zip(&plan.tensors[job.tensor].sources) {
        let file = input.checkpoint.file_of(src);
        file.prefetch(&src.info, byte_range(&job.elems, elem_bytes(src)));
    }
}

fn run_job(plan: &MergePlan, job: &Job) -> Result<JobOutput> {
    let t = &plan.tensors[job.tensor];
    let srcs: Vec<&[u8]> = plan
        .inputs
        .iter()
        .zip(&t.sources)
        .map(|(input, src)| {
            let r = byte_range(&job.elems, elem_bytes(src));
            &input.checkpoint.bytes(src)[r.start as usize..r.end as usize]
        })
        .collect();
    let read_bytes = srcs.iter().map(|s| s.len() as u64).sum();
    let (bytes, nonfinite) = match t.mode {
        TensorMode::Average(out) => average(plan, t, &srcs, out),
        TensorMode::Copy => (copy_exact(plan, t, &srcs)?, Vec::new()),
    };
    // A file truncated under us (SIGBUS, turned into zeros): fail naming it, before its bytes
    // can reach the output.
    for (input, src) in plan.inputs.iter().zip(&t.sources) {
        input.checkpoint.file_of(src).check_faults()?;
    }
    // Done with these input pages: drop them from our RSS (they stay in the page cache).
    for (input, src) in plan.inputs.iter().zip(&t.sources) {
        input
            .checkpoint
            .file_of(src)
            .release(&src.info, byte_range(&job.elems, elem_bytes(src)));
    }
    Ok(JobOutput {
        tensor: job.tensor,
        last_of_tensor: job.elems.end == t.numel(),
        bytes,
        nonfinite,
        read_bytes,
    })
}

thread_local! {
    static ACC: std::cell::RefCell<Vec<f64>> = std::cell::RefCell::new(vec![0.0; BLOCK_ELEMS]);
}

fn average(
    plan: &MergePlan,
    t: &crate::plan::PlannedTensor,
    srcs: &[&[u8]],
    out: FloatDtype,
) -> (Vec<u8>, Vec<(usize, u64)>) {
    let dtypes: Vec<FloatDtype> = t
        .sources
        .iter()
        .map(|s| match classify(s.info.dtype) {
            DtypeClass::Float(d) => d,
            _ => unreachable!("the plan only averages float tensors"),
        })
        .collect();
    let n = srcs.first().map_or(0, |s| s.len() / dtypes[0].size_bytes());
    let mut bytes = vec![0u8; n * out.size_bytes()];
    let mut nonfinite = vec![0u64; srcs.len()];
    ACC.with_borrow_mut(|acc| {
        let mut start = 0;
        while start < n {
            let end = (start + BLOCK_ELEMS).min(n);
            let acc = &mut acc[..end - start];
            let blocks: Vec<(FloatDtype, &[u8])> = srcs
                .iter()
                .zip(&dtypes)
                .map(|(src, &dt)| (dt, &src[start * dt.size_bytes()..end * dt.size_bytes()]))
                .collect();
            weighted_sum(&blocks, &plan.weights.values, acc);
            let osz = out.size_bytes();
            let all_finite = encode_f64(out, acc, &mut bytes[start * osz..end * osz]);
            // Any NaN/Inf input makes its w·x, and so the sum, non-finite (0·Inf is NaN too), so
            // inputs need counting only when the encoder saw a non-finite sum.
            if !all_finite {
                for (i, (src, &dt)) in srcs.iter().zip(&dtypes).enumerate() {
                    let sz = dt.size_bytes();
                    nonfinite[i] += count_nonfinite(dt, &src[start * sz..end * sz]);
                }
            }
            start = end;
        }
    });
    let nonfinite = nonfinite
        .into_iter()
        .enumerate()
        .filter(|&(_, c)| c > 0)
        .collect();
    (bytes, nonfinite)
}

fn copy_exact(plan: &MergePlan, t: &crate::plan::PlannedTensor, srcs: &[&[u8]]) -> Result<Vec<u8>> {
    let newest = srcs[srcs.len() - 1];
    for (i, src) in srcs.iter().enumerate() {
        if *src != newest {
            return Err(Error::ExactTensorDiffers {
                path: plan.inputs[i].checkpoint.root().into(),
                tensor: t.spec.name.clone(),
                reference: plan.inputs[plan.inputs.len() - 1].checkpoint.root().into(),
            });
        }
    }
    Ok(newest.to_vec())
}

/// Writer thread: shards in order, each job's bytes in order.
fn write_shards(
    plan: &MergePlan,
    paths: &[PathBuf],
    rx: mpsc::Receiver<Vec<JobOutput>>,
) -> Result<()> {
    let shard_of = |tensor: usize| {
        plan.shards
            .iter()
            .position(|(_, r)| r.contains(&tensor))
            .expect("every tensor is in a shard")
    };
    let open = |i: usize| StreamWriter::create(&paths[i], &plan.shard_specs(i), &plan.metadata);
    let mut current = 0;
    let mut writer = open(0)?;
    for batch in rx {
        for out in batch {
            let shard = shard_of(out.tensor);
            while current < shard {
                writer.finish()?;
                current += 1;
                writer = open(current)?;
            }
            writer.write(&out.bytes)?;
        }
    }
    // Shards that hold only empty tensors get no jobs; write them too.
    while current + 1 < paths.len() {
        writer.finish()?;
        current += 1;
        writer = open(current)?;
    }
    writer.finish()?;
    Ok(())
}
