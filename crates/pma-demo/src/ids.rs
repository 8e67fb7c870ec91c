//! Typed names of the demo's runs and merge tags.
//!
//! `results.json` stores run names and merge tags as strings (its schema is fixed), and the
//! experiments, findings, plots and report all look records up by them. Spelling a name as a
//! string literal in each of those places meant that a typo gave an empty chart instead of an
//! error. Here each run and tag is a variant: its string form is written once, in
//! [`RunId::fmt`] / [`Tag::as_str`], and records compare against it with `==`
//! (`checkpoint.run == RunId::Trunk`).

use std::fmt;
use std::str::FromStr;

use pma_merge::DecayShape;

/// A training run of the demo; its string form is the run's `name` in `results.json` and its
/// directory under `runs/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunId {
    /// The dense trunk: warmup, then constant LR. `trunk`.
    Trunk,
    /// An annealing fork of the trunk from step `from`. `anneal-{from}`.
    Anneal {
        /// The trunk step it starts from.
        from: u64,
    },
    /// An annealing fork of the trunk from step `from` that decays with `shape`, for the
    /// decay-emulation study. `anneal-{from}-{shape}` (`anneal-1300-cosine`).
    AnnealShaped {
        /// The trunk step it starts from.
        from: u64,
        /// Its LR decay shape.
        shape: DecayShape,
    },
    /// The MoE run. `moe`.
    Moe,
    /// The MoE run's annealing fork from step `from`. `moe-anneal-{from}`.
    MoeAnneal {
        /// The MoE step it starts from.
        from: u64,
    },
    /// Continued training from the newest raw trunk checkpoint, with data order `order`.
    /// `ct-raw-{order}`.
    ContinuedRaw {
        /// Which data order (0-based).
        order: u64,
    },
    /// Continued training from a PMA merge, with data order `order`. `ct-pma-{order}`.
    ContinuedPma {
        /// Which data order (0-based).
        order: u64,
    },
    /// Run `index` of the spike study's LR sweep. `lr-sweep-{index}`.
    LrSweep {
        /// Its place in the sweep, lowest LR first.
        index: usize,
    },
    /// Resumed at the spiking LR from the newest pre-spike checkpoint, with data order `order`.
    /// `resume-raw-{order}`.
    ResumeRaw {
        /// Which data order (0-based).
        order: u64,
    },
    /// Resumed at the spiking LR from the PMA merge, with data order `order`.
    /// `resume-pma-{order}`.
    ResumePma {
        /// Which data order (0-based).
        order: u64,
    },
}

impl RunId {
    /// Every run without a parameter, for parsing.
    const PLAIN: [RunId; 2] = [RunId::Trunk, RunId::Moe];

    fn plain_name(self) -> Option<&'static str> {
        Some(match self {
            RunId::Trunk => "trunk",
            RunId::Moe => "moe",
            RunId::Anneal { .. }
            | RunId::AnnealShaped { .. }
            | RunId::MoeAnneal { .. }
            | RunId::LrSweep { .. }
            | RunId::ResumeRaw { .. }
            | RunId::ResumePma { .. }
            | RunId::ContinuedRaw { .. }
            | RunId::ContinuedPma { .. } => return None,
        })
    }

    /// The run this one forks from, for annealing forks.
    pub fn base(self) -> Option<RunId> {
        match self {
            RunId::Anneal { .. } | RunId::AnnealShaped { .. } => Some(RunId::Trunk),
            RunId::MoeAnneal { .. } => Some(RunId::Moe),
            _ => None,
        }
    }

    /// Whether `name` (a record's run) names this run; allocates nothing.
    pub fn is(self, name: &str) -> bool {
        match (self.plain_name(), self) {
            (Some(n), _) => n == name,
            (None, RunId::Anneal { from }) => fork_step(name, "anneal-") == Some(from),
            (None, RunId::MoeAnneal { from }) => fork_step(name, "moe-anneal-") == Some(from),
            (None, RunId::AnnealShaped { from, shape }) => shaped_fork(name) == Some((from, shape)),
            (None, RunId::LrSweep { index }) => fork_step(name, "lr-sweep-") == Some(index as u64),
            (None, RunId::ResumeRaw { order }) => fork_step(name, "resume-raw-") == Some(order),
            (None, RunId::ResumePma { order }) => fork_step(name, "resume-pma-") == Some(order),
            (None, RunId::ContinuedRaw { order }) => fork_step(name, "ct-raw-") == Some(order),
            (None, RunId::ContinuedPma { order }) => fork_step(name, "ct-pma-") == Some(order),
            (None, _) => unreachable!("only numbered runs have no plain name"),
        }
    }
}

