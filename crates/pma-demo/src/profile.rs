//! Experiment profiles: how big, how long, and which merges.
//!
//! A run of the demo is a [`Scope`] (the demo's core experiments, or the full reproduction with
//! its extra sections) at a [`Scale`] (`tiny` for CI, `quick` for the five-minute demo, `full`
//! for the hour-long reproduction). [`Profile::new`] turns a scale into plain numbers: the model
//! shape, the trunk run, where merges and annealing forks happen, and the sizes of the extra
//! experiments. Every number is in `results.json` next to the figures it produced.
//!
//! Steps are counted from the start of the trunk run. A merge "at step s with N and interval V"
//! averages the checkpoints at `s - (N-1)V, ..., s - V, s`. An annealing fork "from step f" starts
//! from the trunk's checkpoint at `f` and decays the LR to its minimum over `D` steps, so its last
//! checkpoint has seen as many tokens as the trunk at `f + D`.

use pma_lab::config::{default_intermediate_size, ModelConfig, ModelKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How large and long the experiments are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// Seconds per run; for CI and tests (under two minutes in all).
    Tiny,
    /// The demo's default: about three minutes on two quiet cores, within five.
    Quick,
    /// The reproduction's default, with 3 seeds: 37 minutes measured at one thread while the
    /// box's other core was busy, within an hour.
    Full,
}

impl Scale {
    /// The lowercase name used on the command line and in `results.json`.
    pub fn name(self) -> &'static str {
        match self {
            Scale::Tiny => "tiny",
            Scale::Quick => "quick",
            Scale::Full => "full",
        }
    }
}

impl std::fmt::Display for Scale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Scale {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Scale::Tiny),
            "quick" => Ok(Scale::Quick),
            "full" => Ok(Scale::Full),
            other => Err(format!(
                "unknown profile '{other}' (expected tiny, quick or full)"
            )),
        }
    }
}

/// Which experiments run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Trunk, one annealing fork, the method × N grid at two or three points.
    Demo,
    /// Everything in the demo plus early/late, N and V sweeps, merges inside the annealing
    /// branch, annealing prediction, an MoE model, PMA-init for continued training and
    /// loss-spike recovery.
    Reproduce,
}

impl Scope {
    /// The lowercase name used in `results.json`.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Demo => "demo",
            Scope::Reproduce => "reproduce",
        }
    }
}

/// The MoE run of the reproduction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeProfile {
    /// Model shape (Mixtral layout).
    pub model: ModelConfig,
    /// Constant-LR steps after warmup.
    pub steps: u64,
    /// Checkpoint interval.
    pub save_every: u64,
    /// Checkpoints per merge.
    pub n: usize,
    /// Step its annealing fork starts from.
    pub anneal_from: u64,
    /// Decay length of that fork (it ends at `anneal_from + decay_steps`, the run's last step).
    pub decay_steps: u64,
}

/// PMA-init for continued training on held-out text, as the paper's continued-training (CT)
/// stage: fresh optimizers, linear warmup, then a cosine decay to the trunk's `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinuedProfile {
    /// Steps of continued training from each init.
    pub steps: u64,
    /// Peak LR of the continued runs.
    pub lr: f64,
    /// Linear warmup of the continued runs (their optimizers start fresh).
    pub warmup_steps: u64,
    /// Checkpoints in the SMA merge used as PMA-init.
    pub n: usize,
    /// Data orders each pair of runs (raw and PMA-init) is repeated with.
    #[serde(default = "one")]
    pub orders: usize,
}

fn one() -> usize {
    1
}

/// What resumptions used before the field existed (the full profile's continued warmup).
fn resume_warmup() -> u64 {
    10
}

/// Loss-spike rescue: an LR sweep that finds a spontaneous spike, then resumptions from before
/// it (see `experiment/spike.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpikeProfile {
    /// Constant LRs of the sweep, as multiples of the trunk's peak LR, lowest first. The sweep
    /// stops at the first that spikes with `n` checkpoints before the spike.
    pub lr_multiples: Vec<f64>,
    /// Steps of each sweep run (warmup as the trunk's, then constant; a diverging run stops).
    pub steps: u64,
    /// Checkpoint interval of the sweep runs.
    pub save_every: u64,
    /// Checkpoints up to the last pre-spike one, merged by SMA into the PMA-init.
    pub n: usize,
    /// Steps each resumption trains at the spiking LR.
    pub resume_steps: u64,
    /// Data orders every resumption is repeated with.
    pub resume_orders: usize,
    /// Linear warmup of each resumption back to the spiking LR (a merge has no optimizer state,
    /// so both inits start fresh).
    #[serde(default = "resume_warmup")]
    pub resume_warmup_steps: u64,
    /// The spike rule's threshold: a loss above this times the median of the ten before it.
    pub jump_ratio: f64,
}

