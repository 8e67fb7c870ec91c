//! `results.json`: every run, checkpoint, merge, annealed model and finding of one invocation.
//!
//! [`Results`] is the single source of the report: `report.md`, the plots and the terminal
//! table are rendered from it and from nothing else, so a reader can re-check any claim against
//! the JSON. Losses are mean next-token cross-entropy in nats per byte-token on the fixed
//! validation prefix described by [`EvalInfo`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{RunId, Tag};
use crate::profile::Profile;

/// Version of the `results.json` layout.
pub const RESULTS_SCHEMA_VERSION: u32 = 3;

/// The whole record of one `pma demo` / `pma reproduce` invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// [`RESULTS_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `pma-demo` version that wrote it.
    pub pma_version: String,
    /// `demo` or `reproduce`.
    pub scope: String,
    /// `tiny`, `quick` or `full`.
    pub profile: String,
    /// Seeds used (the trunk's; every other run's seed is derived from it and listed in `runs`).
    pub seed: u64,
    /// Every number of the experiment design.
    pub config: Profile,
    /// What "validation loss" means here.
    pub eval: EvalInfo,
    /// Every training run.
    pub runs: Vec<RunRecord>,
    /// Every raw checkpoint evaluated.
    pub checkpoints: Vec<CheckpointRecord>,
    /// Every merge evaluated.
    pub merges: Vec<MergeRecord>,
    /// The last checkpoint of every annealing fork.
    pub annealed: Vec<AnnealedRecord>,
    /// Merged-at-constant-LR vs annealed at matched token counts.
    pub predictions: Vec<PredictionRecord>,
    /// Decay-emulating merges against the forks they emulate (reproduction only).
    #[serde(default)]
    pub decay_emulation: Vec<DecayEmulationRecord>,
    /// PMA-init for continued training (reproduction only).
    pub continued: Option<ContinuedRecord>,
    /// Loss-spike recovery (reproduction only).
    pub spike: Option<SpikeRecord>,
    /// The trunk-level study repeated over several seeds (reproduction with `seeds` > 1).
    #[serde(default)]
    pub seeds: Option<SeedStudy>,
    /// Which of the paper's findings held here.
    pub findings: Vec<Finding>,
    /// Wall time of each stage, in order.
    pub timings: Vec<StageTiming>,
    /// Wall time of the whole invocation.
    pub elapsed_secs: f64,
}

/// The evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalInfo {
    /// Plain-words description of the data.
    pub data: String,
    /// Tokens in the evaluation stream.
    pub n_tokens: usize,
    /// Window length.
    pub seq_len: usize,
}

/// One point of a training curve (from the lab's training report, as in `metrics.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Step within the run.
    pub step: u64,
    /// LR of the update.
    pub lr: f64,
    /// Training loss of the batch (may be non-finite in a diverged run).
    #[serde(with = "finite_or_null")]
    pub loss: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "finite_or_null")]
    pub grad_norm: f64,
}

/// One training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Name (`trunk`, `anneal-300`, `moe`, `ct-raw`, ...); also its directory under `runs/`.
    pub name: String,
    /// What the run is for.
    pub role: String,
    /// `dense` or `moe`.
    pub model: String,
    /// Scalar parameters.
    pub n_params: usize,
    /// Seed of its sampler (and init, for fresh runs).
    pub seed: u64,
    /// Checkpoint it started from (PMA-init / fork), relative to the output directory.
    pub init: Option<String>,
    /// Trunk step its step 0 corresponds to (forks), so `global = offset + local`.
    pub step_offset: u64,
    /// Steps it was configured for.
    pub steps: u64,
    /// Steps it actually took (fewer when it diverged).
    pub steps_done: u64,
    /// `Some(step)` when training stopped on a non-finite loss at that step.
    pub diverged_at: Option<u64>,
    /// Schedule in words (e.g. `constant lr 3e-3, warmup 30`).
    pub schedule: String,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
    /// Wall time.
    pub elapsed_secs: f64,
    /// Training curve, every step.
    pub curve: Vec<CurvePoint>,
}

/// Evaluation figures shared by checkpoints and merges.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean next-token cross-entropy (nats/token).
    pub val_loss: f64,
    /// `exp(val_loss)`.
    pub ppl: f64,
    /// Bits per byte.
    pub bpb: f64,
    /// Next-token accuracy.
    pub accuracy: f64,
}

