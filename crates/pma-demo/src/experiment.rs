//! Orchestration: train, fork, merge, evaluate, and collect everything into [`Results`].
//!
//! [`run`] executes one [`DemoConfig`] in stages, each reported through [`Progress`]:
//! 1. write the data split (`data/pretrain.txt`, `data/heldout.txt`);
//! 2. train the dense trunk (warmup, then constant LR: the stable phase of WSD);
//! 3. fork annealing branches from stable-phase checkpoints (`init` = the checkpoint, its AdamW
//!    moments loaded, LR decayed from the peak to `min_lr` over D steps);
//! 4. evaluate every raw checkpoint;
//! 5. merge (SMA / EMA / WMA over the last N checkpoints at interval V) with `pma-merge` into
//!    `merges/`, evaluating each merge as it is written;
//! 6. reproduction only: the MoE run, PMA-init for continued training and spike recovery.
//!
//! Every evaluation uses the same token stream: a fixed prefix of the embedded corpus's
//! validation split, which no run trains on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use pma_lab::data::{encode_bytes, split_tokens, DataSource, MOBY_DICK};
use pma_lab::eval::{evaluate_on, EvalConfig, EvalReport};
use pma_lab::schedule::{DecayShape, LrSpike, ScheduleKind};
use pma_lab::train::{StepMetrics, TrainConfig};
use pma_merge::{
    execute, CheckpointSeries, ExecOptions, MergeConfig, MergeInput, MergePlan, Selection, Weights,
};

use crate::error::{Error, Result};
use crate::findings::derive_findings;
use crate::profile::{Profile, Scope};
use crate::results::{
    AnnealedRecord, CheckpointRecord, ContinuedRecord, CurvePoint, EvalInfo, MergeRecord, Metrics,
    PredictionRecord, RecoveryRecord, Results, RunRecord, SpikeRecord, StageTiming,
    RESULTS_SCHEMA_VERSION,
};

/// What to run and where. Plain data.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoConfig {
    /// Demo or full reproduction.
    pub scope: Scope,
    /// Sizes and schedule.
    pub profile: Profile,
    /// Seed of the trunk; every other run's seed is derived from it.
    pub seed: u64,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Replace a previous demo's output in `out_dir`.
    pub overwrite: bool,
    /// Merge worker threads (0 = all cores).
    pub threads: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            scope: Scope::Demo,
            profile: Profile::new(crate::profile::Scale::Quick),
            seed: 0,
            out_dir: PathBuf::from("pma-demo-out"),
            overwrite: false,
            threads: 0,
        }
    }
}

