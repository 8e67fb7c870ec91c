//! The merge executor: a [`MergePlan`] run through the streaming [`crate::pipeline`] into a
//! staged HF or DCP output.
//!
//! Its kernel computes every element independently, `acc = 0; acc += w_i · x_i` for i = 1..N
//! (oldest first, no fused multiply-add), then rounds once; integer and BOOL tensors must be
//! identical in every input and are copied. Inputs are read through each member's
//! [`TensorSource`], so the kernel does not know the input format; the output goes through a
//! [`SafetensorsSink`] (HF) or a [`DcpSink`] (DCP, jobs in the DCP writer's chunk order, see
//! [`crate::dcp_output`]) into a [`StagedOutput`] that appears only when complete and durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use pma_format::atomic::{OutputKind, Publish};
use pma_format::dtype::{classify, count_nonfinite, encode_f64, weighted_sum};
use pma_format::writer::DirectIo;
use pma_format::{DtypeClass, FloatDtype, SidecarKind, StagedOutput, TensorSource, TensorStore};
use serde::Serialize;

use crate::dcp_output::io_error;
use crate::error::{Error, Result};
use crate::pipeline::{
    read_members, Emitter, Job, Kernel, PipelineOptions, SafetensorsSink, Scratch, ShardFile,
};
use crate::pipeline::{
    run_pipeline_ordered, tensor_major, DcpSink, OutputRegion, PipelineReport, Sink,
};
use crate::plan::{MergePlan, OutputFormat, PlanSummary, TensorMode};
use crate::progress::Progress;

pub use crate::pipeline::{
    working_memory_bytes, NonFiniteWarning, BATCHES_IN_FLIGHT, BLOCK_ELEMS, JOB_ELEMS,
};

/// Options of one execution.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions<'a> {
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Checked between batches; when set, the merge stops and nothing is written.
    pub cancel: Option<&'a AtomicBool>,
    /// Whether large output files bypass the page cache.
    pub direct_io: DirectIo,
}

/// What a finished merge reports.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// The plan that was executed.
    pub plan: PlanSummary,
    /// Where the output now is.
    pub output: PathBuf,
    /// Sidecar files and folders (`name/`) copied from the newest checkpoint.
    pub sidecars: Vec<String>,
    /// The newest checkpoint's files and folders not copied beside the output, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sidecars_skipped: Vec<SidecarSkipped>,
    /// NaN/Inf found with `allow_nonfinite`.
    pub warnings: Vec<NonFiniteWarning>,
    /// Wall time of the merge, in seconds.
    pub elapsed_secs: f64,
    /// Tensor bytes read per second.
    pub read_bytes_per_sec: f64,
    /// Staging paths of the output left by other runs that were not removed (a live process, or
    /// another host): see [`StagedOutput::stale_kept`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale_staging: Vec<PathBuf>,
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
    // Every caller, not only the CLI, is kept from writing over, inside or around an input.
    crate::placement::check_plan_output(plan, out)?;
    let publish = Publish::overwrite_if(opts.overwrite);
    if publish == Publish::Create && pma_format::writer::output_occupied(out) {
        return Err(pma_format::Error::OutputExists { path: out.into() }.into());
    }
    if plan.output_format() == OutputFormat::Dcp {
        return execute_dcp(plan, out, publish, opts, progress, started);
    }
    plan.check_space(out)?;
    let kind = if plan.single_file {
        OutputKind::File
    } else {
        OutputKind::Dir
    };
    let staged = StagedOutput::create(out, kind, publish)?;
    let files = shard_files(plan, |name| {
        if plan.single_file {
            staged.path().to_path_buf()
        } else {
            staged.path().join(name)
        }
    });
    let sink = SafetensorsSink::new(files, plan.metadata.clone(), opts.direct_io, 0);
    let kernel = MergeKernel::new(plan)?;
    let order = tensor_major(&plan.job_regions());
    let report = run_merge(plan, &order, &kernel, sink, opts, progress)?;

    let mut sidecars = SidecarsCopied::default();
    if !plan.single_file {
        let newest = &plan.inputs[plan.inputs.len() - 1];
        sidecars = copy_sidecars(newest.store(), plan.config.out_dtype, staged.path())?;
    }
    let stale_staging = staged.stale_kept().to_vec();
    staged.commit()?;
    Ok(hf_report(
        plan,
        out,
        sidecars,
        report,
        started,
        stale_staging,
    ))
}

