//! The streaming pipeline every merge and watch update runs on: jobs → compute kernel → ordered
//! writer. Bounded memory, every core busy, disk writes overlapped.
//!
//! Output tensors are cut along their regions ([`Region`]: one region covering each tensor for
//! safetensors; the newest member's chunks for a DCP output), taken in the order the sink writes
//! them ([`OutputRegion`]: tensor by tensor, or a DCP output's file by file), into jobs of at most
//! [`JOB_ELEMS`] elements ([`cut_jobs`]). A batch of jobs is computed in parallel on a rayon pool
//! by the caller's [`Kernel`] while a dedicated writer thread hands the previous batch, job by
//! job in order, to the caller's [`Sink`], and the kernel is asked to prefetch the next
//! [`PREFETCH_BATCHES`] batches' input pages; so reading, computing and writing all overlap.
//! Inside a job, kernels process elements [`BLOCK_ELEMS`] at a time so the f64 accumulator stays
//! in L1 while all inputs stream through it.
//!
//! Threads only decide *which* elements a core computes, never how: every element is computed
//! independently by the kernel, so the output bytes are identical for any thread count.
//!
//! Memory stays flat: a job's input pages are released as soon as the job is done
//! ([`Kernel::release`]), at most [`BATCHES_IN_FLIGHT`] batches of output exist at once, and
//! output buffers go back to a pool once written, so a job does not allocate and zero megabytes
//! afresh (the zeroing alone was about a tenth of a watch update's CPU time). RSS does not grow
//! with the number of inputs or with model size ([`working_memory_bytes`]).
//!
//! NaN/Inf counts are summed per member over a whole tensor, so an error or warning names the
//! file, the tensor and the tensor's full count. The cancel flag is checked between batches.
//!
//! To plug in a new input format, implement [`pma_format::TensorSource`] (and
//! [`pma_format::TensorStore`]) and let the kernel read through it; to plug in a new output,
//! implement [`Sink`].

mod dcp_sink;
mod sink;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use pma_format::{Region, TensorSource};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::progress::Progress;

pub use dcp_sink::DcpSink;
pub use sink::{SafetensorsSink, ShardFile, Sink};

/// Elements per job: the unit of parallel work and of page release.
pub const JOB_ELEMS: u64 = 1 << 19;
/// Elements per accumulation block (4K × 8 bytes = 32 KiB of f64): the sums of a block are
/// stored by the kernel and read straight back by the encoder, so the block stays in L1
/// (a 512 KiB block spilled out of L2 between the two passes).
pub const BLOCK_ELEMS: usize = 1 << 12;
/// Jobs per batch, per worker thread. A batch ends at a barrier (every job computed before
/// the next batch starts), and jobs differ in size (a chunk's tail), so more, smaller jobs per
/// batch waste less: on the W8 layout 4 jobs of 512K elements per thread idle a core for 4% of
/// the compute time, 2 jobs of 1M for 15%, at the same memory.
const JOBS_PER_THREAD: usize = 4;
/// Batches whose inputs are prefetched ahead of the one being computed. On a cold cache this
/// keeps several reads in flight per input while the current batch computes.
pub const PREFETCH_BATCHES: usize = 4;
/// Output batches alive at once: one being computed, these queued for or inside the writer.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// Upper bound on the pipeline's working memory (accumulators and output buffers), in bytes.
/// It does not depend on the number of inputs: their pages are mapped and released per job.
pub fn working_memory_bytes(threads: usize) -> u64 {
    let threads = threads.max(1) as u64;
    let acc = threads * BLOCK_ELEMS as u64 * 8;
    let batch_out = threads * JOBS_PER_THREAD as u64 * JOB_ELEMS * 8;
    acc + (BATCHES_IN_FLIGHT as u64 + 1) * batch_out
}