/// Receives progress events. Every method has a no-op default.
pub trait Progress {
    /// A stage begins; it will advance `total` units (steps, checkpoints or merges).
    fn stage(&self, _label: &str, _total: u64) {}
    /// One unit of the current stage is done; `message` says what (e.g. a loss).
    fn advance(&self, _message: &str) {}
    /// The current stage ended.
    fn finish_stage(&self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Files and directories a demo writes into its output directory; `overwrite` removes exactly
/// these and nothing else.
pub const OUTPUT_ENTRIES: &[&str] = &[
    "data",
    "runs",
    "merges",
    "plots",
    "results.json",
    "report.md",
];

/// Runs the experiments of `config`, writes `results.json`, `report.md` and the plots, and
/// returns the results.
pub fn run(
    config: &DemoConfig,
    progress: &dyn Progress,
    cancel: Option<&AtomicBool>,
) -> Result<Results> {
    let started = Instant::now();
    let p = &config.profile;
    p.validate(config.scope)?;
    prepare_out_dir(&config.out_dir, config.overwrite)?;
    let mut lab = Lab::new(config, progress, cancel)?;

    // Trunk.
    let trunk = lab.train(RunSpec {
        name: "trunk".into(),
        role: "dense trunk: warmup, then constant LR (the stable phase of WSD)".into(),
        train: lab.trunk_config(),
        step_offset: 0,
    })?;

    // Annealing forks.
    let mut forks = Vec::new();
    for &from in &p.anneal_from {
        let name = format!("anneal-{from}");
        let train = TrainConfig {
            init: Some(pma_lab::checkpoint::step_dir(&trunk.dir, from)),
            init_optimizer: true,
            steps: p.decay_steps,
            schedule: ScheduleKind::Wsd,
            warmup_steps: Some(0),
            decay_steps: Some(p.decay_steps),
            seed: config.seed.wrapping_add(from),
            out_dir: lab.run_dir(&name),
            ..lab.trunk_config()
        };
        let role = format!(
            "annealing fork from trunk step {from}: LR decays to min over {} steps",
            p.decay_steps
        );
        forks.push((
            from,
            lab.train(RunSpec {
                name,
                role,
                train,
                step_offset: from,
            })?,
        ));
    }

    // Raw checkpoints.
    let mut to_eval: Vec<(&Trained, u64, PathBuf)> = Vec::new();
    for t in std::iter::once(&trunk).chain(forks.iter().map(|(_, t)| t)) {
        for (step, path) in &t.checkpoints {
            to_eval.push((t, *step, path.clone()));
        }
    }
    lab.stage("evaluate checkpoints", to_eval.len() as u64);
    for (t, step, path) in to_eval {
        lab.eval_checkpoint(t, step, &path)?;
    }
    lab.end_stage();

    // Merges of the trunk (grid, sweeps, prediction points) and of the forks.
    let mut specs = trunk_merge_specs(p, config.scope);
    if config.scope == Scope::Reproduce {
        for (_, fork) in &forks {
            specs.extend(branch_merge_specs(p, &fork.name, fork.last_step()));
        }
    }
    lab.stage("merge and evaluate", specs.len() as u64);
    for spec in &specs {
        let run = if spec.run == "trunk" {
            &trunk
        } else {
            &forks
                .iter()
                .find(|(_, f)| f.name == spec.run)
                .expect("branch specs name existing forks")
                .1
        };
        lab.merge(run, spec)?;
    }
    lab.end_stage();

    for (from, fork) in &forks {
        let last = fork.last_step();
        let rec = lab
            .results
            .checkpoint(&fork.name, last)
            .expect("every fork checkpoint was evaluated")
            .clone();
        lab.results.annealed.push(AnnealedRecord {
            run: fork.name.clone(),
            base_run: "trunk".into(),
            from_step: *from,
            step: rec.global_step,
            tokens: rec.tokens,
            decay_steps: p.decay_steps,
            val_loss: rec.val_loss,
        });
    }
    lab.results.predictions = predictions(&lab.results);

    if config.scope == Scope::Reproduce {
        lab.moe()?;
        lab.results.predictions = predictions(&lab.results);
        lab.continued(&trunk)?;
        lab.spike()?;
    }

    let mut results = lab.finish();
    results.findings = derive_findings(&results);
    results.elapsed_secs = started.elapsed().as_secs_f64();
    crate::plot::draw_all(&results, &config.out_dir)?;
    results.write(&config.out_dir)?;
    let report = crate::report::render_report(&results);
    crate::results::write_atomic(&config.out_dir.join("report.md"), report.as_bytes())?;
    Ok(results)
}

fn prepare_out_dir(out: &Path, overwrite: bool) -> Result<()> {
    let occupied: Vec<PathBuf> = OUTPUT_ENTRIES
        .iter()
        .map(|e| out.join(e))
        .filter(|p| p.exists())
        .collect();
    if !occupied.is_empty() {
        if !overwrite {
            return Err(Error::OutDirOccupied {
                path: out.to_path_buf(),
            });
        }
        for p in occupied {
            let removed = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            removed.map_err(|e| Error::io(&p, "removing", e))?;
        }
    }
    std::fs::create_dir_all(out.join("data")).map_err(|e| Error::io(out, "creating", e))
}

/// A training run to do.
struct RunSpec {
    name: String,
    role: String,
    train: TrainConfig,
    step_offset: u64,
}

/// A finished training run.
struct Trained {
    name: String,
    dir: PathBuf,
    step_offset: u64,
    tokens_per_step: u64,
    /// (step, directory), oldest first.
    checkpoints: Vec<(u64, PathBuf)>,
    diverged_at: Option<u64>,
}

impl Trained {
    fn last_step(&self) -> u64 {
        self.checkpoints.last().map_or(0, |c| c.0)
    }
}

/// One merge to make: `n` checkpoints of `run`, `interval` steps apart, the newest at `step`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MergeSpec {
    pub(crate) run: String,
    pub(crate) method: MethodSpec,
    pub(crate) n: usize,
    pub(crate) interval: u64,
    pub(crate) step: u64,
    pub(crate) tag: &'static str,
}

/// An averaging method with its parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum MethodSpec {
    Sma,
    Ema(f64),
    Wma,
}

impl MethodSpec {
    fn weights(self, n: usize) -> Result<Weights> {
        Ok(match self {
            MethodSpec::Sma => Weights::sma(n)?,
            MethodSpec::Ema(a) => Weights::ema(n, a)?,
            MethodSpec::Wma => Weights::wma(n)?,
        })
    }

    fn name(self) -> &'static str {
        match self {
            MethodSpec::Sma => "sma",
            MethodSpec::Ema(_) => "ema",
            MethodSpec::Wma => "wma",
        }
    }

    fn alpha(self) -> Option<f64> {
        match self {
            MethodSpec::Ema(a) => Some(a),
            _ => None,
        }
    }
}