/// Executes an HF `plan` into `out`, an object-store URL, with no local copy of the weights:
/// every shard is streamed into its own multipart upload while the merge computes
/// ([`pma_format::StreamWriter`] on a URL), parts leaving as they fill, so memory stays at a
/// few parts per upload and the store's write runs alongside the reads and the kernel.
///
/// The order keeps a half-written output from ever looking loadable (see
/// [`pma_format::remote::Publication`]): the sidecars (staged in `staging`, a local folder
/// the caller owns and removes) go first; then the shards, each visible only once complete;
/// and last the file that makes the output loadable: the shard index, or the lone
/// `model.safetensors` (the last shard) when there is one shard, or the single file itself.
/// An existing output (with `overwrite`) stays as it was until the new one is complete: files
/// that replace old ones are staged under the output and copied into place at the commit, and
/// only then are the old output's stale objects deleted. A merge that fails deletes what it
/// uploaded and nothing else, so it leaves the old output, or nothing to block a rerun.
/// A DCP plan is staged locally and published whole by the caller instead.
pub fn execute_to_store(
    plan: &MergePlan,
    out: &Path,
    staging: &Path,
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = std::time::Instant::now();
    crate::placement::check_plan_output(plan, out)?;
    if plan.output_format() == OutputFormat::Dcp {
        return Err(pma_format::Error::RemoteUnsupported {
            url: out.to_string_lossy().into_owned(),
            reason: "a DCP output is staged locally and published whole, not streamed".into(),
        }
        .into());
    }
    let mut sidecars = SidecarsCopied::default();
    if !plan.single_file {
        let newest = &plan.inputs[plan.inputs.len() - 1];
        sidecars = copy_sidecars(newest.store(), plan.config.out_dtype, staging)?;
    }
    let mut names: Vec<String> = plan.shards.iter().map(|(n, _)| n.clone()).collect();
    if plan.shards.len() > 1 {
        names.push(pma_format::checkpoint::INDEX_FILE_NAME.to_string());
    }
    names.extend(
        sidecars
            .copied
            .iter()
            .map(|s| s.trim_end_matches('/').to_string()),
    );
    if plan.single_file {
        // One object, written at `out` itself: its multipart upload replaces an old one
        // whole when it completes, so nothing is staged.
        names.clear();
    }
    let mut publication = pma_format::remote::Publication::begin(out, opts.overwrite, &names)?;
    if !plan.single_file {
        publication.upload_dir(staging)?;
    }
    let files = shard_files(plan, |name| {
        if plan.single_file {
            out.to_path_buf()
        } else {
            publication.url_of(name)
        }
    });
    // The sink finishes each shard's upload as the next begins; the index, the commit, is
    // written here once every shard is complete, and the publication puts it in place last.
    let sink =
        SafetensorsSink::new(files, plan.metadata.clone(), opts.direct_io, 0).without_index();
    let kernel = MergeKernel::new(plan)?;
    let order = tensor_major(&plan.job_regions());
    let merged = run_merge(plan, &order, &kernel, sink, opts, progress).and_then(|report| {
        if plan.shards.len() > 1 {
            pma_format::write_index(staging, &plan.index_listing())?;
            let index = pma_format::checkpoint::INDEX_FILE_NAME;
            publication.upload(&staging.join(index), index)?;
        }
        Ok(report)
    });
    let report = match merged {
        Ok(report) => report,
        Err(e) => {
            // Unfinished uploads were aborted as their writers dropped; finished shards and
            // the sidecars go too (never an object of the old output).
            let shards: Vec<String> = plan.shards.iter().map(|(n, _)| n.clone()).collect();
            publication.discard(if plan.single_file { &[] } else { &shards });
            return Err(e);
        }
    };
    publication.commit()?;
    Ok(hf_report(plan, out, sidecars, report, started, Vec::new()))
}

/// What an HF merge of `plan` into `out` that began at `started` reports.
fn hf_report(
    plan: &MergePlan,
    out: &Path,
    sidecars: SidecarsCopied,
    report: PipelineReport,
    started: std::time::Instant,
    stale_staging: Vec<PathBuf>,
) -> MergeReport {
    let total_read: u64 = plan.bytes_read_per_input().iter().sum();
    let elapsed_secs = started.elapsed().as_secs_f64();
    MergeReport {
        plan: plan.summary(report.threads),
        output: out.to_path_buf(),
        sidecars: sidecars.copied,
        sidecars_skipped: sidecars.skipped,
        warnings: report.warnings,
        elapsed_secs,
        read_bytes_per_sec: total_read as f64 / elapsed_secs.max(1e-9),
        stale_staging,
    }
}