/// One raw checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Run name.
    pub run: String,
    /// Step within the run.
    pub step: u64,
    /// Trunk-equivalent step (`step_offset + step`).
    pub global_step: u64,
    /// Training tokens seen, counting the trunk before a fork.
    pub tokens: u64,
    /// Mean validation cross-entropy.
    pub val_loss: f64,
    /// Other figures.
    pub metrics: Metrics,
    /// Directory, relative to the output directory.
    pub path: String,
}

/// One merged model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// Unique name; also its directory under `merges/`.
    pub id: String,
    /// Experiments it belongs to (`grid`, `n_sweep`, `v_sweep`, `anneal_branch`, `moe`, ...).
    pub tags: Vec<String>,
    /// Run whose checkpoints were merged.
    pub run: String,
    /// `sma`, `ema` or `wma`.
    pub method: String,
    /// EMA smoothing, for `ema`.
    pub alpha: Option<f64>,
    /// Checkpoints merged.
    pub n: usize,
    /// Steps between merged checkpoints (V).
    pub interval: u64,
    /// Step of the newest member, within the run.
    pub step: u64,
    /// Trunk-equivalent step of the newest member.
    pub global_step: u64,
    /// Training tokens of the newest member.
    pub tokens: u64,
    /// Steps of the members, oldest first, within the run.
    pub members: Vec<u64>,
    /// Weights, oldest first.
    pub weights: Vec<f64>,
    /// Mean validation cross-entropy.
    pub val_loss: f64,
    /// Other figures.
    pub metrics: Metrics,
    /// Directory, relative to the output directory.
    pub path: String,
}

impl MergeRecord {
    /// `sma`, `wma` or `ema0.2`.
    pub fn label(&self) -> String {
        match self.alpha {
            Some(a) => format!("{}{a}", self.method),
            None => self.method.clone(),
        }
    }

    /// Whether it belongs to the experiment `tag`.
    pub fn has_tag(&self, tag: Tag) -> bool {
        self.tags.iter().any(|t| *t == tag)
    }
}

/// The end of one annealing fork.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnealedRecord {
    /// Fork run name.
    pub run: String,
    /// Run it forked from (`trunk` or `moe`).
    pub base_run: String,
    /// Trunk step it forked from.
    pub from_step: u64,
    /// Trunk-equivalent step of its last checkpoint (`from_step + D`).
    pub step: u64,
    /// Training tokens at that checkpoint.
    pub tokens: u64,
    /// Decay length D.
    pub decay_steps: u64,
    /// Mean validation cross-entropy.
    pub val_loss: f64,
}

/// One decay shape of the decay-emulation study: the trunk fork that decays with it, against
/// the SMA and decay-weighted merges of the trunk's checkpoints over the fork's window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecayEmulationRecord {
    /// `linear`, `cosine` or `1-sqrt`.
    pub shape: String,
    /// The fork that decays with it.
    pub fork_run: String,
    /// Trunk step the fork starts from (the window's oldest checkpoint).
    pub from_step: u64,
    /// Trunk step it ends at (the window's newest checkpoint).
    pub step: u64,
    /// The fork's final validation loss.
    pub annealed_loss: f64,
    /// The raw trunk checkpoint at `step`.
    pub raw_loss: f64,
    /// The window's SMA merge.
    pub sma_loss: f64,
    /// The window's merge weighted by this shape.
    pub decay_merge_id: String,
    /// Its loss.
    pub decay_loss: f64,
    /// Its weights are SMA's (to 1e-12). Linear decay's are, exactly: the LR a linear decay
    /// takes off per step is constant, so every checkpoint of the window weighs the same.
    pub same_as_sma: bool,
}

impl DecayEmulationRecord {
    /// `|sma - annealed|`: how far SMA is from the annealed model.
    pub fn sma_gap(&self) -> f64 {
        (self.sma_loss - self.annealed_loss).abs()
    }

    /// `|decay merge - annealed|`.
    pub fn decay_gap(&self) -> f64 {
        (self.decay_loss - self.annealed_loss).abs()
    }
}