/// One unit of work: elements `elems` (row-major indices inside `region`) of output tensor
/// `tensor`.
#[derive(Debug, Clone)]
pub struct Job<'r> {
    /// Index of the output tensor, in write order.
    pub tensor: usize,
    /// The region of the tensor this job lies in.
    pub region: &'r Region,
    /// Elements of the region, row-major inside it.
    pub elems: Range<u64>,
    /// Whether this is the tensor's last job (its NaN/Inf count is then complete).
    pub last_of_tensor: bool,
}

/// One region of one output tensor: the unit of write order. A merge writes its regions in
/// whatever order its [`Sink`] needs: tensor by tensor for safetensors ([`tensor_major`]), file
/// by file for a DCP output, whose files interleave the chunks of many tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRegion {
    /// Index of the output tensor.
    pub tensor: usize,
    /// The region of that tensor.
    pub region: Region,
}

/// The regions of every tensor, tensor by tensor: `regions[t]` are tensor `t`'s output
/// regions, in write order.
pub fn tensor_major(regions: &[Vec<Region>]) -> Vec<OutputRegion> {
    regions
        .iter()
        .enumerate()
        .flat_map(|(tensor, rs)| {
            rs.iter().map(move |region| OutputRegion {
                tensor,
                region: region.clone(),
            })
        })
        .collect()
}

/// Cuts every output region, in the order given, into jobs of at most [`JOB_ELEMS`] elements.
/// A tensor's regions may be interleaved with other tensors'; its last job is the last job of
/// its last non-empty region in this order.
pub fn cut_jobs(order: &[OutputRegion]) -> impl Iterator<Item = Job<'_>> + '_ {
    let n_tensors = order.iter().map(|r| r.tensor + 1).max().unwrap_or(0);
    let mut last_region = vec![None; n_tensors];
    for (i, r) in order.iter().enumerate() {
        if r.region.numel() > 0 {
            last_region[r.tensor] = Some(i);
        }
    }
    order.iter().enumerate().flat_map(move |(ri, r)| {
        let n = r.region.numel();
        let n_jobs = n.div_ceil(JOB_ELEMS);
        let last = last_region[r.tensor] == Some(ri);
        (0..n_jobs).map(move |j| Job {
            tensor: r.tensor,
            region: &r.region,
            elems: j * JOB_ELEMS..((j + 1) * JOB_ELEMS).min(n),
            last_of_tensor: last && j + 1 == n_jobs,
        })
    })
}

/// Per-thread scratch space a kernel may use, kept between jobs so a job does not allocate: a
/// fresh accumulator per job is an allocation on the hot path.
#[derive(Debug, Default)]
pub struct Scratch {
    /// The f64 accumulator; its contents are unspecified, every use overwrites what it uses.
    pub acc: Vec<f64>,
    /// One gather buffer per member, for sources that cannot lend their bytes (see
    /// [`read_members`]).
    pub reads: Vec<Vec<u8>>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Reads `job`'s elements from every member's source, oldest first, lending from mappings
/// where possible and gathering into `reads` otherwise.
pub fn read_members<'a>(
    sources: &'a [&'a dyn TensorSource],
    job: &Job<'_>,
    reads: &'a mut Vec<Vec<u8>>,
) -> Result<Vec<&'a [u8]>> {
    if reads.len() < sources.len() {
        reads.resize_with(sources.len(), Vec::new);
    }
    sources
        .iter()
        .zip(reads.iter_mut())
        .map(|(s, buf)| Ok(s.read(job.region, job.elems.clone(), buf)?))
        .collect()
}

/// What a kernel produces for one job: its output byte buffers, in output order (a merge emits
/// one, a watch update emits the state and the output), plus counts.
pub struct Emitter<'p> {
    pool: &'p BufferPool,
    outputs: Vec<Vec<u8>>,
    nonfinite: Vec<(usize, u64)>,
    read_bytes: u64,
}

