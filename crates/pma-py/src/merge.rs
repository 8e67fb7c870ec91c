//! `pma.merge`: the calls `pma merge` makes (`crates/pma-cli/src/cmd/merge.rs`, `plan_from_args`
//! and `run`), from keyword arguments instead of flags, reported as a [`MergeReport`].

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::PathBuf;

use pma_merge::{
    check_output_placement, check_plan_output, execute, CheckpointSeries, ExecOptions, MergeConfig,
    MergePlan, NoProgress, PlanSummary, Skipped,
};
use pyo3::prelude::*;

use crate::errors::{config_error, to_py_err};
use crate::interrupt::run_interruptible;
use crate::options::{self, ByteSize, Count, SelectOptions};
use crate::weights::weight_spec;

/// One checkpoint of a merge: where it is, its step, its weight and the tensor bytes read from it.
#[pyclass(frozen, get_all, module = "pma")]
#[derive(Debug, Clone)]
pub struct Member {
    /// The checkpoint (HF directory or .safetensors file).
    path: PathBuf,
    /// Its training step, when its name carries one.
    step: Option<u64>,
    /// Its weight in the average.
    weight: f64,
    /// Tensor bytes read from it.
    bytes: u64,
}

#[pymethods]
impl Member {
    fn __repr__(&self) -> String {
        format!(
            "Member(path='{}', step={}, weight={}, bytes={})",
            self.path.display(),
            self.step.map_or("None".into(), |s| s.to_string()),
            self.weight,
            self.bytes
        )
    }
}

/// What a merge did, or on a dry run what it would do.
///
/// ``to_dict()`` gives the object ``pma merge --json`` prints.
#[pyclass(frozen, module = "pma")]
#[derive(Debug)]
pub struct MergeReport {
    /// Whether this is a plan only (``dry_run=True``): nothing was read or written.
    #[pyo3(get)]
    dry_run: bool,
    /// The output path.
    #[pyo3(get)]
    output: PathBuf,
    /// The averaging method: ``sma``, ``ema0.2``, ``wma`` or ``weights``.
    #[pyo3(get)]
    method: String,
    /// The merged checkpoints, oldest first, with steps, weights and bytes.
    #[pyo3(get)]
    members: Vec<Member>,
    /// Output files (shards, or the single file).
    #[pyo3(get)]
    files: Vec<String>,
    /// Whether the output is one bare .safetensors file.
    #[pyo3(get)]
    single_file: bool,
    /// Tensors in the output.
    #[pyo3(get)]
    n_tensors: usize,
    /// Parameters in the output.
    #[pyo3(get)]
    n_params: u64,
    /// Output dtypes and how many tensors get each (``{"bf16": 12, "copy (I64)": 1}``).
    #[pyo3(get)]
    output_dtypes: BTreeMap<String, usize>,
    /// Tensor bytes read across all members.
    #[pyo3(get)]
    bytes_read: u64,
    /// Bytes written, headers included.
    #[pyo3(get)]
    bytes_written: u64,
    /// Working memory of the merge, in bytes.
    #[pyo3(get)]
    memory_bytes: u64,
    /// Config/tokenizer files copied from the newest member (empty on a dry run).
    #[pyo3(get)]
    sidecars: Vec<String>,
    /// Wall time of the merge in seconds (``None`` on a dry run).
    #[pyo3(get)]
    elapsed_secs: Option<f64>,
    /// Tensor bytes read per second (``None`` on a dry run).
    #[pyo3(get)]
    read_bytes_per_sec: Option<f64>,
    /// ``(path, tensor, count)`` of NaN/Inf values merged with ``allow_nonfinite=True``.
    #[pyo3(get)]
    nonfinite: Vec<(PathBuf, String, u64)>,
    /// ``(path, reason)`` of incomplete checkpoints of the run that were passed over.
    #[pyo3(get)]
    skipped: Vec<(PathBuf, String)>,
    /// The CLI's `--json` object, serialized.
    json: String,
}

#[pymethods]
impl MergeReport {
    /// The members' weights, oldest first.
    #[getter]
    fn weights(&self) -> Vec<f64> {
        self.members.iter().map(|m| m.weight).collect()
    }

    /// The members' steps, oldest first (``None`` where a name carries no step).
    #[getter]
    fn steps(&self) -> Vec<Option<u64>> {
        self.members.iter().map(|m| m.step).collect()
    }

