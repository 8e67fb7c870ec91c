//! Loss-spike rescue, as the paper describes it: spikes that come from training instability at
//! a high constant LR, not injected ones.
//!
//! 1. **LR sweep.** Fresh runs, identical but for their constant LR (multiples of the trunk's,
//!    lowest first), until one spikes on its own by [`first_spike`]'s rule with at least `n`
//!    checkpoints before the spike. That run and its LR are "the spiking run" and "the spiking
//!    LR"; a sweep where none does is reported as such, and the rescue is not attempted.
//! 2. **Rescue.** From the last checkpoint before the spike ("raw") and from the SMA merge of
//!    the `n` checkpoints ending there ("PMA"), resume at the spiking LR, once per data order.
//!    Both resumptions of one data order see the same batches, so only the init differs.
//! 3. **Outcome.** How many resumptions of each kind spike again (same rule), and their final
//!    validation losses.

use pma_lab::train::TrainConfig;

use super::lab::{mean, nan_max, Lab, RunSpec, Trained};
use super::plan::MergeSpec;
use crate::error::Result;
use crate::ids::{seed_offset, RunId, Tag};
use crate::results::{CurvePoint, ResumeRecord, SpikeRecord, SpikeRescueRecord, SweepRecord};
use pma_merge::WeightSpec;

/// Losses before a step that [`first_spike`] compares it with.
pub const SPIKE_WINDOW: usize = 10;
/// The spike rule, fixed before any run: the first step (counted as in the curve) whose training
/// loss is not finite, or exceeds `ratio` (the profile's `spike.jump_ratio`) times the median of
/// the [`SPIKE_WINDOW`] losses before it. Steps up to `settle` (a warmup) and the first window
/// are not judged, since early losses fall too fast for a median to mean anything.
pub fn first_spike(curve: &[CurvePoint], settle: u64, ratio: f64) -> Option<u64> {
    for (i, c) in curve.iter().enumerate() {
        if !c.loss.is_finite() {
            return Some(c.step);
        }
        if i < SPIKE_WINDOW || c.step <= settle {
            continue;
        }
        let mut recent: Vec<f64> = curve[i - SPIKE_WINDOW..i].iter().map(|p| p.loss).collect();
        recent.sort_by(f64::total_cmp);
        let median = (recent[SPIKE_WINDOW / 2 - 1] + recent[SPIKE_WINDOW / 2]) / 2.0;
        if c.loss > ratio * median {
            return Some(c.step);
        }
    }
    None
}

/// The newest checkpoint a spike at curve step `spike` leaves untouched. A curve's step `t`
/// reports the loss of the weights after `t - 1` updates, so the weights after `t - 1` updates
/// already spike; the checkpoint must come before them.
pub fn pre_spike_checkpoint(spike: u64, save_every: u64) -> Option<u64> {
    let last_clean = spike.checked_sub(2)?;
    let c = last_clean / save_every * save_every;
    (c > 0).then_some(c)
}