fn grid_methods(p: &Profile) -> Vec<MethodSpec> {
    let mut m = vec![MethodSpec::Sma];
    m.extend(p.ema_alphas.iter().map(|&a| MethodSpec::Ema(a)));
    m.push(MethodSpec::Wma);
    m
}

/// Whether `n` checkpoints `interval` apart, the newest at `step`, all exist in a run that
/// saves every `k` steps from `k` on.
fn fits(n: usize, interval: u64, step: u64, k: u64) -> bool {
    let span = interval * (n as u64 - 1);
    step >= span + k && interval % k == 0
}

/// The trunk merges: the method × N grid at every merge point and at the end of every fork's
/// matched step; in the reproduction also the N and V sweeps at the first and last points.
pub(crate) fn trunk_merge_specs(p: &Profile, scope: Scope) -> Vec<MergeSpec> {
    let k = p.save_every;
    let mut specs = Vec::new();
    let mut points = p.merge_points.clone();
    for &f in &p.anneal_from {
        let e = f + p.decay_steps;
        if e <= p.trunk_steps && e % k == 0 && !points.contains(&e) {
            points.push(e);
        }
    }
    points.sort_unstable();
    for &step in &points {
        let tag = if p.merge_points.contains(&step) {
            "grid"
        } else {
            "prediction"
        };
        for method in grid_methods(p) {
            for &n in &p.ns {
                if fits(n, k, step, k) {
                    specs.push(MergeSpec {
                        run: "trunk".into(),
                        method,
                        n,
                        interval: k,
                        step,
                        tag,
                    });
                }
            }
        }
    }
    if scope == Scope::Reproduce {
        let ends = [
            p.merge_points[0],
            *p.merge_points.last().expect("validated non-empty"),
        ];
        for step in ends {
            for &n in &p.sweep_ns {
                if fits(n, k, step, k) {
                    specs.push(MergeSpec {
                        run: "trunk".into(),
                        method: MethodSpec::Sma,
                        n,
                        interval: k,
                        step,
                        tag: "n_sweep",
                    });
                }
            }
            for &m in &p.sweep_v_multiples {
                let interval = m * k;
                if fits(p.sweep_v_n, interval, step, k) {
                    specs.push(MergeSpec {
                        run: "trunk".into(),
                        method: MethodSpec::Sma,
                        n: p.sweep_v_n,
                        interval,
                        step,
                        tag: "v_sweep",
                    });
                }
            }
        }
    }
    specs
}

/// Merges inside an annealing branch, ending at its last checkpoint.
fn branch_merge_specs(p: &Profile, run: &str, last_step: u64) -> Vec<MergeSpec> {
    let k = p.save_every;
    let mut specs = Vec::new();
    for method in grid_methods(p) {
        for &n in &p.ns {
            if fits(n, k, last_step, k) {
                specs.push(MergeSpec {
                    run: run.into(),
                    method,
                    n,
                    interval: k,
                    step: last_step,
                    tag: "anneal_branch",
                });
            }
        }
    }
    specs
}

/// For every annealed model, the best trunk merge ending at the same step.
fn predictions(results: &Results) -> Vec<PredictionRecord> {
    let mut out = Vec::new();
    for a in &results.annealed {
        let Some(raw) = results.checkpoint(&a.base_run, a.step) else {
            continue;
        };
        let k = if a.base_run == "moe" {
            results.config.moe.save_every
        } else {
            results.config.save_every
        };
        let best = results
            .merges
            .iter()
            .filter(|m| m.run == a.base_run && m.step == a.step && m.interval == k)
            .min_by(|x, y| x.val_loss.total_cmp(&y.val_loss));
        if let Some(m) = best {
            let improvement = raw.val_loss - a.val_loss;
            out.push(PredictionRecord {
                run: a.base_run.clone(),
                step: a.step,
                tokens: a.tokens,
                annealed_loss: a.val_loss,
                raw_loss: raw.val_loss,
                merge_id: m.id.clone(),
                merge_loss: m.val_loss,
                gap: m.val_loss - a.val_loss,
                recovered_fraction: if improvement.abs() > 0.0 {
                    (raw.val_loss - m.val_loss) / improvement
                } else {
                    f64::NAN
                },
            });
        }
    }
    out
}

/// Forwards the lab's training events to the demo's progress. (The lab's trainer has no cancel
/// hook, so a cancelled demo stops at the next stage boundary.)
struct TrainBridge<'a> {
    progress: &'a dyn Progress,
}

impl pma_lab::train::Progress for TrainBridge<'_> {
    fn step(&self, m: &StepMetrics) {
        self.progress.advance(&format!(
            "step {} loss {:.3} gnorm {:.2}",
            m.step, m.loss, m.grad_norm
        ));
    }
}

