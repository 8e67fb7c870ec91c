//! The shared machinery of every study: train a run, evaluate a checkpoint, make a merge, and
//! record each into the results.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use pma_lab::data::{encode_bytes, split_tokens, DataSource, MOBY_DICK};
use pma_lab::eval::{evaluate_on, EvalConfig, EvalReport};
use pma_lab::schedule::ScheduleKind;
use pma_lab::train::{StepMetrics, TrainConfig};
use pma_merge::{execute, CheckpointSeries, ExecOptions, MergeConfig, MergePlan, Selection};

use super::plan::MergeSpec;
use super::{DemoConfig, Progress};
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::results::{
    CheckpointRecord, CurvePoint, EvalInfo, MergeRecord, Metrics, Results, RunRecord, StageTiming,
    RESULTS_SCHEMA_VERSION,
};

/// A training run to do.
pub(super) struct RunSpec {
    pub(super) id: RunId,
    pub(super) role: String,
    pub(super) train: TrainConfig,
    pub(super) step_offset: u64,
}

/// A finished training run.
pub(super) struct Trained {
    pub(super) id: RunId,
    pub(super) dir: PathBuf,
    /// Its checkpoint interval, which its annealing forks keep.
    pub(super) save_every: u64,
    pub(super) step_offset: u64,
    pub(super) tokens_per_step: u64,
    /// (step, directory), oldest first.
    pub(super) checkpoints: Vec<(u64, PathBuf)>,
    pub(super) diverged_at: Option<u64>,
}

impl Trained {
    pub(super) fn last_step(&self) -> u64 {
        self.checkpoints.last().map_or(0, |c| c.0)
    }

    /// `value()` for a run that completed; NaN for one that diverged, whose last numbers
    /// describe a broken model.
    pub(super) fn unless_diverged(&self, value: impl FnOnce() -> f64) -> f64 {
        match self.diverged_at {
            Some(_) => f64::NAN,
            None => value(),
        }
    }
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
pub(super) struct Lab<'a> {
    pub(super) config: &'a DemoConfig,
    pub(super) progress: &'a dyn Progress,
    pub(super) cancel: Option<&'a AtomicBool>,
    pub(super) eval_tokens: Vec<u32>,
    pub(super) heldout_eval_tokens: Vec<u32>,
    pub(super) pretrain: PathBuf,
    pub(super) heldout: PathBuf,
    pub(super) results: Results,
    pub(super) stage_started: Option<(String, Instant)>,
}