/// The plan's shards as the sink's files, shard `name` written at `path_of(name)`.
fn shard_files(plan: &MergePlan, path_of: impl Fn(&str) -> PathBuf) -> Vec<ShardFile> {
    plan.shards
        .iter()
        .map(|(name, range)| ShardFile {
            path: path_of(name),
            tensors: range
                .clone()
                .map(|t| (t, plan.tensors[t].spec.clone()))
                .collect(),
        })
        .collect()
}

/// Merges the tensors of `files` (some or all of the plan's shards, each at its own path) and
/// writes them, with the shard index when `index` is set and there is more than one file;
/// `also` sees every job's output too (after the file writer). Tensors of shards not in `files`
/// are neither read nor computed: a part of a partitioned merge ([`crate::partition`]) runs
/// this over its own shards.
pub(crate) fn write_shard_files<S: Sink>(
    plan: &MergePlan,
    files: Vec<ShardFile>,
    index: bool,
    also: S,
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
) -> Result<PipelineReport> {
    let mut wanted = vec![false; plan.tensors.len()];
    for f in &files {
        for (t, _) in &f.tensors {
            wanted[*t] = true;
        }
    }
    // A tensor with no regions gets no jobs, so it is never read.
    let regions: Vec<Vec<pma_format::Region>> = plan
        .job_regions()
        .into_iter()
        .zip(&wanted)
        .map(|(r, &w)| if w { r } else { Vec::new() })
        .collect();
    let mut sink = SafetensorsSink::new(files, plan.metadata.clone(), opts.direct_io, 0);
    if !index {
        sink = sink.without_index();
    }
    let kernel = MergeKernel::new(plan)?;
    let order = tensor_major(&regions);
    run_merge(plan, &order, &kernel, (sink, also), opts, progress)
}

/// Runs the merge kernel over `order` into `sink`, reporting progress over the plan's input
/// bytes.
fn run_merge<S: Sink>(
    plan: &MergePlan,
    order: &[OutputRegion],
    kernel: &MergeKernel<'_>,
    sink: S,
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
) -> Result<PipelineReport> {
    progress.start(plan.bytes_read_per_input().iter().sum());
    let result = run_pipeline_ordered(
        order,
        kernel,
        sink,
        &PipelineOptions {
            threads: opts.threads,
            cancel: opts.cancel,
            allow_nonfinite: plan.config.allow_nonfinite,
            progress,
        },
    );
    progress.finish();
    result
}

/// Merges the tensors of the DCP data files `files` (some or all of `layout`'s, the plan's
/// [`crate::dcp_output::dcp_layout`]) into `dir`, each byte for byte as [`execute`] writes it,
/// with no `.metadata`: a part of a partitioned merge ([`crate::partition`]) runs this over its
/// own files. Chunks of other files are neither read nor computed.
pub(crate) fn write_dcp_files(
    plan: &MergePlan,
    layout: pma_format::dcp_out::DcpLayout,
    dir: &Path,
    files: &[String],
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
) -> Result<(PipelineReport, pma_format::dcp_out::DcpWriteSummary)> {
    let kernel = MergeKernel::new(plan)?;
    let mut writer = pma_format::dcp_out::DcpWriter::create(dir, layout)?;
    writer.set_direct_io(opts.direct_io);
    writer.write_only_files(files)?;
    let order = DcpSink::job_order(&writer);
    let mut sink = DcpSink::new(writer, 0);
    let report = run_merge(plan, &order, &kernel, &mut sink, opts, progress)?;
    let summary = sink
        .summary()
        .cloned()
        .expect("the pipeline finishes its sink when it succeeds");
    Ok((report, summary))
}