impl Lab<'_> {
    /// The LR sweep, then the rescue from the spiking run.
    pub(super) fn spike(&mut self) -> Result<()> {
        let p = self.config.profile.clone();
        let s = &p.spike;
        let settle = p.warmup_steps;
        let mut sweep = Vec::new();
        let mut spiking = None;
        for (index, &multiple) in s.lr_multiples.iter().enumerate() {
            let id = RunId::LrSweep { index };
            let lr = p.lr * multiple;
            let train = TrainConfig {
                steps: s.steps,
                save_every: s.save_every,
                lr,
                // One seed for the whole sweep: the same init and batches, so only the LR
                // differs.
                seed: self.config.seed.wrapping_add(seed_offset::SPIKE),
                out_dir: self.run_dir(id),
                ..self.trunk_config()
            };
            let role = format!(
                "LR sweep: warmup, then constant LR {lr:e} ({multiple}x the trunk's) until it spikes"
            );
            let run = self.train(RunSpec {
                id,
                role,
                train,
                step_offset: 0,
            })?;
            let curve = &self.results.run(id).expect("recorded").curve;
            let spike_step = first_spike(curve, settle, s.jump_ratio);
            let pre = spike_step
                .and_then(|t| pre_spike_checkpoint(t, s.save_every))
                .filter(|&c| c >= s.save_every * s.n as u64);
            sweep.push(SweepRecord {
                run: id.to_string(),
                lr,
                lr_multiple: multiple,
                spike_step,
                diverged_at: run.diverged_at,
                max_train_loss: max_loss(curve.iter().filter(|c| c.step > settle)),
            });
            if let Some(pre) = pre {
                spiking = Some((run, lr, spike_step.expect("pre implies a spike"), pre));
                break;
            }
        }
        let rescue = match spiking {
            Some((run, lr, spike_step, pre)) => Some(self.rescue(&run, lr, spike_step, pre)?),
            None => None,
        };
        self.results.spike = Some(SpikeRecord {
            rule: format!(
                "a step's training loss is not finite or exceeds {} x the median of the {SPIKE_WINDOW} before it (steps after warmup only)",
                s.jump_ratio
            ),
            sweep,
            rescue,
        });
        Ok(())
    }

    /// Resumes `run` at `lr` from its checkpoint at `pre` and from the SMA of the `n` ending
    /// there, once per data order.
    fn rescue(
        &mut self,
        run: &Trained,
        lr: f64,
        spike_step: u64,
        pre: u64,
    ) -> Result<SpikeRescueRecord> {
        let p = self.config.profile.clone();
        let s = &p.spike;
        // The merge's members, oldest first; the newest is the raw init.
        let mut raw = None;
        for j in (0..s.n as u64).rev() {
            let step = pre - j * s.save_every;
            let path = pma_lab::checkpoint::step_dir(&run.dir, step);
            raw = Some(self.eval_checkpoint(run, step, &path)?);
        }
        let raw = raw.expect("the profile asks for at least one member");
        let raw_path = pma_lab::checkpoint::step_dir(&run.dir, pre);
        let merge = self.merge(
            run,
            &MergeSpec {
                run: run.id,
                method: WeightSpec::Sma,
                n: s.n,
                interval: s.save_every,
                step: pre,
                tag: Tag::SpikeInit,
            },
        )?;
        let merge_path = self.config.out_dir.join(&merge.path);
        let mut resumes = Vec::new();
        for order in 0..s.resume_orders as u64 {
            for (id, init) in [
                (RunId::ResumeRaw { order }, &raw_path),
                (RunId::ResumePma { order }, &merge_path),
            ] {
                let train = TrainConfig {
                    init: Some(init.clone()),
                    steps: s.resume_steps,
                    // Only the final checkpoint is evaluated.
                    save_every: s.resume_steps,
                    lr,
                    // A merge has no optimizer state, so both start fresh, with the same short
                    // warmup back to the spiking LR.
                    warmup_steps: Some(s.resume_warmup_steps),
                    seed: self
                        .config
                        .seed
                        .wrapping_add(seed_offset::SPIKE_RESUME)
                        .wrapping_add(order),
                    out_dir: self.run_dir(id),
                    ..self.trunk_config()
                };
                let role = format!(
                    "resume at LR {lr:e} from {} (data order {order})",
                    self.rel(init)
                );
                let resumed = self.train(RunSpec {
                    id,
                    role,
                    train,
                    step_offset: pre,
                })?;
                self.eval_all(&resumed)?;
                let curve = &self.results.run(id).expect("recorded").curve;
                resumes.push(ResumeRecord {
                    run: id.to_string(),
                    from_merge: matches!(id, RunId::ResumePma { .. }),
                    order,
                    spike_step: first_spike(curve, s.resume_warmup_steps, s.jump_ratio),
                    max_train_loss: max_loss(curve.iter()),
                    final_val_loss: self.final_val_loss(&resumed),
                });
            }
        }
        let before = &self.results.run(run.id).expect("recorded").curve;
        let pre_spike_train_loss = mean(
            before
                .iter()
                .filter(|c| c.step + SPIKE_WINDOW as u64 > pre && c.step <= pre)
                .map(|c| c.loss),
        );
        Ok(SpikeRescueRecord {
            run: run.id.to_string(),
            lr,
            spike_step,
            pre_spike_step: pre,
            pre_spike_train_loss,
            pre_spike_val_loss: raw.val_loss,
            merge_id: merge.id,
            merge_val_loss: merge.val_loss,
            resumes,
        })
    }
}

/// The largest training loss of `points`; NaN if any is NaN.
fn max_loss<'a>(points: impl Iterator<Item = &'a CurvePoint>) -> f64 {
    points.map(|c| c.loss).fold(f64::NEG_INFINITY, nan_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(losses: &[f64]) -> Vec<CurvePoint> {
        losses
            .iter()
            .enumerate()
            .map(|(i, &loss)| CurvePoint {
                step: i as u64 + 1,
                lr: 1e-3,
                loss,
                grad_norm: 1.0,
            })
            .collect()
    }

    #[test]
    fn a_jump_over_the_recent_median_is_a_spike() {
        let mut l = vec![3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.5, 2.4, 2.4, 2.3, 2.3, 2.3];
        assert_eq!(first_spike(&curve(&l), 0, 1.3), None);
        // The ten before step 13 have median 2.45; 3.5 > 1.3 x 2.45 is a spike.
        l.push(3.5);
        assert_eq!(first_spike(&curve(&l), 0, 1.3), Some(13));
        // Just under the ratio is noise.
        l.pop();
        l.push(1.3 * 2.45 - 1e-9);
        assert_eq!(first_spike(&curve(&l), 0, 1.3), None);
    }

    #[test]
    fn non_finite_is_a_spike_even_early_and_warmup_is_not_judged() {
        assert_eq!(first_spike(&curve(&[3.0, f64::NAN]), 100, 1.3), Some(2));
        let mut l = vec![2.0; 12];
        l[11] = 9.0;
        assert_eq!(first_spike(&curve(&l), 12, 1.3), None);
        assert_eq!(first_spike(&curve(&l), 11, 1.3), Some(12));
    }

    #[test]
    fn the_pre_spike_checkpoint_predates_the_spiking_weights() {
        // A spike reported at step 42 comes from the weights after 41 updates; the newest
        // checkpoint every 20 steps that predates them is step 40.
        assert_eq!(pre_spike_checkpoint(42, 20), Some(40));
        assert_eq!(pre_spike_checkpoint(41, 20), Some(20));
        assert_eq!(pre_spike_checkpoint(21, 20), None);
        assert_eq!(pre_spike_checkpoint(1, 20), None);
    }
}
