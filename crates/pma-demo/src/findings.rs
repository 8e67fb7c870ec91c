//! The paper's findings as checks on [`Results`].
//!
//! Each check reads only `results.json` data and states its rule up front, so a verdict can be
//! re-derived by hand. The rules were fixed before any run and are deliberately plain (a
//! comparison of two losses, a sign), with no tolerance chosen after seeing the numbers. A check
//! whose experiment did not run is left out rather than reported as held.

use crate::ids::{RunId, Tag};
use crate::results::{Finding, MergeRecord, Results, SeedFinding, SeedRun, SeedStudy};

/// Every check that has data, in report order.
pub fn derive_findings(r: &Results) -> Vec<Finding> {
    [
        merge_beats_newest(r, RunId::Trunk, Tag::Grid, "merge_beats_newest"),
        predicts_annealing(r),
        method_spread_shrinks(r),
        weighted_best_early(r),
        n_sweep(r),
        v_sweep(r),
        anneal_branch(r),
        decay_emulation(r),
        merge_beats_newest(r, RunId::Moe, Tag::Moe, "moe_merge_beats_newest"),
        continued(r),
        spike(r),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn fmt_loss(x: f64) -> String {
    format!("{x:.4}")
}

/// Grid points of the trunk, earliest first.
fn grid_points(r: &Results, run: RunId, tag: Tag) -> Vec<u64> {
    let mut points: Vec<u64> = r
        .merges
        .iter()
        .filter(|m| m.run == run && m.has_tag(tag))
        .map(|m| m.step)
        .collect();
    points.sort_unstable();
    points.dedup();
    points
}

fn best<'a>(merges: impl Iterator<Item = &'a MergeRecord>) -> Option<&'a MergeRecord> {
    merges.min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
}

fn at<'a>(
    r: &'a Results,
    run: RunId,
    tag: Tag,
    step: u64,
) -> impl Iterator<Item = &'a MergeRecord> + 'a {
    r.merges
        .iter()
        .filter(move |m| m.run == run && m.step == step && m.has_tag(tag))
}

/// Rule: at every merge point, the best merge has a lower validation loss than the newest raw
/// checkpoint at that point.
fn merge_beats_newest(r: &Results, run: RunId, tag: Tag, id: &str) -> Option<Finding> {
    let points = grid_points(r, run, tag);
    if points.is_empty() {
        return None;
    }
    let mut effect = f64::INFINITY;
    let mut parts = Vec::new();
    for step in points {
        let raw = r.checkpoint(run, step)?;
        let all: Vec<&MergeRecord> = at(r, run, tag, step).collect();
        let b = best(all.iter().copied())?;
        let n_better = all.iter().filter(|m| m.val_loss < raw.val_loss).count();
        effect = effect.min(raw.val_loss - b.val_loss);
        parts.push(format!(
            "step {step}: newest raw {} vs best merge {} (N={}) {} ({:+.4}; {n_better}/{} merges beat the raw checkpoint)",
            fmt_loss(raw.val_loss),
            b.label(),
            b.n,
            fmt_loss(b.val_loss),
            b.val_loss - raw.val_loss,
            all.len()
        ));
    }
    let what = if run == RunId::Moe {
        "For the MoE model, merging"
    } else {
        "Merging"
    };
    Some(Finding {
        id: id.into(),
        claim: format!("{what} the last N constant-LR checkpoints beats the newest checkpoint."),
        held: effect > 0.0,
        evidence: parts.join("; "),
        effect: Some(effect),
    })
}

/// Rule: the best merge at constant LR recovers at least half of the improvement annealing
/// brings over the raw checkpoint with the same token count.
fn predicts_annealing(r: &Results) -> Option<Finding> {
    if r.predictions.is_empty() {
        return None;
    }
    let mut effect = f64::INFINITY;
    let mut parts = Vec::new();
    for p in &r.predictions {
        // Without an annealing gain there is nothing to predict; that counts against the claim.
        let gain = p.raw_loss - p.annealed_loss;
        let gained = gain > 0.0;
        // In loss units: the merge's improvement beyond half the annealing gain.
        effect = effect
            .min(gain)
            .min((p.raw_loss - p.merge_loss) - 0.5 * gain);
        let share = if gained {
            format!(
                "merge recovers {:.0}% of the annealing gain",
                100.0 * p.recovered_fraction
            )
        } else {
            "annealing did not beat the raw checkpoint here".into()
        };
        parts.push(format!(
            "{} step {}: raw {}, merge {}, annealed {} (gap {:+.4}; {share})",
            p.run,
            p.step,
            fmt_loss(p.raw_loss),
            fmt_loss(p.merge_loss),
            fmt_loss(p.annealed_loss),
            p.gap,
        ));
    }
    Some(Finding {
        id: "merge_predicts_annealing".into(),
        claim: "A merge of constant-LR checkpoints approximates the annealed model at the same token count (rule: it recovers at least half of the raw-to-annealed improvement).".into(),
        held: effect > 0.0,
        evidence: parts.join("; "),
        effect: Some(effect),
    })
}

