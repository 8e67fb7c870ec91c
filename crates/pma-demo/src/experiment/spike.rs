//! Loss-spike recovery: resume a spiking run from the raw pre-spike checkpoint or from a merge.

use pma_lab::schedule::LrSpike;
use pma_lab::train::TrainConfig;

use super::lab::{mean, nan_max, Lab, RunSpec};
use super::plan::MergeSpec;
use crate::error::Result;
use crate::ids::{seed_offset, RunId, Tag};
use crate::results::{CurvePoint, RecoveryRecord, SpikeRecord};
use pma_merge::WeightSpec;

impl Lab<'_> {
    /// Loss-spike recovery: a run with a deliberate LR spike, then two resumptions under the
    /// same remaining spike, one from the newest pre-spike checkpoint and one from the SMA merge
    /// of the `n` checkpoints before the spike.
    pub(super) fn spike(&mut self) -> Result<()> {
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
            seed: self.config.seed.wrapping_add(seed_offset::SPIKE),
            out_dir: self.run_dir(RunId::Spike),
            ..self.trunk_config()
        };
        let role = format!(
            "dense run with an LR spike: x{} for {} steps from step {}",
            s.factor, s.len_steps, s.spike_step
        );
        let run = self.train(RunSpec {
            id: RunId::Spike,
            role,
            train,
            step_offset: 0,
        })?;
        self.eval_all(&run)?;
        let pre_spike_step = (s.spike_step / s.save_every) * s.save_every;
        let merge = self.merge(
            &run,
            &MergeSpec {
                run: RunId::Spike,
                method: WeightSpec::Sma,
                n: s.n,
                interval: s.save_every,
                step: pre_spike_step,
                tag: Tag::SpikeInit,
            },
        )?;
        let pre = self
            .results
            .checkpoint(RunId::Spike, pre_spike_step)
            .expect("the pre-spike checkpoint was evaluated")
            .clone();
        let curve = self
            .results
            .run(RunId::Spike)
            .expect("recorded")
            .curve
            .clone();
        let before: Vec<f64> = curve
            .iter()
            .filter(|c| c.step + 5 > s.spike_step && c.step <= s.spike_step)
            .map(|c| c.loss)
            .collect();
        let max_after =
            run.unless_diverged(|| max_loss(curve.iter().filter(|c| c.step > s.spike_step)));
        let final_val = self.final_val_loss(&run);
        // The resumed runs face what is left of the spike, at the same offset from the start.
        let resume_spike = LrSpike {
            step: s.spike_step - pre_spike_step,
            ..spike
        };
        let mut outcomes = Vec::new();
        for (id, init, init_loss) in [
            (
                RunId::ResumeRaw,
                self.config.out_dir.join(&pre.path),
                pre.val_loss,
            ),
            (
                RunId::ResumePma,
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
                seed: self.config.seed.wrapping_add(seed_offset::SPIKE_RESUME),
                out_dir: self.run_dir(id),
                ..self.trunk_config()
            };
            let role = format!("resume after the spike from {}", self.rel(&init));
            let r = self.train(RunSpec {
                id,
                role,
                train,
                step_offset: pre_spike_step,
            })?;
            self.eval_all(&r)?;
            let curve = &self.results.run(id).expect("recorded").curve;
            let max_train = r.unless_diverged(|| max_loss(curve.iter()));
            let final_val = self.final_val_loss(&r);
            outcomes.push(RecoveryRecord {
                run: id.to_string(),
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
            run: RunId::Spike.to_string(),
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

/// The largest training loss of `points`; NaN if any is NaN.
fn max_loss<'a>(points: impl Iterator<Item = &'a CurvePoint>) -> f64 {
    points.map(|c| c.loss).fold(f64::NEG_INFINITY, nan_max)
}