/// A merged-at-constant-LR model against the annealed model with the same token count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRecord {
    /// Constant-LR run (`trunk` or `moe`).
    pub run: String,
    /// Step of both, counted in that run.
    pub step: u64,
    /// Training tokens of both.
    pub tokens: u64,
    /// The annealed model's loss.
    pub annealed_loss: f64,
    /// The raw constant-LR checkpoint's loss at that step.
    pub raw_loss: f64,
    /// The merge compared (the best merge of that run ending at that step, V = K).
    pub merge_id: String,
    /// Its loss.
    pub merge_loss: f64,
    /// `merge_loss - annealed_loss` (positive: annealing is better).
    pub gap: f64,
    /// Fraction of the raw→annealed improvement the merge recovers:
    /// `(raw - merge) / (raw - annealed)`.
    pub recovered_fraction: f64,
}

/// PMA-init for continued training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinuedRecord {
    /// Description of the held-out text.
    pub data: String,
    /// The continued runs' LR schedule, in words.
    pub schedule: String,
    /// Trunk step both inits come from.
    pub from_step: u64,
    /// The merge used as PMA-init.
    pub merge_id: String,
    /// Loss of each init on the held-out text before continued training: (raw, merge).
    pub initial_heldout_loss: (f64, f64),
    /// One pair of runs (raw and PMA-init, the same batches) per data order.
    pub orders: Vec<ContinuedOrder>,
}

/// Continued training from both inits with one data order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinuedOrder {
    /// Which data order (0-based).
    pub order: u64,
    /// Run started from the newest raw checkpoint.
    pub raw_run: String,
    /// Run started from the merge.
    pub merge_run: String,
    /// Held-out loss at each saved step, from the init (step 0) to the end: (step, raw, merge).
    /// A step a diverged run never reached is NaN (`null` in the file).
    #[serde(with = "finite_triples")]
    pub heldout_curve: Vec<(u64, f64, f64)>,
    /// Standard deviation of the gradient norm over the first quarter of the steps:
    /// (raw, merge).
    pub early_grad_norm_std: (f64, f64),
    /// Largest gradient norm over the run: (raw, merge).
    pub max_grad_norm: (f64, f64),
}

impl ContinuedOrder {
    /// Held-out loss at the end: (raw, merge).
    pub fn final_heldout_loss(&self) -> (f64, f64) {
        self.heldout_curve
            .last()
            .map_or((f64::NAN, f64::NAN), |&(_, r, m)| (r, m))
    }
}

/// One run of the spike study's LR sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    /// The run.
    pub run: String,
    /// Its constant LR.
    pub lr: f64,
    /// That LR over the trunk's.
    pub lr_multiple: f64,
    /// First step the spike rule flagged, if any.
    pub spike_step: Option<u64>,
    /// `Some(step)` when it stopped on a non-finite loss.
    pub diverged_at: Option<u64>,
    /// Largest training loss after warmup (non-finite when it diverged).
    #[serde(with = "finite_or_null")]
    pub max_train_loss: f64,
}

/// One resumption at the spiking LR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeRecord {
    /// The run.
    pub run: String,
    /// Started from the PMA merge (else from the newest pre-spike checkpoint).
    pub from_merge: bool,
    /// Its data order.
    pub order: u64,
    /// First step the spike rule flagged, if any.
    pub spike_step: Option<u64>,
    /// Largest training loss (non-finite when it diverged).
    #[serde(with = "finite_or_null")]
    pub max_train_loss: f64,
    /// Validation loss at its end (non-finite when it diverged).
    #[serde(with = "finite_or_null")]
    pub final_val_loss: f64,
}

/// The rescue from the spiking run of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpikeRescueRecord {
    /// The spiking sweep run.
    pub run: String,
    /// Its LR, at which every resumption trains.
    pub lr: f64,
    /// The step its spike was flagged at.
    pub spike_step: u64,
    /// The newest checkpoint before the spike.
    pub pre_spike_step: u64,
    /// Mean training loss of the steps up to that checkpoint.
    pub pre_spike_train_loss: f64,
    /// That checkpoint's validation loss.
    pub pre_spike_val_loss: f64,
    /// The SMA merge of the checkpoints ending there.
    pub merge_id: String,
    /// Its validation loss.
    pub merge_val_loss: f64,
    /// Every resumption, raw and PMA per data order.
    pub resumes: Vec<ResumeRecord>,
}

impl SpikeRescueRecord {
    /// Resumptions from the merge (`true`) or the raw checkpoint that spiked again, and how
    /// many there were.
    pub fn respikes(&self, from_merge: bool) -> (usize, usize) {
        let of: Vec<&ResumeRecord> = self
            .resumes
            .iter()
            .filter(|r| r.from_merge == from_merge)
            .collect();
        (
            of.iter().filter(|r| r.spike_step.is_some()).count(),
            of.len(),
        )
    }