fn spread(ms: &[&MergeRecord]) -> f64 {
    let lo = ms.iter().map(|m| m.val_loss).fold(f64::INFINITY, f64::min);
    let hi = ms
        .iter()
        .map(|m| m.val_loss)
        .fold(f64::NEG_INFINITY, f64::max);
    hi - lo
}

/// Rule: at a common N, the spread between methods (max − min loss) is smaller at the last grid
/// point than at the first.
fn method_spread_shrinks(r: &Results) -> Option<Finding> {
    let points = grid_points(r, RunId::Trunk, Tag::Grid);
    let (&early, &late) = (points.first()?, points.last()?);
    if early == late {
        return None;
    }
    let n = *r
        .config
        .ns
        .iter()
        .filter(|&&n| at(r, RunId::Trunk, Tag::Grid, early).any(|m| m.n == n))
        .max()?;
    let e: Vec<&MergeRecord> = at(r, RunId::Trunk, Tag::Grid, early)
        .filter(|m| m.n == n)
        .collect();
    let l: Vec<&MergeRecord> = at(r, RunId::Trunk, Tag::Grid, late)
        .filter(|m| m.n == n)
        .collect();
    if e.len() < 2 || l.len() < 2 {
        return None;
    }
    let (se, sl) = (spread(&e), spread(&l));
    Some(Finding {
        id: "method_differences_shrink".into(),
        claim: "Differences between SMA, EMA and WMA are larger early in training and vanish late."
            .into(),
        held: sl < se,
        evidence: format!(
            "N={n}: spread across methods {:.4} at step {early}, {:.4} at step {late}",
            se, sl
        ),
        effect: Some(se - sl),
    })
}

/// Rule: at the first grid point and the largest common N, the best method is WMA or the EMA
/// with the highest alpha (the ones that weight recent checkpoints most).
fn weighted_best_early(r: &Results) -> Option<Finding> {
    let points = grid_points(r, RunId::Trunk, Tag::Grid);
    let &early = points.first()?;
    let n = *r
        .config
        .ns
        .iter()
        .filter(|&&n| at(r, RunId::Trunk, Tag::Grid, early).any(|m| m.n == n))
        .max()?;
    let ms: Vec<&MergeRecord> = at(r, RunId::Trunk, Tag::Grid, early)
        .filter(|m| m.n == n)
        .collect();
    let b = best(ms.iter().copied())?;
    let max_alpha = ms
        .iter()
        .filter_map(|m| m.alpha)
        .fold(f64::NEG_INFINITY, f64::max);
    let weighted = |m: &&MergeRecord| m.method == "wma" || m.alpha == Some(max_alpha);
    let best_of = |w: bool| {
        ms.iter()
            .filter(|m| weighted(m) == w)
            .map(|m| m.val_loss)
            .fold(f64::INFINITY, f64::min)
    };
    // How much better the best recent-weighted merge is than the best of the others.
    let effect = best_of(false) - best_of(true);
    let held = weighted(&b);
    let table: Vec<String> = ms
        .iter()
        .map(|m| format!("{} {}", m.label(), fmt_loss(m.val_loss)))
        .collect();
    Some(Finding {
        id: "weighted_best_early".into(),
        claim: "Early in training, methods that weight recent checkpoints more (WMA, EMA with a higher alpha) merge best.".into(),
        held,
        evidence: format!("step {early}, N={n}: {} (best: {})", table.join(", "), b.label()),
        effect: Some(effect),
    })
}