/// Every number an experiment needs. Plain data; built by [`Profile::new`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The scale it was built for.
    pub scale: Scale,
    /// Dense model shape of the trunk.
    pub model: ModelConfig,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak (stable-phase) LR.
    pub lr: f64,
    /// LR at the end of an annealing decay.
    pub min_lr: f64,
    /// Linear warmup of the trunk.
    pub warmup_steps: u64,
    /// Steps of the trunk (warmup + constant LR).
    pub trunk_steps: u64,
    /// Checkpoint interval K of the trunk.
    pub save_every: u64,
    /// Steps at which the method × N grid is merged, earliest first.
    pub merge_points: Vec<u64>,
    /// N values of the grid.
    pub ns: Vec<usize>,
    /// EMA smoothing values of the grid (the demo uses 0.2).
    pub ema_alphas: Vec<f64>,
    /// Trunk steps annealing forks start from.
    pub anneal_from: Vec<u64>,
    /// Decay length D of each annealing fork.
    pub decay_steps: u64,
    /// Trunk step from which the decay-emulation study forks one annealing run per decay shape
    /// (linear, cosine, 1-sqrt), each over `decay_steps`, reproduction only. Their losses are
    /// compared with SMA and decay-weighted merges of the trunk over the same window.
    #[serde(default)]
    pub shape_forks_from: Option<u64>,
    /// Tokens of the validation split used for every evaluation (a fixed prefix).
    pub eval_tokens: usize,
    /// N values of the N sweep (V = K), reproduction only.
    pub sweep_ns: Vec<usize>,
    /// Intervals of the V sweep as multiples of K, reproduction only.
    pub sweep_v_multiples: Vec<u64>,
    /// N of the V sweep.
    pub sweep_v_n: usize,
    /// The MoE run, reproduction only.
    pub moe: MoeProfile,
    /// Continued training, reproduction only.
    pub continued: ContinuedProfile,
    /// Spike recovery, reproduction only.
    pub spike: SpikeProfile,
    /// Seeds the trunk-level study runs with, reproduction only; with more than one, its
    /// findings are judged over the seeds.
    #[serde(default = "one")]
    pub seeds: usize,
}

fn dense(hidden: usize, layers: usize, heads: usize, seq_len: usize) -> ModelConfig {
    ModelConfig {
        kind: ModelKind::Dense,
        hidden_size: hidden,
        intermediate_size: default_intermediate_size(hidden),
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        max_position_embeddings: seq_len,
        ..ModelConfig::default()
    }
}

fn moe(hidden: usize, layers: usize, heads: usize, seq_len: usize, experts: usize) -> ModelConfig {
    ModelConfig {
        kind: ModelKind::Moe,
        // Each expert is half a dense MLP wide, so top-2 routing costs about one dense MLP.
        intermediate_size: default_intermediate_size(hidden) / 2,
        num_experts: experts,
        top_k: 2,
        ..dense(hidden, layers, heads, seq_len)
    }
}