impl Emitter<'_> {
    /// A buffer of exactly `len` bytes whose contents are unspecified: the kernel overwrites
    /// every byte. Comes from the pool of written buffers.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        self.pool.take(len)
    }

    /// Appends the job's next output.
    pub fn emit(&mut self, bytes: Vec<u8>) {
        self.outputs.push(bytes);
    }

    /// Records `count` NaN/Inf elements of member `member` in this job.
    pub fn nonfinite(&mut self, member: usize, count: u64) {
        if count > 0 {
            self.nonfinite.push((member, count));
        }
    }

    /// Records input bytes read (for progress and throughput).
    pub fn read(&mut self, n_bytes: u64) {
        self.read_bytes += n_bytes;
    }
}

/// The computation of one caller: what each job's output bytes are. It is called from many
/// threads at once, on different jobs.
pub trait Kernel: Sync {
    /// A hint that `job` will be computed soon: start reading its inputs.
    fn prefetch(&self, _job: &Job<'_>) {}

    /// Computes `job`: reads its inputs, emits its outputs (in the same order for every job).
    fn compute(&self, job: &Job<'_>, scratch: &mut Scratch, out: &mut Emitter<'_>) -> Result<()>;

    /// `job` is computed and its inputs will not be read again: drop them from our RSS.
    fn release(&self, _job: &Job<'_>) {}

    /// The file of member `member`, as named in NaN/Inf errors and warnings.
    fn member_path(&self, member: usize) -> PathBuf;

    /// The name of output tensor `tensor`.
    fn tensor_name(&self, tensor: usize) -> String;
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

/// Options of one pipeline run.
#[derive(Clone, Copy)]
pub struct PipelineOptions<'a> {
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Checked between batches; when set, the run stops with [`Error::Interrupted`].
    pub cancel: Option<&'a AtomicBool>,
    /// Report NaN/Inf inputs as warnings instead of failing with [`Error::NonFinite`].
    pub allow_nonfinite: bool,
    /// Told the bytes read as jobs complete (the caller calls `start`/`finish`).
    pub progress: &'a dyn Progress,
}

/// What a pipeline run reports.
#[derive(Debug, Clone, Default)]
pub struct PipelineReport {
    /// Input bytes read.
    pub read_bytes: u64,
    /// NaN/Inf found with `allow_nonfinite`, per tensor and member.
    pub warnings: Vec<NonFiniteWarning>,
    /// Worker threads used.
    pub threads: usize,
}

struct JobOutput<'r> {
    job: Job<'r>,
    outputs: Vec<Vec<u8>>,
    nonfinite: Vec<(usize, u64)>,
    read_bytes: u64,
}

/// Runs every job of `regions` (tensor by tensor, see [`tensor_major`]) through `kernel`, in
/// parallel, and hands their outputs to `sink` in job order; finishes the sink when all jobs are
/// written.
pub fn run_pipeline<K: Kernel, S: Sink>(
    regions: &[Vec<Region>],
    kernel: &K,
    sink: S,
    opts: &PipelineOptions<'_>,
) -> Result<PipelineReport> {
    run_pipeline_ordered(&tensor_major(regions), kernel, sink, opts)
}

/// [`run_pipeline`] over regions in an order the caller chooses (a DCP output's file order).
pub fn run_pipeline_ordered<K: Kernel, S: Sink>(
    order: &[OutputRegion],
    kernel: &K,
    mut sink: S,
    opts: &PipelineOptions<'_>,
) -> Result<PipelineReport> {
    let threads = crate::threads::resolve_threads(opts.threads)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::ThreadPool {
            threads,
            reason: e.to_string(),
        })?;
    let buffers = BufferPool::default();
    let all_computed = AtomicBool::new(false);
    let mut report = std::thread::scope(|scope| -> Result<PipelineReport> {
        let (tx, rx) = mpsc::sync_channel::<Vec<JobOutput<'_>>>(BATCHES_IN_FLIGHT - 1);
        let buffers = &buffers;
        let all_computed = &all_computed;
        let writer = scope.spawn(move || -> Result<()> {
            for batch in rx {
                for out in batch {
                    sink.write(&out.job, &out.outputs)?;
                    out.outputs.into_iter().for_each(|b| buffers.give(b));
                }
            }
            // A failed or cancelled computation leaves its files unfinished: the caller drops
            // them with their staging path, and there is nothing to make durable.
            if all_computed.load(Ordering::Acquire) {
                sink.finish()?;
            }
            Ok(())
        });
        let computed = pool.install(|| compute_batches(order, kernel, threads, opts, buffers, &tx));
        // The channel closes after this store, so the writer sees it once its loop ends.
        all_computed.store(computed.is_ok(), Ordering::Release);
        drop(tx);
        let written = writer.join().expect("writer thread does not panic");
        // A compute error closes the channel early; report the cause, not what the writer saw.
        let report = computed?;
        written?;
        Ok(report)
    })?;
    report.threads = threads;
    Ok(report)
}