/// Rule: at the first point the largest N is worse than the smallest; at the last point it is
/// better.
fn n_sweep(r: &Results) -> Option<Finding> {
    let points = grid_points(r, RunId::Trunk, Tag::NSweep);
    let (&early, &late) = (points.first()?, points.last()?);
    if early == late {
        return None;
    }
    let line = |step: u64| -> Vec<&MergeRecord> {
        let mut v: Vec<&MergeRecord> = at(r, RunId::Trunk, Tag::NSweep, step).collect();
        v.sort_by_key(|m| m.n);
        v
    };
    let (e, l) = (line(early), line(late));
    let (e0, e1, l0, l1) = (e.first()?, e.last()?, l.first()?, l.last()?);
    let effect = (e1.val_loss - e0.val_loss).min(l0.val_loss - l1.val_loss);
    let held = e1.val_loss > e0.val_loss && l1.val_loss < l0.val_loss;
    let fmt = |v: &[&MergeRecord]| {
        v.iter()
            .map(|m| format!("N={} {}", m.n, fmt_loss(m.val_loss)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(Finding {
        id: "large_n_hurts_early_helps_late".into(),
        claim: "A large N hurts early in training and helps late (SMA, V = K).".into(),
        held,
        evidence: format!("step {early}: {}; step {late}: {}", fmt(&e), fmt(&l)),
        effect: Some(effect),
    })
}

/// Rule: at the first point the largest interval is worse than the smallest.
fn v_sweep(r: &Results) -> Option<Finding> {
    let points = grid_points(r, RunId::Trunk, Tag::VSweep);
    let &early = points.first()?;
    let line = |step: u64| -> Vec<&MergeRecord> {
        let mut v: Vec<&MergeRecord> = at(r, RunId::Trunk, Tag::VSweep, step).collect();
        v.sort_by_key(|m| m.interval);
        v
    };
    let e = line(early);
    let (e0, e1) = (e.first()?, e.last()?);
    if e0.interval == e1.interval {
        return None;
    }
    let fmt = |v: &[&MergeRecord]| {
        v.iter()
            .map(|m| format!("V={} {}", m.interval, fmt_loss(m.val_loss)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let late = *points.last()?;
    let late_text = if late != early {
        format!("; step {late}: {}", fmt(&line(late)))
    } else {
        String::new()
    };
    Some(Finding {
        id: "large_v_hurts_early".into(),
        claim: format!(
            "Early in training, too large an interval V pulls in unstable weights (SMA, N = {}).",
            e0.n
        ),
        held: e1.val_loss > e0.val_loss,
        evidence: format!("step {early}: {}{late_text}", fmt(&e)),
        effect: Some(e1.val_loss - e0.val_loss),
    })
}

/// Rule: inside each annealing branch, the best merge ending at its last checkpoint is no worse
/// than that checkpoint.
fn anneal_branch(r: &Results) -> Option<Finding> {
    let mut parts = Vec::new();
    let mut effect = f64::INFINITY;
    for a in &r.annealed {
        let ms: Vec<&MergeRecord> = r
            .merges_tagged(Tag::AnnealBranch)
            .filter(|m| m.run == a.run)
            .collect();
        let Some(b) = best(ms.iter().copied()) else {
            continue;
        };
        effect = effect.min(a.val_loss - b.val_loss);
        parts.push(format!(
            "{}: annealed {} vs best in-branch merge {} (N={}) {} ({:+.4})",
            a.run,
            fmt_loss(a.val_loss),
            b.label(),
            b.n,
            fmt_loss(b.val_loss),
            b.val_loss - a.val_loss
        ));
    }
    if parts.is_empty() {
        return None;
    }
    Some(Finding {
        id: "merge_during_annealing".into(),
        claim: "Merging the last checkpoints of the annealing branch is no worse than its final checkpoint (the paper sees small or no gains once the LR is annealed).".into(),
        held: effect >= 0.0,
        evidence: parts.join("; "),
        effect: Some(effect),
    })
}

/// Rule: for every decay shape whose merge weights differ from SMA's, the merge weighted by that
/// shape over the fork's window is closer (absolute validation-loss difference) to the fork
/// that decays with that shape than the SMA merge of the same window is. A shape whose weights
/// are SMA's (linear) cannot differ and is shown but not judged; with no other shape the check
/// is left out.
fn decay_emulation(r: &Results) -> Option<Finding> {
    let judged: Vec<_> = r
        .decay_emulation
        .iter()
        .filter(|d| !d.same_as_sma)
        .collect();
    if judged.is_empty() {
        return None;
    }
    let effect = judged
        .iter()
        .map(|d| d.sma_gap() - d.decay_gap())
        .fold(f64::INFINITY, f64::min);
    let parts: Vec<String> = r
        .decay_emulation
        .iter()
        .map(|d| {
            if d.same_as_sma {
                return format!(
                    "{}: annealed {}; its decay-{} merge weighs like SMA, {} (|gap| {:.4}), not judged",
                    d.fork_run,
                    fmt_loss(d.annealed_loss),
                    d.shape,
                    fmt_loss(d.sma_loss),
                    d.sma_gap()
                );
            }
            format!(
                "{}: annealed {} vs decay-{} merge {} (|gap| {:.4}) and SMA {} (|gap| {:.4})",
                d.fork_run,
                fmt_loss(d.annealed_loss),
                d.shape,
                fmt_loss(d.decay_loss),
                d.decay_gap(),
                fmt_loss(d.sma_loss),
                d.sma_gap()
            )
        })
        .collect();
    Some(Finding {
        id: "decay_merge_emulates_its_shape".into(),
        claim: "A merge weighted by an LR decay shape (WSM) predicts the model annealed with that shape over the same steps better than SMA of the same checkpoints does.".into(),
        held: effect > 0.0,
        evidence: parts.join("; "),
        effect: Some(effect),
    })
}

/// Rule: over the data orders, continued training from the merge has a steadier start (the
/// standard deviation of its gradient norm over the first quarter of the steps is lower, on
/// average over the orders) and ends no worse: the mean of (raw − PMA) final held-out loss is at
/// least minus its standard deviation across orders, so a deficit within data-order noise does
/// not count against it. The effect is that mean final-loss difference.
fn continued(r: &Results) -> Option<Finding> {
    let c = r.continued.as_ref()?;
    if c.orders.is_empty() {
        return None;
    }
    let finals: Vec<(f64, f64)> = c.orders.iter().map(|o| o.final_heldout_loss()).collect();
    let diffs: Vec<f64> = finals.iter().map(|(raw, pma)| raw - pma).collect();
    let (m, sd) = mean_std(&diffs);
    let steadier = mean_of(c.orders.iter().map(|o| {
        let (raw, pma) = o.early_grad_norm_std;
        raw - pma
    }));
    let sd_or_zero = if sd.is_nan() { 0.0 } else { sd };
    let held = steadier > 0.0 && m >= -sd_or_zero;
    let per_order: Vec<String> = c
        .orders
        .iter()
        .zip(&finals)
        .map(|(o, (raw, pma))| {
            format!(
                "order {}: final raw {} / PMA {}, early grad-norm std raw {:.3} / PMA {:.3}",
                o.order,
                fmt_loss(*raw),
                fmt_loss(*pma),
                o.early_grad_norm_std.0,
                o.early_grad_norm_std.1
            )
        })
        .collect();
    Some(Finding {
        id: "pma_init_continued_training".into(),
        claim: "PMA-init (starting continued training from a merge) starts steadier (lower gradient-norm spread early) and ends no worse than starting from the newest checkpoint.".into(),
        held,
        evidence: format!(
            "held-out loss of the inits: raw {} / PMA {}; {} steps ({}); {}; mean final (raw − PMA) {:+.4} ± {:.4} over {} orders; mean early grad-norm std (raw − PMA) {:+.3}",
            fmt_loss(c.initial_heldout_loss.0),
            fmt_loss(c.initial_heldout_loss.1),
            r.config.continued.steps,
            c.schedule,
            per_order.join("; "),
            m,
            sd_or_zero,
            c.orders.len(),
            steadier
        ),
        effect: Some(m),
    })
}

fn mean_of(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    mean_std(&v).0
}

/// Mean and sample standard deviation (n − 1); the deviation is NaN for fewer than two values.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let m = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (m, f64::NAN);
    }
    let var = values.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
    (m, var.sqrt())
}

/// The findings a seed of the trunk study decides on its own, and which the full reproduction
/// therefore repeats over seeds.
pub const TRUNK_FINDINGS: [&str; 8] = [
    "merge_beats_newest",
    "merge_predicts_annealing",
    "method_differences_shrink",
    "weighted_best_early",
    "large_n_hurts_early_helps_late",
    "large_v_hurts_early",
    "merge_during_annealing",
    "decay_merge_emulates_its_shape",
];

/// The seed rule, fixed in code before any run.
pub const SEED_RULE: &str = "Each trunk-level finding has an effect per seed, in nats per byte, positive when its claim held in that seed. Over the seeds, it holds only when every seed measured it and the mean effect exceeds the spread: the sample standard deviation of the effects across seeds.";

/// Each trunk-level finding over the seeds, by [`SEED_RULE`].
pub fn seed_findings(seeds: &[SeedRun]) -> Vec<SeedFinding> {
    TRUNK_FINDINGS
        .iter()
        .filter(|id| {
            seeds
                .iter()
                .any(|s| s.findings.iter().any(|f| f.id == **id))
        })
        .map(|id| {
            let effects: Vec<f64> = seeds
                .iter()
                .map(|s| {
                    s.findings
                        .iter()
                        .find(|f| f.id == *id)
                        .and_then(|f| f.effect)
                        .unwrap_or(f64::NAN)
                })
                .collect();
            let (mean, std) = mean_std(&effects);
            SeedFinding {
                id: (*id).into(),
                held: effects.iter().all(|e| e.is_finite()) && mean > std,
                effects,
                mean,
                std,
            }
        })
        .collect()
}

/// Replaces each trunk-level finding's verdict with its verdict over the seeds, and adds the
/// per-seed numbers to its evidence.
pub fn apply_seed_verdicts(findings: &mut [Finding], study: &SeedStudy) {
    for sf in &study.findings {
        let Some(f) = findings.iter_mut().find(|f| f.id == sf.id) else {
            continue;
        };
        let effects: Vec<String> = study
            .seeds
            .iter()
            .zip(&sf.effects)
            .map(|(s, e)| format!("seed {} {e:+.4}", s.seed))
            .collect();
        f.held = sf.held;
        f.evidence = format!(
            "Seed {}: {}. Over {} seeds, effect {} (mean {:+.4}, spread {:.4}): the mean {} the spread.",
            study.seeds.first().map_or(0, |s| s.seed),
            f.evidence,
            study.seeds.len(),
            effects.join(", "),
            sf.mean,
            sf.std,
            if sf.held { "exceeds" } else { "does not exceed" }
        );
    }
}

/// Rule: over the data orders, resumptions at the spiking LR from the PMA merge spike again in
/// fewer orders than resumptions from the newest pre-spike checkpoint, and end with a mean
/// validation loss no worse (a diverged run counts as infinite). Left out when the sweep found
/// no spike to rescue.
fn spike(r: &Results) -> Option<Finding> {
    let s = r.spike.as_ref()?.rescue.as_ref()?;
    let (raw_spikes, orders) = s.respikes(false);
    let (pma_spikes, _) = s.respikes(true);
    let (raw_loss, pma_loss) = (s.mean_final_loss(false), s.mean_final_loss(true));
    let show = |x: f64| {
        if x.is_finite() {
            fmt_loss(x)
        } else {
            "diverged".into()
        }
    };
    Some(Finding {
        id: "pma_init_avoids_respike".into(),
        claim: "After a loss spike at a high constant LR, resuming from a PMA merge of the checkpoints before it spikes again less often than resuming from the last checkpoint, and ends no worse.".into(),
        held: pma_spikes < raw_spikes && pma_loss <= raw_loss,
        evidence: format!(
            "{} spiked at step {} at LR {:e}; resumed at that LR over {orders} data orders: from the step-{} checkpoint (val {}) {raw_spikes}/{orders} spiked again, mean final val {}; from {} (val {}) {pma_spikes}/{orders} spiked again, mean final val {}",
            s.run,
            s.spike_step,
            s.lr,
            s.pre_spike_step,
            fmt_loss(s.pre_spike_val_loss),
            show(raw_loss),
            s.merge_id,
            fmt_loss(s.merge_val_loss),
            show(pma_loss),
        ),
        // Counts of re-spikes and a loss are not one unit.
        effect: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Profile, Scale};
    use crate::results::{CheckpointRecord, EvalInfo, Metrics, RESULTS_SCHEMA_VERSION};

    fn metrics(v: f64) -> Metrics {
        Metrics {
            val_loss: v,
            ppl: v.exp(),
            bpb: v / std::f64::consts::LN_2,
            accuracy: 0.5,
        }
    }

    fn empty() -> Results {
        Results {
            schema_version: RESULTS_SCHEMA_VERSION,
            pma_version: "test".into(),
            scope: "demo".into(),
            profile: "tiny".into(),
            seed: 0,
            config: Profile::new(Scale::Tiny),
            eval: EvalInfo {
                data: "x".into(),
                n_tokens: 1,
                seq_len: 2,
            },
            runs: vec![],
            checkpoints: vec![],
            merges: vec![],
            annealed: vec![],
            predictions: vec![],
            decay_emulation: Vec::new(),
            continued: None,
            spike: None,
            seeds: None,
            findings: vec![],
            timings: vec![],
            elapsed_secs: 0.0,
        }
    }

    fn ckpt(step: u64, v: f64) -> CheckpointRecord {
        CheckpointRecord {
            run: RunId::Trunk.to_string(),
            step,
            global_step: step,
            tokens: step,
            val_loss: v,
            metrics: metrics(v),
            path: String::new(),
        }
    }

    fn merge(method: &str, alpha: Option<f64>, n: usize, step: u64, v: f64) -> MergeRecord {
        MergeRecord {
            id: format!("{method}{alpha:?}-{n}-{step}"),
            tags: vec![Tag::Grid.to_string()],
            run: RunId::Trunk.to_string(),
            method: method.into(),
            alpha,
            n,
            interval: 5,
            step,
            global_step: step,
            tokens: step,
            members: vec![],
            weights: vec![],
            val_loss: v,
            metrics: metrics(v),
            path: String::new(),
        }
    }

    fn finding(id: &str, effect: f64) -> Finding {
        Finding {
            id: id.into(),
            claim: String::new(),
            held: effect > 0.0,
            evidence: "e".into(),
            effect: Some(effect),
        }
    }

    fn seed(seed: u64, findings: Vec<Finding>) -> SeedRun {
        SeedRun {
            seed,
            dir: format!("seeds/seed-{seed}"),
            runs: vec![],
            checkpoints: vec![],
            merges: vec![],
            annealed: vec![],
            predictions: vec![],
            findings,
        }
    }

    #[test]
    fn a_finding_holds_over_seeds_only_beyond_their_spread() {
        let seeds = vec![
            seed(
                0,
                vec![
                    finding("merge_beats_newest", 0.03),
                    finding("large_v_hurts_early", 0.02),
                ],
            ),
            seed(
                1,
                vec![
                    finding("merge_beats_newest", 0.01),
                    finding("large_v_hurts_early", -0.03),
                ],
            ),
            seed(2, vec![finding("merge_beats_newest", 0.02)]),
        ];
        let sf = seed_findings(&seeds);
        assert_eq!(sf.len(), 2);
        // Mean 0.02, spread 0.01: held.
        assert_eq!(sf[0].id, "merge_beats_newest");
        assert!((sf[0].mean - 0.02).abs() < 1e-12 && (sf[0].std - 0.01).abs() < 1e-12);
        assert!(sf[0].held);
        // Missing in one seed: not held, whatever the others say.
        assert_eq!(sf[1].id, "large_v_hurts_early");
        assert!(sf[1].effects[2].is_nan() && !sf[1].held);
        // Positive in every seed but within the spread: not held.
        let noisy = vec![
            seed(0, vec![finding("merge_beats_newest", 0.001)]),
            seed(1, vec![finding("merge_beats_newest", 0.05)]),
        ];
        let sf = seed_findings(&noisy);
        assert!(sf[0].mean > 0.0 && !sf[0].held, "{sf:?}");
        let mut findings = vec![finding("merge_beats_newest", 0.001)];
        let study = SeedStudy {
            rule: SEED_RULE.into(),
            seeds: noisy,
            findings: sf,
        };
        apply_seed_verdicts(&mut findings, &study);
        assert!(!findings[0].held);
        assert!(
            findings[0].evidence.contains("Over 2 seeds"),
            "{}",
            findings[0].evidence
        );
    }

    #[test]
    fn pma_init_must_start_steadier_and_end_no_worse_beyond_order_noise() {
        let order = |i: u64, raw: f64, pma: f64, gn: (f64, f64)| crate::results::ContinuedOrder {
            order: i,
            raw_run: format!("ct-raw-{i}"),
            merge_run: format!("ct-pma-{i}"),
            heldout_curve: vec![(0, 2.0, 1.9), (8, raw, pma)],
            early_grad_norm_std: gn,
            max_grad_norm: (1.0, 1.0),
        };
        let mut r = empty();
        r.continued = Some(crate::results::ContinuedRecord {
            data: "x".into(),
            schedule: "cosine".into(),
            from_step: 60,
            merge_id: "m".into(),
            initial_heldout_loss: (2.0, 1.9),
            // PMA ends a little worse on average, within the orders' spread; steadier.
            orders: vec![
                order(0, 1.50, 1.52, (0.2, 0.1)),
                order(1, 1.50, 1.47, (0.2, 0.1)),
                order(2, 1.50, 1.52, (0.2, 0.1)),
            ],
        });
        let f = continued(&r).unwrap();
        assert!(f.held, "{}", f.evidence);
        assert!(f.effect.unwrap() < 0.0);
        // Worse in every order by the same margin: no spread to hide in.
        let c = r.continued.as_mut().unwrap();
        for o in &mut c.orders {
            o.heldout_curve[1].2 = 1.52;
        }
        assert!(!continued(&r).unwrap().held);
        // Better at the end but not steadier: not held either.
        for o in &mut r.continued.as_mut().unwrap().orders {
            o.heldout_curve[1].2 = 1.4;
            o.early_grad_norm_std = (0.1, 0.2);
        }
        assert!(!continued(&r).unwrap().held);
    }

    #[test]
    fn no_data_no_findings() {
        assert!(derive_findings(&empty()).is_empty());
    }

    #[test]
    fn decay_emulation_needs_every_shape_closer_than_sma() {
        let rec = |shape: &str, decay_loss: f64| crate::results::DecayEmulationRecord {
            shape: shape.into(),
            fork_run: format!("anneal-40-{shape}"),
            from_step: 40,
            step: 60,
            annealed_loss: 2.0,
            raw_loss: 2.3,
            sma_loss: 2.1,
            decay_merge_id: format!("trunk-decay-{shape}-n5-v5-s0000060"),
            decay_loss,
            same_as_sma: shape == "linear",
        };
        let mut r = empty();
        // Linear weighs like SMA: shown, not judged, so alone it makes no finding.
        r.decay_emulation = vec![rec("linear", 2.1)];
        assert!(derive_findings(&r).is_empty());
        r.decay_emulation.push(rec("cosine", 1.96));
        let f = derive_findings(&r);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].id, "decay_merge_emulates_its_shape");
        assert!(f[0].held, "{}", f[0].evidence);
        // Overshooting the annealed loss by more than SMA misses it counts as a miss.
        r.decay_emulation.push(rec("1-sqrt", 1.85));
        let f = derive_findings(&r);
        assert!(!f[0].held, "{}", f[0].evidence);
        assert!(f[0].evidence.contains("anneal-40-1-sqrt"));
    }

    #[test]
    fn merge_beats_newest_needs_every_point() {
        let mut r = empty();
        r.checkpoints = vec![ckpt(30, 2.0), ckpt(60, 1.8)];
        r.merges = vec![
            merge("sma", None, 3, 30, 1.9),
            merge("sma", None, 3, 60, 1.85),
        ];
        let f = merge_beats_newest(&r, RunId::Trunk, Tag::Grid, "x").unwrap();
        assert!(!f.held, "{}", f.evidence);
        r.merges[1].val_loss = 1.7;
        assert!(
            merge_beats_newest(&r, RunId::Trunk, Tag::Grid, "x")
                .unwrap()
                .held
        );
    }

    #[test]
    fn spread_and_early_winner() {
        let mut r = empty();
        r.merges = vec![
            merge("sma", None, 3, 30, 2.0),
            merge("ema", Some(0.2), 3, 30, 1.9),
            merge("wma", None, 3, 30, 1.8),
            merge("sma", None, 3, 60, 1.50),
            merge("ema", Some(0.2), 3, 60, 1.51),
            merge("wma", None, 3, 60, 1.52),
        ];
        assert!(method_spread_shrinks(&r).unwrap().held);
        assert!(weighted_best_early(&r).unwrap().held);
        r.merges[0].val_loss = 1.0;
        assert!(!weighted_best_early(&r).unwrap().held);
    }
}