/// `anneal-{from}-{shape}`, with `from` canonical and `shape` one of [`DecayShape::name`].
fn shaped_fork(name: &str) -> Option<(u64, DecayShape)> {
    let (digits, shape) = name.strip_prefix("anneal-")?.split_once('-')?;
    let from = fork_step(digits, "")?;
    let shape = DecayShape::ALL.into_iter().find(|s| s.name() == shape)?;
    Some((from, shape))
}

fn fork_step(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    // Only the canonical form (`anneal-300`, not `anneal-0300`) names a run.
    let step: u64 = digits.parse().ok()?;
    (step.to_string() == digits).then_some(step)
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.plain_name(), self) {
            (Some(n), _) => f.write_str(n),
            (None, RunId::Anneal { from }) => write!(f, "anneal-{from}"),
            (None, RunId::MoeAnneal { from }) => write!(f, "moe-anneal-{from}"),
            (None, RunId::AnnealShaped { from, shape }) => {
                write!(f, "anneal-{from}-{}", shape.name())
            }
            (None, RunId::LrSweep { index }) => write!(f, "lr-sweep-{index}"),
            (None, RunId::ResumeRaw { order }) => write!(f, "resume-raw-{order}"),
            (None, RunId::ResumePma { order }) => write!(f, "resume-pma-{order}"),
            (None, RunId::ContinuedRaw { order }) => write!(f, "ct-raw-{order}"),
            (None, RunId::ContinuedPma { order }) => write!(f, "ct-pma-{order}"),
            (None, _) => unreachable!("only numbered runs have no plain name"),
        }
    }
}

impl FromStr for RunId {
    type Err = String;
    fn from_str(s: &str) -> Result<RunId, String> {
        if let Some(id) = RunId::PLAIN.into_iter().find(|id| id.is(s)) {
            return Ok(id);
        }
        if let Some(from) = fork_step(s, "moe-anneal-") {
            return Ok(RunId::MoeAnneal { from });
        }
        if let Some(from) = fork_step(s, "anneal-") {
            return Ok(RunId::Anneal { from });
        }
        if let Some((from, shape)) = shaped_fork(s) {
            return Ok(RunId::AnnealShaped { from, shape });
        }
        if let Some(index) = fork_step(s, "lr-sweep-") {
            return Ok(RunId::LrSweep {
                index: index as usize,
            });
        }
        if let Some(order) = fork_step(s, "resume-raw-") {
            return Ok(RunId::ResumeRaw { order });
        }
        if let Some(order) = fork_step(s, "resume-pma-") {
            return Ok(RunId::ResumePma { order });
        }
        if let Some(order) = fork_step(s, "ct-raw-") {
            return Ok(RunId::ContinuedRaw { order });
        }
        if let Some(order) = fork_step(s, "ct-pma-") {
            return Ok(RunId::ContinuedPma { order });
        }
        Err(format!("'{s}' is not a demo run"))
    }
}

impl PartialEq<RunId> for String {
    fn eq(&self, id: &RunId) -> bool {
        id.is(self)
    }
}

impl PartialEq<RunId> for str {
    fn eq(&self, id: &RunId) -> bool {
        id.is(self)
    }
}

/// The experiment a merge belongs to; a merge shared by several carries each tag once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tag {
    /// The method × N grid at a merge point of the trunk.
    Grid,
    /// The grid at the end step of an annealing fork, to predict it.
    Prediction,
    /// The N sweep.
    NSweep,
    /// The V sweep.
    VSweep,
    /// Merges inside an annealing branch.
    AnnealBranch,
    /// The MoE run's merges.
    Moe,
    /// The merge that initialises continued training.
    ContinuedInit,
    /// The merge that restarts the spiking run.
    SpikeInit,
    /// SMA and decay-emulating merges over the window of the shaped annealing forks.
    DecayEmulation,
}

impl Tag {
    /// Every tag.
    pub const ALL: [Tag; 9] = [
        Tag::Grid,
        Tag::Prediction,
        Tag::NSweep,
        Tag::VSweep,
        Tag::AnnealBranch,
        Tag::Moe,
        Tag::ContinuedInit,
        Tag::SpikeInit,
        Tag::DecayEmulation,
    ];

    /// The string in a merge record's `tags`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tag::Grid => "grid",
            Tag::Prediction => "prediction",
            Tag::NSweep => "n_sweep",
            Tag::VSweep => "v_sweep",
            Tag::AnnealBranch => "anneal_branch",
            Tag::Moe => "moe",
            Tag::ContinuedInit => "continued_init",
            Tag::SpikeInit => "spike_init",
            Tag::DecayEmulation => "decay_emulation",
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tag {
    type Err = String;
    fn from_str(s: &str) -> Result<Tag, String> {
        Tag::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("'{s}' is not a merge tag"))
    }
}