    /// Mean final validation loss of the resumptions from the merge (`true`) or the raw
    /// checkpoint; a diverged one counts as infinite.
    pub fn mean_final_loss(&self, from_merge: bool) -> f64 {
        let losses: Vec<f64> = self
            .resumes
            .iter()
            .filter(|r| r.from_merge == from_merge)
            .map(|r| {
                if r.final_val_loss.is_finite() {
                    r.final_val_loss
                } else {
                    f64::INFINITY
                }
            })
            .collect();
        losses.iter().sum::<f64>() / losses.len() as f64
    }
}

/// Loss-spike rescue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpikeRecord {
    /// The spike rule, in words.
    pub rule: String,
    /// The LR sweep, lowest LR first, up to the first run that spiked in time.
    pub sweep: Vec<SweepRecord>,
    /// The rescue, when a sweep run spiked with enough checkpoints before the spike.
    pub rescue: Option<SpikeRescueRecord>,
}

/// One claim of the paper, checked here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Short id (`merge_beats_newest`, ...).
    pub id: String,
    /// The claim in the paper's words.
    pub claim: String,
    /// Whether it held in this run (over every seed, when [`Results::seeds`] lists it).
    pub held: bool,
    /// The numbers behind the verdict, quoted from this file.
    pub evidence: String,
    /// How far the claim held, in validation-loss units (nats per byte): positive when it held
    /// in this seed. `None` for a claim not measured in loss.
    #[serde(default)]
    pub effect: Option<f64>,
}

/// The trunk-level study (trunk, annealing forks, merges and their findings) repeated with
/// several seeds, each changing the init and the data order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedStudy {
    /// The rule that turns per-seed effects into a verdict, in words.
    pub rule: String,
    /// Every seed, the invocation's own first.
    pub seeds: Vec<SeedRun>,
    /// Each trunk-level finding over the seeds.
    pub findings: Vec<SeedFinding>,
}

/// The trunk-level records of one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedRun {
    /// The trunk's seed.
    pub seed: u64,
    /// Its output directory, relative to the invocation's (`.` for the first seed).
    pub dir: String,
    /// Its training runs, with their curves.
    pub runs: Vec<RunRecord>,
    /// Its raw checkpoints.
    pub checkpoints: Vec<CheckpointRecord>,
    /// Its merges.
    pub merges: Vec<MergeRecord>,
    /// Its annealing forks' last checkpoints.
    pub annealed: Vec<AnnealedRecord>,
    /// Its annealing predictions.
    pub predictions: Vec<PredictionRecord>,
    /// Its trunk-level findings.
    pub findings: Vec<Finding>,
}

impl SeedRun {
    /// The trunk-level records of `r` (its trunk and the trunk's forks), found in `dir`, and
    /// the trunk-level findings derived from those records alone, so that every seed's effect
    /// comes from the same data (the first seed's results also hold the MoE run's).
    pub fn of(r: &Results, dir: &str) -> SeedRun {
        let trunk_level = |run: &str| {
            run.parse::<RunId>()
                .is_ok_and(|id| id == RunId::Trunk || id.base() == Some(RunId::Trunk))
        };
        let mut only = Results {
            runs: keep(&r.runs, |x| trunk_level(&x.name)),
            checkpoints: keep(&r.checkpoints, |c| trunk_level(&c.run)),
            merges: keep(&r.merges, |m| trunk_level(&m.run)),
            annealed: keep(&r.annealed, |a| trunk_level(&a.run)),
            predictions: keep(&r.predictions, |p| trunk_level(&p.run)),
            continued: None,
            spike: None,
            seeds: None,
            findings: Vec::new(),
            timings: Vec::new(),
            ..r.clone()
        };
        only.findings = crate::findings::derive_findings(&only)
            .into_iter()
            .filter(|f| crate::findings::TRUNK_FINDINGS.contains(&f.id.as_str()))
            .collect();
        SeedRun {
            seed: r.seed,
            dir: dir.into(),
            runs: only.runs,
            checkpoints: only.checkpoints,
            merges: only.merges,
            annealed: only.annealed,
            predictions: only.predictions,
            findings: only.findings,
        }
    }
}