fn compute_batches<'r, K: Kernel>(
    order: &'r [OutputRegion],
    kernel: &K,
    threads: usize,
    opts: &PipelineOptions<'_>,
    buffers: &BufferPool,
    tx: &mpsc::SyncSender<Vec<JobOutput<'r>>>,
) -> Result<PipelineReport> {
    let batch_len = threads * JOBS_PER_THREAD;
    let mut all = cut_jobs(order);
    // Batches whose input pages have been requested but not yet computed.
    let mut ahead: VecDeque<Vec<Job<'r>>> = VecDeque::new();
    let mut refill = |ahead: &mut VecDeque<Vec<Job<'r>>>| {
        while ahead.len() < PREFETCH_BATCHES {
            let batch: Vec<Job<'r>> = all.by_ref().take(batch_len).collect();
            if batch.is_empty() {
                break;
            }
            for job in &batch {
                kernel.prefetch(job);
            }
            ahead.push_back(batch);
        }
    };
    let mut counts: HashMap<(usize, usize), u64> = HashMap::new();
    let mut report = PipelineReport::default();
    refill(&mut ahead);
    while let Some(batch) = ahead.pop_front() {
        if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        refill(&mut ahead);
        let outputs: Vec<JobOutput<'r>> = batch
            .into_par_iter()
            .map(|job| run_job(kernel, job, buffers))
            .collect::<Result<_>>()?;
        for out in &outputs {
            opts.progress.advance(out.read_bytes);
            report.read_bytes += out.read_bytes;
            for &(member, count) in &out.nonfinite {
                *counts.entry((out.job.tensor, member)).or_insert(0) += count;
            }
            if out.job.last_of_tensor {
                let mut done: Vec<(usize, u64)> = counts
                    .iter()
                    .filter(|((t, _), _)| *t == out.job.tensor)
                    .map(|(&(_, m), &c)| (m, c))
                    .collect();
                done.sort_unstable();
                for (member, count) in done {
                    counts.remove(&(out.job.tensor, member));
                    let path = kernel.member_path(member);
                    let tensor = kernel.tensor_name(out.job.tensor);
                    if !opts.allow_nonfinite {
                        return Err(Error::NonFinite {
                            path,
                            tensor,
                            count,
                        });
                    }
                    report.warnings.push(NonFiniteWarning {
                        path,
                        tensor,
                        count,
                    });
                }
            }
        }
        if tx.send(outputs).is_err() {
            // The writer stopped early; its own error says why.
            return Ok(report);
        }
    }
    Ok(report)
}

fn run_job<'r, K: Kernel>(kernel: &K, job: Job<'r>, buffers: &BufferPool) -> Result<JobOutput<'r>> {
    let mut out = Emitter {
        pool: buffers,
        outputs: Vec::new(),
        nonfinite: Vec::new(),
        read_bytes: 0,
    };
    let mut scratch = SCRATCH.take();
    let computed = kernel.compute(&job, &mut scratch, &mut out);
    SCRATCH.set(scratch);
    if let Err(e) = computed {
        out.outputs.into_iter().for_each(|b| buffers.give(b));
        return Err(e);
    }
    // Done with these input pages: drop them from our RSS (they stay in the page cache).
    kernel.release(&job);
    Ok(JobOutput {
        job,
        outputs: out.outputs,
        nonfinite: out.nonfinite,
        read_bytes: out.read_bytes,
    })
}

