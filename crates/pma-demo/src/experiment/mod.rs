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
//! 6. reproduction only: the MoE run, PMA-init for continued training and spike recovery;
//! 7. reproduction with several seeds: stages 2–5 again for each further seed, in
//!    `seeds/seed-S/`, and the trunk-level findings judged over all seeds.
//!
//! Every evaluation uses the same token stream: a fixed prefix of the embedded corpus's
//! validation split, which no run trains on.

mod annealing;
mod continued;
mod lab;
mod moe;
mod plan;
mod spike;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::findings::{apply_seed_verdicts, derive_findings, seed_findings, SEED_RULE};
use crate::ids::{seed_offset, RunId};
use crate::profile::{Profile, Scope};
use crate::results::{Results, SeedRun, SeedStudy, StageTiming};
use annealing::{decay_emulation, predictions};
use lab::{Lab, RunSpec, Trained};
use plan::{branch_merge_specs, decay_emulation_specs, trunk_merge_specs};
use pma_merge::DecayShape;

/// A fork of the decay-emulation study: trained for it, or an annealing fork (by index) that
/// already decays with that shape from that step.
enum Shaped {
    Trained(Trained),
    Reused(usize),
}

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
    "seeds",
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
    let trunk = trunk_study(&mut lab)?;
    if config.scope == Scope::Reproduce {
        lab.moe()?;
        lab.results.predictions = predictions(&lab.results);
        lab.continued(&trunk)?;
        lab.spike()?;
    }

    let mut results = lab.finish();
    results.findings = derive_findings(&results);
    if config.scope == Scope::Reproduce && p.seeds > 1 {
        let study = seed_study(config, &mut results, progress, cancel)?;
        apply_seed_verdicts(&mut results.findings, &study);
        results.seeds = Some(study);
    }
    results.elapsed_secs = started.elapsed().as_secs_f64();
    crate::plot::draw_all(&results, &config.out_dir)?;
    results.write(&config.out_dir)?;
    let report = crate::report::render_report(&results);
    crate::results::write_atomic(&config.out_dir.join("report.md"), report.as_bytes())?;
    Ok(results)
}

/// The trunk-level study of one seed: the trunk, its annealing forks (and the decay-shape
/// forks of a reproduction), every checkpoint's evaluation, the merges, the annealing
/// predictions and the decay-emulation records. Returns the trunk.
fn trunk_study(lab: &mut Lab<'_>) -> Result<Trained> {
    let config = lab.config;
    let p = &config.profile;
    // Trunk.
    let trunk = lab.train(RunSpec {
        id: RunId::Trunk,
        role: "dense trunk: warmup, then constant LR (the stable phase of WSD)".into(),
        train: lab.trunk_config(),
        step_offset: 0,
    })?;

    // Annealing forks.
    let mut forks = Vec::new();
    for &from in &p.anneal_from {
        forks.push(lab.fork_annealing(&trunk, RunId::Anneal { from }, p.decay_steps)?);
    }
    // The decay-emulation study's forks, one per shape; an annealing fork above from the same
    // step already decays with the trunk's shape, so that one is not trained twice.
    let mut shaped = Vec::new();
    if let (Some(from), Scope::Reproduce) = (p.shape_forks_from, config.scope) {
        let default_shape = lab.trunk_config().decay_shape;
        for shape in DecayShape::ALL {
            let reused = (shape == default_shape && p.anneal_from.contains(&from))
                .then(|| forks.iter().position(|f| f.id == RunId::Anneal { from }))
                .flatten();
            let fork = match reused {
                Some(i) => Shaped::Reused(i),
                None => Shaped::Trained(lab.fork_annealing(
                    &trunk,
                    RunId::AnnealShaped { from, shape },
                    p.decay_steps,
                )?),
            };
            shaped.push((shape, fork));
        }
    }

    // Raw checkpoints.
    let mut to_eval: Vec<(&Trained, u64, PathBuf)> = Vec::new();
    let shaped_trained = shaped.iter().filter_map(|(_, f)| match f {
        Shaped::Trained(t) => Some(t),
        Shaped::Reused(_) => None,
    });
    for t in std::iter::once(&trunk).chain(&forks).chain(shaped_trained) {
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
    specs.extend(decay_emulation_specs(p, config.scope));
    if config.scope == Scope::Reproduce {
        for fork in &forks {
            specs.extend(branch_merge_specs(p, fork.id, fork.last_step()));
        }
    }
    lab.stage("merge and evaluate", specs.len() as u64);
    for spec in &specs {
        let run = std::iter::once(&trunk)
            .chain(&forks)
            .find(|r| r.id == spec.run)
            .expect("merge specs name the trunk or one of its forks");
        lab.merge(run, spec)?;
    }
    lab.end_stage();

    for fork in &forks {
        lab.record_annealed(fork, p.decay_steps);
    }
    lab.results.predictions = predictions(&lab.results);
    let shaped: Vec<(DecayShape, &Trained)> = shaped
        .iter()
        .map(|(shape, f)| match f {
            Shaped::Trained(t) => (*shape, t),
            Shaped::Reused(i) => (*shape, &forks[*i]),
        })
        .collect();
    lab.results.decay_emulation = decay_emulation(&lab.results, &shaped);

    Ok(trunk)
}

/// Repeats the trunk-level study with `profile.seeds - 1` further seeds, each in
/// `seeds/seed-S/`, and judges the trunk-level findings over all seeds, `first` included. The
/// further seeds' stage timings join `first`'s.
fn seed_study(
    config: &DemoConfig,
    first: &mut Results,
    progress: &dyn Progress,
    cancel: Option<&AtomicBool>,
) -> Result<SeedStudy> {
    let mut seeds = vec![SeedRun::of(first, ".")];
    for i in 1..config.profile.seeds as u64 {
        let seed = config
            .seed
            .wrapping_add(i.wrapping_mul(seed_offset::SEED_STRIDE));
        let dir = Path::new("seeds").join(format!("seed-{seed}"));
        let seed_config = DemoConfig {
            seed,
            out_dir: config.out_dir.join(&dir),
            ..config.clone()
        };
        std::fs::create_dir_all(seed_config.out_dir.join("data"))
            .map_err(|e| Error::io(&seed_config.out_dir, "creating", e))?;
        let mut lab = Lab::new(&seed_config, progress, cancel)?;
        trunk_study(&mut lab)?;
        // `SeedRun::of` derives this seed's findings from its records.
        let r = lab.finish();
        first.timings.extend(r.timings.iter().map(|t| StageTiming {
            stage: format!("seed {seed}: {}", t.stage),
            elapsed_secs: t.elapsed_secs,
        }));
        seeds.push(SeedRun::of(&r, &dir.display().to_string()));
    }
    Ok(SeedStudy {
        rule: SEED_RULE.into(),
        findings: seed_findings(&seeds),
        seeds,
    })
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
