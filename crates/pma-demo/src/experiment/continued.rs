//! PMA-init for continued training: from a raw checkpoint and from a merge, on held-out text.

use pma_lab::data::DataSource;
use pma_lab::schedule::ScheduleKind;
use pma_lab::train::TrainConfig;

use super::lab::{mean, Lab, RunSpec, Trained};
use super::plan::MergeSpec;
use crate::error::Result;
use crate::ids::{seed_offset, RunId, Tag};
use crate::results::ContinuedRecord;
use pma_merge::WeightSpec;

impl Lab<'_> {
    /// PMA-init for continued training on the held-out text: from the newest raw trunk
    /// checkpoint and from the SMA merge of the last N, same data order, fresh optimizers.
    pub(super) fn continued(&mut self, trunk: &Trained) -> Result<()> {
        let p = self.config.profile.clone();
        let c = &p.continued;
        let from = trunk.last_step();
        let merge = self.merge(
            trunk,
            &MergeSpec {
                run: RunId::Trunk,
                method: WeightSpec::Sma,
                n: c.n,
                interval: p.save_every,
                step: from,
                tag: Tag::ContinuedInit,
            },
        )?;
        let raw_init = pma_lab::checkpoint::step_dir(&trunk.dir, from);
        let merge_init = self.config.out_dir.join(&merge.path);
        let mut finals = Vec::new();
        let mut initials = Vec::new();
        let mut names = Vec::new();
        for (id, init) in [
            (RunId::ContinuedRaw, raw_init),
            (RunId::ContinuedPma, merge_init),
        ] {
            let train = TrainConfig {
                init: Some(init.clone()),
                steps: c.steps,
                lr: c.lr,
                warmup_steps: Some(c.warmup_steps),
                schedule: ScheduleKind::Constant,
                save_every: 0,
                // The same seed for both: identical batches, so only the init differs.
                seed: self.config.seed.wrapping_add(seed_offset::CONTINUED),
                data: DataSource::Files(vec![self.heldout.clone()]),
                out_dir: self.run_dir(id),
                ..self.trunk_config()
            };
            let role = format!(
                "continued training on held-out text from {}",
                self.rel(&init)
            );
            let run = self.train(RunSpec {
                id,
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
            names.push(id);
        }
        let curve_stats = |id: RunId| {
            let curve = &self
                .results
                .run(id)
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
        let (er, mr, sr) = curve_stats(RunId::ContinuedRaw);
        let (ep, mp, sp) = curve_stats(RunId::ContinuedPma);
        self.results.continued = Some(ContinuedRecord {
            data: format!(
                "data/heldout.txt: the last 10% of the corpus's training part ({} bytes), never seen by the trunk; scored on its last 5% ({} tokens)",
                std::fs::metadata(&self.heldout).map(|m| m.len()).unwrap_or(0),
                self.heldout_eval_tokens.len()
            ),
            from_step: from,
            merge_id: merge.id,
            raw_run: names[0].to_string(),
            merge_run: names[1].to_string(),
            initial_heldout_loss: (initials[0], initials[1]),
            final_heldout_loss: (finals[0], finals[1]),
            early_train_loss: (er, ep),
            max_grad_norm: (mr, mp),
            grad_norm_std: (sr, sp),
        });
        Ok(())
    }
}
