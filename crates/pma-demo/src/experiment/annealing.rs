//! Annealing forks, and whether a merge at constant LR predicts them.
//!
//! A fork starts from a stable-phase checkpoint of the trunk (or of the MoE run), with its AdamW
//! moments, and decays the LR to `min_lr`. [`Lab::fork_annealing`] is the one definition of a
//! fork; [`predictions`] pairs each fork's end with the best merge of its base run at the same
//! step.

use std::path::PathBuf;

use pma_lab::schedule::{DecayShape, ScheduleKind};
use pma_lab::train::TrainConfig;
use pma_merge::WeightSpec;

use super::lab::{Lab, RunSpec, Trained};
use crate::error::Result;
use crate::ids::{seed_offset, RunId, Tag};
use crate::results::{AnnealedRecord, DecayEmulationRecord, PredictionRecord, Results};

impl Lab<'_> {
    /// Forks the annealing run `id` (a fork of `base`) from `base`'s checkpoint at the fork's
    /// step: its weights and AdamW moments, then the LR decaying from the peak to `min_lr` over
    /// `decay_steps` (WSD with no warmup and no stable phase), with the trunk's decay shape
    /// unless `id` names one. The fork keeps `base`'s checkpoint interval, and its seed is
    /// `base`'s plus the fork's step, so forks from different steps see different batches and
    /// forks from one step that differ only in shape see the same ones.
    pub(super) fn fork_annealing(
        &mut self,
        base: &Trained,
        id: RunId,
        decay_steps: u64,
    ) -> Result<Trained> {
        let defaults = self.trunk_config();
        let (from, offset, shape, role) = match (base.id, id) {
            (RunId::Trunk, RunId::Anneal { from }) => (
                from,
                seed_offset::TRUNK,
                defaults.decay_shape,
                format!(
                    "annealing fork from trunk step {from}: LR decays to min over {decay_steps} steps ({})",
                    defaults.decay_shape.name()
                ),
            ),
            (RunId::Trunk, RunId::AnnealShaped { from, shape }) => (
                from,
                seed_offset::TRUNK,
                shape,
                format!(
                    "decay-shape fork from trunk step {from}: LR decays to min over {decay_steps} steps ({})",
                    shape.name()
                ),
            ),
            (RunId::Moe, RunId::MoeAnneal { from }) => (
                from,
                seed_offset::MOE,
                defaults.decay_shape,
                format!(
                    "MoE annealing fork from step {from}: LR decays to min over {decay_steps} steps ({})",
                    defaults.decay_shape.name()
                ),
            ),
            (b, other) => unreachable!("{other} is not an annealing fork of {b}"),
        };
        let train = TrainConfig {
            decay_shape: shape,
            ..annealing_config(
                &defaults,
                base,
                from,
                decay_steps,
                self.config.seed.wrapping_add(offset),
                self.run_dir(id),
            )
        };
        self.train(RunSpec {
            id,
            role,
            train,
            step_offset: from,
        })
    }

    /// Records the last checkpoint of an annealing `fork` (once evaluated) as an annealed model.
    pub(super) fn record_annealed(&mut self, fork: &Trained, decay_steps: u64) {
        let base = fork.id.base().expect("annealing forks have a base run");
        if let Some(rec) = self.results.checkpoint(fork.id, fork.last_step()).cloned() {
            self.results.annealed.push(AnnealedRecord {
                run: fork.id.to_string(),
                base_run: base.to_string(),
                from_step: fork.step_offset,
                step: rec.global_step,
                tokens: rec.tokens,
                decay_steps,
                val_loss: rec.val_loss,
            });
        }
    }
}

/// The config of an annealing fork of `base` from step `from`: the fork-specific settings on top
/// of `defaults` (the trunk's). Pure, so the one definition of a fork is testable.
pub(super) fn annealing_config(
    defaults: &TrainConfig,
    base: &Trained,
    from: u64,
    decay_steps: u64,
    base_seed: u64,
    out_dir: PathBuf,
) -> TrainConfig {
    TrainConfig {
        init: Some(pma_lab::checkpoint::step_dir(&base.dir, from)),
        init_optimizer: true,
        steps: decay_steps,
        schedule: ScheduleKind::Wsd,
        warmup_steps: Some(0),
        decay_steps: Some(decay_steps),
        seed: base_seed.wrapping_add(from),
        save_every: base.save_every,
        out_dir,
        ..defaults.clone()
    }
}