/// [`execute`] into a DCP directory: the plan's tensors with the newest member's chunk layout,
/// plus the kept entries and files of [`crate::dcp_output`].
fn execute_dcp(
    plan: &MergePlan,
    out: &Path,
    publish: Publish,
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
    started: std::time::Instant,
) -> Result<MergeReport> {
    let layout = crate::dcp_output::dcp_layout(plan)?;
    let state_files = crate::dcp_output::state_files(plan)?;
    let kernel = MergeKernel::new(plan)?;
    let staged = StagedOutput::create(out, OutputKind::Dir, publish)?;
    let mut writer = pma_format::dcp_out::DcpWriter::create(staged.path(), layout)?;
    writer.set_direct_io(opts.direct_io);
    // The writer has planned every item, so the data files' sizes are exact; `.metadata` is
    // bounded.
    let data_bytes: u64 = writer.planned_files().iter().map(|(_, n)| n).sum();
    let state_bytes: u64 = state_files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let order = DcpSink::job_order(&writer);
    let needed = data_bytes + state_bytes + crate::dcp_output::metadata_bound(writer.layout());
    let available = pma_format::available_bytes(staged.path())?;
    if available < needed {
        return Err(pma_format::Error::NoSpace {
            path: staged.path().into(),
            needed,
            available,
        }
        .into());
    }
    let total_read: u64 = plan.bytes_read_per_input().iter().sum();
    let report = run_merge(
        plan,
        &order,
        &kernel,
        DcpSink::new(writer, 0),
        opts,
        progress,
    )?;
    let sidecars = crate::dcp_output::copy_state_files(&state_files, staged.path())?;
    let metadata_path = staged.path().join(pma_format::dcp_out::METADATA_FILE_NAME);
    let metadata_bytes = std::fs::metadata(&metadata_path)
        .map_err(|e| io_error(&metadata_path, "reading metadata of", e))?
        .len();
    let stale_staging = staged.stale_kept().to_vec();
    staged.commit()?;
    let elapsed_secs = started.elapsed().as_secs_f64();
    let mut summary = plan.summary(report.threads);
    summary.bytes_written = data_bytes + metadata_bytes + state_bytes;
    Ok(MergeReport {
        plan: summary,
        output: out.to_path_buf(),
        sidecars,
        sidecars_skipped: Vec::new(),
        warnings: report.warnings,
        elapsed_secs,
        read_bytes_per_sec: total_read as f64 / elapsed_secs.max(1e-9),
        stale_staging,
    })
}

/// A sidecar of the newest checkpoint that was not copied, and why (for the report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SidecarSkipped {
    /// Path relative to the checkpoint directory.
    pub path: String,
    /// Why it was left behind (training state, weights, a symlink leaving the checkpoint, ...).
    pub reason: String,
}

/// What [`copy_sidecars`] did.
#[derive(Debug, Clone, Default)]
pub(crate) struct SidecarsCopied {
    /// Relative paths copied, folders with a trailing `/`, each before its contents.
    pub copied: Vec<String>,
    /// What was left behind, and why.
    pub skipped: Vec<SidecarSkipped>,
}

