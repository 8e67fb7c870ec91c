//! The MoE study: one Mixtral-layout model through the whole pipeline, and its annealing fork.

use pma_lab::train::TrainConfig;

use super::lab::{Lab, RunSpec};
use super::plan::{fits, grid_methods, MergeSpec};
use crate::error::Result;
use crate::ids::{seed_offset, RunId, Tag};

impl Lab<'_> {
    /// One MoE model through the pipeline: constant-LR run, every checkpoint, SMA/EMA/WMA merges.
    pub(super) fn moe(&mut self) -> Result<()> {
        let p = &self.config.profile;
        let m = &p.moe;
        let train = TrainConfig {
            model: m.model.clone(),
            steps: m.steps,
            save_every: m.save_every,
            seed: self.config.seed.wrapping_add(seed_offset::MOE),
            out_dir: self.run_dir(RunId::Moe),
            warmup_steps: Some(p.warmup_steps.min(m.steps / 4)),
            ..self.trunk_config()
        };
        let run = self.train(RunSpec {
            id: RunId::Moe,
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
                run: RunId::Moe,
                method,
                n: m.n,
                interval: m.save_every,
                step: last,
                tag: Tag::Moe,
            })
            .collect();
        self.stage("merge moe", specs.len() as u64);
        for spec in &specs {
            self.merge(&run, spec)?;
        }
        self.end_stage();

        // Its annealing fork, ending at the same step as the merges.
        let fork = self.fork_annealing(
            &run,
            RunId::MoeAnneal {
                from: m.anneal_from,
            },
            m.decay_steps,
        )?;
        self.eval_all(&fork)?;
        self.record_annealed(&fork, m.decay_steps);
        Ok(())
    }
}
