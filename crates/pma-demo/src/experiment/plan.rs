//! Pure planning: which merges each study makes, from the profile alone.

use pma_merge::{DecayShape, WeightSpec};

use crate::ids::{RunId, Tag};
use crate::profile::{Profile, Scope};

/// One merge to make: `n` checkpoints of `run`, `interval` steps apart, the newest at `step`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MergeSpec {
    pub(crate) run: RunId,
    pub(crate) method: WeightSpec,
    pub(crate) n: usize,
    pub(crate) interval: u64,
    pub(crate) step: u64,
    pub(crate) tag: Tag,
}

pub(super) fn grid_methods(p: &Profile) -> Vec<WeightSpec> {
    let mut m = vec![WeightSpec::Sma];
    m.extend(p.ema_alphas.iter().map(|&alpha| WeightSpec::Ema { alpha }));
    m.push(WeightSpec::Wma);
    m
}

/// Whether `n` checkpoints `interval` apart, the newest at `step`, all exist in a run that
/// saves every `k` steps from `k` on.
pub(super) fn fits(n: usize, interval: u64, step: u64, k: u64) -> bool {
    let span = interval * (n as u64 - 1);
    step >= span + k && interval % k == 0
}

/// The trunk merges: the method × N grid at every merge point and at the end of every fork's
/// matched step; in the reproduction also the N and V sweeps at the first and last points.
pub(crate) fn trunk_merge_specs(p: &Profile, scope: Scope) -> Vec<MergeSpec> {
    let k = p.save_every;
    let mut specs = Vec::new();
    let mut points = p.merge_points.clone();
    for &f in &p.anneal_from {
        let e = f + p.decay_steps;
        if e <= p.trunk_steps && e % k == 0 && !points.contains(&e) {
            points.push(e);
        }
    }
    points.sort_unstable();
    for &step in &points {
        let tag = if p.merge_points.contains(&step) {
            Tag::Grid
        } else {
            Tag::Prediction
        };
        for method in grid_methods(p) {
            for &n in &p.ns {
                if fits(n, k, step, k) {
                    specs.push(MergeSpec {
                        run: RunId::Trunk,
                        method: method.clone(),
                        n,
                        interval: k,
                        step,
                        tag,
                    });
                }
            }
        }
    }
    if scope == Scope::Reproduce {
        let ends = [
            p.merge_points[0],
            *p.merge_points.last().expect("validated non-empty"),
        ];
        for step in ends {
            for &n in &p.sweep_ns {
                if fits(n, k, step, k) {
                    specs.push(MergeSpec {
                        run: RunId::Trunk,
                        method: WeightSpec::Sma,
                        n,
                        interval: k,
                        step,
                        tag: Tag::NSweep,
                    });
                }
            }
            for &m in &p.sweep_v_multiples {
                let interval = m * k;
                if fits(p.sweep_v_n, interval, step, k) {
                    specs.push(MergeSpec {
                        run: RunId::Trunk,
                        method: WeightSpec::Sma,
                        n: p.sweep_v_n,
                        interval,
                        step,
                        tag: Tag::VSweep,
                    });
                }
            }
        }
    }
    specs
}

/// The decay-emulation study's trunk merges: over the window of the shaped forks, every
/// checkpoint from the forks' start to their end (N = D/K + 1, V = K), weighted by SMA and by
/// each decay shape. A decay-shape merge of that window stands for the fork that decays with
/// the same shape over the same steps (WSM, arXiv 2507.17634).
pub(crate) fn decay_emulation_specs(p: &Profile, scope: Scope) -> Vec<MergeSpec> {
    let Some(from) = p.shape_forks_from.filter(|_| scope == Scope::Reproduce) else {
        return Vec::new();
    };
    let k = p.save_every;
    let n = (p.decay_steps / k) as usize + 1;
    let step = from + p.decay_steps;
    std::iter::once(WeightSpec::Sma)
        .chain(DecayShape::ALL.map(|shape| WeightSpec::Decay { shape }))
        .map(|method| MergeSpec {
            run: RunId::Trunk,
            method,
            n,
            interval: k,
            step,
            tag: Tag::DecayEmulation,
        })
        .collect()
}

/// Merges inside an annealing branch, ending at its last checkpoint.
pub(super) fn branch_merge_specs(p: &Profile, run: RunId, last_step: u64) -> Vec<MergeSpec> {
    let k = p.save_every;
    let mut specs = Vec::new();
    for method in grid_methods(p) {
        for &n in &p.ns {
            if fits(n, k, last_step, k) {
                specs.push(MergeSpec {
                    run,
                    method: method.clone(),
                    n,
                    interval: k,
                    step: last_step,
                    tag: Tag::AnnealBranch,
                });
            }
        }
    }
    specs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Scale;

    #[test]
    fn grid_specs_only_use_existing_checkpoints() {
        let p = Profile::new(Scale::Quick);
        for spec in trunk_merge_specs(&p, Scope::Reproduce) {
            let oldest = spec.step as i64 - spec.interval as i64 * (spec.n as i64 - 1);
            assert!(oldest >= p.save_every as i64, "{spec:?}");
            assert_eq!(spec.step % p.save_every, 0);
            assert!(spec.step <= p.trunk_steps);
        }
    }

    #[test]
    fn quick_grid_has_every_method_and_n_at_the_late_point() {
        let p = Profile::new(Scale::Quick);
        let specs = trunk_merge_specs(&p, Scope::Demo);
        let last = *p.merge_points.last().unwrap();
        let late: Vec<_> = specs.iter().filter(|s| s.step == last).collect();
        assert_eq!(late.len(), 3 * p.ns.len());
    }

    #[test]
    fn decay_emulation_merges_span_the_forks_window() {
        let p = Profile::new(Scale::Full);
        assert!(decay_emulation_specs(&p, Scope::Demo).is_empty());
        let specs = decay_emulation_specs(&p, Scope::Reproduce);
        let names: Vec<&str> = specs.iter().map(|s| s.method.name()).collect();
        assert_eq!(
            names,
            ["sma", "decay-linear", "decay-cosine", "decay-1-sqrt"]
        );
        let from = p.shape_forks_from.unwrap();
        for s in &specs {
            // Oldest member: the checkpoint the forks start from; newest: where they end.
            assert_eq!(s.step, from + p.decay_steps);
            assert_eq!(s.step - s.interval * (s.n as u64 - 1), from);
            assert!(fits(s.n, s.interval, s.step, p.save_every));
        }
    }

    #[test]
    fn fits_counts_the_oldest_member() {
        // N=10 at step 200 with K=V=20 needs steps 20..=200.
        assert!(fits(10, 20, 200, 20));
        assert!(!fits(11, 20, 200, 20));
        assert!(!fits(3, 30, 200, 20));
    }
}
