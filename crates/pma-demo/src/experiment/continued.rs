//! PMA-init for continued training: from a raw checkpoint and from a merge, on held-out text.
//!
//! The paper's setup (arXiv 2505.12082, PMA-init): the continued-training (CT) stage starts
//! from the merge of the last stable-phase checkpoints instead of the newest one, with a fresh
//! optimizer, a warmup and a decaying LR, on data the pre-training did not see; it compares the
//! gradient norms along the run and the model's quality along and after it. Here each pair of
//! runs (same batches, only the init differs) is repeated over several data orders, so the
//! report can tell a difference from data-order noise.

use pma_lab::data::DataSource;
use pma_lab::schedule::ScheduleKind;
use pma_lab::train::TrainConfig;

use super::lab::{describe_schedule, mean, Lab, RunSpec, Trained};
use super::plan::MergeSpec;
use crate::error::Result;
use crate::ids::{seed_offset, RunId, Tag};
use crate::results::{ContinuedOrder, ContinuedRecord};
use pma_merge::WeightSpec;

impl Lab<'_> {
    /// PMA-init for continued training on the held-out text: from the newest raw trunk
    /// checkpoint and from the SMA merge of the last N, fresh optimizers, once per data order.
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
        let initial = (
            self.evaluate(&raw_init, &self.heldout_eval_tokens)?
                .val_loss,
            self.evaluate(&merge_init, &self.heldout_eval_tokens)?
                .val_loss,
        );
        // Four held-out evaluations along each run, the last at its end.
        let every = (c.steps / 4).max(1);
        let mut orders = Vec::new();
        let mut schedule = String::new();
        for order in 0..c.orders as u64 {
            let mut curves = Vec::new();
            let mut names = Vec::new();
            for (id, init) in [
                (RunId::ContinuedRaw { order }, &raw_init),
                (RunId::ContinuedPma { order }, &merge_init),
            ] {
                let train = TrainConfig {
                    init: Some(init.clone()),
                    steps: c.steps,
                    lr: c.lr,
                    min_lr: Some(p.min_lr),
                    warmup_steps: Some(c.warmup_steps),
                    schedule: ScheduleKind::Cosine,
                    save_every: every,
                    // The same seed for both inits: identical batches, so only the init differs.
                    seed: self
                        .config
                        .seed
                        .wrapping_add(seed_offset::CONTINUED)
                        .wrapping_add(order.wrapping_mul(seed_offset::CONTINUED_ORDER_STRIDE)),
                    data: DataSource::Files(vec![self.heldout.clone()]),
                    out_dir: self.run_dir(id),
                    ..self.trunk_config()
                };
                schedule = describe_schedule(&train);
                let role = format!(
                    "continued training on held-out text from {} (data order {order})",
                    self.rel(init)
                );
                let run = self.train(RunSpec {
                    id,
                    role,
                    train,
                    step_offset: 0,
                })?;
                // On the grid of saved steps; a step a diverged run never saved is NaN.
                self.stage(&format!("evaluate {id} on held-out text"), c.steps / every);
                let mut curve = Vec::new();
                for step in (every..=c.steps).step_by(every as usize) {
                    let saved = run.checkpoints.iter().find(|(s, _)| *s == step);
                    let loss = match saved {
                        Some((_, path)) => self.evaluate(path, &self.heldout_eval_tokens)?.val_loss,
                        None => f64::NAN,
                    };
                    self.progress
                        .advance(&format!("{id} step {step}: held-out loss {loss:.4}"));
                    curve.push((step, loss));
                }
                self.end_stage();
                curves.push(curve);
                names.push(id);
            }
            let grad_stats = |id: RunId| {
                let curve = &self
                    .results
                    .run(id)
                    .expect("continued runs were recorded")
                    .curve;
                let g: Vec<f64> = curve.iter().map(|c| c.grad_norm).collect();
                let early = &g[..(g.len() / 4).max(1).min(g.len())];
                let m = mean(early.iter().copied());
                let std = mean(early.iter().map(|x| (x - m) * (x - m))).sqrt();
                let max = g.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (std, max)
            };
            let (sr, mr) = grad_stats(names[0]);
            let (sp, mp) = grad_stats(names[1]);
            let mut heldout_curve = vec![(0, initial.0, initial.1)];
            heldout_curve.extend(
                curves[0]
                    .iter()
                    .zip(&curves[1])
                    .map(|(&(step, raw), &(_, pma))| (step, raw, pma)),
            );
            orders.push(ContinuedOrder {
                order,
                raw_run: names[0].to_string(),
                merge_run: names[1].to_string(),
                heldout_curve,
                early_grad_norm_std: (sr, sp),
                max_grad_norm: (mr, mp),
            });
        }
        self.results.continued = Some(ContinuedRecord {
            data: format!(
                "data/heldout.txt: the last 10% of the corpus's training part ({} bytes), never seen by the trunk; scored on its last 5% ({} tokens)",
                std::fs::metadata(&self.heldout).map(|m| m.len()).unwrap_or(0),
                self.heldout_eval_tokens.len()
            ),
            schedule,
            from_step: from,
            merge_id: merge.id,
            initial_heldout_loss: initial,
            orders,
        });
        Ok(())
    }
}