impl Profile {
    /// The numbers of a scale. They were chosen for wall time on two CPU cores, never by the
    /// outcome of a finding.
    ///
    /// Measured on a shared 2-core box (other builds running, load average 7–10), release build
    /// with the lab's fused CPU kernels: `demo --profile quick` 59 s wall (its earlier, 139K-parameter shape with one fork); the 669K-parameter quick profile with two forks and the fused attention: 167 s wall on a quiet 2-core box; `demo --profile tiny`
    /// 2 s (6 s with a debug build). Before the fused kernels, `reproduce --profile quick` took
    /// 11 min wall (357 s CPU) under the same load. `reproduce --profile full` with the fused
    /// kernels: 11 min wall (790 s CPU) at `nice 19` on that box, every section included. With
    /// 3 seeds, the CT stage over 3 data orders and the LR sweep: 37 min wall (2,041 s CPU) at
    /// `RAYON_NUM_THREADS=1 --threads 1`, the other core running builds (load 6–11).
    pub fn new(scale: Scale) -> Profile {
        match scale {
            Scale::Tiny => Profile {
                scale,
                model: dense(32, 2, 2, 32),
                batch_size: 8,
                seq_len: 32,
                lr: 3e-3,
                min_lr: 3e-4,
                warmup_steps: 10,
                trunk_steps: 60,
                save_every: 5,
                merge_points: vec![30, 60],
                ns: vec![3, 6, 10],
                ema_alphas: vec![0.2],
                anneal_from: vec![40],
                decay_steps: 20,
                shape_forks_from: Some(40),
                eval_tokens: 4096,
                sweep_ns: vec![3, 6, 10, 15],
                sweep_v_multiples: vec![1, 2, 3, 4],
                sweep_v_n: 3,
                moe: MoeProfile {
                    model: moe(32, 1, 2, 32, 4),
                    steps: 30,
                    save_every: 5,
                    n: 3,
                    anneal_from: 20,
                    decay_steps: 10,
                },
                continued: ContinuedProfile {
                    steps: 12,
                    lr: 3e-3,
                    warmup_steps: 2,
                    n: 3,
                    orders: 2,
                },
                spike: SpikeProfile {
                    lr_multiples: vec![2.0, 4.0, 8.0, 16.0, 32.0],
                    steps: 40,
                    save_every: 2,
                    n: 3,
                    resume_steps: 12,
                    resume_orders: 2,
                    resume_warmup_steps: 2,
                    // Tiny runs are too short to spike: any rise over the recent median counts,
                    // so CI exercises the rescue. Tiny verdicts mean nothing.
                    jump_ratio: 1.0,
                },
                seeds: 2,
            },
            Scale::Quick => Profile {
                scale,
                model: dense(128, 3, 4, 64),
                batch_size: 16,
                seq_len: 64,
                lr: 3e-3,
                min_lr: 3e-4,
                warmup_steps: 50,
                trunk_steps: 800,
                save_every: 40,
                merge_points: vec![400, 600, 800],
                ns: vec![3, 6, 10],
                ema_alphas: vec![0.2],
                // Two forks, so the annealing prediction is a curve, not one point.
                anneal_from: vec![400, 600],
                decay_steps: 200,
                shape_forks_from: Some(600),
                eval_tokens: 16_384,
                sweep_ns: vec![3, 6, 10, 15],
                sweep_v_multiples: vec![1, 2, 3, 4],
                sweep_v_n: 3,
                moe: MoeProfile {
                    model: moe(64, 2, 4, 64, 4),
                    steps: 200,
                    save_every: 20,
                    n: 6,
                    anneal_from: 100,
                    decay_steps: 100,
                },
                continued: ContinuedProfile {
                    steps: 80,
                    lr: 3e-3,
                    warmup_steps: 8,
                    n: 6,
                    orders: 2,
                },
                spike: SpikeProfile {
                    lr_multiples: vec![2.0, 4.0, 8.0, 16.0, 32.0],
                    steps: 300,
                    save_every: 20,
                    n: 3,
                    resume_steps: 100,
                    resume_orders: 3,
                    resume_warmup_steps: 5,
                    jump_ratio: 1.3,
                },
                seeds: 1,
            },
            Scale::Full => Profile {
                scale,
                model: dense(128, 3, 4, 64),
                batch_size: 16,
                seq_len: 64,
                lr: 3e-3,
                min_lr: 3e-4,
                warmup_steps: 100,
                trunk_steps: 1500,
                save_every: 50,
                merge_points: vec![500, 1000, 1500],
                ns: vec![3, 6, 10],
                ema_alphas: vec![0.1, 0.2, 0.5],
                anneal_from: vec![700, 1000, 1300],
                decay_steps: 200,
                shape_forks_from: Some(1300),
                eval_tokens: 32_768,
                sweep_ns: vec![3, 6, 10, 15],
                sweep_v_multiples: vec![1, 2, 3, 4],
                sweep_v_n: 3,
                moe: MoeProfile {
                    model: moe(128, 2, 4, 64, 8),
                    steps: 600,
                    save_every: 50,
                    n: 6,
                    anneal_from: 400,
                    decay_steps: 200,
                },
                continued: ContinuedProfile {
                    steps: 200,
                    lr: 3e-3,
                    warmup_steps: 20,
                    n: 6,
                    orders: 3,
                },
                spike: SpikeProfile {
                    // Doubling, as the quick profile: the 3-seed trunk study needs the time.
                    lr_multiples: vec![2.0, 4.0, 8.0, 16.0, 32.0],
                    steps: 500,
                    save_every: 25,
                    n: 3,
                    resume_steps: 200,
                    resume_orders: 3,
                    resume_warmup_steps: 10,
                    jump_ratio: 1.3,
                },
                seeds: 3,
            },
        }
    }