/// Output buffers handed back by the writer for reuse. At most the buffers of the batches in
/// flight exist at once.
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// A buffer of exactly `len` bytes whose contents are unspecified.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_cover_every_region_in_order() {
        let regions = vec![
            vec![Region::full(&[3])],
            vec![Region::full(&[0])],
            vec![
                Region {
                    offsets: vec![0],
                    sizes: vec![JOB_ELEMS + 1],
                },
                Region {
                    offsets: vec![JOB_ELEMS + 1],
                    sizes: vec![2],
                },
                Region {
                    offsets: vec![JOB_ELEMS + 3],
                    sizes: vec![0],
                },
            ],
        ];
        let jobs: Vec<(usize, Range<u64>, bool)> = cut_jobs(&tensor_major(&regions))
            .map(|j| (j.tensor, j.elems, j.last_of_tensor))
            .collect();
        assert_eq!(
            jobs,
            vec![
                (0, 0..3, true),
                (2, 0..JOB_ELEMS, false),
                (2, JOB_ELEMS..JOB_ELEMS + 1, false),
                (2, 0..2, true),
            ]
        );
    }

    #[test]
    fn interleaved_regions_mark_each_tensors_last_job() {
        // A DCP output's file order: tensor 0's first chunk, tensor 1's, then their second ones.
        let r = |o: u64, n: u64| Region {
            offsets: vec![o],
            sizes: vec![n],
        };
        let order = vec![
            OutputRegion {
                tensor: 0,
                region: r(0, 2),
            },
            OutputRegion {
                tensor: 1,
                region: r(0, 3),
            },
            OutputRegion {
                tensor: 0,
                region: r(2, 2),
            },
            OutputRegion {
                tensor: 1,
                region: r(3, 0),
            },
            OutputRegion {
                tensor: 1,
                region: r(3, JOB_ELEMS + 1),
            },
        ];
        let jobs: Vec<(usize, u64, Range<u64>, bool)> = cut_jobs(&order)
            .map(|j| (j.tensor, j.region.offsets[0], j.elems, j.last_of_tensor))
            .collect();
        assert_eq!(
            jobs,
            vec![
                (0, 0, 0..2, false),
                (1, 0, 0..3, false),
                (0, 2, 0..2, true),
                (1, 3, 0..JOB_ELEMS, false),
                (1, 3, JOB_ELEMS..JOB_ELEMS + 1, true),
            ]
        );
    }

    /// A kernel whose output for element e of tensor t is the byte (t·7 + e) mod 251, and which
    /// reports every 100 000th element as NaN.
    struct Numbered;

    impl Kernel for Numbered {
        fn compute(&self, job: &Job<'_>, _: &mut Scratch, out: &mut Emitter<'_>) -> Result<()> {
            let mut b = out.buffer((job.elems.end - job.elems.start) as usize);
            for (i, e) in job.elems.clone().enumerate() {
                b[i] = ((job.tensor as u64 * 7 + e) % 251) as u8;
            }
            let nans = job.elems.clone().filter(|e| e % 100_000 == 0).count() as u64;
            out.nonfinite(1, nans);
            out.read(b.len() as u64);
            out.emit(b);
            Ok(())
        }

        fn member_path(&self, member: usize) -> PathBuf {
            PathBuf::from(format!("member-{member}"))
        }

        fn tensor_name(&self, tensor: usize) -> String {
            format!("t{tensor}")
        }
    }

    struct Collect<'a>(&'a Mutex<Vec<(usize, Vec<u8>)>>, &'a Mutex<bool>);

    impl Sink for Collect<'_> {
        fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((job.tensor, outputs[0].clone()));
            Ok(())
        }

        fn finish(&mut self) -> Result<()> {
            *self.1.lock().unwrap() = true;
            Ok(())
        }
    }

    fn run_numbered(
        threads: usize,
        allow: bool,
    ) -> (Result<PipelineReport>, Vec<(usize, Vec<u8>)>) {
        let regions = vec![
            vec![Region::full(&[2 * JOB_ELEMS + 5])],
            vec![Region::full(&[3])],
        ];
        let (written, finished) = (Mutex::new(Vec::new()), Mutex::new(false));
        let opts = PipelineOptions {
            threads,
            cancel: None,
            allow_nonfinite: allow,
            progress: &crate::NoProgress,
        };
        let r = run_pipeline(&regions, &Numbered, Collect(&written, &finished), &opts);
        assert_eq!(*finished.lock().unwrap(), r.is_ok());
        (r, written.into_inner().unwrap())
    }

    #[test]
    fn writes_in_job_order_whatever_the_thread_count() {
        let (r1, w1) = run_numbered(1, true);
        let (r4, w4) = run_numbered(4, true);
        assert_eq!(w1, w4);
        assert_eq!(w1.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [0, 0, 0, 1]);
        let bytes: Vec<u8> = w1.iter().take(3).flat_map(|(_, b)| b.clone()).collect();
        assert!(bytes.iter().enumerate().all(|(e, &b)| b == (e % 251) as u8));
        assert_eq!(r1.unwrap().read_bytes, r4.unwrap().read_bytes);
    }

    #[test]
    fn nonfinite_is_counted_per_whole_tensor() {
        // Issue 8.1: the count covers the whole tensor (all its jobs), not one job.
        let per_tensor = (2 * JOB_ELEMS + 5).div_ceil(100_000);
        let (r, _) = run_numbered(3, true);
        let w = r.unwrap().warnings;
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].tensor.as_str(), w[0].count), ("t0", per_tensor));
        assert_eq!(w[0].path, PathBuf::from("member-1"));
        assert_eq!((w[1].tensor.as_str(), w[1].count), ("t1", 1));
        let (r, _) = run_numbered(3, false);
        match r.unwrap_err() {
            Error::NonFinite {
                path,
                tensor,
                count,
            } => assert_eq!(
                (path, tensor.as_str(), count),
                (PathBuf::from("member-1"), "t0", per_tensor)
            ),
            e => panic!("expected NonFinite, got {e}"),
        }
    }

    #[test]
    fn cancel_stops_before_the_first_batch() {
        let cancel = AtomicBool::new(true);
        let regions = vec![vec![Region::full(&[10])]];
        let (written, finished) = (Mutex::new(Vec::new()), Mutex::new(false));
        let opts = PipelineOptions {
            threads: 2,
            cancel: Some(&cancel),
            allow_nonfinite: true,
            progress: &crate::NoProgress,
        };
        let e = run_pipeline(&regions, &Numbered, Collect(&written, &finished), &opts);
        assert!(matches!(e, Err(Error::Interrupted)));
        assert!(written.lock().unwrap().is_empty() && !*finished.lock().unwrap());
    }

    #[test]
    fn kernels_read_unaligned_input_slices() {
        // DCP tensor data starts at odd offsets: the f64 kernel must not assume alignment.
        use pma_format::dtype::weighted_sum;
        use pma_format::FloatDtype;
        let n = 1000;
        let vals: Vec<f64> = (0..n).map(|i| i as f64 * 0.37 - 100.0).collect();
        for dt in [FloatDtype::F32, FloatDtype::F64, FloatDtype::BF16] {
            let sz = dt.size_bytes();
            let mut aligned = vec![0u8; n * sz];
            pma_format::dtype::encode_f64(dt, &vals, &mut aligned);
            let mut shifted = vec![0u8; n * sz + 1];
            shifted[1..].copy_from_slice(&aligned);
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            weighted_sum(
                &[(dt, &aligned[..]), (dt, &aligned[..])],
                &[0.25, 0.75],
                &mut a,
            );
            weighted_sum(
                &[(dt, &shifted[1..]), (dt, &shifted[1..])],
                &[0.25, 0.75],
                &mut b,
            );
            assert_eq!(a, b, "{dt:?}");
        }
    }
}