impl<'a> Lab<'a> {
    pub(super) fn new(
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
            decay_emulation: Vec::new(),
            continued: None,
            spike: None,
            seeds: None,
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
        })
    }

    pub(super) fn finish(self) -> Results {
        self.results
    }

    pub(super) fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    pub(super) fn stage(&mut self, label: &str, total: u64) {
        self.progress.stage(label, total);
        self.stage_started = Some((label.to_string(), Instant::now()));
    }

    pub(super) fn end_stage(&mut self) {
        self.progress.finish_stage();
        if let Some((stage, t)) = self.stage_started.take() {
            self.results.timings.push(StageTiming {
                stage,
                elapsed_secs: t.elapsed().as_secs_f64(),
            });
        }
    }

    pub(super) fn run_dir(&self, id: RunId) -> PathBuf {
        self.config.out_dir.join("runs").join(id.to_string())
    }

    pub(super) fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.config.out_dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    pub(super) fn trunk_config(&self) -> TrainConfig {
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
            out_dir: self.run_dir(RunId::Trunk),
            ..TrainConfig::default()
        }
    }

    /// Trains one run. A run that diverges ends early; its outcome is recorded.
    pub(super) fn train(&mut self, spec: RunSpec) -> Result<Trained> {
        self.check_cancel()?;
        let t = &spec.train;
        let label = format!("train {}", spec.id);
        self.stage(&label, t.steps);
        let bridge = TrainBridge {
            progress: self.progress,
        };
        let started = Instant::now();
        let report = pma_lab::train::train(t, &bridge)?;
        let elapsed_secs = started.elapsed().as_secs_f64();
        self.end_stage();
        let diverged_at = report.outcome.diverged_at();
        let checkpoints = pma_lab::checkpoint::list_checkpoints(&t.out_dir)?;
        let n_params = report.n_params;
        let curve: Vec<CurvePoint> = report
            .curve
            .iter()
            .map(|m| CurvePoint {
                step: m.step,
                lr: m.lr,
                loss: m.loss,
                grad_norm: m.grad_norm,
            })
            .collect();
        let tokens_per_step = (t.batch_size * t.seq_len) as u64;
        let steps_done = curve.last().map_or(0, |c| c.step);
        let schedule = describe_schedule(t);
        self.results.runs.push(RunRecord {
            name: spec.id.to_string(),
            role: spec.role,
            model: match report.model.kind {
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
            id: spec.id,
            dir: t.out_dir.clone(),
            save_every: t.save_every,
            step_offset: spec.step_offset,
            tokens_per_step,
            checkpoints,
            diverged_at,
        })
    }

    pub(super) fn evaluate(&self, path: &Path, tokens: &[u32]) -> Result<EvalReport> {
        let cfg = EvalConfig {
            data: DataSource::Embedded,
            seq_len: Some(self.config.profile.seq_len),
            batch_size: 16,
        };
        Ok(evaluate_on(path, tokens, &cfg)?)
    }

    pub(super) fn eval_checkpoint(
        &mut self,
        run: &Trained,
        step: u64,
        path: &Path,
    ) -> Result<CheckpointRecord> {
        self.check_cancel()?;
        let r = self.evaluate(path, &self.eval_tokens)?;
        let global_step = run.step_offset + step;
        let rec = CheckpointRecord {
            run: run.id.to_string(),
            step,
            global_step,
            tokens: global_step * run.tokens_per_step,
            val_loss: r.val_loss,
            metrics: metrics(&r),
            path: self.rel(path),
        };
        self.progress.advance(&format!(
            "{} step {step}: val loss {:.4}",
            run.id, r.val_loss
        ));
        self.results.checkpoints.push(rec.clone());
        Ok(rec)
    }

    /// Makes and evaluates one merge; an identical earlier merge only gains the new tag.
    pub(super) fn merge(&mut self, run: &Trained, spec: &MergeSpec) -> Result<MergeRecord> {
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
            if !existing.has_tag(spec.tag) {
                existing.tags.push(spec.tag.to_string());
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
        // The lab's own runs are complete: nothing is skipped.
        let (inputs, _skipped) = selected.into_inputs();
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
            tags: vec![spec.tag.to_string()],
            run: spec.run.to_string(),
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

    pub(super) fn eval_all(&mut self, run: &Trained) -> Result<()> {
        self.stage(
            &format!("evaluate {}", run.id),
            run.checkpoints.len() as u64,
        );
        for (step, path) in run.checkpoints.clone() {
            self.eval_checkpoint(run, step, &path)?;
        }
        self.end_stage();
        Ok(())
    }

    /// The validation loss of `run`'s newest evaluated checkpoint; NaN when it diverged or has
    /// none.
    pub(super) fn final_val_loss(&self, run: &Trained) -> f64 {
        run.unless_diverged(|| {
            self.results
                .checkpoints
                .iter()
                .rfind(|c| c.run == run.id)
                .map_or(f64::NAN, |c| c.val_loss)
        })
    }
}

pub(super) fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

pub(super) fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

pub(super) fn metrics(r: &EvalReport) -> Metrics {
    Metrics {
        val_loss: r.val_loss,
        ppl: r.ppl,
        bpb: r.bpb,
        accuracy: r.accuracy,
    }
}

pub(super) fn describe_schedule(t: &TrainConfig) -> String {
    let s = t.schedule();
    let mut out = match s.kind {
        ScheduleKind::Constant => format!("constant lr {:e}, warmup {}", s.peak_lr, s.warmup_steps),
        ScheduleKind::Wsd => format!(
            "wsd lr {:e} -> {:e}, warmup {}, decay {} ({})",
            s.peak_lr,
            s.min_lr,
            s.warmup_steps,
            s.decay_steps,
            s.decay_shape.name()
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