/// Shared state of one invocation.
struct Lab<'a> {
    config: &'a DemoConfig,
    progress: &'a dyn Progress,
    cancel: Option<&'a AtomicBool>,
    eval_tokens: Vec<u32>,
    heldout_eval_tokens: Vec<u32>,
    pretrain: PathBuf,
    heldout: PathBuf,
    results: Results,
    stage_started: Option<(String, Instant)>,
    n_params: BTreeMap<String, usize>,
}

impl<'a> Lab<'a> {
    fn new(
        config: &'a DemoConfig,
        progress: &'a dyn Progress,
        cancel: Option<&'a AtomicBool>,
    ) -> Result<Lab<'a>> {
        let p = &config.profile;
        // The embedded text: its last 5% is the validation split (never trained on). Of the
        // rest, the last 10% is held out of pre-training for the continued-training experiment.
        let split = split_tokens(&encode_bytes(MOBY_DICK));
        let train_bytes = &MOBY_DICK[..split.train.len()];
        let cut = train_bytes.len() - train_bytes.len() / 10;
        let pretrain = config.out_dir.join("data").join("pretrain.txt");
        let heldout = config.out_dir.join("data").join("heldout.txt");
        crate::results::write_atomic(&pretrain, &train_bytes[..cut])?;
        crate::results::write_atomic(&heldout, &train_bytes[cut..])?;
        let n_eval = p.eval_tokens.min(split.validation.len());
        let eval_tokens = split.validation[..n_eval].to_vec();
        // The continued runs train on the first 95% of heldout.txt; its last 5% scores them.
        let held = split_tokens(&encode_bytes(&train_bytes[cut..])).validation;
        let heldout_eval_tokens = held[..held.len().min(p.eval_tokens)].to_vec();
        let results = Results {
            schema_version: RESULTS_SCHEMA_VERSION,
            pma_version: env!("CARGO_PKG_VERSION").into(),
            scope: config.scope.name().into(),
            profile: p.scale.name().into(),
            seed: config.seed,
            config: p.clone(),
            eval: EvalInfo {
                data: format!(
                    "the first {n_eval} byte-tokens of the embedded Moby-Dick validation split (its last 5%), in windows of {} tokens",
                    p.seq_len
                ),
                n_tokens: n_eval,
                seq_len: p.seq_len,
            },
            runs: Vec::new(),
            checkpoints: Vec::new(),
            merges: Vec::new(),
            annealed: Vec::new(),
            predictions: Vec::new(),
            continued: None,
            spike: None,
            findings: Vec::new(),
            timings: Vec::new(),
            elapsed_secs: 0.0,
        };
        Ok(Lab {
            config,
            progress,
            cancel,
            eval_tokens,
            heldout_eval_tokens,
            pretrain,
            heldout,
            results,
            stage_started: None,
            n_params: BTreeMap::new(),
        })
    }

    fn finish(self) -> Results {
        self.results
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    fn stage(&mut self, label: &str, total: u64) {
        self.progress.stage(label, total);
        self.stage_started = Some((label.to_string(), Instant::now()));
    }

    fn end_stage(&mut self) {
        self.progress.finish_stage();
        if let Some((stage, t)) = self.stage_started.take() {
            self.results.timings.push(StageTiming {
                stage,
                elapsed_secs: t.elapsed().as_secs_f64(),
            });
        }
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.config.out_dir.join("runs").join(name)
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.config.out_dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn trunk_config(&self) -> TrainConfig {
        let p = &self.config.profile;
        TrainConfig {
            model: p.model.clone(),
            steps: p.trunk_steps,
            batch_size: p.batch_size,
            seq_len: p.seq_len,
            lr: p.lr,
            min_lr: Some(p.min_lr),
            schedule: ScheduleKind::Constant,
            warmup_steps: Some(p.warmup_steps),
            save_every: p.save_every,
            seed: self.config.seed,
            data: DataSource::Files(vec![self.pretrain.clone()]),
            out_dir: self.run_dir("trunk"),
            ..TrainConfig::default()
        }
    }

    /// Trains one run. A non-finite loss ends the run early and is recorded, not returned.
    fn train(&mut self, spec: RunSpec) -> Result<Trained> {
        self.check_cancel()?;
        let t = &spec.train;
        let label = format!("train {}", spec.name);
        self.stage(&label, t.steps);
        let bridge = TrainBridge {
            progress: self.progress,
        };
        let started = Instant::now();
        let (diverged_at, n_params) = match pma_lab::train::train(t, &bridge) {
            Ok(report) => (None, report.n_params),
            Err(pma_lab::Error::NonFinite { step, .. }) => (Some(step), 0),
            Err(e) => return Err(e.into()),
        };
        let elapsed_secs = started.elapsed().as_secs_f64();
        self.end_stage();
        let checkpoints = pma_lab::checkpoint::list_checkpoints(&t.out_dir)?;
        let model = match &t.init {
            Some(init) => pma_lab::config::ModelConfig::load(init)?,
            None => t.model.clone(),
        };
        let n_params = if n_params > 0 {
            n_params
        } else {
            model.n_params()
        };
        self.n_params.insert(spec.name.clone(), n_params);
        let curve = read_curve(&t.out_dir.join("metrics.jsonl"))?;
        let tokens_per_step = (t.batch_size * t.seq_len) as u64;
        let steps_done = curve.last().map_or(0, |c| c.step);
        let schedule = describe_schedule(t);
        self.results.runs.push(RunRecord {
            name: spec.name.clone(),
            role: spec.role,
            model: match model.kind {
                pma_lab::config::ModelKind::Dense => "dense".into(),
                pma_lab::config::ModelKind::Moe => "moe".into(),
            },
            n_params,
            seed: t.seed,
            init: t.init.as_deref().map(|p| self.rel(p)),
            step_offset: spec.step_offset,
            steps: t.steps,
            steps_done,
            diverged_at,
            schedule,
            tokens_per_sec: steps_done as f64 * tokens_per_step as f64 / elapsed_secs.max(1e-9),
            elapsed_secs,
            curve,
        });
        Ok(Trained {
            name: spec.name,
            dir: t.out_dir.clone(),
            step_offset: spec.step_offset,
            tokens_per_step,
            checkpoints,
            diverged_at,
        })
    }

    fn evaluate(&self, path: &Path, tokens: &[u32]) -> Result<EvalReport> {
        let cfg = EvalConfig {
            data: DataSource::Embedded,
            seq_len: Some(self.config.profile.seq_len),
            batch_size: 16,
        };
        Ok(evaluate_on(path, tokens, &cfg)?)
    }

    fn eval_checkpoint(
        &mut self,
        run: &Trained,
        step: u64,
        path: &Path,
    ) -> Result<CheckpointRecord> {
        self.check_cancel()?;
        let r = self.evaluate(path, &self.eval_tokens)?;
        let global_step = run.step_offset + step;
        let rec = CheckpointRecord {
            run: run.name.clone(),
            step,
            global_step,
            tokens: global_step * run.tokens_per_step,
            val_loss: r.val_loss,
            metrics: metrics(&r),
            path: self.rel(path),
        };
        self.progress.advance(&format!(
            "{} step {step}: val loss {:.4}",
            run.name, r.val_loss
        ));
        self.results.checkpoints.push(rec.clone());
        Ok(rec)
    }

    /// Makes and evaluates one merge; an identical earlier merge only gains the new tag.
    fn merge(&mut self, run: &Trained, spec: &MergeSpec) -> Result<MergeRecord> {
        self.check_cancel()?;
        let id = format!(
            "{}-{}-n{}-v{}-s{:07}",
            spec.run,
            match spec.method.alpha() {
                Some(a) => format!("ema{a}"),
                None => spec.method.name().into(),
            },
            spec.n,
            spec.interval,
            spec.step
        );
        if let Some(existing) = self.results.merges.iter_mut().find(|m| m.id == id) {
            if !existing.tags.iter().any(|t| t == spec.tag) {
                existing.tags.push(spec.tag.into());
            }
            self.progress.advance(&format!("{id} (already merged)"));
            return Ok(existing.clone());
        }
        let series = CheckpointSeries::discover(&run.dir)?;
        let selected = Selection {
            last: Some(spec.n),
            every: Some(spec.interval),
            at: Some(spec.step),
            min: None,
        }
        .select(&series, true)?;
        let members: Vec<u64> = selected
            .checkpoints
            .iter()
            .map(|(s, _)| s.expect("lab checkpoints are named step-XXXXXXX"))
            .collect();
        let inputs: Vec<MergeInput> = selected
            .checkpoints
            .into_iter()
            .map(|(step, checkpoint)| MergeInput { step, checkpoint })
            .collect();
        let weights = spec.method.weights(inputs.len())?;
        let weight_values = weights.values.clone();
        let plan = MergePlan::build(inputs, weights, MergeConfig::default())?;
        let out = self.config.out_dir.join("merges").join(&id);
        std::fs::create_dir_all(out.parent().expect("merges/<id> has a parent"))
            .map_err(|e| Error::io(&out, "creating", e))?;
        let opts = ExecOptions {
            threads: self.config.threads,
            overwrite: true,
            cancel: self.cancel,
            direct_io: Default::default(),
        };
        execute(&plan, &out, &opts, &pma_merge::NoProgress)?;
        let r = self.evaluate(&out, &self.eval_tokens)?;
        let global_step = run.step_offset + spec.step;
        let rec = MergeRecord {
            id: id.clone(),
            tags: vec![spec.tag.into()],
            run: spec.run.clone(),
            method: spec.method.name().into(),
            alpha: spec.method.alpha(),
            n: members.len(),
            interval: spec.interval,
            step: spec.step,
            global_step,
            tokens: global_step * run.tokens_per_step,
            members,
            weights: weight_values,
            val_loss: r.val_loss,
            metrics: metrics(&r),
            path: self.rel(&out),
        };
        self.progress
            .advance(&format!("{id}: val loss {:.4}", r.val_loss));
        self.results.merges.push(rec.clone());
        Ok(rec)
    }

    fn eval_all(&mut self, run: &Trained) -> Result<()> {
        self.stage(
            &format!("evaluate {}", run.name),
            run.checkpoints.len() as u64,
        );
        for (step, path) in run.checkpoints.clone() {
            self.eval_checkpoint(run, step, &path)?;
        }
        self.end_stage();
        Ok(())
    }

    /// One MoE model through the pipeline: constant-LR run, every checkpoint, SMA/EMA/WMA merges.
    fn moe(&mut self) -> Result<()> {
        let p = &self.config.profile;
        let m = &p.moe;
        let train = TrainConfig {
            model: m.model.clone(),
            steps: m.steps,
            save_every: m.save_every,
            seed: self.config.seed.wrapping_add(1),
            out_dir: self.run_dir("moe"),
            warmup_steps: Some(p.warmup_steps.min(m.steps / 4)),
            ..self.trunk_config()
        };
        let run = self.train(RunSpec {
            name: "moe".into(),
            role: "MoE (Mixtral layout): warmup, then constant LR".into(),
            train,
            step_offset: 0,
        })?;
        self.eval_all(&run)?;
        let last = run.last_step();
        let specs: Vec<MergeSpec> = grid_methods(p)
            .into_iter()
            .filter(|_| fits(m.n, m.save_every, last, m.save_every))
            .map(|method| MergeSpec {
                run: "moe".into(),
                method,
                n: m.n,
                interval: m.save_every,
                step: last,
                tag: "moe",
            })
            .collect();
        self.stage("merge moe", specs.len() as u64);
        for spec in &specs {
            self.merge(&run, spec)?;
        }
        self.end_stage();

        // Its annealing fork, ending at the same step as the merges.
        let name = format!("moe-anneal-{}", m.anneal_from);
        let train = TrainConfig {
            init: Some(pma_lab::checkpoint::step_dir(&run.dir, m.anneal_from)),
            init_optimizer: true,
            steps: m.decay_steps,
            schedule: ScheduleKind::Wsd,
            warmup_steps: Some(0),
            decay_steps: Some(m.decay_steps),
            seed: self.config.seed.wrapping_add(1).wrapping_add(m.anneal_from),
            out_dir: self.run_dir(&name),
            save_every: m.save_every,
            ..self.trunk_config()
        };
        let role = format!(
            "MoE annealing fork from step {}: LR decays to min over {} steps",
            m.anneal_from, m.decay_steps
        );
        let fork = self.train(RunSpec {
            name: name.clone(),
            role,
            train,
            step_offset: m.anneal_from,
        })?;
        self.eval_all(&fork)?;
        if let Some(rec) = self.results.checkpoint(&name, fork.last_step()).cloned() {
            self.results.annealed.push(AnnealedRecord {
                run: name,
                base_run: "moe".into(),
                from_step: m.anneal_from,
                step: rec.global_step,
                tokens: rec.tokens,
                decay_steps: m.decay_steps,
                val_loss: rec.val_loss,
            });
        }
        Ok(())
    }

    /// PMA-init for continued training on the held-out text: from the newest raw trunk
    /// checkpoint and from the SMA merge of the last N, same data order, fresh optimizers.
    fn continued(&mut self, trunk: &Trained) -> Result<()> {
        let p = self.config.profile.clone();
        let c = &p.continued;
        let from = trunk.last_step();
        let merge = self.merge(
            trunk,
            &MergeSpec {
                run: "trunk".into(),
                method: MethodSpec::Sma,
                n: c.n,
                interval: p.save_every,
                step: from,
                tag: "continued_init",
            },
        )?;
        let raw_init = pma_lab::checkpoint::step_dir(&trunk.dir, from);
        let merge_init = self.config.out_dir.join(&merge.path);
        let mut finals = Vec::new();
        let mut initials = Vec::new();
        let mut names = Vec::new();
        for (name, init) in [("ct-raw", raw_init), ("ct-pma", merge_init)] {
            let train = TrainConfig {
                init: Some(init.clone()),
                steps: c.steps,
                lr: c.lr,
                warmup_steps: Some(c.warmup_steps),
                schedule: ScheduleKind::Constant,
                save_every: 0,
                // The same seed for both: identical batches, so only the init differs.
                seed: self.config.seed.wrapping_add(2),
                data: DataSource::Files(vec![self.heldout.clone()]),
                out_dir: self.run_dir(name),
                ..self.trunk_config()
            };
            let role = format!(
                "continued training on held-out text from {}",
                self.rel(&init)
            );
            let run = self.train(RunSpec {
                name: name.into(),
                role,
                train,
                step_offset: 0,
            })?;
            initials.push(self.evaluate(&init, &self.heldout_eval_tokens)?.val_loss);
            let last = run.checkpoints.last().map(|c| c.1.clone());
            finals.push(match last {
                Some(path) => self.evaluate(&path, &self.heldout_eval_tokens)?.val_loss,
                None => f64::NAN,
            });
            self.eval_all(&run)?;
            names.push(name.to_string());
        }
        let curve_stats = |name: &str| {
            let curve = &self
                .results
                .run(name)
                .expect("continued runs were recorded")
                .curve;
            let q = (curve.len() / 4).max(1);
            let early = mean(curve.iter().take(q).map(|c| c.loss));
            let g: Vec<f64> = curve.iter().map(|c| c.grad_norm).collect();
            let max_g = g.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let m = mean(g.iter().copied());
            let std = (mean(g.iter().map(|x| (x - m) * (x - m)))).sqrt();
            (early, max_g, std)
        };
        let (er, mr, sr) = curve_stats("ct-raw");
        let (ep, mp, sp) = curve_stats("ct-pma");
        self.results.continued = Some(ContinuedRecord {
            data: format!(
                "data/heldout.txt: the last 10% of the corpus's training part ({} bytes), never seen by the trunk; scored on its last 5% ({} tokens)",
                std::fs::metadata(&self.heldout).map(|m| m.len()).unwrap_or(0),
                self.heldout_eval_tokens.len()
            ),
            from_step: from,
            merge_id: merge.id,
            raw_run: names[0].clone(),
            merge_run: names[1].clone(),
            initial_heldout_loss: (initials[0], initials[1]),
            final_heldout_loss: (finals[0], finals[1]),
            early_train_loss: (er, ep),
            max_grad_norm: (mr, mp),
            grad_norm_std: (sr, sp),
        });
        Ok(())
    }

    /// Loss-spike recovery: a run with a deliberate LR spike, then two resumptions under the
    /// same remaining spike, one from the newest pre-spike checkpoint and one from the SMA merge
    /// of the `n` checkpoints before the spike.
    fn spike(&mut self) -> Result<()> {
        let p = self.config.profile.clone();
        let s = &p.spike;
        let spike = LrSpike {
            step: s.spike_step,
            factor: s.factor,
            len_steps: s.len_steps,
        };
        let train = TrainConfig {
            steps: s.steps,
            save_every: s.save_every,
            lr_spike: Some(spike),
            seed: self.config.seed.wrapping_add(3),
            out_dir: self.run_dir("spike"),
            ..self.trunk_config()
        };
        let role = format!(
            "dense run with an LR spike: x{} for {} steps from step {}",
            s.factor, s.len_steps, s.spike_step
        );
        let run = self.train(RunSpec {
            name: "spike".into(),
            role,
            train,
            step_offset: 0,
        })?;
        self.eval_all(&run)?;
        let pre_spike_step = (s.spike_step / s.save_every) * s.save_every;
        let merge = self.merge(
            &run,
            &MergeSpec {
                run: "spike".into(),
                method: MethodSpec::Sma,
                n: s.n,
                interval: s.save_every,
                step: pre_spike_step,
                tag: "spike_init",
            },
        )?;
        let pre = self
            .results
            .checkpoint("spike", pre_spike_step)
            .expect("the pre-spike checkpoint was evaluated")
            .clone();
        let curve = self.results.run("spike").expect("recorded").curve.clone();
        let before: Vec<f64> = curve
            .iter()
            .filter(|c| c.step + 5 > s.spike_step && c.step <= s.spike_step)
            .map(|c| c.loss)
            .collect();
        let after = curve.iter().filter(|c| c.step > s.spike_step);
        let max_after = after
            .clone()
            .map(|c| c.loss)
            .fold(f64::NEG_INFINITY, nan_max);
        let max_after = if run.diverged_at.is_some() {
            f64::NAN
        } else {
            max_after
        };
        let final_val = if run.diverged_at.is_some() {
            f64::NAN
        } else {
            self.results
                .checkpoints
                .iter()
                .rfind(|c| c.run == "spike")
                .map_or(f64::NAN, |c| c.val_loss)
        };
        // The resumed runs face what is left of the spike, at the same offset from the start.
        let resume_spike = LrSpike {
            step: s.spike_step - pre_spike_step,
            ..spike
        };
        let mut outcomes = Vec::new();
        for (name, init, init_loss) in [
            (
                "resume-raw",
                self.config.out_dir.join(&pre.path),
                pre.val_loss,
            ),
            (
                "resume-pma",
                self.config.out_dir.join(&merge.path),
                merge.val_loss,
            ),
        ] {
            let train = TrainConfig {
                init: Some(init.clone()),
                steps: s.resume_steps,
                save_every: s.save_every,
                lr_spike: Some(resume_spike),
                warmup_steps: Some(p.continued.warmup_steps),
                seed: self.config.seed.wrapping_add(4),
                out_dir: self.run_dir(name),
                ..self.trunk_config()
            };
            let role = format!("resume after the spike from {}", self.rel(&init));
            let r = self.train(RunSpec {
                name: name.into(),
                role,
                train,
                step_offset: pre_spike_step,
            })?;
            self.eval_all(&r)?;
            let curve = &self.results.run(name).expect("recorded").curve;
            let max_train = if r.diverged_at.is_some() {
                f64::NAN
            } else {
                curve
                    .iter()
                    .map(|c| c.loss)
                    .fold(f64::NEG_INFINITY, nan_max)
            };
            let final_val = if r.diverged_at.is_some() {
                f64::NAN
            } else {
                self.results
                    .checkpoints
                    .iter()
                    .rfind(|c| c.run == name)
                    .map_or(f64::NAN, |c| c.val_loss)
            };
            outcomes.push(RecoveryRecord {
                run: name.into(),
                init: self.rel(&init),
                init_val_loss: init_loss,
                final_val_loss: final_val,
                max_train_loss: max_train,
                recovered: final_val.is_finite() && final_val <= pre.val_loss * 1.05,
            });
        }
        let from_merge = outcomes.pop().expect("two resumptions");
        let from_raw = outcomes.pop().expect("two resumptions");
        self.results.spike = Some(SpikeRecord {
            run: "spike".into(),
            spike_step: s.spike_step,
            factor: s.factor,
            len_steps: s.len_steps,
            pre_spike_train_loss: mean(before.into_iter()),
            max_train_loss: max_after,
            final_val_loss: final_val,
            pre_spike_step,
            pre_spike_val_loss: pre.val_loss,
            merge_id: merge.id,
            from_raw,
            from_merge,
        });
        Ok(())
    }
}

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

fn metrics(r: &EvalReport) -> Metrics {
    Metrics {
        val_loss: r.val_loss,
        ppl: r.ppl,
        bpb: r.bpb,
        accuracy: r.accuracy,
    }
}

fn describe_schedule(t: &TrainConfig) -> String {
    let s = t.schedule();
    let mut out = match s.kind {
        ScheduleKind::Constant => format!("constant lr {:e}, warmup {}", s.peak_lr, s.warmup_steps),
        ScheduleKind::Wsd => format!(
            "wsd lr {:e} -> {:e}, warmup {}, decay {} ({})",
            s.peak_lr,
            s.min_lr,
            s.warmup_steps,
            s.decay_steps,
            match s.decay_shape {
                DecayShape::Linear => "linear",
                DecayShape::Cosine => "cosine",
                DecayShape::OneSqrt => "1-sqrt",
            }
        ),
        ScheduleKind::Cosine => format!(
            "cosine lr {:e} -> {:e}, warmup {}",
            s.peak_lr, s.min_lr, s.warmup_steps
        ),
    };
    if let Some(sp) = s.spike {
        out.push_str(&format!(
            ", lr x{} for {} steps from step {}",
            sp.factor, sp.len_steps, sp.step
        ));
    }
    out
}

/// Reads a run's `metrics.jsonl` into a curve.
fn read_curve(path: &Path) -> Result<Vec<CurvePoint>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, "reading", e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let m: StepMetrics = serde_json::from_str(line).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(CurvePoint {
                step: m.step,
                lr: m.lr,
                loss: m.loss,
                grad_norm: m.grad_norm,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Scale;

    #[test]
    fn grid_specs_only_use_existing_checkpoints() {
        let p = Profile::new(Scale::Quick);
        for spec in trunk_merge_specs(&p, Scope::Reproduce) {
            let oldest = spec.step as i64 - spec.interval as i64 * (spec.n as i64 - 1);
            assert!(oldest >= p.save_every as i64, "{spec:?}");
            assert_eq!(spec.step % p.save_every, 0);
            assert!(spec.step <= p.trunk_steps);
        }
    }

    #[test]
    fn quick_grid_has_every_method_and_n_at_the_late_point() {
        let p = Profile::new(Scale::Quick);
        let specs = trunk_merge_specs(&p, Scope::Demo);
        let late: Vec<_> = specs.iter().filter(|s| s.step == 400).collect();
        assert_eq!(late.len(), 3 * p.ns.len());
    }

    #[test]
    fn fits_counts_the_oldest_member() {
        // N=10 at step 200 with K=V=20 needs steps 20..=200.
        assert!(fits(10, 20, 200, 20));
        assert!(!fits(11, 20, 200, 20));
        assert!(!fits(3, 30, 200, 20));
    }
}
