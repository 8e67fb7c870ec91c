//! The MoE study: one Mixtral-layout model through the whole pipeline, and its annealing fork.

use pma_lab::schedule::ScheduleKind;
use pma_lab::train::TrainConfig;

use super::lab::{Lab, RunSpec};
use super::plan::{fits, grid_methods, MergeSpec};
use crate::error::Result;
use crate::results::AnnealedRecord;

impl Lab<'_> {
    /// One MoE model through the pipeline: constant-LR run, every checkpoint, SMA/EMA/WMA merges.
    pub(super) fn moe(&mut self) -> Result<()> {
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
}