/// Copies the newest checkpoint's sidecars into `dir`: every non-weight file and folder but
/// training state, hidden folders and symlinks leaving the checkpoint
/// ([`TensorStore::sidecar_plan`]). Folders are recreated and files copied through the kernel,
/// never following a link out of the checkpoint ([`pma_format::copy_sidecar`]).
/// `config.json`'s `torch_dtype` follows an explicit output dtype so `from_pretrained` loads the
/// weights as they were written.
pub(crate) fn copy_sidecars(
    newest: &dyn TensorStore,
    out_dtype: Option<FloatDtype>,
    dir: &Path,
) -> Result<SidecarsCopied> {
    let io_error = |path: &Path, action, source| pma_format::Error::Io {
        path: path.into(),
        action,
        source,
    };
    let plan = newest.sidecar_plan()?;
    let root = newest.root();
    let mut done = SidecarsCopied {
        skipped: plan
            .skipped
            .iter()
            .map(|s| SidecarSkipped {
                path: s.path.to_string_lossy().into_owned(),
                reason: s.reason.to_string(),
            })
            .collect(),
        ..SidecarsCopied::default()
    };
    for entry in &plan.copy {
        let (src, dst) = (root.join(&entry.path), dir.join(&entry.path));
        let name = entry.path.to_string_lossy().into_owned();
        if entry.kind == SidecarKind::Dir {
            std::fs::create_dir(&dst).map_err(|e| io_error(&dst, "creating", e))?;
            done.copied.push(name + "/");
            continue;
        }
        let rewrite = match (entry.path == Path::new("config.json"), out_dtype) {
            (true, Some(dtype)) => {
                // Never follows a link out of the checkpoint (see pma_format::sidecar).
                let text = pma_format::read_sidecar(root, &src)?;
                match serde_json::from_slice(&text) {
                    Ok(serde_json::Value::Object(mut cfg)) => {
                        cfg.insert("torch_dtype".into(), dtype.torch_name().into());
                        let bytes = serde_json::to_vec_pretty(&cfg).expect("JSON value serializes");
                        pma_format::write_file_synced(&dst, &bytes)?;
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        if !rewrite {
            pma_format::copy_sidecar(root, &src, &dst)?;
        }
        done.copied.push(name);
    }
    // The output's own directory is synced when it is committed; the folders made here hold
    // entries of their own.
    for entry in plan.copy.iter().filter(|e| e.kind == SidecarKind::Dir) {
        let sub = dir.join(&entry.path);
        std::fs::File::open(&sub)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error(&sub, "syncing", e))?;
    }
    Ok(done)
}

/// The merge's compute kernel: the weighted average of float tensors, the exact copy of the rest.
struct MergeKernel<'p> {
    plan: &'p MergePlan,
    /// `sources[t][i]`: output tensor `t` in input `i`, oldest first.
    sources: Vec<Vec<Box<dyn TensorSource + 'p>>>,
}

impl<'p> MergeKernel<'p> {
    fn new(plan: &'p MergePlan) -> Result<MergeKernel<'p>> {
        let sources = plan
            .tensors
            .iter()
            .map(|t| {
                plan.inputs
                    .iter()
                    .map(|input| {
                        input
                            .store()
                            .source(&t.spec.name)
                            .ok_or_else(|| Error::MissingTensor {
                                path: input.store().root().into(),
                                tensor: t.spec.name.clone(),
                                reference: plan.inputs[plan.inputs.len() - 1].store().root().into(),
                            })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        Ok(MergeKernel { plan, sources })
    }

    fn members(&self, tensor: usize) -> Vec<&dyn TensorSource> {
        self.sources[tensor].iter().map(|s| s.as_ref()).collect()
    }
}

impl Kernel for MergeKernel<'_> {
    fn prefetch(&self, job: &Job<'_>) {
        for s in &self.sources[job.tensor] {
            s.prefetch(job.region, job.elems.clone());
        }
    }

    fn compute(&self, job: &Job<'_>, scratch: &mut Scratch, out: &mut Emitter<'_>) -> Result<()> {
        let t = &self.plan.tensors[job.tensor];
        let members = self.members(job.tensor);
        let srcs = read_members(&members, job, &mut scratch.reads)?;
        out.read(srcs.iter().map(|s| s.len() as u64).sum());
        match t.mode {
            TensorMode::Average(dtype) => {
                average(self.plan, job.tensor, &srcs, dtype, &mut scratch.acc, out)?
            }
            TensorMode::Copy => copy_exact(self.plan, job.tensor, &srcs, out)?,
        }
        // A file truncated under us (SIGBUS, turned into zeros): fail naming it, before its
        // bytes can reach the output.
        for s in &members {
            s.verify()?;
        }
        Ok(())
    }

    fn release(&self, job: &Job<'_>) {
        for s in &self.sources[job.tensor] {
            s.release(job.region, job.elems.clone());
        }
    }

    fn member_path(&self, member: usize) -> PathBuf {
        self.plan.inputs[member].store().root().into()
    }

    fn tensor_name(&self, tensor: usize) -> String {
        self.plan.tensors[tensor].spec.name.clone()
    }
}

fn average(
    plan: &MergePlan,
    tensor: usize,
    srcs: &[&[u8]],
    out_dtype: FloatDtype,
    acc: &mut Vec<f64>,
    out: &mut Emitter<'_>,
) -> Result<()> {
    let t = &plan.tensors[tensor];
    let dtypes: Vec<FloatDtype> = t
        .sources
        .iter()
        .map(|s| match classify(s.dtype) {
            DtypeClass::Float(d) => d,
            _ => unreachable!("the plan only averages float tensors"),
        })
        .collect();
    let n = srcs.first().map_or(0, |s| s.len() / dtypes[0].size_bytes());
    let osz = out_dtype.size_bytes();
    let mut bytes = out.buffer(n * osz);
    let mut nonfinite = vec![0u64; srcs.len()];
    acc.resize(BLOCK_ELEMS.min(n), 0.0); // every block's sum overwrites what it uses
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
        let all_finite = encode_f64(out_dtype, acc, &mut bytes[start * osz..end * osz]);
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
    for (i, c) in nonfinite.into_iter().enumerate() {
        out.nonfinite(i, c);
    }
    out.emit(bytes);
    Ok(())
}

fn copy_exact(
    plan: &MergePlan,
    tensor: usize,
    srcs: &[&[u8]],
    out: &mut Emitter<'_>,
) -> Result<()> {
    let newest = srcs[srcs.len() - 1];
    for (i, src) in srcs.iter().enumerate() {
        if *src != newest {
            return Err(Error::ExactTensorDiffers {
                path: plan.inputs[i].store().root().into(),
                tensor: plan.tensors[tensor].spec.name.clone(),
                reference: plan.inputs[plan.inputs.len() - 1].store().root().into(),
            });
        }
    }
    let mut bytes = out.buffer(newest.len());
    bytes.copy_from_slice(newest);
    out.emit(bytes);
    Ok(())
}