    /// The report as ``pma merge --json`` prints it (``{"schema_version": 1, ...}``).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("json")?.call_method1("loads", (&self.json,))
    }

    fn __repr__(&self) -> String {
        format!(
            "MergeReport({}method='{}', members={}, output='{}', bytes_written={})",
            if self.dry_run { "dry_run=True, " } else { "" },
            self.method,
            self.members.len(),
            self.output.display(),
            self.bytes_written
        )
    }
}

impl MergeReport {
    fn new(
        summary: &PlanSummary,
        output: PathBuf,
        executed: Option<&pma_merge::MergeReport>,
        skipped: &[Skipped],
    ) -> MergeReport {
        let json = match executed {
            Some(r) => serde_json::json!({ "schema_version": 1, "dry_run": false, "report": r }),
            None => serde_json::json!({ "schema_version": 1, "dry_run": true, "plan": summary }),
        };
        MergeReport {
            dry_run: executed.is_none(),
            output,
            method: summary.method_label(),
            members: summary
                .inputs
                .iter()
                .map(|i| Member {
                    path: i.path.clone(),
                    step: i.step,
                    weight: i.weight,
                    bytes: i.bytes,
                })
                .collect(),
            files: summary.files.clone(),
            single_file: summary.single_file,
            n_tensors: summary.n_tensors,
            n_params: summary.n_params,
            output_dtypes: summary.output_dtypes.clone(),
            bytes_read: summary.bytes_read,
            bytes_written: summary.bytes_written,
            memory_bytes: summary.memory_bytes,
            sidecars: executed.map(|r| r.sidecars.clone()).unwrap_or_default(),
            elapsed_secs: executed.map(|r| r.elapsed_secs),
            read_bytes_per_sec: executed.map(|r| r.read_bytes_per_sec),
            nonfinite: executed
                .map(|r| {
                    r.warnings
                        .iter()
                        .map(|w| (w.path.clone(), w.tensor.clone(), w.count))
                        .collect()
                })
                .unwrap_or_default(),
            skipped: skipped
                .iter()
                .map(|s| (s.path.clone(), s.reason.clone()))
                .collect(),
            json: json.to_string(),
        }
    }

    /// The warnings `pma merge` prints on stderr, as Python `UserWarning`s.
    fn warn(&self, py: Python<'_>) -> PyResult<()> {
        let category = py.import("pma._errors")?.getattr("PmaWarning")?;
        let skipped = self.skipped.iter().map(|(path, reason)| {
            format!(
                "skipping incomplete checkpoint {}: {reason}",
                path.display()
            )
        });
        let nonfinite = self.nonfinite.iter().map(|(path, tensor, count)| {
            format!(
                "{}: tensor '{tensor}' has {count} non-finite values (merged anyway)",
                path.display()
            )
        });
        for message in skipped.chain(nonfinite) {
            let message =
                CString::new(message.replace('\0', " ")).expect("NUL bytes were replaced above");
            PyErr::warn(py, &category, &message, 1)?;
        }
        Ok(())
    }
}

/// Where the checkpoints come from.
enum Source {
    /// A run directory, discovered and filtered by the selection.
    Run(PathBuf),
    /// Paths given by the caller, oldest first.
    Paths(Vec<PathBuf>),
}