    /// Checks that every merge point, fork and sweep lands on checkpoints that will exist.
    pub fn validate(&self, scope: Scope) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(Error::InvalidProfile { field, reason });
        let k = self.save_every;
        if k == 0 || self.trunk_steps < k {
            return bad(
                "save_every",
                format!("{k} does not fit {} steps", self.trunk_steps),
            );
        }
        for &p in &self.merge_points {
            if p % k != 0 || p > self.trunk_steps {
                return bad("merge_points", format!("{p} is not a checkpoint step"));
            }
        }
        for &f in &self.anneal_from {
            if f % k != 0 || f > self.trunk_steps || f < self.warmup_steps {
                return bad(
                    "anneal_from",
                    format!("{f} is not a stable-phase checkpoint"),
                );
            }
        }
        if self.decay_steps == 0 {
            return bad("decay_steps", "must be positive".into());
        }
        if self.merge_points.is_empty() || self.ns.is_empty() {
            return bad("merge_points", "the grid needs points and N values".into());
        }
        if let Some(f) = self.shape_forks_from {
            let end = f + self.decay_steps;
            if f % k != 0 || f < self.warmup_steps || end > self.trunk_steps || end % k != 0 {
                return bad(
                    "shape_forks_from",
                    format!(
                        "forks from {f} over {} steps must start and end at stable-phase trunk checkpoints",
                        self.decay_steps
                    ),
                );
            }
        }
        if scope == Scope::Reproduce {
            let m = &self.moe;
            if m.save_every == 0
                || m.anneal_from % m.save_every != 0
                || m.anneal_from + m.decay_steps != m.steps
            {
                return bad(
                    "moe.anneal_from",
                    format!(
                        "the MoE fork must start at a checkpoint and end at step {}",
                        m.steps
                    ),
                );
            }
            let s = &self.spike;
            let ascending = s.lr_multiples.windows(2).all(|w| w[0] < w[1]);
            if s.lr_multiples.is_empty() || !ascending || s.lr_multiples[0] <= 0.0 {
                return bad(
                    "spike.lr_multiples",
                    "the sweep needs positive LR multiples, lowest first".into(),
                );
            }
            if s.save_every == 0 || s.n == 0 || s.steps < s.save_every * (s.n as u64 + 1) {
                return bad(
                    "spike.steps",
                    format!(
                        "{} steps cannot hold {} checkpoints every {} before a spike",
                        s.steps, s.n, s.save_every
                    ),
                );
            }
            if s.jump_ratio.is_nan() || s.jump_ratio < 1.0 {
                return bad(
                    "spike.jump_ratio",
                    format!("{} would flag a loss that fell", s.jump_ratio),
                );
            }
            if self.seeds == 0 {
                return bad("seeds", "the study needs at least one seed".into());
            }
            let c = &self.continued;
            if c.orders == 0 || c.steps < 4 || c.steps % 4 != 0 || c.warmup_steps >= c.steps {
                return bad(
                    "continued.steps",
                    format!(
                        "{} orders of {} steps (warmup {}): needs an order, a multiple of 4 steps (4 evaluations) and a decay after the warmup",
                        c.orders, c.steps, c.warmup_steps
                    ),
                );
            }
            if s.resume_orders == 0 || s.resume_steps == 0 {
                return bad(
                    "spike.resume_orders",
                    "the rescue needs at least one data order and one step".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scale_validates_for_both_scopes() {
        for scale in [Scale::Tiny, Scale::Quick, Scale::Full] {
            let p = Profile::new(scale);
            p.validate(Scope::Demo).unwrap();
            p.validate(Scope::Reproduce).unwrap();
            p.model.validate().unwrap();
            p.moe.model.validate().unwrap();
        }
    }

    #[test]
    fn scale_names_round_trip() {
        for scale in [Scale::Tiny, Scale::Quick, Scale::Full] {
            assert_eq!(scale.name().parse::<Scale>().unwrap(), scale);
        }
        assert!("huge".parse::<Scale>().is_err());
    }
}