fn keep<T: Clone>(all: &[T], pred: impl Fn(&T) -> bool) -> Vec<T> {
    all.iter().filter(|x| pred(x)).cloned().collect()
}

/// One finding's effect across seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedFinding {
    /// The finding's id.
    pub id: String,
    /// Its effect in each seed, in [`SeedStudy::seeds`] order (NaN where a seed lacks it).
    #[serde(with = "finite_vec")]
    pub effects: Vec<f64>,
    /// Mean effect.
    #[serde(with = "finite_or_null")]
    pub mean: f64,
    /// Sample standard deviation of the effect across seeds: the spread.
    #[serde(with = "finite_or_null")]
    pub std: f64,
    /// Whether the mean effect exceeds the spread.
    pub held: bool,
}

/// Wall time of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    /// Stage label.
    pub stage: String,
    /// Seconds.
    pub elapsed_secs: f64,
}

impl Results {
    /// The checkpoint of `run` at `step`, if evaluated.
    pub fn checkpoint(&self, run: RunId, step: u64) -> Option<&CheckpointRecord> {
        self.checkpoints
            .iter()
            .find(|c| c.run == run && c.step == step)
    }

    /// Merges carrying `tag`.
    pub fn merges_tagged(&self, tag: Tag) -> impl Iterator<Item = &MergeRecord> + '_ {
        self.merges.iter().filter(move |m| m.has_tag(tag))
    }

    /// A run by id.
    pub fn run(&self, id: RunId) -> Option<&RunRecord> {
        self.runs.iter().find(|r| r.name == id)
    }

    /// Writes `results.json` into `dir` (temp file, then rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join("results.json");
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)
    }

    /// Reads a `results.json`.
    pub fn read(path: &Path) -> Result<Results> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "reading", e))?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Writes `bytes` to a file beside `path`, fsyncs it, renames it into place and fsyncs the
/// directory: a crash leaves the old file or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    pma_format::write_file_atomic(path, bytes, pma_format::Publish::Replace)
        .map_err(|e| pma_merge::Error::from(e).into())
}

/// [`finite_or_null`] for the losses of `(step, loss, loss)` triples.
mod finite_triples {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    fn opt(x: f64) -> Option<f64> {
        x.is_finite().then_some(x)
    }

    pub fn serialize<S: Serializer>(v: &[(u64, f64, f64)], s: S) -> Result<S::Ok, S::Error> {
        let o: Vec<(u64, Option<f64>, Option<f64>)> =
            v.iter().map(|&(t, a, b)| (t, opt(a), opt(b))).collect();
        o.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, f64, f64)>, D::Error> {
        let o = Vec::<(u64, Option<f64>, Option<f64>)>::deserialize(d)?;
        let nan = |x: Option<f64>| x.unwrap_or(f64::NAN);
        Ok(o.into_iter().map(|(t, a, b)| (t, nan(a), nan(b))).collect())
    }
}

/// [`finite_or_null`] for each element.
mod finite_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let opt: Vec<Option<f64>> = v.iter().map(|x| x.is_finite().then_some(*x)).collect();
        opt.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let opt = Vec::<Option<f64>>::deserialize(d)?;
        Ok(opt.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
    }
}

/// JSON has no NaN or infinity: non-finite values (a diverged run) are written as `null` and read
/// back as NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_losses_round_trip_as_null() {
        let order = ContinuedOrder {
            order: 1,
            raw_run: "ct-raw-1".into(),
            merge_run: "ct-pma-1".into(),
            heldout_curve: vec![(0, 2.0, 1.9), (8, f64::NAN, 1.5)],
            early_grad_norm_std: (0.1, 0.2),
            max_grad_norm: (1.0, 2.0),
        };
        let json = serde_json::to_string(&order).unwrap();
        assert!(json.contains("[8,null,1.5]"), "{json}");
        let back: ContinuedOrder = serde_json::from_str(&json).unwrap();
        assert!(back.heldout_curve[1].1.is_nan());
        assert_eq!(back.final_heldout_loss().1, 1.5);
        let sf = SeedFinding {
            id: "x".into(),
            effects: vec![0.1, f64::NAN],
            mean: f64::NAN,
            std: f64::NAN,
            held: false,
        };
        let back: SeedFinding = serde_json::from_str(&serde_json::to_string(&sf).unwrap()).unwrap();
        assert!(back.effects[1].is_nan() && back.mean.is_nan() && !back.held);
    }
}