/// merge(checkpoints=None, *, run=None, method="ema", alpha=0.2, weights=None, normalize=False,
/// last=10, every=None, at=None, min=None, tokens_per_step=None, out, dtype=None,
/// max_shard_size=None, threads=None, allow_nonfinite=False, overwrite=False, dry_run=False,
/// cancel=None)
///
/// Merge checkpoints of a pre-training run into one checkpoint, bit-identical to ``pma merge``.
/// See the ``pma`` package docs and ``pma/_pma.pyi`` for every argument.
#[pyfunction]
#[pyo3(signature = (
    checkpoints=None, *, run=None, method=Some("ema".to_string()), alpha=crate::weights::DEFAULT_ALPHA,
    weights=None, normalize=false, last=Some(10), every=None, at=None, min=None,
    tokens_per_step=None, out, dtype=None, max_shard_size=None, threads=None,
    allow_nonfinite=false, overwrite=false, dry_run=false, cancel=None, format=None,
    include=Vec::new(), exclude=Vec::new()
))]
#[allow(clippy::too_many_arguments)] // Python keyword arguments, one per `pma merge` flag.
pub(crate) fn merge(
    py: Python<'_>,
    checkpoints: Option<Vec<PathBuf>>,
    run: Option<PathBuf>,
    method: Option<String>,
    alpha: f64,
    weights: Option<Vec<f64>>,
    normalize: bool,
    last: Option<usize>,
    every: Option<Count>,
    at: Option<Count>,
    min: Option<usize>,
    tokens_per_step: Option<Count>,
    out: PathBuf,
    dtype: Option<String>,
    max_shard_size: Option<ByteSize>,
    threads: Option<usize>,
    allow_nonfinite: bool,
    overwrite: bool,
    dry_run: bool,
    cancel: Option<Bound<'_, PyAny>>,
    format: Option<String>,
    include: Vec<String>,
    exclude: Vec<String>,
) -> PyResult<MergeReport> {
    let source = match (run, checkpoints) {
        (Some(run), None) => Source::Run(run),
        (None, Some(paths)) if !paths.is_empty() => Source::Paths(paths),
        (Some(_), Some(_)) => return Err(config_error("give either checkpoints or run, not both")),
        (None, _) => {
            return Err(config_error(
                "nothing to merge: give checkpoints (oldest first) or run=RUN_DIR",
            ))
        }
    };
    // An explicit list is what the caller wants merged: `last` (10 unless given) only guards
    // against merging more than intended, it never drops checkpoints silently.
    let last = match &source {
        Source::Paths(paths) => match last {
            Some(n) if paths.len() > n => {
                return Err(config_error(format!(
                    "{} checkpoints given but last={n}; pass last=None to merge them all",
                    paths.len()
                )))
            }
            _ => None,
        },
        Source::Run(_) => last,
    };
    let selection = SelectOptions {
        last,
        every,
        at,
        min,
        tokens_per_step,
    }
    .selection()?;
    let spec = weight_spec(method.as_deref(), alpha, weights, normalize)?;
    let config = MergeConfig {
        out_dtype: options::dtype(dtype.as_deref())?,
        max_shard_bytes: options::max_shard_bytes(max_shard_size.as_ref())?,
        single_file: out.extension().is_some_and(|e| e == "safetensors"),
        allow_nonfinite,
        // As `pma merge --format`: None picks DCP for a DCP newest member, HF otherwise.
        format: match format.as_deref() {
            None => None,
            Some("hf") => Some(pma_merge::OutputFormat::Hf),
            Some("dcp") => Some(pma_merge::OutputFormat::Dcp),
            Some(other) => {
                return Err(config_error(format!(
                    "format '{other}' is not 'hf' or 'dcp'"
                )))
            }
        },
        // As `pma merge --include/--exclude` (globs; `*` crosses dots).
        keys: pma_merge::KeySelectionConfig {
            include,
            exclude,
            keep_state_newest: false,
        },
    };
    let threads = options::threads(threads)?;

    let outcome = run_interruptible(py, cancel.as_ref(), |cancel| {
        let (series, from_run) = match &source {
            Source::Run(run) => (CheckpointSeries::discover(run)?, true),
            Source::Paths(paths) => (CheckpointSeries::from_paths(paths), false),
        };
        // Never write over, inside or around the run or an input (the CLI's order of checks).
        if let Source::Run(run) = &source {
            check_output_placement(&out, &[run.as_path()])?;
        }
        let (inputs, skipped) = selection.select(&series, from_run)?.into_inputs();
        let weights = spec.weights(inputs.len())?;
        let plan = MergePlan::build(inputs, weights, config)?;
        check_plan_output(&plan, &out)?;
        let executed = if dry_run {
            None
        } else {
            let opts = ExecOptions {
                threads,
                overwrite,
                cancel: Some(cancel),
                direct_io: pma_format::DirectIo::from_env(),
            };
            Some(execute(&plan, &out, &opts, &NoProgress)?)
        };
        let summary = executed
            .as_ref()
            .map_or_else(|| plan.summary(threads), |r| r.plan.clone());
        Ok::<_, pma_merge::Error>(MergeReport::new(
            &summary,
            out.clone(),
            executed.as_ref(),
            &skipped,
        ))
    })?;
    let report = outcome.map_err(to_py_err)?;
    report.warn(py)?;
    Ok(report)
}