impl PartialEq<Tag> for String {
    fn eq(&self, tag: &Tag) -> bool {
        self == tag.as_str()
    }
}

/// Offsets added to the trunk's seed, so every run draws its own data order (and, for fresh runs,
/// its own init) while the whole demo stays a function of one seed. Annealing forks add their
/// start step on top, so forks from different steps differ.
pub(crate) mod seed_offset {
    /// The trunk and its annealing forks.
    pub(crate) const TRUNK: u64 = 0;
    /// The MoE run and its fork.
    pub(crate) const MOE: u64 = 1;
    /// Every run of the LR sweep (the same init and batches; only the LR differs).
    pub(crate) const SPIKE: u64 = 3;
    /// The resumptions after the spike, plus their data order: raw and PMA of one order see
    /// the same batches.
    pub(crate) const SPIKE_RESUME: u64 = 4;
    /// The continued-training runs, plus their data order times [`CONTINUED_ORDER_STRIDE`]:
    /// raw and PMA-init of one order see the same batches.
    pub(crate) const CONTINUED: u64 = 2;
    /// Between the continued-training data orders: clear of the resumptions' `4 + order`.
    pub(crate) const CONTINUED_ORDER_STRIDE: u64 = 1 << 16;
    /// Between the seeds of a multi-seed reproduction: far beyond every offset above and every
    /// fork's start step, so no run of one seed shares a seed with a run of another.
    pub(crate) const SEED_STRIDE: u64 = 1 << 32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_round_trip_through_their_names() {
        let all = [
            RunId::Trunk,
            RunId::Anneal { from: 300 },
            RunId::AnnealShaped {
                from: 300,
                shape: DecayShape::Linear,
            },
            RunId::AnnealShaped {
                from: 300,
                shape: DecayShape::OneMinusSqrt,
            },
            RunId::Moe,
            RunId::MoeAnneal { from: 0 },
            RunId::ContinuedRaw { order: 0 },
            RunId::ContinuedPma { order: 2 },
            RunId::LrSweep { index: 2 },
            RunId::ResumeRaw { order: 0 },
            RunId::ResumePma { order: 1 },
        ];
        let names: Vec<String> = all.iter().map(RunId::to_string).collect();
        assert_eq!(
            names,
            [
                "trunk",
                "anneal-300",
                "anneal-300-linear",
                "anneal-300-1-sqrt",
                "moe",
                "moe-anneal-0",
                "ct-raw-0",
                "ct-pma-2",
                "lr-sweep-2",
                "resume-raw-0",
                "resume-pma-1"
            ]
        );
        for (id, name) in all.iter().zip(&names) {
            assert_eq!(name.parse::<RunId>(), Ok(*id));
            assert!(*name == *id, "{name} == {id:?}");
            for other in all.iter().filter(|o| *o != id) {
                assert!(*name != *other, "{name} must not match {other:?}");
            }
        }
    }

    #[test]
    fn a_misspelt_run_or_tag_is_an_error_not_an_empty_match() {
        assert!("trunc".parse::<RunId>().is_err());
        assert!("anneal-".parse::<RunId>().is_err());
        assert!("anneal-0300".parse::<RunId>().is_err());
        assert!("anneal-x".parse::<RunId>().is_err());
        assert!("anneal-300-".parse::<RunId>().is_err());
        assert!("anneal-300-minus-sqrt".parse::<RunId>().is_err());
        assert!("anneal-0300-linear".parse::<RunId>().is_err());
        assert!("gird".parse::<Tag>().is_err());
        assert!(!RunId::Anneal { from: 300 }.is("anneal-0300"));
    }

    #[test]
    fn tags_round_trip_and_are_distinct() {
        for t in Tag::ALL {
            assert_eq!(t.as_str().parse::<Tag>(), Ok(t));
            assert!(t.as_str().to_string() == t);
        }
        let mut names: Vec<&str> = Tag::ALL.iter().map(|t| t.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Tag::ALL.len());
    }

    #[test]
    fn forks_know_their_base() {
        assert_eq!(RunId::Anneal { from: 40 }.base(), Some(RunId::Trunk));
        assert_eq!(RunId::MoeAnneal { from: 20 }.base(), Some(RunId::Moe));
        assert_eq!(RunId::Trunk.base(), None);
    }
}