/// For every annealed model, the best trunk merge ending at the same step.
pub(super) fn predictions(results: &Results) -> Vec<PredictionRecord> {
    let mut out = Vec::new();
    for a in &results.annealed {
        let Ok(base) = a.base_run.parse::<RunId>() else {
            continue;
        };
        let Some(raw) = results.checkpoint(base, a.step) else {
            continue;
        };
        let k = if base == RunId::Moe {
            results.config.moe.save_every
        } else {
            results.config.save_every
        };
        // The decay-emulation study's merges answer their own question, not this one.
        let best = results
            .merges
            .iter()
            .filter(|m| m.run == a.base_run && m.step == a.step && m.interval == k)
            .filter(|m| m.tags.iter().any(|t| *t != Tag::DecayEmulation))
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

/// For every `(shape, fork)` of the decay-emulation study, the fork's final loss against the
/// trunk's SMA and `shape`-weighted merges of the fork's window (tagged
/// [`Tag::DecayEmulation`]). Shapes whose fork or merges are missing are left out.
pub(super) fn decay_emulation(
    results: &Results,
    forks: &[(DecayShape, &Trained)],
) -> Vec<DecayEmulationRecord> {
    let mut out = Vec::new();
    for &(shape, fork) in forks {
        let step = fork.step_offset + fork.last_step();
        let window = |name: &str| {
            results
                .merges_tagged(Tag::DecayEmulation)
                .find(|m| m.run == RunId::Trunk && m.step == step && m.method == name)
        };
        let (Some(annealed), Some(raw), Some(sma), Some(merge)) = (
            results.checkpoint(fork.id, fork.last_step()),
            results.checkpoint(RunId::Trunk, step),
            window(WeightSpec::Sma.name()),
            window(shape.method_name()),
        ) else {
            continue;
        };
        out.push(DecayEmulationRecord {
            shape: shape.name().into(),
            fork_run: fork.id.to_string(),
            from_step: fork.step_offset,
            step,
            annealed_loss: annealed.val_loss,
            raw_loss: raw.val_loss,
            sma_loss: sma.val_loss,
            decay_merge_id: merge.id.clone(),
            decay_loss: merge.val_loss,
            same_as_sma: merge.weights.len() == sma.weights.len()
                && merge
                    .weights
                    .iter()
                    .zip(&sma.weights)
                    .all(|(a, b)| (a - b).abs() <= 1e-12),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(id: RunId, save_every: u64) -> Trained {
        Trained {
            id,
            dir: PathBuf::from("out/runs").join(id.to_string()),
            save_every,
            step_offset: 0,
            tokens_per_step: 64,
            checkpoints: Vec::new(),
            diverged_at: None,
        }
    }

    /// A fork loads the base's checkpoint and moments, then decays from the peak to `min_lr`
    /// over exactly its own steps; everything else is the trunk's.
    #[test]
    fn annealing_fork_decays_from_the_base_checkpoint() {
        let defaults = TrainConfig {
            lr: 1e-3,
            min_lr: Some(1e-4),
            batch_size: 4,
            save_every: 20,
            schedule: ScheduleKind::Constant,
            ..TrainConfig::default()
        };
        let moe = base(RunId::Moe, 10);
        let c = annealing_config(&defaults, &moe, 30, 50, 7, "out/runs/moe-anneal-30".into());
        assert_eq!(c.init, Some(PathBuf::from("out/runs/moe/step-0000030")));
        assert!(c.init_optimizer);
        assert_eq!(c.steps, 50);
        assert_eq!(
            c.seed,
            7 + 30,
            "forks from different steps see different batches"
        );
        assert_eq!(
            c.save_every, 10,
            "a fork keeps its base's checkpoint interval"
        );
        assert_eq!(c.batch_size, 4);
        assert_eq!(c.out_dir, PathBuf::from("out/runs/moe-anneal-30"));
        let s = c.schedule();
        // No warmup and no stable phase: the first update already decays from the peak, the
        // last one is at min_lr.
        assert!(s.lr_at(0) < 1e-3 && s.lr_at(0) > 0.8e-3, "{}", s.lr_at(0));
        assert!((s.lr_at(49) - 1e-4).abs() < 1e-12, "{}", s.lr_at(49));
    }
}
